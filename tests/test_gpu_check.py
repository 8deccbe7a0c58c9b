"""scripts/gpu_check.sh end to end at a tiny width on the CPU: the same steps a lent GPU machine runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_end_to_end_on_cpu_with_the_tiny_shape(tmp_path):
    out = tmp_path / "out"
    command = ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--shape", "tiny", "--device", "cpu", "--workdir",
               str(tmp_path / "work"), "--out", str(out), "--samples", "4", "--seq-len", "32", "--new-tokens", "8",
               "--importance", "fixed"]
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary == json.loads(done.stdout[done.stdout.index("{"):])  # printed and written alike
    assert summary["environment"]["device"] == "cpu"
    assert summary["shape"]["intermediate_size"] / summary["shape"]["hidden_size"] == 11008 / 4096
    prune = summary["prune"]
    assert prune["export_dtype"] == "bfloat16" and prune["params_after"] < prune["params_before"]
    assert {"load", "calibration_and_gradients", "importance", "slice"} <= set(prune["stages"])
    assert prune["peak_rss_bytes"] > 0 and prune["peak_cuda_bytes"] is None
    assert summary["disk"]["export_bytes"] < summary["disk"]["source_bytes"]
    for name in ("dense", "pruned"):
        assert summary["decode"][name]["new_tokens"] == 8 and summary["decode"][name]["tokens_per_second"] > 0
    # The GPU machine has neither vLLM nor FastAPI: the check must not need them.
    assert summary["modules"] == {"server": False, "vllm": False, "fastapi": False}
