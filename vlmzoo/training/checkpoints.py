"""Checkpoints a crash cannot corrupt, and the choice of the one a stage resumes from.

Writing (:meth:`vlmzoo.training.VLMTrainer._save_checkpoint`): every file of step N's checkpoint
(weights, optimizer, scheduler, RNG states, trainer state) goes into ``tmp-checkpoint-N/``; then
:func:`write_manifest` records each file's size, the step, the hash of the config the stage trains
(:func:`vlmzoo.config.stage_identity`) and the run's loss sum so far in ``vlmzoo_checkpoint.json``;
the files are flushed to disk and the folder is renamed to ``checkpoint-N``. A ``checkpoint-N``
therefore always holds a whole checkpoint; a kill mid-write leaves a ``tmp-checkpoint-N`` that
the next run removes.

Resuming (:func:`find_resume_checkpoint`): the newest ``checkpoint-N`` that :func:`inspect`
finds intact. One without a manifest (a partial write by an older vlmzoo or another tool) or with
a file missing or of another size than recorded (truncated) is skipped with a warning naming it
and moved to ``invalid-checkpoint-N`` (kept, out of the way); the next older one is tried, and
without any the stage starts from its first step (which, training being deterministic, ends in
the same weights). A checkpoint whose optimizer or scheduler state is missing is an error
(:class:`CheckpointStateError`): resuming from it would silently restart the optimizer or the
schedule. Every file a trainer saves is listed, so state added later (e.g. adapter weights) is
covered the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text, fsync_dir

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
TMP_PREFIX = "tmp-checkpoint"
INVALID_PREFIX = "invalid-checkpoint"
MANIFEST = "vlmzoo_checkpoint.json"
MANIFEST_VERSION = 1
# Files holding optimizer / scheduler state (plain torch, or DeepSpeed's global_stepN/ folder): a
# checkpoint without both kinds cannot resume exactly.
_STATE_KINDS = {
    "optimizer": re.compile(r"^(optimizer\.(pt|bin)|global_step\d+/.*optim_states\.pt)$"),
    "scheduler": re.compile(r"^(scheduler\.pt|global_step\d+/mp_rank_\d+_model_states\.pt)$"),
}
_CHECKPOINT_DIR = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


class CheckpointStateError(ValueError):
    """A checkpoint that would lose optimizer or scheduler state if resumed from."""


@dataclass
class Checkpoint:
    """An intact checkpoint: its folder, step and manifest."""

    path: Path
    step: int
    manifest: dict[str, Any]

    @property
    def config_hash(self) -> str | None:
        return self.manifest.get("config_hash")


def _files(folder: Path) -> dict[str, int]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            out[path.relative_to(folder).as_posix()] = path.stat().st_size
    return out


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (and the folders) to disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        fsync_dir(path)


def write_manifest(folder: Path, step: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Record the files of the checkpoint in ``folder`` (sizes), its step and ``extra`` (config
    hash, loss sum); flush everything to disk. The manifest is written last."""
    files = _files(folder)
    manifest = {
        "version": MANIFEST_VERSION,
        "step": int(step),
        "files": files,
        "training_state": [name for name in files if any(r.match(name) for r in _STATE_KINDS.values())],
        **extra,
    }
    fsync_tree(folder)
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final`` (replacing a leftover ``final``)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def inspect(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, None)`` for an intact checkpoint, ``(None, why)`` for a partial or damaged one.
    Raises :class:`CheckpointStateError` when only its optimizer or scheduler state is missing."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, f"no {MANIFEST} (an interrupted or foreign write)"
    try:
        manifest = json.loads(path.read_text())
        files, step = dict(manifest["files"]), int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable {MANIFEST} ({exc})"
    match = _CHECKPOINT_DIR.match(folder.name)
    if match and int(match.group(1)) != step:
        return None, f"its manifest is for step {step}"
    state = set(manifest.get("training_state") or [])
    present = {name: (folder / name).stat().st_size for name in files if (folder / name).is_file()}
    missing_state = sorted(name for name in state if name not in present)
    lacking = [kind for kind, rule in _STATE_KINDS.items() if not any(rule.match(name) for name in state)]
    if missing_state or lacking:
        what = (f"{', '.join(missing_state)} missing" if missing_state
                else f"it was saved without {' and '.join(lacking)} state")
        raise CheckpointStateError(
            f"{folder}: {what}. Resuming from it would restart the optimizer or the learning-rate schedule. "
            f"Delete {folder} to resume from an earlier checkpoint (or from the stage's start)."
        )
    for name, size in files.items():
        if name not in present:
            return None, f"{name} is missing"
        if present[name] != size:
            return None, f"{name} is {present[name]} bytes, {size} when saved (truncated or damaged)"
    return manifest, None


def remove_partial_writes(stage_dir: Path) -> list[Path]:
    """Delete ``tmp-checkpoint-*`` folders (writes a crash interrupted); -> the ones removed."""
    removed = sorted(p for p in stage_dir.glob(f"{TMP_PREFIX}-*") if p.is_dir())
    for path in removed:
        logger.warning("Removing %s: a checkpoint write that did not finish.", path)
        shutil.rmtree(path)
    return removed


def checkpoint_dirs(stage_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-N`` in ``stage_dir``, newest first."""
    found = []
    for path in stage_dir.glob(f"{CHECKPOINT_PREFIX}-*"):
        match = _CHECKPOINT_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def set_aside(folder: Path, why: str) -> Path:
    """Move a checkpoint that cannot be resumed from to ``invalid-checkpoint-N`` (numbered if taken)."""
    target = folder.with_name(folder.name.replace(CHECKPOINT_PREFIX, INVALID_PREFIX, 1))
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name.replace(CHECKPOINT_PREFIX, INVALID_PREFIX, 1)}.{n}")
    os.replace(folder, target)
    logger.warning("Skipping checkpoint %s: %s. Moved to %s; resuming from an earlier one.", folder, why, target.name)
    return target


def find_resume_checkpoint(stage_dir: Path, tidy: bool = True) -> Checkpoint | None:
    """The newest intact checkpoint of a stage folder, or ``None``. With ``tidy`` (the main process
    of a run) partial writes are removed and damaged checkpoints set aside, each with a warning
    naming it; without, they are only passed over. Raises :class:`CheckpointStateError` for a
    checkpoint that lacks its optimizer or scheduler state."""
    if not stage_dir.is_dir():
        return None
    if tidy:
        remove_partial_writes(stage_dir)
    for step, folder in checkpoint_dirs(stage_dir):
        manifest, problem = inspect(folder)
        if manifest is None:
            if tidy:
                set_aside(folder, problem or "damaged")
            continue
        return Checkpoint(folder, step, manifest)
    return None


def recorded_hashes(stage_dir: Path) -> dict[Path, str | None]:
    """The config hash every checkpoint manifest in ``stage_dir`` records (``None``: none recorded)."""
    out: dict[Path, str | None] = {}
    for _, folder in checkpoint_dirs(stage_dir):
        try:
            out[folder] = json.loads((folder / MANIFEST).read_text()).get("config_hash")
        except (OSError, ValueError):
            continue  # partial or damaged: find_resume_checkpoint sets it aside
    return out
