"""`--target-memory SIZE` / `--target-params N`: the smallest pruning ratio that makes a model fit.

Memory counted = weights + the KV cache for `max_seqs` sequences of `max_model_len` tokens each, the
two things that grow with the model's width and that vLLM must hold. Activations, the runtime and
allocator slack are not counted: leave headroom for them (vLLM's `gpu_memory_utilization`).

Everything here is arithmetic on a config dict (a HF `config.json`, uniform or with HywiaLlama's
per-layer lists), so a 7B-shaped target can be checked without any weights. The ratio is the
fraction of the whole model's parameters removed (LLM-Pruner's convention, as in hywia.budget); the
keep counts a ratio gives come from an allocator (hywia.budget): by default the uniform layout, in
which attention and MLP lose about the same fraction in every layer; a per-layer layout passes its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hywia.budget import MAX_RATIO, Allocator, allocator, uniform_budget  # MAX_RATIO: the most hywia removes
from hywia.errors import HywiaError
from hywia.plan import head_dim, layer_widths, pruned_config
from hywia.units import LayerShape

RATIO_STEP = 0.01

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}



def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class Workload:
    """What the served model must hold besides its weights."""

    max_model_len: int
    max_seqs: int
    dtype: str = "bfloat16"  # of the weights
    kv_cache_dtype: str | None = None  # None: same as the weights (vLLM's "auto")

    @property
    def weight_bytes(self) -> int:
        return _dtype_bytes(self.dtype)

    @property
    def kv_bytes(self) -> int:
        return _dtype_bytes(self.kv_cache_dtype or self.dtype)

    @property
    def kv_tokens(self) -> int:
        return self.max_model_len * self.max_seqs


def served_dtype(export_dtype: str) -> str:
    """The dtype vLLM serves an export in under its default `--dtype auto`: the checkpoint's own, except that a
    float32 checkpoint is served in a 16-bit type (bfloat16 where supported, else float16: the same bytes)."""
    return "bfloat16" if export_dtype == "float32" else export_dtype


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise HywiaError(f"unknown dtype {dtype!r} for the memory arithmetic", f"use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


# ---- shapes -------------------------------------------------------------------------------------

def parameter_count(config: dict) -> int:
    """Parameters of a LLaMA-family model with this config (what LlamaForCausalLM allocates)."""
    hidden, dim, vocab = config["hidden_size"], head_dim(config), config["vocab_size"]
    attn_bias, mlp_bias = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
    total = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2) + hidden  # + final norm
    for heads, kv_heads, channels in layer_widths(config):
        q_width, kv_width = heads * dim, kv_heads * dim
        attention = 2 * hidden * q_width + 2 * hidden * kv_width  # q, o and k, v
        attention += (q_width + 2 * kv_width + hidden) if attn_bias else 0
        mlp = 3 * hidden * channels + ((2 * channels + hidden) if mlp_bias else 0)
        total += attention + mlp + 2 * hidden  # + two RMSNorms
    return total


def kv_cache_bytes_per_token(config: dict, kv_bytes: int) -> int:
    """K and V of every layer for one token; per-layer KV heads count layer by layer, as vLLM's
    v1 KV-cache manager allocates them."""
    return sum(2 * kv_heads * head_dim(config) * kv_bytes for _, kv_heads, _ in layer_widths(config))


@dataclass(frozen=True)
class Footprint:
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_bytes_per_token * self.kv_tokens

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes


def footprint(config: dict, workload: Workload) -> Footprint:
    parameters = parameter_count(config)
    return Footprint(parameters=parameters, weight_bytes=parameters * workload.weight_bytes,
                     kv_bytes_per_token=kv_cache_bytes_per_token(config, workload.kv_bytes),
                     kv_tokens=workload.kv_tokens)


def config_layer_shapes(config: dict) -> list[LayerShape]:
    """hywia.budget's view of every layer (units and what one unit owns), from a config alone. The unit
    costs are those of hywia.units: a KV group owns its q/k/v rows (and biases) and o_proj columns, an
    MLP channel its gate/up rows (and biases) and down_proj column."""
    hidden, dim = config["hidden_size"], head_dim(config)
    attn_bias, mlp_bias = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
    shapes = []
    for heads, kv_heads, channels in layer_widths(config):
        group_size = heads // kv_heads
        group_cost = 2 * hidden * dim * (group_size + 1) + ((group_size + 2) * dim if attn_bias else 0)
        channel_cost = 3 * hidden + (2 if mlp_bias else 0)
        shapes.append(LayerShape(kv_heads, channels, group_cost, channel_cost))
    return shapes


def uniform_allocator(config: dict, align_heads: int = 1, align_mlp: int = 1) -> Allocator:
    """The uniform layout's keep counts for CONFIG at any ratio (hywia.budget on a config's shapes)."""
    return allocator(uniform_budget(config_layer_shapes(config), parameter_count(config), align_heads, align_mlp))


def uniform_pruned_config(config: dict, ratio: float, align_heads: int = 1, align_mlp: int = 1) -> dict:
    """CONFIG with the uniform layout RATIO gives."""
    return pruned_config(config, uniform_allocator(config, align_heads, align_mlp)(ratio))


def describe_widths(config: dict) -> str:
    widths = layer_widths(config)
    kv = [w[1] for w in widths]
    channels = [w[2] for w in widths]
    if len(set(widths)) == 1:
        return f"{kv[0]} KV heads, {channels[0]:,} MLP channels in each of {len(widths)} layers"
    return (f"per layer {min(kv)}–{max(kv)} KV heads ({sum(kv)} in all), "
            f"{min(channels):,}–{max(channels):,} MLP channels")


# ---- choosing the ratio -------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    ratio: float
    config: dict
    footprint: Footprint


@dataclass
class FitResult:
    """The chosen ratio (0.0: the dense model already fits) and the arithmetic that chose it."""

    target: str  # "memory" or "params"
    limit: int  # bytes or parameters
    workload: Workload
    dense: Candidate
    chosen: Candidate
    previous: Candidate | None  # the next-smaller ratio step, which does not fit

    @property
    def ratio(self) -> float:
        return self.chosen.ratio

    def fits(self, candidate: Candidate) -> bool:
        f = candidate.footprint
        return (f.total_bytes if self.target == "memory" else f.parameters) <= self.limit

    def explanation(self) -> str:
        if self.chosen.ratio == 0:
            conclusion = "the dense model already fits: no pruning needed"
        else:
            conclusion = f"chosen ratio {self.chosen.ratio:.2f}: the smallest step of {RATIO_STEP} that fits"
        return "\n".join([*self.arithmetic(), conclusion])

    def arithmetic(self) -> list[str]:
        """The target, then one line per candidate: dense, the step below the chosen one, the chosen."""
        w = self.workload
        if self.target == "memory":
            budget = (f"target {format_bytes(self.limit)} ({self.limit:,} B) = weights ({w.dtype}, "
                      f"{w.weight_bytes} B/param) + KV cache ({w.kv_cache_dtype or w.dtype}, {w.kv_bytes} B/value)"
                      f" for {w.max_seqs} sequences × {w.max_model_len:,} tokens = {w.kv_tokens:,} tokens")
            per_token = (f"KV cache per token = Σ over layers of 2 (K, V) × KV heads × head_dim "
                         f"{head_dim(self.dense.config)} × {w.kv_bytes} B")
            lines = [budget, per_token]
        else:
            lines = [f"target {self.limit:,} parameters"]
        rows = {0.0: ("dense", self.dense)}
        for candidate in (self.previous, self.chosen):
            if candidate is not None and candidate.ratio not in rows:
                rows[candidate.ratio] = (f"ratio {candidate.ratio:.2f}", candidate)
        return lines + [f"{label:>10}: {self._line(candidate)}" for label, candidate in rows.values()]

    def _line(self, candidate: Candidate) -> str:
        f, fits = candidate.footprint, self.fits(candidate)
        verdict = "fits" if fits else "does not fit"
        shape = describe_widths(candidate.config)
        if self.target == "params":
            return f"{shape}: {f.parameters:,} params {'≤' if fits else '>'} {self.limit:,} ({verdict})"
        return (f"{shape}: {f.parameters:,} params × {self.workload.weight_bytes} B = {format_bytes(f.weight_bytes)}"
                f" + KV {format_bytes(f.kv_bytes_per_token)}/token × {f.kv_tokens:,} = {format_bytes(f.kv_cache_bytes)}"
                f" → {format_bytes(f.total_bytes)} {'≤' if fits else '>'} {format_bytes(self.limit)} ({verdict})")

    def to_dict(self) -> dict:
        """For the pruning report."""
        def candidate(c: Candidate | None):
            if c is None:
                return None
            return {"ratio": c.ratio, **asdict(c.footprint), "kv_cache_bytes": c.footprint.kv_cache_bytes,
                    "total_bytes": c.footprint.total_bytes, "widths": describe_widths(c.config)}

        return {"target": self.target, "limit": self.limit, "workload": asdict(self.workload),
                "ratio": self.ratio, "dense": candidate(self.dense), "chosen": candidate(self.chosen),
                "previous": candidate(self.previous), "explanation": self.explanation()}


def ratio_steps() -> list[float]:
    """The grid choose_ratio searches, from 0 (dense) to MAX_RATIO."""
    return [round(i * RATIO_STEP, 10) for i in range(round(MAX_RATIO / RATIO_STEP) + 1)]


def choose_ratio(config: dict, workload: Workload, *, target_memory: int | None = None,
                 target_params: int | None = None,
                 allocate: Allocator | None = None) -> FitResult:
    """The smallest ratio of `ratio_steps()` whose footprint fits the target (exactly one of
    TARGET_MEMORY in bytes or TARGET_PARAMS). ALLOCATE maps a ratio > 0 to keep counts per layer
    (default: the uniform layout) and raises HywiaError past the largest ratio it can make. Raises
    HywiaError, with the arithmetic of the closest miss, when no allowed ratio fits."""
    if (target_memory is None) == (target_params is None):
        raise ValueError("give exactly one of target_memory and target_params")
    target, limit = ("memory", target_memory) if target_memory is not None else ("params", target_params)
    allocate = allocate or uniform_allocator(config)
    dense = Candidate(0.0, dict(config), footprint(config, workload))

    previous = None
    for ratio in ratio_steps():
        try:
            shape = pruned_config(config, allocate(ratio)) if ratio else dense.config
        except HywiaError:
            break  # the shape cannot go this far: `previous` is the largest ratio it allows
        current = Candidate(ratio, shape, footprint(shape, workload))
        result = FitResult(target, limit, workload, dense, current, previous)
        if result.fits(current):
            return result
        previous = current
    closest = FitResult(target, limit, workload, dense, previous, None)
    raise HywiaError(
        f"no pruning ratio up to {previous.ratio:.2f} (the most hywia removes from this model) fits the target:\n"
        + "\n".join(closest.arithmetic()),
        _refusal_hint(target, previous),
    )


def _refusal_hint(target: str, closest: Candidate) -> str:
    if target == "params":
        return "raise --target-params"
    f = closest.footprint
    if f.kv_cache_bytes > f.weight_bytes:
        return ("the KV cache is most of it: lower --max-model-len or --max-seqs, use a smaller KV cache dtype, "
                "or raise --target-memory")
    return "raise --target-memory, use a smaller dtype, or choose a smaller model"
