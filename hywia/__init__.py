"""HyWIA structured pruning for LLaMA-family models, exported as dense checkpoints vLLM serves."""

__version__ = "0.1.0"
