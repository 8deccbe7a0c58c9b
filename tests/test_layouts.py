"""Per-layer layouts (issue 5): --protect-layers and --allocation global through the real pipeline,
HywiaLlama exports equal to the in-memory pruned model, --target-memory / --target-params choosing the
ratio, validation before heavy work, and the real default model pruned per-layer served by
vLLM's own OpenAI server and by `hywia serve` on the vLLM engine."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from hywia.budget import Budget, GlobalAllocation, minimum_kept, protected_layers
from hywia.cli import build_parser, main
from hywia.commands.serve import prune_options
from hywia.errors import HywiaError
from hywia.importance import CRITERIA
from hywia.memory_fit import Workload, footprint, parameter_count
from hywia.models import load_model, resolve_source
from hywia.options import PruneOptions
from hywia.pipeline import prune_model, prune_to_directory
from hywia.plan import PruningPlan
from hywia.scores import UnitStatistics
from hywia.surgery import slice_model, zero_removed_units
from hywia.units import LayerShape
from tests.conftest import TEST_CACHE
from tests.tiny import save_tiny_model

CALIBRATION_TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 400
LAYERS = 6
RATIO = 0.3
MODES = {
    "protect": {"layout": "per-layer", "allocation": "even", "protect_layers": "first:1,last:1"},
    "global": {"layout": "per-layer", "allocation": "global", "min_keep": 0.25},
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("layouts") / "tiny-gqa", gqa=True, layers=LAYERS)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text(CALIBRATION_TEXT)
    return str(path)


def options(calibration, **fields) -> PruneOptions:
    """Small, fast options; RATIO unless a target chooses the ratio."""
    targeted = "target_params" in fields or "target_memory" in fields
    return PruneOptions(**{"ratio": PruneOptions.ratio if targeted else RATIO, "importance": "fine",
                           "calibration": calibration, "samples": 8, "seq_len": 32, "reconstruct": "none", "recover": "none",
                           **fields})


def logits(model, seed=0):
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", MODES)
def test_per_layer_export_equals_the_in_memory_pruned_model(mode, source, calibration, tmp_path):
    result = prune_to_directory(str(source), options(calibration, **MODES[mode]), tmp_path / "export", progress=False)
    report, plan = result.report, PruningPlan.from_dict(result.report["plan"])
    assert not plan.is_uniform

    config = json.loads((result.directory / "config.json").read_text())
    assert config["architectures"] == ["HywiaLlamaForCausalLM"] and config["model_type"] == "hywia_llama"
    assert config["layer_num_key_value_heads"] == [len(p.kept_kv_groups) for p in plan.layers]
    assert config["layer_intermediate_size"] == [len(p.kept_mlp_channels) for p in plan.layers]
    assert config["layer_num_attention_heads"] == [2 * len(p.kept_kv_groups) for p in plan.layers]  # GQA G = 2

    original = load_model(str(source)).model
    in_memory = slice_model(copy.deepcopy(original), plan)
    exported = AutoModelForCausalLM.from_pretrained(result.directory, dtype=torch.float32).eval()
    assert type(exported).__name__ == "HywiaLlamaForCausalLM"
    torch.testing.assert_close(logits(exported), logits(in_memory), atol=1e-5, rtol=0)
    # ... which is the original with the removed units zeroed, and really differs from the original.
    masked = zero_removed_units(copy.deepcopy(original), plan)
    torch.testing.assert_close(logits(exported), logits(masked), atol=1e-5, rtol=0)
    assert (logits(exported) - logits(original)).abs().max() > 1e-3

    assert abs(report["ratio_achieved"] - RATIO) < 0.005
    assert report["params_after"] == parameter_count(config)  # the config describes what was written
    assert report["layout"]["layout"] == "per-layer" and report["layout"]["uniform"] is False


def test_protected_layers_stay_whole_and_the_rest_share_the_removal(source, calibration):
    loaded = load_model(str(source))
    original = copy.deepcopy(loaded.model)
    plan, report = prune_model(loaded, options(calibration, **MODES["protect"]), progress=False)
    assert report["layout"]["protected_layers"] == [0, LAYERS - 1]
    for index in (0, LAYERS - 1):
        kept, before = loaded.model.model.layers[index].state_dict(), original.model.layers[index].state_dict()
        assert kept.keys() == before.keys()
        for name in kept:
            assert torch.equal(kept[name], before[name]), f"protected layer {index}: {name} changed"
    shapes = {(len(p.kept_kv_groups), len(p.kept_mlp_channels)) for p in plan.layers[1:-1]}
    assert len(shapes) == 1 and shapes != {(2, 512)}


def test_global_allocation_keeps_the_minimum_in_every_layer(source, calibration):
    loaded = load_model(str(source))
    plan, report = prune_model(loaded, options(calibration, ratio=0.5, align_mlp=8, **MODES["global"]),
                               progress=False)
    kv_floor, mlp_floor = minimum_kept(2, 0.25, 1), minimum_kept(512, 0.25, 8)
    assert (kv_floor, mlp_floor) == (1, 128)
    for layer in plan.layers:
        assert len(layer.kept_kv_groups) >= kv_floor and len(layer.kept_mlp_channels) >= mlp_floor
        assert len(layer.kept_mlp_channels) % 8 == 0 or len(layer.kept_mlp_channels) == 512
    assert len({len(layer.kept_mlp_channels) for layer in plan.layers}) > 1  # the ranking did differ by layer
    assert abs(report["ratio_achieved"] - 0.5) < 0.005
    assert "divided by the unit's parameter count" in report["layout"]["ranking"]


def test_blends_keep_as_many_units_per_layer_as_fine_and_hybrid_trains_at_those_counts(source, calibration):
    counts = {}
    for method in ("fine", "fixed", "hybrid"):
        loaded = load_model(str(source))
        plan, report = prune_model(loaded, options(calibration, importance=method, **MODES["global"]), progress=False)
        counts[method] = [(len(p.kept_kv_groups), len(p.kept_mlp_channels)) for p in plan.layers]
    assert counts["hybrid"] == counts["fixed"] == counts["fine"]
    assert report["importance_details"]["selected"] in ("learned", "fixed")  # the fusion did run
    assert "the fusion then trains with these counts" in report["layout"]["ranking"]


# ---- global allocation, on scores made up for the test ----------------------------------------------

SHAPE = LayerShape(kv_groups=4, mlp_channels=64, kv_group_params=1000, mlp_channel_params=10)
TOTAL = 20_000  # 4 layers × (4 000 + 640) = 18 560 prunable parameters, plus 1 440 that are not


def made_up_scores(per_layer_scale: list[float]) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"attn": scale * 1000 * torch.rand(4, generator=generator),
             "mlp": scale * 10 * torch.rand(64, generator=generator)} for scale in per_layer_scale]


def test_global_allocation_takes_more_from_less_important_layers():
    scores = CRITERIA["fine"].comparable(None, made_up_scores([10, 1, 10, 10]), [SHAPE] * 4, "rank")
    keep = GlobalAllocation(scores, Budget((SHAPE,) * 4, TOTAL, min_keep=0.25)).keep_counts(0.3)
    removed = [SHAPE.removed_params(k) for k in keep]
    # The least important layer goes down to its minimum (1 of 4 KV groups, 16 of 64 channels) first.
    assert removed[1] == 3 * 1000 + 48 * 10 == max(removed)
    assert abs(sum(removed) - 0.3 * TOTAL) <= 5  # half the smallest step
    assert all(k.kv_groups >= 1 and k.mlp_channels >= 16 for k in keep)


def test_blends_are_allocated_by_the_fine_loss_estimate_alone():
    """Normalised within each layer (as hywia.importance does for fixed/hybrid), a layer whose units
    all matter ten times less would look like every other layer; the blends are therefore allocated by
    fine's per-parameter scores, and coarse, whatever its scale, has no say in the keep counts."""
    fine = made_up_scores([10, 1, 10, 10])
    for coarse in (made_up_scores([1, 10, 1, 1]), made_up_scores([1, 1, 1, 1])):
        for name in ("fixed", "hybrid"):
            scores = CRITERIA[name].comparable(UnitStatistics(fine=fine, coarse=coarse), None, [SHAPE] * 4, "rank")
            for got, want in zip(scores, CRITERIA["fine"].comparable(None, fine, [SHAPE] * 4, "rank")):
                for kind in ("attn", "mlp"):
                    assert torch.equal(got[kind], want[kind])
    keep = GlobalAllocation(scores, Budget((SHAPE,) * 4, TOTAL)).keep_counts(0.3)
    assert SHAPE.removed_params(keep[1]) == max(SHAPE.removed_params(k) for k in keep)


def test_global_allocation_refuses_a_ratio_the_minimum_forbids():
    allocation = GlobalAllocation(made_up_scores([1, 1, 1, 1]), Budget((SHAPE,) * 4, TOTAL, protected=(0,), min_keep=0.5))
    with pytest.raises(HywiaError, match="keeps at least 0.5"):
        allocation.keep_counts(0.4)
    assert allocation.keep_counts(0.1)[0] == SHAPE.whole  # the protected layer is never ranked


# ---- --target-memory / --target-params ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["uniform", "protect", "global"])
def test_target_params_chooses_the_ratio_the_pipeline_then_applies(mode, source, calibration):
    fields = {"uniform": {}, **MODES}[mode]
    dense = sum(p.numel() for p in load_model(str(source)).model.parameters())
    target = int(dense * 0.75)
    loaded = load_model(str(source))
    _, report = prune_model(loaded, options(calibration, target_params=str(target), **fields),
                            progress=False)
    fit = report["memory_fit"]
    assert fit["target"] == "params" and report["ratio_requested"] == fit["ratio"] > 0.2
    # The arithmetic's shape is the one cut: same parameter count, within the target, one step less is not.
    assert report["params_after"] == fit["chosen"]["parameters"] <= target < fit["previous"]["parameters"]
    assert "chosen ratio" in fit["explanation"]


def test_target_memory_counts_the_kv_cache_of_the_workload(source, calibration):
    loaded = load_model(str(source))
    config = loaded.model.config.to_dict()
    # A float32 export is served by vLLM in a 16-bit dtype (its --dtype auto), so the target counts 2 bytes.
    workload = Workload(max_model_len=256, max_seqs=8, dtype="bfloat16")
    dense = footprint(config, workload)
    target = int(dense.weight_bytes * 0.7 + dense.kv_cache_bytes)
    plan, report = prune_model(loaded, options(calibration, target_memory=f"{target}B", max_model_len=256, max_seqs=8,
                                               **MODES["protect"]), progress=False)
    chosen = report["memory_fit"]["chosen"]
    assert chosen["total_bytes"] <= target < report["memory_fit"]["previous"]["total_bytes"]
    assert chosen["parameters"] == report["params_after"]
    kv_per_token = sum(2 * len(layer.kept_kv_groups) * 64 * 2 for layer in plan.layers)
    assert chosen["kv_bytes_per_token"] == kv_per_token and chosen["kv_tokens"] == 256 * 8


def test_a_target_the_dense_model_meets_prunes_nothing(source, calibration, tmp_path):
    result = prune_to_directory(str(source), options(calibration, target_params="1B"),
                                tmp_path / "export", progress=False)
    assert result.report["ratio_requested"] == 0 and result.report["params_after"] == result.report["params_before"]
    assert "no pruning needed" in result.report["memory_fit"]["explanation"]


def test_a_target_no_ratio_meets_is_refused_before_calibration(source, tmp_path):
    # A calibration file far too short: had the pipeline calibrated, that would be the error. (Even widths
    # are known before any score; global allocation needs the scores, so it refuses after them: below.)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    loaded = load_model(str(source))
    with pytest.raises(HywiaError, match="no pruning ratio up to 0.78") as refusal:
        prune_model(loaded, PruneOptions(importance="fine", calibration=str(short), target_params="1000",
                                         layout="uniform"), progress=False)
    assert refusal.value.fix == "raise --target-params"


def test_a_target_global_allocation_cannot_meet_is_refused_with_its_limit(source, calibration):
    loaded = load_model(str(source))
    with pytest.raises(HywiaError, match=r"no pruning ratio up to 0\.\d+ \(the most hywia removes") as refusal:
        prune_model(loaded, options(calibration, target_params="1000"), progress=False)
    assert refusal.value.fix == "raise --target-params"


# ---- validation before heavy work ------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"layout": "per-layer", "protect_layers": "first4"}, "cannot read --protect-layers"),
    ({"layout": "per-layer", "protect_layers": "first:1,first:2"}, "cannot read --protect-layers"),
    ({"layout": "per-layer", "protect_layers": "middle:3"}, "cannot read --protect-layers"),
    ({"layout": "per-layer", "protect_layers": "first:0,last:0"}, "protects no layer"),
    ({"layout": "uniform", "protect_layers": "first:4,last:2"}, "which the uniform layout cannot"),
    ({"layout": "uniform", "allocation": "global"}, "which the uniform layout cannot"),
    ({"layout": "per-layer", "allocation": "even"}, "--allocation even needs --protect-layers first:K,last:M"),
    ({"layout": "per-layer", "allocation": "global", "min_keep": 1.0}, r"--min-keep 1.0 is outside \[0, 1\)"),
    ({"layout": "diagonal"}, "not one of"),
    ({"ratio": 0.3, "target_params": "1B"}, "--ratio and a target"),
    ({"target_params": "1B", "target_memory": "1GiB", "max_seqs": 1}, "give one of them"),
    ({"target_memory": "6 gigs", "max_seqs": 1}, "cannot read the memory size"),
    ({"target_memory": "6GiB"}, "--max-seqs N"),
    ({"target_params": "lots"}, "cannot read the parameter count"),
    ({"target_memory": "6GiB", "max_seqs": 0}, "--max-seqs 0 must be at least 1"),
])
def test_bad_layout_and_target_options_fail_before_loading(fields, message):
    with pytest.raises(HywiaError, match=message):
        PruneOptions(**fields)


def test_the_default_layout_is_per_layer_global_and_uniform_means_even():
    assert (PruneOptions().layout, PruneOptions().allocation, PruneOptions().protect_layers) == ("per-layer", "global", None)
    assert PruneOptions(layout="uniform").allocation == "even"
    # protected ends with the default allocation: global ranking of the unprotected layers' units
    assert PruneOptions(protect_layers="first:2,last:2").allocation == "global"
    assert PruneOptions(protect_layers="first:4,last:2", allocation="even").allocation == "even"


def test_protecting_every_layer_is_refused():
    assert protected_layers("first:4,last:2", 30) == [0, 1, 2, 3, 28, 29]
    assert protected_layers("last:1", 3) == [2]
    with pytest.raises(HywiaError, match="protects all 6 layers"):
        protected_layers("first:4,last:2", 6)


def test_cli_refusals_name_the_flag_and_print_no_traceback(source, tmp_path, capsys):
    cases = [
        (["--ratio", "0.3", "--target-params", "1M"], "--ratio and --target-params both set the ratio"),
        (["--max-seqs", "4"], "add --target-memory SIZE"),
        (["--layout", "per-layer", "--protect-layers", "first:9,last:9"], "protects all 6 layers"),
    ]
    for flags, message in cases:
        assert main(["prune", str(source), "--out", str(tmp_path / "x"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_serve_takes_the_layout_and_target_flags_from_the_shared_arguments():
    """`hywia serve` adds the pruning flags through add_prune_arguments next to its own
    --max-model-len / --max-num-seqs, which are then the workload --target-memory fits."""
    args = build_parser().parse_args(["serve", "--layout", "per-layer", "--protect-layers", "first:4,last:2",
                                      "--target-memory", "1GiB", "--max-model-len", "512", "--max-num-seqs", "4"])
    fitted = prune_options(args)
    assert (fitted.layout, fitted.protect_layers, fitted.target_memory) == ("per-layer", "first:4,last:2", "1GiB")
    assert (fitted.max_model_len, fitted.max_seqs) == (512, 4)
    plain = prune_options(build_parser().parse_args(["serve", "--max-model-len", "512"]))
    assert plain == PruneOptions()  # serving flags alone change nothing about pruning (nor the cache key)


def test_cli_prune_per_layer_with_a_target_prints_the_arithmetic(source, calibration, tmp_path, capsys):
    dense = sum(p.numel() for p in load_model(str(source)).model.parameters())
    out = tmp_path / "export"
    code = main(["prune", str(source), "--out", str(out), "--layout", "per-layer", "--protect-layers", "first:1",
                 "--importance", "magnitude", "--target-memory", f"{dense * 2 * 0.8 / 2**20:.2f}MiB",  # served in 16 bits
                 "--max-model-len", "64", "--max-seqs", "2", "--recover", "none"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "chosen ratio" in printed and "2 sequences × 64 tokens" in printed
    assert "layers [0] protected" in printed
    assert json.loads((out / "hywia_report.json").read_text())["memory_fit"]["workload"]["max_seqs"] == 2


# ---- the real default model, pruned per-layer, served by vLLM's own server and by ours ----------------

# Shared by both servers (same options → same cache key → pruned once per machine). `fixed` needs no
# fusion training; the calibration is the default one, so its statistics (hywia.statistics_cache) are
# those every default-calibration export of this model in the test cache reuses.
PER_LAYER_DEFAULT_OPTIONS = PruneOptions(ratio=0.2, importance="fixed", layout="per-layer",
                                         protect_layers="first:4,last:2", recover="none")
PER_LAYER_SERVE_FLAGS = ("--ratio", "0.2", "--importance", "fixed", "--layout", "per-layer",
                         "--protect-layers", "first:4,last:2", "--recover", "none")
SERVER_START_SECONDS = 600


@pytest.fixture(scope="module")
def per_layer_default_export(test_cache, default_model_dir):
    from hywia.pipeline import prepare_export

    export = prepare_export(resolve_source(None, test_cache), PER_LAYER_DEFAULT_OPTIONS, cache_dir=test_cache)
    config = json.loads((export.directory / "config.json").read_text())
    assert config["architectures"] == ["HywiaLlamaForCausalLM"]
    assert config["layer_num_key_value_heads"][:4] == [3] * 4 and config["layer_num_key_value_heads"][-2:] == [3] * 2
    assert abs(export.report["ratio_achieved"] - 0.2) < 0.005
    return export


def vllm_serve_command(export, port: int) -> tuple[list[str], str]:
    """vLLM's own OpenAI server on the export: only the installed plugin teaches it HywiaLlama."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export), "--host", "127.0.0.1",
            "--port", str(port), "--max-model-len", "512", "--max-num-seqs", "4", "--enforce-eager",
            "--dtype", "float32", "--served-model-name", "smollm2-per-layer"], "smollm2-per-layer"


def hywia_serve_command(export, port: int) -> tuple[list[str], str]:
    """Our server, given the pruning flags: it must find the same export in the cache, not prune again."""
    from tests.test_server_api import serve_command

    return (serve_command(None, port, TEST_CACHE, "--engine", "vllm", *PER_LAYER_SERVE_FLAGS,
                          "--kv-cache-memory-bytes", "256MiB", "--max-model-len", "512", "--enforce-eager"),
            "smollm2-135m-instruct-pruned20")


@pytest.mark.slow
@pytest.mark.parametrize("server", [vllm_serve_command, hywia_serve_command], ids=["vllm-serve", "hywia-serve"])
def test_a_server_answers_a_chat_request_on_the_per_layer_default_model(server, per_layer_default_export,
                                                                      tmp_path):
    import openai

    from hywia.bench.process import ServerProcess, free_port
    from tests.test_server_api import API_KEY

    port = free_port()
    command, model = server(per_layer_default_export.directory, port)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = ServerProcess(command, port, tmp_path / "server.log", env=env).start()
    try:
        process.wait_until_ready(SERVER_START_SECONDS)
        client = openai.OpenAI(base_url=f"{process.base_url}/v1", api_key=API_KEY, timeout=120, max_retries=0)
        if server is hywia_serve_command:
            report = client.get("/hywia/report", cast_to=object)
            served = next(entry for entry in report["data"] if entry["model"] == model)
            assert served["directory"] == str(per_layer_default_export.directory)  # a cache hit, not a re-prune
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32, temperature=0.0)
        text = reply.choices[0].message.content
        assert reply.usage.completion_tokens > 3 and text.strip(), f"empty reply: {reply}"
        assert sum(ch.isalpha() for ch in text) > 10, f"no words in the reply: {text!r}"
        assert len(set(text.split())) > 3, f"degenerate reply: {text!r}"
    finally:
        process.stop()
