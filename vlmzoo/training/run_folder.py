"""A run folder belongs to one config: what is complete, what was trained with another config, and
what a run may do with it.

Every completed stage records, in ``<stage>/final/stage_complete.json``, the hash of what its weights
depend on (:func:`vlmzoo.config.stage_identity`: model, data, training settings, seed, this stage
and the ones before it) and that identity itself; every checkpoint's manifest records the same
(:mod:`vlmzoo.training.checkpoints`). Before anything trains, :func:`plan_stages` compares them
with the config being run:

* a stage whose outputs were made with another config is never reused: with
  ``training.on_config_change=error`` (default) that is an error naming the stage and the keys that
  differ; with ``retrain`` that stage's folder, every later stage's and ``eval/`` are deleted and
  trained again;
* ``training.resume=false`` only starts in an empty (or new) folder (:func:`check_output_dir`);
* the whole config is also compared with the folder's ``resolved_config.yaml`` (keys that do not
  change what trains, :data:`vlmzoo.config.RESUMABLE_KEYS`, may differ; tiny-world paths count by
  the world's hash, not its cache folder).

One process at a time trains into a folder (:func:`lock_run_folder`).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..config import RunConfig, diff_configs, identity_hash, stage_identity, training_identity
from ..variables import variable_providers
from .checkpoints import recorded_hashes

if TYPE_CHECKING:
    from filelock import FileLock

logger = logging.getLogger(__name__)

RESOLVED_CONFIG = "resolved_config.yaml"
FINAL_DIRNAME = "final"
STAGE_DONE_FILE = "stage_complete.json"
LOCK_FILE = ".vlmzoo.lock"
EVAL_DIRNAME = "eval"


@dataclass
class StageStatus:
    """One stage of a run folder, against the config being run.

    Attributes:
        index / name: the stage.
        config_hash / identity: what the config being run trains in it (see :func:`vlmzoo.config.stage_identity`).
        done: its ``stage_complete.json`` when it is complete for this config, else ``None``.
        stale: one line per output of the stage made with another config (empty: none).
    """

    index: int
    name: str
    config_hash: str
    identity: dict[str, Any]
    done: dict[str, Any] | None = None
    stale: list[str] = field(default_factory=list)


def stage_dir(cfg: RunConfig, index: int) -> Path:
    return Path(cfg.output.dir) / cfg.training.stages[index].name


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _identity_of(tree: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """``training_identity(tree)``; a ``resolved_config.yaml`` written before configs recorded a
    provider section's ``root`` (e.g. ``tiny_world.root``) gets ``like``'s, so its paths compare by
    the folder's name too."""
    for name in variable_providers():
        section = tree.get(name)
        if isinstance(section, dict) and not section.get("root") and (like.get(name) or {}).get("root"):
            tree = {**tree, name: {**section, "root": like[name]["root"]}}
    return training_identity(tree)


def config_differences(cfg: RunConfig) -> list[str] | None:
    """Keys (dotted) at which the folder's ``resolved_config.yaml`` trains differently from ``cfg``;
    ``None`` when there is no such file."""
    path = Path(cfg.output.dir) / RESOLVED_CONFIG
    if not path.is_file():
        return None
    new = cfg.to_dict()
    old = yaml.safe_load(path.read_text()) or {}
    return diff_configs(_identity_of(old, new), training_identity(new))


def check_output_dir(cfg: RunConfig) -> None:
    """``training.resume=false``: the folder must be empty or new. Otherwise, unless
    ``training.on_config_change=retrain``, it must not hold a run of a config that trains differently."""
    out = Path(cfg.output.dir)
    if not cfg.training.resume:
        held = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
        if held:
            raise ValueError(
                f"training.resume=false, but the output folder {out} is not empty (holds {', '.join(held[:6])}"
                f"{' ...' if len(held) > 6 else ''}). Remove it or choose another output.dir to train from scratch; "
                "training.resume=true continues the run it holds."
            )
        return
    diffs = config_differences(cfg)
    if diffs and cfg.training.on_config_change == "error":
        raise ValueError(
            f"{out} holds a run of a different config (differs at: {', '.join(diffs[:10])}"
            f"{' ...' if len(diffs) > 10 else ''}). Choose another output.dir, or set training.on_config_change=retrain "
            "to train again the stages this changes (their outputs in the folder are deleted)."
        )


def _differs(recorded: dict[str, Any] | None, wanted: dict[str, Any]) -> str:
    if not isinstance(recorded, dict):
        return "its config was not recorded"
    keys = diff_configs(recorded, wanted)
    return f"differs at: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}" if keys else "another config"


def plan_stages(cfg: RunConfig) -> list[StageStatus]:
    """The status of every stage of ``cfg`` in its run folder (read only)."""
    tree = cfg.to_dict()
    legacy_ok = config_differences(cfg) == []  # an unrecorded stage hash is trusted only then
    out: list[StageStatus] = []
    for i, stage in enumerate(cfg.training.stages):
        identity = stage_identity(tree, i)
        status = StageStatus(i, stage.name, identity_hash(identity), identity)
        sdir = stage_dir(cfg, i)
        final = sdir / FINAL_DIRNAME
        done = read_json(final / STAGE_DONE_FILE)
        if done is not None:
            recorded = done.get("config_hash")
            if recorded == status.config_hash or (recorded is None and legacy_ok):
                status.done = done
            else:
                status.stale.append(f"{final}: {_differs(done.get('config'), identity)}")
        for folder, recorded in recorded_hashes(sdir).items():
            if recorded is not None and recorded != status.config_hash:
                manifest = read_json(folder / "vlmzoo_checkpoint.json") or {}
                status.stale.append(f"{folder}: {_differs(manifest.get('config'), identity)}")
        out.append(status)
    return out


def settle_stale_stages(cfg: RunConfig, statuses: list[StageStatus], main: bool = True) -> list[StageStatus]:
    """Raise for stages trained with another config (``on_config_change=error``), or delete them,
    every later stage and ``eval/`` (``retrain``; only the main process deletes); -> the statuses
    after that."""
    stale = [s for s in statuses if s.stale]
    if not stale:
        return statuses
    first = stale[0]
    if cfg.training.on_config_change == "error":
        raise ValueError(
            f"Stage {first.name!r} in {cfg.output.dir} was trained with another config ({first.stale[0]}). "
            "Its outputs are not reused: choose another output.dir, or set training.on_config_change=retrain to "
            "delete them and train it (and every later stage) again."
        )
    doomed = [stage_dir(cfg, s.index) for s in statuses[first.index:]] + [Path(cfg.output.dir) / EVAL_DIRNAME]
    logger.warning("training.on_config_change=retrain: stage %r was trained with another config (%s); deleting %s.",
                   first.name, first.stale[0], ", ".join(str(p) for p in doomed if p.exists()) or "nothing")
    if main:
        for path in doomed:
            if path.exists():
                shutil.rmtree(path)
    for s in statuses[first.index:]:
        s.done, s.stale = None, []
    return statuses


def lock_run_folder(cfg: RunConfig) -> "FileLock":
    """An exclusive lock on the run folder (held until the returned lock is released; the OS
    releases it if the process dies). Another process training into it is an error naming the folder."""
    from filelock import FileLock, Timeout

    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"Another process is training into {out} (it holds {out / LOCK_FILE}); "
                         "wait for it to finish or choose another output.dir.") from None
    return lock
