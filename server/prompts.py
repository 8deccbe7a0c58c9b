"""Requests → prompt token ids, with the model's own chat template, and the context budget.

The server tokenises every prompt itself (engines receive token ids), so `usage.prompt_tokens` is
exactly what the checkpoint's tokenizer says, whichever engine runs, and an over-long prompt is
refused before it reaches an engine.
"""

from __future__ import annotations

from server.errors import context_length_exceeded, invalid_request
from server.protocol import ChatMessage


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Render MESSAGES with the checkpoint's chat template and tokenise the result.

    The rendered text already holds the template's special tokens, so no BOS is added on top
    (vLLM's chat path does the same).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise invalid_request("This model has no chat template; use /v1/completions with a plain prompt.",
                              param="messages", code="no_chat_template")
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                    for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja2 TemplateError, or a template's own raise_exception()
        raise invalid_request(f"The model's chat template rejected these messages: {exc}",
                              param="messages") from exc
    return tokenizer(text, add_special_tokens=False).input_ids


def completion_prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    """A text prompt is tokenised as the tokenizer would for the model (BOS where it adds one);
    token ids are checked against the vocabulary and passed through."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt).input_ids
    else:
        vocabulary = len(tokenizer)
        bad = [token for token in prompt if not 0 <= token < vocabulary]
        if bad:
            raise invalid_request(f"Token ids {bad[:5]} are outside the vocabulary (0…{vocabulary - 1}).",
                                  param="prompt")
        ids = list(prompt)
    if not ids:
        raise invalid_request("The prompt is empty.", param="prompt")
    return ids


def completion_budget(prompt_tokens: int, requested: int | None, max_model_len: int, param: str) -> int:
    """How many tokens may be generated: what was asked for, capped to what fits in the context.

    A prompt that leaves no room is an error; a max_tokens that does not fit is capped (the
    choice then ends with finish_reason "length"), as the reliability issue asks.
    """
    if prompt_tokens >= max_model_len:
        raise context_length_exceeded(prompt_tokens, max_model_len, param)
    room = max_model_len - prompt_tokens
    return room if requested is None else min(requested, room)
