"""One thread budget per process: torch's intra-op threads and numpy's BLAS threads together."""

import numpy as np
import torch
from threadpoolctl import threadpool_info

from fedpeft.task import set_threads


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_set_threads_limits_numpy_blas_as_well_as_torch():
    before = torch.get_num_threads()
    np.linalg.svd(np.ones((4, 4)))  # numpy's BLAS is loaded
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        assert blas_threads() and set(blas_threads()) == {1}
    finally:
        set_threads(before)
