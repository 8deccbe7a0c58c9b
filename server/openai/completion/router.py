"""The text-completion route; the app adds access control and readiness when it includes the router."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.openai.completion.protocol import CompletionRequest

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(request: Request, body: CompletionRequest):
    return await request.app.state.completion_serving.create(request, body)
