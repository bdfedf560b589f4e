"""Soak: ``scripts/train.py`` killed with SIGKILL ten times at seeded random points of a short two-stage
run (at a random moment of training, while a checkpoint is being written, while a stage's final
model is being written), then run to completion: both stages' final weights and train losses equal
an uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_training import make_toy_world, toy_config_dict

REPO = Path(__file__).resolve().parent.parent
KILLS = 10


def launch(config: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "scripts/train.py", "--config", str(config), "--no-eval"],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def wait_for(proc: subprocess.Popen, found, timeout: float = 300.0) -> bool:
    """Poll until ``found()`` or the process ends; -> whether ``found()`` held while it ran."""
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if found():
            return True
        time.sleep(0.002)
    return False


def training_started(out: Path, since: float):
    def found() -> bool:  # resolved_config.yaml is written once the run folder and data checks pass
        path = out / "resolved_config.yaml"
        return path.is_file() and path.stat().st_mtime >= since
    return found


def appears(out: Path, pattern: str):
    return lambda: any(out.glob(pattern))


@pytest.mark.slow
def test_ten_random_kills_then_completion_equal_the_uninterrupted_run(tmp_path):
    world = make_toy_world(tmp_path / "world", n_train=24, n_eval=4)

    def config(out: Path) -> Path:
        d = toy_config_dict(world, out, max_steps=8, save_steps=1, scheduler="cosine", warmup=0.2)
        d["training"].update(group_by_length=True, cache_vision_features=True, optim="adamw_torch_fused",
                             save_total_limit=2)
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(d))
        return path

    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    ref = launch(config(ref_out), tmp_path / "reference.log")
    assert ref.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    rng = random.Random(25)
    cfg, log = config(out), tmp_path / "killed.log"
    outcomes = []
    # A kill while a stage's final model is written lets that stage finish first: one such kill in
    # the middle of the ten (stage 1's, usually), one last (stage 2's); the others anywhere.
    plan = [rng.choice(["moment", "checkpoint write"]) for _ in range(KILLS)]
    plan[rng.randrange(3, KILLS - 3)] = plan[-1] = "final write"
    for mode in plan:
        start = time.time() - 1.0  # mtime resolution
        proc = launch(cfg, log)
        if mode == "moment":
            hit = wait_for(proc, training_started(out, start))
            time.sleep(rng.uniform(0.0, 0.8))
        else:
            hit = wait_for(proc, appears(out, "*/tmp-checkpoint-*" if mode == "checkpoint write" else "*/tmp-final"))
            time.sleep(rng.uniform(0.0, 0.02))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        outcomes.append((mode, hit, proc.wait(timeout=60)))
    assert all(rc in (0, -signal.SIGKILL) for _, _, rc in outcomes), (outcomes, log.read_text()[-3000:])
    assert any(rc == -signal.SIGKILL for _, _, rc in outcomes), outcomes

    final = launch(cfg, log)
    assert final.wait(timeout=600) == 0, (outcomes, log.read_text()[-3000:])
    for stage in ("align", "instruct"):
        ours = load_file(out / stage / "final" / "model.safetensors")
        theirs = load_file(ref_out / stage / "final" / "model.safetensors")
        assert ours.keys() == theirs.keys()
        differ = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
        assert not differ, (stage, differ[:3], outcomes)
        a, b = (json.loads((o / stage / "final" / "stage_complete.json").read_text()) for o in (out, ref_out))
        assert a["global_step"] == b["global_step"] == 8
        assert a["train_loss"] == b["train_loss"], outcomes
    assert not list(out.glob("*/tmp-*")), outcomes
