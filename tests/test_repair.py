"""The repair stages as the pipeline runs them: reconstruction after cutting, recovery (LoRA) after
slicing, both recorded in the report, both part of the cache key, and a stop request that leaves
nothing in the cache."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hywia.errors import HywiaError
from hywia.models import load_model, resolve_source
from hywia.options import PruneOptions
from hywia.pipeline import export_key, prepare_export
from hywia.plan import PruningPlan
from hywia.reconstruct import reconstruct
from hywia.recovery import RecoveryStopped
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
                         ("recover_samples", 9), ("recover_seq_len", 96), ("reconstruct", "none")):
        changed = PruneOptions(**{field: value})
        assert export_key("digest", changed) != export_key("digest", base), field


def test_a_stop_request_during_recovery_writes_nothing(tiny_gqa_dir, calibration, tmp_path):
    """`hywia serve` sets its stop event on SIGTERM; recovery polls it, and the export never lands."""
    polls = []

    def stop_at_second_step() -> bool:
        polls.append(1)
        return len(polls) > 1

    options = PruneOptions(**FAST, calibration=calibration)
    with pytest.raises(RecoveryStopped, match="nothing was merged or written"):
        prepare_export(resolve_source(str(tiny_gqa_dir)), options, cache_dir=tmp_path,
                       should_stop=stop_at_second_step)
    exports = tmp_path / "exports"
    assert not exports.exists() or not any(exports.iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--recover-steps", "0"], "--recover-steps 0 must be a positive whole number"),
    (["--recover-lr", "-1"], "--recover-lr -1.0 must be a positive number"),
    (["--recover-data", "/no/such/recovery.txt"], "does not exist"),
    (["--recover-seq-len", "16"], "--recover-seq-len 16 must be at least 64"),
    (["--reconstruct", "svd"], "invalid choice"),
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
