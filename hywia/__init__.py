"""HyWIA structured pruning for LLaMA-family models, exported as dense checkpoints vLLM serves."""

from hywia.registration import register_when_transformers_loads

__version__ = "0.1.0"

# Per-layer exports load with transformers' Auto classes once hywia is imported (README), at no cost
# to `import hywia` itself: the registration runs when transformers loads its Auto classes.
register_when_transformers_loads()
