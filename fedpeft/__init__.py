"""fedpeft: federated fine-tuning of PEFT adapters on frozen, quantized backbones, on Flower."""

__version__ = "0.1.0"
