"""--device resolution, the dtype pruning computes in, and where the weights may go (checked before loading)."""

from __future__ import annotations

import gc
import mmap

import pytest
import torch

from hywia.devices import (
    ACCUMULATOR_BYTES,
    ACTIVATION_HEADROOM,
    MemoryMeter,
    checkpoint_parameters,
    compute_dtype,
    placement,
    resolve_device,
    source_dtype,
    statistics_budget_bytes,
    working_bytes,
)
from hywia.errors import HywiaError
from tests.tiny import tiny_model


def test_auto_and_cpu_resolve_on_a_machine_without_cuda():
    assert not torch.cuda.is_available()  # this suite runs on CPU machines; the GPU path is scripts/gpu_check.sh
    assert resolve_device("auto") == "cpu"
    assert resolve_device("CPU") == "cpu"


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_clear_error(spec):
    with pytest.raises(HywiaError, match="sees no CUDA device") as caught:
        resolve_device(spec)
    assert "--device cpu" in caught.value.fix


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "mps", "cuda:-1"])
def test_unknown_device_names_the_choices(spec):
    with pytest.raises(HywiaError, match="is not one of auto, cpu, cuda, cuda:N"):
        resolve_device(spec)


def test_cuda_index_beyond_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(HywiaError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("config, stored", [
    ({"dtype": "bfloat16"}, "bfloat16"), ({"torch_dtype": "float16"}, "float16"), ({}, "float32"),
    ({"torch_dtype": "torch.bfloat16"}, "bfloat16"), ({"dtype": "half"}, "float16"), ({"dtype": "int8"}, "float32"),
])
def test_source_dtype(config, stored):
    assert source_dtype(config) == stored


def test_compute_dtype_keeps_the_source_but_float16_on_cpu():
    assert compute_dtype("bfloat16", "cpu") == "bfloat16"
    assert compute_dtype("float16", "cpu") == "float32"
    assert compute_dtype("float16", "cuda:0") == "float16"


def test_checkpoint_parameters_from_headers(tiny_gqa_dir):
    model = tiny_model(gqa=True)
    total, largest_layer = checkpoint_parameters(tiny_gqa_dir)
    assert total == sum(p.numel() for p in model.parameters())
    assert largest_layer == sum(p.numel() for p in model.model.layers[0].parameters())


def test_cpu_placement_refuses_a_model_larger_than_the_ram(tiny_gqa_dir, monkeypatch):
    import psutil

    total, layer = checkpoint_parameters(tiny_gqa_dir)
    needed = total * 4 + working_bytes(total, layer, "float32")
    assert placement(tiny_gqa_dir, "cpu", "float32") == {"device_map": {"": "cpu"}}
    ram = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: ram._replace(total=needed - 1))
    with pytest.raises(HywiaError, match="this machine has") as caught:
        placement(tiny_gqa_dir, "cpu", "float32")
    assert "--device cuda" in caught.value.fix


def _fake_gpus(monkeypatch, free: list[int]):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(free))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (free[index], free[index]))


def test_cuda_placement_one_gpu_spread_or_refuse(tiny_gqa_dir, monkeypatch):
    """The decision only (no GPU here): one GPU when weights + one layer's statistics fit, accelerate's
    device_map over every GPU for `cuda` when only their sum does, a clear error otherwise."""
    total, layer = checkpoint_parameters(tiny_gqa_dir)
    weights, room = total * 2, working_bytes(total, layer, "bfloat16")
    _fake_gpus(monkeypatch, [weights + room, 0])
    assert placement(tiny_gqa_dir, "cuda", "bfloat16") == {"device_map": {"": 0}}
    per_gpu_room = ACCUMULATOR_BYTES * layer + int(ACTIVATION_HEADROOM * weights / 2)
    half = weights // 2 + per_gpu_room + 1024
    _fake_gpus(monkeypatch, [half, half])
    assert placement(tiny_gqa_dir, "cuda", "bfloat16") == {
        "device_map": "auto", "max_memory": {0: half - per_gpu_room, 1: half - per_gpu_room}}
    with pytest.raises(HywiaError, match="GPU 1 has") as caught:
        placement(tiny_gqa_dir, "cuda:1", "bfloat16")
    assert "--device cuda to spread" in caught.value.fix
    _fake_gpus(monkeypatch, [weights // 4, weights // 4])
    with pytest.raises(HywiaError, match="the 2 GPUs together have"):
        placement(tiny_gqa_dir, "cuda", "bfloat16")


def test_statistics_budget_on_cpu_is_the_weights_or_a_small_model_floor(monkeypatch):
    """The weights' own bytes, but never below SMALL_MODEL_STATISTICS_BYTES (so a small model's statistics
    take one pass), unless a quarter of the available memory is less than that floor."""
    import collections

    import psutil

    from hywia.devices import SMALL_MODEL_STATISTICS_BYTES

    model = tiny_model(gqa=True).to(torch.bfloat16)
    weights = 2 * sum(p.numel() for p in model.parameters())
    memory = collections.namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(64 * 2**30))
    assert statistics_budget_bytes(model) == SMALL_MODEL_STATISTICS_BYTES
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(4 * weights))
    assert statistics_budget_bytes(model) == weights  # a quarter of what is free is below the weights
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(4 * weights + 400))
    assert statistics_budget_bytes(model) == weights + 100
    assert ACCUMULATOR_BYTES == 8  # Σg and Σg² in float32


def test_memory_meter_records_each_stage():
    from hywia.devices import current_rss_bytes

    # The 64 MiB are a fresh anonymous mapping, touched page by page: a torch (malloc) block could be served
    # from heap memory an earlier test freed but the allocator kept resident, leaving RSS flat (CI saw that).
    # The collector is paused so that no other object is freed, and RSS shrinks, while the stage is measured.
    size = 64 * 2**20
    meter = MemoryMeter()
    gc.collect()
    gc.disable()
    try:
        before = current_rss_bytes()
        with meter.stage("load"):
            block = mmap.mmap(-1, size)  # held past the stage
            for offset in range(0, size, mmap.PAGESIZE):
                block[offset] = 1
        with meter.stage("score"):
            pass
    finally:
        gc.enable()
    summary = meter.summary()
    assert list(summary["stages"]) == ["load", "score"]
    load = summary["stages"]["load"]
    assert load["rss_bytes"] >= before + size - 2**20 and load["peak_rss_bytes"] >= load["rss_bytes"]
    block.close()
    assert load["seconds"] >= 0
    assert load["peak_cuda_bytes"] is None and summary["peak_cuda_bytes"] is None
    assert summary["peak_rss_bytes"] >= summary["stages"]["score"]["peak_rss_bytes"] >= load["peak_rss_bytes"]


@pytest.mark.parametrize("verb", ["prune", "serve"])
def test_cli_refuses_cuda_without_cuda_before_any_work(verb, tiny_gqa_dir, tmp_path, capsys, monkeypatch):
    from hywia import cli, models, pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the source was resolved before the device was checked")

    monkeypatch.setattr(models, "resolve_source", no_loading)  # serve's start-up imports it from here
    monkeypatch.setattr(pipeline, "resolve_source", no_loading)
    out = tmp_path / "export"
    argv = [verb, str(tiny_gqa_dir), "--device", "cuda"] + (["--out", str(out)] if verb == "prune" else [])
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert "--device cuda: torch" in error and "sees no CUDA device" in error and "--device cpu" in error
    assert "Traceback" not in error and not out.exists()
