"""Where pruning runs and what it costs there: `--device auto|cpu|cuda[:N]`, checked before any work;
the dtype the gradients are computed in; where the weights go (one device, or accelerate's device_map
over the GPUs of one machine for a model larger than one GPU); the peak memory of each stage.

The memory a prune needs beyond its weights (hywia.scores): the statistics of one chunk of layers,
two fp32 values per prunable weight of the chunk (at least one layer), plus activations for one
calibration sequence. `working_bytes` is that floor; a device that cannot hold the weights plus the
floor is refused up front rather than failing after minutes of loading.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hywia.errors import HywiaError

log = logging.getLogger(__name__)

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"
DEVICE_HELP = ("where pruning runs: auto (a CUDA GPU when present, else the CPU), cpu, cuda (GPU 0, or every GPU "
               "of this machine when the model is larger than one) or cuda:N")
DTYPE_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
ACCUMULATOR_BYTES = 8  # per prunable weight of a chunk: Σg and Σg² in float32 (hywia.scores)
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"}
# Activations, logits and allocator slack besides the weights and one layer's statistics, as a fraction of
# the weights (a floor for the fit check, not a promise; benchmarks/results/pruning_memory.md measures it).
ACTIVATION_HEADROOM = 0.1


def resolve_device(spec: str) -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' → 'cpu', 'cuda' or 'cuda:N', or a HywiaError naming the fix."""
    import torch

    normalized = (spec or "auto").strip().lower()
    if normalized == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if normalized == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", normalized)
    if match is None:
        raise HywiaError(f"--device {spec!r} is not one of {DEVICE_CHOICES}", f"choose one of: {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise HywiaError(
            f"--device {spec}: torch {torch.__version__} sees no CUDA device on this machine",
            "use --device cpu (or auto), or run on a machine with an NVIDIA GPU and a CUDA build of torch",
        )
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise HywiaError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0", f"use --device cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    return normalized


def source_dtype(config: dict) -> str:
    """The dtype a checkpoint's weights are stored in, as its config.json says (float32 when silent or exotic)."""
    named = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    named = _DTYPE_ALIASES.get(named, named)
    return named if named in DTYPE_ITEMSIZE else "float32"


def compute_dtype(stored: str, device: str) -> str:
    """The dtype pruning computes in: the stored one, except float16 on the CPU, whose kernels are slow or
    missing there (float32 instead; the export still defaults to float16)."""
    return "float32" if stored == "float16" and device == "cpu" else stored


def checkpoint_parameters(directory: Path) -> tuple[int, int]:
    """(all parameters, parameters of the largest decoder layer) from the safetensors headers, no weights read."""
    from safetensors import safe_open

    total, per_layer = 0, {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(path, "pt") as weights:
            for name in weights.keys():
                numel = 1
                for size in weights.get_slice(name).get_shape():
                    numel *= size
                total += numel
                layer = re.search(r"layers\.(\d+)\.", name)
                if layer:
                    per_layer[layer.group(1)] = per_layer.get(layer.group(1), 0) + numel
    return total, max(per_layer.values(), default=0)


def working_bytes(total_params: int, layer_params: int, dtype: str) -> int:
    """Memory a prune needs beyond its weights, at least: one layer's fp32 statistics plus headroom."""
    return ACCUMULATOR_BYTES * layer_params + int(ACTIVATION_HEADROOM * total_params * DTYPE_ITEMSIZE[dtype])


def placement(directory: Path, device: str, dtype: str) -> dict:
    """from_pretrained's placement arguments for pruning on `device`, or a HywiaError when it cannot fit even one
    layer's statistics beside the weights. 'cuda' spreads the layers over every GPU (accelerate) when one is too small."""
    total, layer = checkpoint_parameters(directory)
    weights = total * DTYPE_ITEMSIZE[dtype]
    needed = weights + working_bytes(total, layer, dtype)
    if device == "cpu":
        import psutil

        physical = psutil.virtual_memory().total
        if needed > physical:
            raise HywiaError(
                f"pruning this model on the CPU needs about {_gib(needed)} ({_gib(weights)} of {dtype} weights plus "
                f"{_gib(needed - weights)} of statistics and activations); this machine has {_gib(physical)} of RAM",
                "prune on a GPU (--device cuda) or on a machine with more memory")
        return {"device_map": {"": "cpu"}}
    import torch

    indices = [int(device.split(":")[1])] if ":" in device else list(range(torch.cuda.device_count()))
    free = {i: torch.cuda.mem_get_info(i)[0] for i in indices}
    if needed <= free[indices[0]]:
        return {"device_map": {"": indices[0]}}
    # Spread: accelerate places whole decoder layers; each GPU keeps room for one layer's statistics and its
    # share of the activation headroom.
    room = ACCUMULATOR_BYTES * layer + int(ACTIVATION_HEADROOM * weights / len(indices))
    if len(indices) > 1 and weights + len(indices) * room <= sum(free.values()):
        log.info("the model's %s of weights exceed one GPU: spreading its layers over GPUs %s", _gib(weights), indices)
        return {"device_map": "auto", "max_memory": {i: max(0, free[i] - room) for i in indices}}
    where = f"GPU {indices[0]}" if len(indices) == 1 else f"the {len(indices)} GPUs together"
    raise HywiaError(
        f"pruning this model on {device} needs about {_gib(needed)} ({_gib(weights)} of {dtype} weights plus at least "
        f"{_gib(needed - weights)} for one layer's statistics and activations); {where} "
        f"{'has' if len(indices) == 1 else 'have'} {_gib(sum(free.values()))} free",
        "use --device cuda to spread the layers over every GPU of this machine, a machine with more GPU memory, "
        "or --device cpu" if len(indices) == 1 else "use a machine with more GPU memory, or --device cpu")


SMALL_MODEL_STATISTICS_BYTES = 2 * 2**30


def statistics_budget_bytes(model) -> int:
    """How much the gradient statistics of one chunk of layers may take (hywia.scores chunks the layers by it).
    CPU: the weights' own bytes, so a prune peaks near weights + weights + activations, a small multiple that
    holds on a shared host; but at least SMALL_MODEL_STATISTICS_BYTES (within a quarter of the memory
    available), so that a small model (SmolLM2: 0.8 GB of statistics) takes one pass, not two.
    CUDA: 60% of the memory free on the fullest GPU after loading, so a large GPU takes every layer in one
    pass and a small one takes as many passes as it must."""
    weights = sum(param.numel() * param.element_size() for param in model.parameters())
    cuda_devices = {param.device for param in model.parameters() if param.device.type == "cuda"}
    if not cuda_devices:
        import psutil

        return max(weights, min(SMALL_MODEL_STATISTICS_BYTES, psutil.virtual_memory().available // 4))
    import torch

    return int(0.6 * min(torch.cuda.mem_get_info(device)[0] for device in cuda_devices))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


@dataclass
class MemoryMeter:
    """Seconds and memory per pipeline stage. RSS peaks are the process's peak so far (Linux cannot reset
    it without disturbing other readers of ru_maxrss), so the stage whose value jumps is the one that set it;
    CUDA peaks are reset at each stage start, so they are the stage's own."""

    stages: dict = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        cuda = _cuda()
        if cuda is not None:
            for index in range(cuda.device_count()):
                cuda.reset_peak_memory_stats(index)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = {"seconds": time.perf_counter() - started, "rss_bytes": current_rss_bytes(),
                                 "peak_rss_bytes": peak_rss_bytes(), "peak_cuda_bytes": peak_cuda_bytes()}

    def summary(self) -> dict:
        """The report's memory fields: overall peaks and the per-stage table."""
        cuda_peaks = [s["peak_cuda_bytes"] for s in self.stages.values() if s["peak_cuda_bytes"] is not None]
        return {"peak_rss_bytes": peak_rss_bytes(), "peak_cuda_bytes": max(cuda_peaks) if cuda_peaks else None,
                "stages": self.stages}


def _cuda():
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


def peak_rss_bytes() -> int:
    # ru_maxrss (KiB on Linux) is updated lazily by the kernel: never report less than the RSS right now.
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, current_rss_bytes())


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_cuda_bytes() -> int | None:
    """Peak bytes allocated by torch since the last reset, summed over GPUs (None without CUDA)."""
    cuda = _cuda()
    if cuda is None:
        return None
    return sum(cuda.max_memory_allocated(index) for index in range(cuda.device_count()))


def read_config_dtype(directory: Path) -> str:
    return source_dtype(json.loads((Path(directory) / "config.json").read_text()))
