"""The FastAPI app: routes, access control and error handling; serving logic lives elsewhere."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from hywia import __version__
from server.errors import install_error_handlers, not_ready, unauthorized
from server.limits import AdmissionGate, BodySizeLimit, ServerLimits
from server.metrics import CONTENT_TYPE, UNKNOWN_MODEL
from server.openai.chat.router import router as chat_router
from server.openai.chat.serving import ChatServing
from server.openai.completion.router import router as completion_router
from server.openai.completion.serving import CompletionServing
from server.openai.protocol import ModelCard, ModelList
from server.openai.serving import ServingContext
from server.startup import ServeConfig, start_serving, stop_serving
from server.state import Phase, ServerState

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


@dataclass(frozen=True)
class AccessPolicy:
    api_key: str | None = None  # when set, every /v1 route needs `Authorization: Bearer <key>`
    protect_metrics: bool = False  # also require the key for /metrics and /health


def create_app(config: ServeConfig, access: AccessPolicy | None = None, limits: ServerLimits | None = None,
               state: ServerState | None = None,
               on_startup_failure: Callable[[str], None] | None = None) -> FastAPI:
    """An app that starts its models in the background once it is serving (see startup)."""
    access, limits, state = access or AccessPolicy(), limits or ServerLimits(), state or ServerState()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        starting = asyncio.create_task(start_serving(config, state, on_startup_failure))
        try:
            yield
        finally:
            state.stopping.set()
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await stop_serving(state)

    app = FastAPI(title="hywia", version=__version__, lifespan=lifespan)
    app.state.hywia = state
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    serving = ServingContext(state.registry, state.metrics, AdmissionGate(limits.max_concurrent_requests))
    app.state.chat_serving = ChatServing(serving)
    app.state.completion_serving = CompletionServing(serving)

    def count_refused(request: Request, status: int) -> None:
        # Refused completion requests count too; a request that never named a served model
        # gets one fixed label, so arbitrary model names cannot blow up the series.
        if request.url.path in GENERATION_PATHS:
            model_id = getattr(request.state, "model_id", None) or UNKNOWN_MODEL
            state.metrics.requests.labels(model_id, str(status)).inc()

    install_error_handlers(app, on_error=count_refused)

    def require_key(request: Request) -> None:
        if access.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.")
        if not hmac.compare_digest(token.strip().encode(), access.api_key.encode()):
            raise unauthorized("Incorrect API key provided.")

    def require_ready() -> None:
        if not state.ready:
            raise not_ready(state.phase.value)

    def require_key_for_operations(request: Request) -> None:
        if access.protect_metrics:
            require_key(request)

    api = [Depends(require_key), Depends(require_ready)]

    @app.get("/health", dependencies=[Depends(require_key_for_operations)])
    async def health():
        body = {"status": state.phase.value}
        if state.phase is Phase.READY:
            body["models"] = [m.model_id for m in state.registry.all()]
            return body
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=503)

    @app.get("/metrics", dependencies=[Depends(require_key_for_operations)])
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=api)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=m.model_id, created=m.created, root=str(Path(m.directory).resolve()),
                                         max_model_len=m.engine.max_model_len) for m in state.registry.all()])

    app.include_router(chat_router, dependencies=api)
    app.include_router(completion_router, dependencies=api)

    @app.get("/v1/hywia/report", dependencies=api)
    async def pruning_report():
        return {"object": "list", "data": [
            {"model": m.model_id, "engine": m.engine.name, "directory": str(m.directory),
             "pruned": m.report is not None, "cache_hit": m.cache_hit,
             "parameters": m.size.parameters, "weight_bytes": m.size.weight_bytes,
             "unpruned_parameters": m.unpruned_size.parameters,
             "unpruned_weight_bytes": m.unpruned_size.weight_bytes, "report": m.report}
            for m in state.registry.all()]}

    return app
