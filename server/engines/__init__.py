"""Engines behind one interface (`base.Engine`): `vllm` (AsyncLLM) and `torch` (built in)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hywia.errors import HywiaError
from server.engines.base import Engine, EngineSettings

ENGINE_CHOICES = ("auto", "vllm", "torch")


def resolve_engine_kind(requested: str) -> str:
    """`auto` means vLLM where it is installed, else the built-in torch engine."""
    from server.engines.vllm_engine import vllm_importable

    if requested == "auto":
        return "vllm" if vllm_importable() else "torch"
    if requested == "vllm" and not vllm_importable():
        raise HywiaError("--engine vllm was asked for, but vLLM is not installed in this environment",
                         "install the vLLM flavour (`make venv` does), or use --engine torch")
    return requested


async def start_engine(kind: str, directory: Path, settings: EngineSettings, model_id: str) -> Engine:
    """Load DIRECTORY into an engine of KIND without blocking the event loop."""
    if kind == "vllm":
        from server.engines.vllm_engine import VllmEngine

        return await asyncio.to_thread(VllmEngine.load, directory, settings, model_id)
    from server.engines.torch_engine import TorchEngine

    return await asyncio.to_thread(TorchEngine.load, directory, settings)
