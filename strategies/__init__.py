"""Server strategies: one file each, registered here by the name used in configs."""

from strategies.fedavg import FedAvgPEFT

REGISTRY = {
    "fedavg": FedAvgPEFT,
}

__all__ = ["REGISTRY", "FedAvgPEFT"]
