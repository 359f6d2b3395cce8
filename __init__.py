"""hsplit: plan and run heterogeneous split-federated LoRA fine-tuning."""
__version__ = "0.1.0"
