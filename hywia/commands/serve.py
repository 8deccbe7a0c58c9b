"""`hywia serve [SOURCE]`: prune (or load the cached export) and serve it on an OpenAI-compatible API.

The port is bound first, so `/health` answers (503 with the phase) while the model is pruned and
the engine starts; it turns 200 when every model is served. With no SOURCE it serves the built-in
default model pruned at the default ratio. `--ratio 0` serves SOURCE as it is.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import socket

from hywia.errors import HywiaError
from hywia.pipeline import add_prune_arguments, options_from_args
from server.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENT_REQUESTS

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'268435456', '256MiB', '256M', '1.5GiB', '2G' → bytes (K/M/G/T are powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 268435456, 256MiB, 2GiB)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def add_arguments(parser) -> None:
    parser.add_argument("source", nargs="?", default=None,
                        help="HF directory, .gguf file, hub id, or the default 'smollm2-135m-instruct'")
    add_prune_arguments(parser)
    serving = parser.add_argument_group("serving")
    serving.add_argument("--engine", choices=("auto", "vllm", "torch"), default="auto",
                         help="vllm (AsyncLLM), torch (built in), or auto: vllm where installed (default)")
    serving.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serving.add_argument("--port", type=int, default=8000)
    serving.add_argument("--api-key", default=os.environ.get("HYWIA_API_KEY"),
                         help="require 'Authorization: Bearer KEY' on /v1 routes (default $HYWIA_API_KEY)")
    serving.add_argument("--protect-metrics", action="store_true",
                         help="require the API key for /metrics and /health too")
    serving.add_argument("--serve-dense", action="store_true",
                         help="also serve the unpruned model, under the source's own name, for comparison")
    serving.add_argument("--model-name", default=None,
                         help="id of the served (pruned) model (default: SOURCE name + '-pruned<percent>')")
    serving.add_argument("--max-model-len", type=int, default=None,
                         help="context length to serve (default: the model's)")
    serving.add_argument("--kv-cache-bytes", type=parse_bytes, default=None,
                         help="KV cache size per model for vLLM, e.g. 2GiB (default on CPU: a quarter of free "
                              "memory, at most 4 GiB; on GPU: vLLM's share of GPU memory)")
    serving.add_argument("--tensor-parallel-size", type=int, default=1,
                         help="shard each model over T GPUs (vLLM); pruning then keeps attention units in "
                              "multiples of T unless --align-heads is given")
    serving.add_argument("--max-num-seqs", type=int, default=None,
                         help="sequences generated at once per model (torch engine default 16; vLLM's own)")
    serving.add_argument("--max-body-bytes", type=parse_bytes, default=DEFAULT_MAX_BODY_BYTES,
                         help="largest request body accepted (default 4MiB); larger ones get a 413")
    serving.add_argument("--max-concurrent-requests", type=int, default=DEFAULT_MAX_CONCURRENT_REQUESTS,
                         help="generations at once; more get a 503 with Retry-After (default %(default)s)")
    serving.add_argument("--drain-seconds", type=int, default=30,
                         help="on SIGTERM, how long in-flight requests may finish before exit (default 30)")


def run(args) -> int:
    import uvicorn

    from server.app import AccessPolicy, create_app
    from server.engines.base import EngineSettings
    from server.limits import ServerLimits
    from server.startup import ServeConfig

    options = options_from_args(args)
    prune = options if args.ratio > 0 else None
    if prune is not None:
        prune.validate()  # a bad flag fails now, not after the port opened
    if args.tensor_parallel_size < 1:
        raise HywiaError(f"--tensor-parallel-size {args.tensor_parallel_size} must be at least 1")
    settings = EngineSettings(
        max_model_len=args.max_model_len, kv_cache_bytes=args.kv_cache_bytes,
        tensor_parallel_size=args.tensor_parallel_size, max_batch_size=args.max_num_seqs or 16,
        extra={"max_num_seqs": args.max_num_seqs},
    )
    config = ServeConfig(source=args.source, prune=prune, engine=args.engine, engine_settings=settings,
                         serve_dense=args.serve_dense, model_name=args.model_name, cache_dir=args.cache_dir,
                         allow_pickle=args.allow_pickle)
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
