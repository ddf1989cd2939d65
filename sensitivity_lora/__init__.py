"""sensitivity-lora: Hessian-sensitivity rank allocation for LoRA."""
__version__ = "0.1.0"
