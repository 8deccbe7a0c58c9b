"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every failure that reaches a client goes through here, including the ones FastAPI and Starlette
raise themselves (a malformed body would otherwise be a 422 with FastAPI's own shape, an unknown
route a bare 404), so that OpenAI clients can parse every error and no stack trace ever leaks.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields; raise it anywhere in request handling."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientDisconnected(Exception):
    """The client left before its (non-streamed) response was ready; its generation was aborted."""


CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client closed the connection"


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str, available: list[str]) -> APIError:
    return APIError(404, f"The model '{model}' does not exist. Served models: {', '.join(available)}",
                    param="model", code="model_not_found")


def context_length_exceeded(prompt_tokens: int, max_model_len: int, param: str) -> APIError:
    return invalid_request(
        f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
        f"{prompt_tokens} tokens (at least one token must remain for the completion).",
        param=param, code="context_length_exceeded")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, param=None, code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def not_ready(status: str) -> APIError:
    return APIError(503, f"The server is starting ({status}); retry shortly.", type="server_error",
                    code="model_not_ready", headers={"Retry-After": "5"})


def internal_error() -> APIError:
    return APIError(500, "The server had an internal error while processing the request.",
                    type="server_error", code="internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence for the first problem, and the parameter it concerns."""
    errors = exc.errors()
    if not errors:
        return "The request body is invalid.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}", None
    # loc looks like ("body", "messages", 0, "role"); the API's param is the dotted rest.
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"Invalid value for '{param}': {message}{more}" if param else f"{message}{more}"), param


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Route every exception to an OpenAI-shaped response; `on_error(request, status)` observes it."""

    def respond(request: Request, error: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(request, error.status)
        return error.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return respond(request, exc)

    @app.exception_handler(ClientDisconnected)
    async def _client_gone(request: Request, exc: ClientDisconnected):
        # Nobody reads this response; the status is for the access log. The generation has already
        # counted the request as 499, so on_error is not told again.
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return respond(request, invalid_request(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        error = APIError(exc.status_code, str(exc.detail), type=kind, headers=getattr(exc, "headers", None))
        return respond(request, error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return respond(request, internal_error())
