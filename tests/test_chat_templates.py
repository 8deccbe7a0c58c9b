"""Built-in chat templates (vicuna, llama-2) and `--chat-template NAME|PATH` resolution."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from hywia.chat_templates import (
    BUILTIN_TEMPLATES,
    VICUNA_SYSTEM,
    render_sample_conversation,
    resolve_chat_template,
)
from hywia.errors import HywiaError
from tests.shapes import LLAMA_2_7B, VICUNA_7B_V1_5, write_tokenizer

TWO_TURNS = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi there."},
    {"role": "user", "content": "How are you?"},
]
SYSTEM = {"role": "system", "content": "Be brief."}


def _render(tokenizer, template, messages):
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def vicuna_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vicuna-tokenizer")
    write_tokenizer(directory, VICUNA_7B_V1_5)
    return AutoTokenizer.from_pretrained(directory)


def test_vicuna_is_fastchat_v1_1(vicuna_tokenizer):
    template = resolve_chat_template("vicuna")
    assert _render(vicuna_tokenizer, template, [SYSTEM, *TWO_TURNS]) == (
        "<s>Be brief. USER: Hello! ASSISTANT: Hi there.</s>USER: How are you? ASSISTANT:")
    # No system message: FastChat's default system line.
    assert _render(vicuna_tokenizer, template, TWO_TURNS) == (
        f"<s>{VICUNA_SYSTEM} USER: Hello! ASSISTANT: Hi there.</s>USER: How are you? ASSISTANT:")


def test_vicuna_prompt_tokenizes_with_one_bos(vicuna_tokenizer):
    """vLLM tokenizes a rendered chat without adding special tokens: the template's <s> is the only BOS."""
    ids = vicuna_tokenizer.apply_chat_template(TWO_TURNS, chat_template=BUILTIN_TEMPLATES["vicuna"],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
    bos = vicuna_tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids.count(vicuna_tokenizer.eos_token_id) == 1  # after the one finished answer


def test_vicuna_refuses_unknown_roles(vicuna_tokenizer):
    with pytest.raises(Exception, match="not tool"):
        _render(vicuna_tokenizer, BUILTIN_TEMPLATES["vicuna"], [{"role": "tool", "content": "x"}])


def test_llama_2_is_metas_format(tmp_path):
    write_tokenizer(tmp_path, LLAMA_2_7B)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    template = resolve_chat_template("llama-2")
    assert _render(tokenizer, template, [SYSTEM, *TWO_TURNS]) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello! [/INST] Hi there. </s><s>[INST] How are you? [/INST]")
    assert _render(tokenizer, template, TWO_TURNS) == (
        "<s>[INST] Hello! [/INST] Hi there. </s><s>[INST] How are you? [/INST]")
    with pytest.raises(Exception, match="alternating"):
        _render(tokenizer, template, [TWO_TURNS[0], TWO_TURNS[2]])


def test_render_check_uses_transformers_renderer(vicuna_tokenizer):
    """The start-up check renders exactly what the tokenizer will render at request time."""
    from hywia.chat_templates import SAMPLE_SYSTEM, SAMPLE_TURNS

    messages = [{"role": "system", "content": SAMPLE_SYSTEM}, *SAMPLE_TURNS]
    for template in BUILTIN_TEMPLATES.values():
        assert render_sample_conversation(template) == _render(vicuna_tokenizer, template, messages)


def test_template_files_and_inline_templates_resolve(tmp_path):
    path = tmp_path / "vicuna.jinja"
    path.write_text(BUILTIN_TEMPLATES["vicuna"])
    assert resolve_chat_template(str(path)) == BUILTIN_TEMPLATES["vicuna"]
    inline = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    assert resolve_chat_template(inline) == inline


def test_unknown_name_lists_the_builtins(tmp_path):
    with pytest.raises(HywiaError, match="neither a built-in template") as caught:
        resolve_chat_template("vicuna-v2")
    assert "vicuna" in caught.value.fix and "llama-2" in caught.value.fix
    with pytest.raises(HywiaError, match="nor an existing file"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))


def test_unreadable_template_file(tmp_path):
    with pytest.raises(HywiaError, match="cannot be read"):
        resolve_chat_template(str(tmp_path))  # a directory
    binary = tmp_path / "template.bin"
    binary.write_bytes(b"\xff\xfe\x00{{")
    with pytest.raises(HywiaError, match="cannot be read as a UTF-8"):
        resolve_chat_template(str(binary))


@pytest.mark.parametrize("template, reason", [
    ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),
    ("{{ raise_exception('no chat here') }}", "no chat here"),
    ("{% for m in messages if m['role'] == 'user' %}{{ m['content'] }}{% endfor %}", "lacks the assistant turn"),
    ("{{ messages[0]['content'] + none }}", "TypeError"),
])
def test_templates_that_do_not_render_two_turns_are_refused(tmp_path, template, reason):
    path = tmp_path / "bad.jinja"
    path.write_text(template)
    with pytest.raises(HywiaError, match="does not render a two-turn conversation") as caught:
        resolve_chat_template(str(path))
    assert reason in str(caught.value)


def test_template_without_a_system_role_is_accepted():
    """Some templates (Gemma's, Mistral's early ones) refuse the system role; two turns still render."""
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                "{% endif %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}[assistant]")
    assert resolve_chat_template(template) == template
    assert render_sample_conversation(template).endswith("[assistant]")


@pytest.mark.parametrize("verb", ["prune", "serve"])
def test_cli_refuses_an_unknown_template_before_any_work(verb, tmp_path, capsys):
    from hywia import cli

    out = tmp_path / "export"
    argv = [verb, str(tmp_path / "no-model-here"), "--chat-template", "vicuna-2"]
    assert cli.main(argv + (["--out", str(out)] if verb == "prune" else [])) == 2
    error = capsys.readouterr().err
    assert "neither a built-in template (vicuna, llama-2)" in error and "Traceback" not in error
    assert not out.exists()
