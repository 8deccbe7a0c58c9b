"""The repair stages as the pipeline runs them: reconstruction after cutting, recovery (LoRA) after
slicing, both recorded in the report, both part of the cache key, and a stop request that leaves
nothing in the cache."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
import traceback

import pytest
import torch
from safetensors.torch import load_file

from hywia.errors import HywiaError
from hywia.models import load_model, resolve_source
from hywia.options import PruneOptions
from hywia.pipeline import export_key, prepare_export
from hywia.plan import PruningPlan
from hywia.reconstruct import reconstruct
from hywia.stopping import PruningStopped
from hywia.surgery import slice_model
from tests.test_pruning import CALIBRATION_TEXT

FAST = dict(ratio=0.3, importance="fixed", samples=4, seq_len=32, recover_samples=8, recover_seq_len=96,
            recover_steps=2)


@pytest.fixture
def calibration(tmp_path) -> str:
    path = tmp_path / "calibration.txt"
    path.write_text(CALIBRATION_TEXT)
    return str(path)


def exported_tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_recover_none_exports_exactly_the_reconstructed_slice(tiny_gqa_dir, calibration, tmp_path):
    """With --recover none the export is the plan's slice of the reconstructed model, tensor for tensor;
    with --reconstruct none as well, the plain slice of the source."""
    for reconstruction in ("ls", "none"):
        options = PruneOptions(**FAST, calibration=calibration, recover="none", reconstruct=reconstruction,
                               dtype="float32")
        export = prepare_export(resolve_source(str(tiny_gqa_dir)), options, cache_dir=tmp_path / reconstruction)
        assert export.report["recovery"] is None
        plan = PruningPlan.from_dict(export.report["plan"])
        expected = load_model(str(tiny_gqa_dir)).model
        if reconstruction == "ls":
            from hywia.calibration import calibration_batch

            # The pipeline scored with the same batch (same source, sizes and seed).
            loaded = load_model(str(tiny_gqa_dir))
            batch = calibration_batch(calibration, loaded.tokenizer, expected, 4, 32, 0)
            assert export.report["reconstruction"]["tokens"] == batch.numel()
            reconstruct(expected, plan, batch, progress=False)
        else:
            assert export.report["reconstruction"] is None
        slice_model(expected, plan)
        saved = exported_tensors(export.directory)
        state = {name: tensor for name, tensor in expected.state_dict().items() if name in saved}
        assert state.keys() == saved.keys()
        for name, tensor in state.items():
            torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)


def test_reconstruct_samples_fit_on_more_rows_of_the_calibration_text(tiny_gqa_dir, calibration, tmp_path):
    """--reconstruct-samples N: the export is the slice of the model re-fitted on the calibration rows plus
    N − samples more windows (hywia.calibration.reconstruction_rows), tensor for tensor."""
    from hywia.calibration import calibration_batch, reconstruction_rows
    from hywia.quality import HELDOUT_SAMPLES

    options = PruneOptions(**FAST, calibration=calibration, recover="none", reconstruct_samples=12,
                           dtype="float32")
    export = prepare_export(resolve_source(str(tiny_gqa_dir)), options, cache_dir=tmp_path)
    assert export.report["reconstruction"]["tokens"] == 12 * 32
    assert "reconstruction_text" in export.report["memory"]["stages"]
    plan = PruningPlan.from_dict(export.report["plan"])
    loaded = load_model(str(tiny_gqa_dir))
    batch = calibration_batch(calibration, loaded.tokenizer, loaded.model, 4, 32, 0)
    rows = reconstruction_rows(calibration, loaded.tokenizer, loaded.model, batch, 12, 0, HELDOUT_SAMPLES)
    reconstruct(loaded.model, plan, rows, progress=False)
    slice_model(loaded.model, plan)
    saved = exported_tensors(export.directory)
    for name, tensor in loaded.model.state_dict().items():
        if name in saved:
            torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)
    fewer = prepare_export(resolve_source(str(tiny_gqa_dir)), dataclasses.replace(options, reconstruct_samples=None),
                           cache_dir=tmp_path)
    assert fewer.report["reconstruction"]["tokens"] == 4 * 32
    fitted_on_fewer = exported_tensors(fewer.directory)
    assert any(not torch.equal(fitted_on_fewer[name], saved[name]) for name in saved if name.endswith("down_proj.weight"))


def test_recovery_runs_after_slicing_and_is_reported(tiny_gqa_dir, calibration, tmp_path):
    options = PruneOptions(**FAST, calibration=calibration)
    export = prepare_export(resolve_source(str(tiny_gqa_dir)), options, cache_dir=tmp_path)
    recovery = export.report["recovery"]
    assert len(recovery["losses"]) == 2 and recovery["options"]["steps"] == 2
    assert export.report["reconstruction"]["fits"]
    assert "recovery" in export.report["memory"]["stages"]
    plain = prepare_export(resolve_source(str(tiny_gqa_dir)), PruneOptions(**FAST, calibration=calibration,
                                                                           recover="none"), cache_dir=tmp_path)
    assert plain.directory != export.directory  # the recovery options are part of the cache key
    # The merged adapters changed weights (every projection carries one), and only those.
    recovered, sliced = exported_tensors(export.directory), exported_tensors(plain.directory)
    changed = {name for name in recovered if not torch.equal(recovered[name], sliced[name])}
    assert changed and all(name.endswith("proj.weight") for name in changed)


def test_recovery_options_change_the_export_key():
    base = PruneOptions()
    for field, value in (("recover", "none"), ("recover_steps", 7), ("recover_lr", 1e-4), ("recover_rank", 4),
                         ("recover_samples", 9), ("recover_seq_len", 96), ("reconstruct", "none"),
                         ("reconstruct_samples", 512)):
        changed = PruneOptions(**{field: value})
        assert export_key("digest", changed) != export_key("digest", base), field
    # As many re-fit rows as calibration rows is the default's fit: the same export, not a second one.
    assert export_key("digest", PruneOptions(reconstruct_samples=PruneOptions.samples)) == export_key("digest", base)


# Each long stage's function, innermost first where one calls another (recovery's own text is written
# by the self-calibration generator), and the words its stop message names it by.
STOPPING_STAGES = {"own_text": "recovery data (own text)", "self_replies": "recovery data (dense replies)",
                   "teacher_targets": "recovery teacher", "self_generated": "self-calibration",
                   "_chunk_statistics": "gradients", "train_fusion": "fusion", "reconstruct": "reconstruction",
                   "recover": "recovery (before step"}


def _polling_stage() -> str | None:
    """Which pipeline stage is asking whether to stop (read off the call stack)."""
    functions = {frame.name for frame in traceback.extract_stack()}
    return next((name for name in STOPPING_STAGES if name in functions), None)


def _cached_files(cache) -> set[str]:
    return {str(path.relative_to(cache)) for path in cache.rglob("*") if path.is_file()}


def test_a_stop_request_in_any_stage_stops_there_and_writes_nothing_partial(tiny_gqa_dir, tmp_path):
    """`hywia serve` sets its stop event on SIGTERM. Every long stage of the default pipeline polls it
    between units of work, so a stop asked for at any stage's first poll ends the prune at once (within
    the next poll) with an error naming that stage, and the cache holds no export and nothing that a
    finished prune would not have written (statistics of a finished gradient stage may stay)."""
    source = resolve_source(str(tiny_gqa_dir))
    options = PruneOptions(ratio=0.3, importance="hybrid", calibration="self", samples=4, seq_len=32,
                           recover_samples=8, recover_seq_len=96, recover_steps=2)
    polls = []
    prepare_export(source, options, cache_dir=tmp_path / "whole", should_stop=lambda: polls.append(_polling_stage()))
    finished = _cached_files(tmp_path / "whole")
    first_poll = {stage: polls.index(stage) for stage in STOPPING_STAGES}  # ValueError: a stage never polls
    for stage, index in first_poll.items():
        cache, count = tmp_path / stage, itertools.count()
        with pytest.raises(PruningStopped) as stopped:
            prepare_export(source, options, cache_dir=cache,
                           should_stop=lambda polls=count, first=index: next(polls) >= first)
        assert STOPPING_STAGES[stage] in stopped.value.problem and "nothing was written" in stopped.value.problem
        assert next(count) <= index + 2, stage  # the stopping poll, and at most one more after a cut generation
        left = _cached_files(cache) if cache.exists() else set()
        assert not any(name.startswith("exports") for name in left), stage
        assert left <= finished, (stage, left - finished)


@pytest.mark.parametrize("flags, message", [
    (["--recover-steps", "0"], "--recover-steps 0 must be a positive whole number"),
    (["--recover-lr", "-1"], "--recover-lr -1.0 must be a positive number"),
    (["--recover-data", "/no/such/recovery.txt"], "does not exist"),
    (["--recover-seq-len", "16"], "--recover-seq-len 16 must be at least 64"),
    (["--reconstruct", "svd"], "invalid choice"),
    (["--reconstruct-samples", "2"], "--reconstruct-samples 2 is below --samples"),
    (["--reconstruct", "none", "--reconstruct-samples", "512"], "which --reconstruct none turns off"),
])
def test_bad_repair_flags_fail_before_any_work(tiny_gqa_dir, tmp_path, flags, message):
    done = subprocess.run([sys.executable, "-m", "hywia.cli", "prune", str(tiny_gqa_dir), "--out",
                           str(tmp_path / "out"), *flags], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_recovery_options_are_validated_on_construction():
    with pytest.raises(HywiaError, match="--recover-rank 0"):
        PruneOptions(recover_rank=0)
    PruneOptions(recover="none", recover_rank=0)  # nothing to validate when recovery is off


def test_recovery_of_a_checkpoint_without_a_chat_template_continues_plain_text(tiny_gqa_dir):
    """LLaMA-1/2 base checkpoints ship no template: the default recovery must still have data to learn."""
    from hywia.recovery_data import self_replies

    loaded = load_model(str(tiny_gqa_dir))
    loaded.tokenizer.chat_template = None
    data = self_replies(loaded.tokenizer, loaded.model, samples=2, seq_len=96, seed=0, progress=False)
    assert data.input_ids.shape == (2, 96) and data.trained_tokens > 0
    first = loaded.tokenizer.decode(data.input_ids[0][data.attention_mask[0].bool()])
    assert "<|im_start|>" not in first  # no chat markup without a template
