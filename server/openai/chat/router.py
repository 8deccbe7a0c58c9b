"""The chat route; the app adds access control and readiness to it when it includes the router."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.openai.chat.protocol import ChatCompletionRequest

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request, body: ChatCompletionRequest):
    return await request.app.state.chat_serving.create(request, body)
