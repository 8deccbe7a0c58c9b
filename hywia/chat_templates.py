"""Chat templates for checkpoints that ship none (LLaMA-1, LLaMA-2 base, Vicuna).

`resolve_chat_template` reads `--chat-template NAME|PATH` the way `vllm serve --chat-template` does (a file,
or an inline Jinja template), plus two built-in names, and proves the result renders a two-turn
conversation with transformers' own renderer before any download or pruning starts: a template that
only fails at the first chat request would otherwise surface as a 500 hours into a 7B prune.

The built-ins write the prompt formats the models were trained on:
  * `vicuna`  FastChat's `vicuna_v1.1`: "SYSTEM USER: hi ASSISTANT: hello</s>USER: … ASSISTANT:",
              with FastChat's default system line when the conversation has none;
  * `llama-2` Meta's chat format: "<s>[INST] <<SYS>>\\nSYSTEM\\n<</SYS>>\\n\\nhi [/INST] hello </s><s>[INST] … [/INST]".
Both begin with `bos_token` because vLLM and transformers tokenize a rendered chat without adding special
tokens (the template owns them).
"""

from __future__ import annotations

from pathlib import Path

from hywia.errors import HywiaError

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# FastChat's separators: a space after the system line and after each user turn, `</s>` after each answer.
VICUNA_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- bos_token + system_message + ' ' -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + message['content'] + eos_token -}}"
    "{%- else -%}{{- raise_exception('vicuna chat knows the roles system (first), user and assistant, not '"
    " + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# Meta's format: the system block rides inside the first [INST]; every exchange is its own <s>…</s>.
# The answer is prompted by "[/INST]" itself, so add_generation_prompt adds nothing.
LLAMA2_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_block = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system_block = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('llama-2 chat needs user and assistant turns alternating, starting with user') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- bos_token + '[INST] ' + (system_block if loop.first else '') + message['content'] | trim + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + message['content'] | trim + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

BUILTIN_TEMPLATES = {"vicuna": VICUNA_TEMPLATE, "llama-2": LLAMA2_TEMPLATE}

# The conversation every template must render: two user turns around one answer.
SAMPLE_SYSTEM = "You answer in one short sentence."
SAMPLE_TURNS = (
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Blue is a primary colour."},
    {"role": "user", "content": "Name another one."},
)
# vLLM's rule for telling an inline template from a path (vllm.renderers.chat_utils._load_chat_template).
_INLINE_TEMPLATE_CHARS = "{}\n"


def resolve_chat_template(name_or_path: str) -> str:
    """`--chat-template` → a Jinja template that renders a two-turn conversation, or a HywiaError."""
    if name_or_path in BUILTIN_TEMPLATES:
        template = BUILTIN_TEMPLATES[name_or_path]
    elif any(char in name_or_path for char in _INLINE_TEMPLATE_CHARS) and not Path(name_or_path).exists():
        template = name_or_path
    else:
        template = _read_template_file(Path(name_or_path).expanduser())
    render_sample_conversation(template)
    return template


def _read_template_file(path: Path) -> str:
    builtins = ", ".join(BUILTIN_TEMPLATES)
    if not path.exists():
        raise HywiaError(
            f"--chat-template {str(path)!r} is neither a built-in template ({builtins}) nor an existing file",
            f"use one of {builtins}, or the path of a Jinja chat template file",
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HywiaError(
            f"--chat-template {path} cannot be read as a UTF-8 text file ({exc})",
            f"pass a readable Jinja template file, or a built-in template ({builtins})",
        ) from exc


def render_sample_conversation(template: str, bos_token: str = "<s>", eos_token: str = "</s>") -> str:
    """Render SAMPLE_TURNS (with a system message, else without: some templates refuse the system role)
    through transformers' renderer; the text must carry every turn, in order."""
    from transformers.utils.chat_template_utils import render_jinja_template

    failures = []
    for messages in ([{"role": "system", "content": SAMPLE_SYSTEM}, *SAMPLE_TURNS], list(SAMPLE_TURNS)):
        try:
            rendered, _generation_indices = render_jinja_template(
                conversations=[messages], chat_template=template, add_generation_prompt=True,
                bos_token=bos_token, eos_token=eos_token,
            )
        # A user's template can fail in any way Jinja or Python can (syntax, raise_exception, a None in +):
        # each means the same thing here, so every one becomes the user-facing error below.
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        text = rendered[0]
        missing = _first_missing_turn(text)
        if missing is None:
            return text
        failures.append(f"the rendered text lacks the {missing['role']} turn {missing['content']!r}")
    raise HywiaError(
        "the chat template does not render a two-turn conversation (system, user, assistant, user): "
        + "; ".join(dict.fromkeys(failures)),
        f"fix the template, or use a built-in one ({', '.join(BUILTIN_TEMPLATES)})",
    )


def _first_missing_turn(text: str) -> dict | None:
    position = 0
    for turn in SAMPLE_TURNS:
        found = text.find(turn["content"], position)
        if found < 0:
            return turn
        position = found + len(turn["content"])
    return None
