"""`hywia serve` with vLLM's own defaults, compiled mode included (the one test that starts an engine
without --enforce-eager: compiling takes about a minute longer on 2 CPU cores), answers correctly when it
computes in the checkpoint's float32."""

from __future__ import annotations

import os
import sys

import openai
import pytest

from hywia.bench.process import ServerProcess, free_port
from tests.conftest import TEST_CACHE

pytestmark = pytest.mark.slow


def test_default_engine_arguments_compile_and_answer(tmp_path, default_model_dir):
    port = free_port()
    # --ratio 0: the dense default model, so no pruning time; the KV cache size is the one flag a
    # CPU needs (vLLM's default would ask for most of the machine's memory).
    command = [sys.executable, "-m", "hywia.cli", "serve", "--ratio", "0", "--engine", "vllm", "--port", str(port),
               "--cache-dir", str(TEST_CACHE), "--kv-cache-memory-bytes", "256MiB", "--max-model-len", "512",
               # float32 as the checkpoint: on a CPU vLLM's own choice is bfloat16, and compiled bfloat16 kernels
               # turn this small model's greedy answer into "L'Étoile, la Marseillaise, …" (measured 2026-12-02:
               # compiled float32, eager bfloat16 and transformers all answer Paris; compiled bfloat16 does not).
               "--dtype", "float32"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    with ServerProcess(command, port, tmp_path / "server.log", env=env) as server:
        server.wait_until_ready(1200)
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct", max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        log = server.log_tail(1_000_000)
    assert "Paris" in reply.choices[0].message.content
    # vLLM ran with its own defaults: compiled (not eager), nothing of ours in between.
    assert "enforce_eager=False" in log and "enforce_eager=True" not in log
    assert "dtype=torch.float32" in log
    assert "Warming up model for the compilation" in log
