"""FlexLoRA: average the clients' full LoRA updates, give each client the SVD at its rank.

Bai et al. 2024, "Federated Fine-tuning of Large Language Models under Heterogeneous
Tasks and Client Resources" (FlexLoRA). For every adapted matrix the server forms each
client's product ``B_k A_k`` (its factors after local training), averages them,

    G = G_old + server_lr * (sum_k c_k B_k A_k - G_old),      (server_lr = 1: the paper)

and keeps the rank-R truncated SVD of G split as ``B = U_R sqrt(S_R)``,
``A = sqrt(S_R) V_R^T``; client k receives its first r_k slices, which are exactly the
rank-r_k truncated SVD. The head is averaged as in FedAvg. The SVDs' wall time is
reported each round (``flex-svd-seconds``), with the share of G's energy the rank-R
truncation keeps (``flex-energy-kept``).

Sending, validation and rank bookkeeping are HetLoRA's (strategies/hetlora.py); only the
aggregation differs.
"""

from __future__ import annotations

from fedpeft.state import State
from strategies.fedavg import Accepted
from strategies.hetlora import HetLoRA
from strategies.lora_hetero import flex_average


class FlexLoRA(HetLoRA):
    """Unequal-rank LoRA aggregated through the averaged full update and its truncated SVD."""

    def aggregate_factors(self, accepted: Accepted, weights: list[float], rule) -> tuple[State, dict[str, float]]:
        """Rank-R truncated SVD of the averaged products; the head averaged as in FedAvg."""
        return flex_average(
            self.current,
            [d for _, d, _ in accepted],
            weights,
            self.max_rank,
            server_lr=self.server_lr,
            coefficients=rule,
        )
