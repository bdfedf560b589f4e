"""Runs you can trust after a crash: a run interrupted at any point (a checkpoint write, between a
stage's last checkpoint and its final model, inside the final model's write) and run again ends in
weights bit-identical to an uninterrupted run's, with the shipped tiny recipe's settings (length
grouping, the frozen tower's feature cache, the fused optimizer); damaged checkpoints are skipped
with a warning, a checkpoint without optimizer state is an error; a stage trained with another
config is never reused; moving the tiny world's cache keeps a run resumable.

The crashes here are raised inside the process at the named point, which leaves the run folder as
a kill -9 there would (every write is atomic); ``test_soak.py`` kills real processes at random.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training import Interrupted, InterruptAfterSave, make_toy_world, toy_config_dict
from vlmzoo.config import run_config_from_dict

STAGES = ("align", "instruct")


def exact_config(world, out: Path, **training) -> dict:
    """Two 10-step stages over 48 samples in batches of 8 (6 steps an epoch, so a resume at step 8
    is in the second epoch), a checkpoint every 4 steps, the shipped recipe's sampler and caches."""
    d = toy_config_dict(world, out, max_steps=10, save_steps=4, scheduler="cosine", warmup=0.2)
    d["training"].update(group_by_length=True, cache_vision_features=True, optim="adamw_torch_fused",
                         save_total_limit=2, **training)
    return d


def run(d: dict, callbacks=None):
    from vlmzoo.training import run_training

    return run_training(run_config_from_dict(d), evaluate=False, callbacks=callbacks)


def weights(out: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(out / stage / "final" / "model.safetensors")


def done(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "final" / "stage_complete.json").read_text())


def assert_same_run(out: Path, ref: Path) -> None:
    """Both stages' final weights bit-identical, and the same step count and all-steps train loss."""
    for stage in STAGES:
        ours, theirs = weights(out, stage), weights(ref, stage)
        assert ours.keys() == theirs.keys()
        differ = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
        assert not differ, f"{stage}: {len(differ)} tensors differ, e.g. {differ[:3]}"
        a, b = done(out, stage), done(ref, stage)
        assert a["global_step"] == b["global_step"] == 10
        assert a["train_loss"] == b["train_loss"]  # every step's loss, bit for bit
        assert a["last_logged_loss"] == b["last_logged_loss"]
        assert a["config_hash"] == b["config_hash"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_toy_world(tmp_path_factory.mktemp("toy_world"))


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    run(exact_config(world, out))
    return out


def crash_on_call(monkeypatch, module, name: str, when=lambda *a, **k: True) -> None:
    """``module.name`` raises :class:`Interrupted` on the first call for which ``when(*args)`` holds."""
    original = getattr(module, name)
    fired = []

    def wrapper(*args, **kwargs):
        if not fired and when(*args, **kwargs):
            fired.append(True)
            raise Interrupted(f"deliberate crash in {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


# ---- crash points --------------------------------------------------------------------------------
def _in_stage(stage: str, step: int | None = None):
    def when(folder, *args, **kwargs):
        folder = Path(folder)
        return folder.parent.name == stage and (step is None or folder.name.endswith(f"-{step}"))
    return when


def crash_mid_write(monkeypatch):  # optimizer being written: model.safetensors there, the rest not
    from vlmzoo.training.trainer import VLMTrainer

    original = VLMTrainer._save_optimizer_and_scheduler

    def broken(self, output_dir):
        if Path(output_dir).name == "tmp-checkpoint-8" and Path(output_dir).parent.name == "instruct":
            raise Interrupted("deliberate crash while writing checkpoint-8")
        return original(self, output_dir)

    monkeypatch.setattr(VLMTrainer, "_save_optimizer_and_scheduler", broken)


def crash_before_manifest(monkeypatch):  # every file written, manifest not yet, not renamed
    import vlmzoo.training.trainer as trainer

    crash_on_call(monkeypatch, trainer, "write_manifest", _in_stage("instruct", 8))


def crash_before_final(monkeypatch):  # the last checkpoint is written, final/ is not
    import vlmzoo.training.runner as runner

    crash_on_call(monkeypatch, runner, "save_final", lambda trainer, final_dir, *a, **k: final_dir.parent.name == "instruct")


def crash_before_marker(monkeypatch):  # tmp-final/ holds the model, not yet stage_complete.json
    import vlmzoo.training.runner as runner

    crash_on_call(monkeypatch, runner, "atomic_write_text",
                  lambda path, text: Path(path).name == "stage_complete.json" and Path(path).parent.parent.name == "instruct")


def crash_before_rename(monkeypatch):  # tmp-final/ is complete, marker included, not yet renamed
    import vlmzoo.training.runner as runner

    crash_on_call(monkeypatch, runner, "publish", lambda tmp, final: Path(final).parent.name == "instruct")


def crash_between_stages(monkeypatch):  # stage 1 complete, stage 2 not started
    import vlmzoo.training.runner as runner

    crash_on_call(monkeypatch, runner, "load_stage_start", lambda cfg, previous, *a, **k: previous is not None)


def crash_mid_stage1(monkeypatch):
    return [InterruptAfterSave("align", 8)]


CRASHES = {
    "mid stage 1 (epoch 2)": crash_mid_stage1,
    "between stages": crash_between_stages,
    "during a checkpoint write": crash_mid_write,
    "checkpoint written, before its manifest": crash_before_manifest,
    "after the last checkpoint, before final/": crash_before_final,
    "final/ written, before its completion marker": crash_before_marker,
    "final/ complete, before its rename": crash_before_rename,
}
FAST = ("during a checkpoint write", "after the last checkpoint, before final/")


@pytest.mark.parametrize("point", [p if p in FAST else pytest.param(p, marks=pytest.mark.slow) for p in CRASHES])
def test_a_crash_at_any_point_then_the_same_command_gives_identical_weights(world, reference, tmp_path, monkeypatch, point):
    out = tmp_path / "run"
    d = exact_config(world, out)
    with monkeypatch.context() as patch:
        callbacks = CRASHES[point](patch)
        with pytest.raises(Interrupted):
            run(d, callbacks=callbacks)
    assert not (out / "instruct" / "final" / "stage_complete.json").exists()
    result = run(d)
    assert_same_run(out, reference)
    assert not list(out.glob("*/tmp-*")), "a partial write was left behind"
    if point == "during a checkpoint write":
        assert result.stages[1].metrics["resumed_from"].endswith("instruct/checkpoint-4")
    if point.startswith(("after the last checkpoint", "final/")):
        assert result.stages[1].metrics["resumed_from"].endswith("instruct/checkpoint-10")


def test_an_uninterrupted_rerun_is_bit_identical_and_skips_everything(world, reference, tmp_path):
    out = tmp_path / "run"
    d = exact_config(world, out)
    run(d)
    assert_same_run(out, reference)
    again = run(d)
    assert [s.skipped for s in again.stages] == [True, True]


# ---- damaged checkpoints -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted(world, tmp_path_factory) -> Path:
    """A run stopped right after stage 2's checkpoint-8 (checkpoint-4 kept too)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(Interrupted):
        run(exact_config(world, out), callbacks=[InterruptAfterSave("instruct", 8)])
    assert sorted(p.name for p in (out / "instruct").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    return out


def copy_of(interrupted: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    return out


@pytest.mark.parametrize("damage", ["truncated model.safetensors", "partial (no manifest, no trainer state)"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_with_a_warning(world, reference, interrupted, tmp_path,
                                                                           caplog, damage):
    out = copy_of(interrupted, tmp_path)
    newest = out / "instruct" / "checkpoint-8"
    if damage.startswith("truncated"):
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
        named = "model.safetensors"
    else:
        (newest / "vlmzoo_checkpoint.json").unlink()
        (newest / "trainer_state.json").unlink()
        named = "vlmzoo_checkpoint.json"
    with caplog.at_level(logging.WARNING, logger="vlmzoo.training"):
        result = run(exact_config(world, out))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "Skipping checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and str(newest) in warnings[0] and named in warnings[0]
    assert result.stages[1].metrics["resumed_from"] == str(out / "instruct" / "checkpoint-4")
    assert (out / "instruct" / "invalid-checkpoint-8").is_dir()  # kept, out of the way
    assert_same_run(out, reference)


@pytest.mark.parametrize("lost", ["optimizer.pt", "scheduler.pt"])
def test_a_checkpoint_without_optimizer_or_scheduler_state_is_an_error(world, interrupted, tmp_path, lost):
    from vlmzoo.training.checkpoints import CheckpointStateError

    out = copy_of(interrupted, tmp_path)
    (out / "instruct" / "checkpoint-8" / lost).unlink()
    with pytest.raises(CheckpointStateError, match=rf"checkpoint-8: {lost} missing\. Resuming from it would restart"):
        run(exact_config(world, out))
    assert not (out / "instruct" / "final").exists()
    assert (out / "instruct" / "checkpoint-8").is_dir()  # nothing deleted


# ---- one config per run folder -------------------------------------------------------------------
@pytest.mark.slow
def test_a_stage_of_another_config_is_never_reused(world, reference, tmp_path):
    """The sequence of issue 25: resume=false on a used folder, a missing resolved_config.yaml, and
    an interrupted retrain followed by a plain rerun."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    b = exact_config(world, out)
    b["training"]["stages"][0]["lr"] = 1e-3  # stage 1 (and so stage 2) train differently

    with pytest.raises(ValueError, match=r"training\.resume=false, but the output folder .* is not empty"):
        run({**b, "training": {**b["training"], "resume": False}})
    with pytest.raises(ValueError, match=r"holds a run of a different config \(differs at: training\.stages\.0\.lr\)"):
        run(b)
    (out / "resolved_config.yaml").unlink()
    with pytest.raises(ValueError, match=r"Stage 'align' .* was trained with another config \(.*differs at: stages\.0\.lr\)"):
        run(b)
    assert weights(out, "align").keys()  # nothing was deleted or trained

    retrain = {**b, "training": {**b["training"], "on_config_change": "retrain"}}
    with pytest.raises(Interrupted):
        run(retrain, callbacks=[InterruptAfterSave("instruct", 4)])
    result = run(b)  # the plain command: stage 1 is B's now, stage 2 resumes from B's checkpoint
    assert [s.skipped for s in result.stages] == [True, False]

    fresh = exact_config(world, tmp_path / "fresh")
    fresh["training"]["stages"][0]["lr"] = 1e-3
    run(fresh)
    assert_same_run(out, tmp_path / "fresh")
    assert done(out, "align")["config_hash"] != done(reference, "align")["config_hash"]


def test_resume_false_starts_in_a_new_folder(world, tmp_path):
    out = tmp_path / "new"
    d = exact_config(world, out, resume=False)
    d["training"]["stages"] = d["training"]["stages"][:1]
    d["training"]["stages"][0]["max_steps"] = 2
    assert not run(d).stages[0].skipped


# ---- the tiny world's cache moves ----------------------------------------------------------------
@pytest.mark.slow
def test_a_run_resumes_with_the_same_world_in_another_cache(tmp_path):
    from vlmzoo.config import CONFIGS_DIR, load_run_config
    from vlmzoo.tinyworld import small_test_config
    from vlmzoo.training import run_training

    small = json.dumps(small_test_config().to_dict())
    overrides = [f"tiny_world.config={small}", "eval.data=null", f"output.dir={tmp_path / 'run'}",
                 *[f"training.stages.{i}.{k}={v}" for i in (0, 1) for k, v in (("max_steps", 2), ("batch_size", 4))]]
    first = load_run_config(CONFIGS_DIR / "llava" / "tiny.yaml", [f"tiny_world.cache_dir={tmp_path / 'a'}", *overrides])
    run_training(first, evaluate=False)
    shutil.copytree(tmp_path / "a" / "tiny_world", tmp_path / "b" / "tiny_world")
    moved = load_run_config(CONFIGS_DIR / "llava" / "tiny.yaml", [f"tiny_world.cache_dir={tmp_path / 'b'}", *overrides])
    assert moved.model.llm != first.model.llm and Path(moved.variables["tiny_world"].root).name == Path(first.variables["tiny_world"].root).name
    again = run_training(moved, evaluate=False)
    assert [s.skipped for s in again.stages] == [True, True]


def test_a_second_run_into_a_folder_in_use_is_refused(world, tmp_path):
    from filelock import FileLock

    out = tmp_path / "run"
    out.mkdir()
    held = FileLock(str(out / ".vlmzoo.lock"))  # as another process training into it would hold it
    held.acquire()
    try:
        with pytest.raises(ValueError, match=rf"Another process is training into {out}"):
            run(exact_config(world, out))
    finally:
        held.release()
    assert sorted(p.name for p in out.iterdir()) == [".vlmzoo.lock"]


def test_a_damaged_final_model_of_a_completed_stage_is_named(world, interrupted, tmp_path):
    out = copy_of(interrupted, tmp_path)
    weights_file = out / "align" / "final" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"Cannot load the previous stage's model from {out / 'align' / 'final'}: "
                                         rf"SafetensorError.*Delete {out / 'align'} to train that stage again"):
        run(exact_config(world, out))
