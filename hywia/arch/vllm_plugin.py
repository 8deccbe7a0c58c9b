"""vLLM plugin: makes `vllm serve EXPORT` (and our in-process engine) load per-layer exports.

Declared as the `vllm.general_plugins` entry point `hywia = "hywia.arch.vllm_plugin:register"`.
vLLM calls `register()` in every process that may build or inspect a model (front end, engine
core, workers), possibly several times per process, so it must be idempotent and cheap.
"""

from __future__ import annotations

# Importing hywia.arch also registers the config with transformers' AutoConfig, which vLLM needs
# before it reads config.json ("model_type": "hywia_llama"); that registration is idempotent.
from hywia.arch import ARCHITECTURE

_MODEL_CLASS = "hywia.arch.vllm_model:HywiaLlamaForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    # A "module:Class" string: vLLM imports the model code lazily, in the process that needs it.
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, _MODEL_CLASS)
