"""Real-model shapes (tests/shapes.py) through prune → export → stock vLLM → chat, and `hywia serve
--chat-template vicuna` on a Vicuna-shaped checkpoint whose export stock vLLM then serves with the embedded
template (issue 15). Each server is a child process on the CPU build of vLLM, eager, with a small KV cache."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from hywia.bench.process import ServerProcess, free_port
from hywia.chat_templates import resolve_chat_template
from hywia.options import PruneOptions
from hywia.pipeline import prune_to_directory
from tests.shapes import LLAMA_1_7B, LLAMA_2_7B, LLAMA_3_8B, VICUNA_7B_V1_5, save_shape
from tests.test_server_api import API_KEY, serve_command

START_SECONDS = 600
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a primary colour."}]
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}
PRUNING = dict(ratio=0.25, importance="fixed", samples=4, seq_len=32, recover="none")  # seconds per model
# (shape, --chat-template): LLaMA-1/2 and Vicuna ship none; Llama-3 ships its own, which the export keeps.
CASES = [(LLAMA_1_7B, "vicuna"), (LLAMA_2_7B, "llama-2"), (LLAMA_3_8B, None), (VICUNA_7B_V1_5, "vicuna")]


def stock_vllm(directory, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(directory), "--host",
            "127.0.0.1", "--port", str(port), "--max-model-len", "256", "--max-num-seqs", "2", "--enforce-eager",
            "--served-model-name", "served", "--api-key", API_KEY]


def hywia_serve(source, port: int, cache_dir) -> list[str]:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in PRUNING.items()]
    return serve_command(str(source), port, cache_dir, "--engine", "vllm", "--enforce-eager", "--device", "cpu",
                         "--chat-template", "vicuna", "--served-model-name", "served", "--max-model-len", "256",
                         "--max-num-seqs", "2", "--kv-cache-memory-bytes", "64MiB", *flags)


def chat_through(command: list[str], port: int, log) -> tuple[object, object]:
    """Start the server, ask one chat question through the openai client; (reply, the server's report or None)."""
    import openai

    process = ServerProcess(command, port, log, env=ENV).start()
    try:
        process.wait_until_ready(START_SECONDS)
        client = openai.OpenAI(base_url=f"{process.base_url}/v1", api_key=API_KEY, timeout=120, max_retries=0)
        reply = client.chat.completions.create(model="served", messages=MESSAGES, max_tokens=6, temperature=0.0,
                                               extra_body={"ignore_eos": True})
        report = client.get("/hywia/report", cast_to=object) if "hywia.cli" in command else None
        return reply, report
    finally:
        process.stop()


def assert_chat_rendered_with(reply, tokenizer, template: str) -> None:
    """The server rendered the conversation with TEMPLATE: its prompt is exactly that many tokens."""
    prompt = tokenizer.apply_chat_template(MESSAGES, chat_template=template, add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == 6 and reply.choices[0].message.role == "assistant"


@pytest.mark.slow
@pytest.mark.parametrize("shape, template_name", CASES, ids=[shape.name for shape, _ in CASES])
def test_real_shapes_chat_on_stock_vllm(shape, template_name, tmp_path):
    source = save_shape(tmp_path / "source", shape, dtype=torch.bfloat16)
    template = resolve_chat_template(template_name) if template_name else None
    if shape is VICUNA_7B_V1_5:  # hywia serve prunes it with --chat-template vicuna and answers chat itself
        reply, report = chat_through(hywia_serve(source, port := free_port(), tmp_path / "cache"), port,
                                     tmp_path / "hywia.log")
        export = next(entry["directory"] for entry in report["data"] if entry["model"] == "served")
        assert_chat_rendered_with(reply, AutoTokenizer.from_pretrained(export), template)
    else:
        export = tmp_path / "export"
        prune_to_directory(str(source), PruneOptions(**PRUNING, chat_template=template), export, device="cpu",
                           progress=False)
    # The export: bf16 like its source, smaller, the shape's head ratio kept, the template embedded.
    export = Path(export)
    config, source_config = (json.loads((d / "config.json").read_text()) for d in (export, source))
    assert config["dtype"] == "bfloat16"
    with safe_open(export / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}  # noqa: SIM118 -- safe_open is not a dict
    assert (export / "model.safetensors").stat().st_size < (source / "model.safetensors").stat().st_size
    assert (config["num_attention_heads"] // config["num_key_value_heads"]
            == source_config["num_attention_heads"] // source_config["num_key_value_heads"])
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.chat_template == (template or shape.chat_template)
    # Stock vLLM serves chat on the export with the template the export carries.
    reply, _ = chat_through(stock_vllm(export, port := free_port()), port, tmp_path / "vllm.log")
    assert_chat_rendered_with(reply, tokenizer, tokenizer.chat_template)
