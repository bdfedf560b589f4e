"""Checksums of a tiny world's files, and the pretrained weights shipped with the package.

A built world records the SHA-256 of every file in its manifest, so a missing or damaged file is
found by name before a run reads it. The package ships the pretrained towers of the default world
(``pretrained/<towers hash>/``: ``clip/``, ``llm/`` and the build record they came from): a build
whose config has shipped weights (same :meth:`~.config.TinyWorldConfig.towers_hash`) generates only
the data (about a minute) and checks that the files the towers are pretrained from are the ones the
weights were pretrained on (:func:`data_digest`: :data:`TOWER_DATA_FILES`' text without the per-turn
``regions``, which no tower reads). Data no tower reads (the stage-1 captions, the eval questions,
the regions) can change without invalidating the shipped towers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .config import DATA_ONLY_FIELDS

#: where shipped pretrained towers live (one folder per towers hash).
SHIPPED_DIR = Path(__file__).resolve().parent / "pretrained"
#: the files that define a world's data (images are rendered from ``scenes.json``).
DATA_FILES = ("data/stage1_captions.json", "data/stage2_instruct.json", "data/eval.json", "data/scenes.json",
              "data/world.json")
#: the data files tower pretraining reads: the scenes (the tiny CLIP's images and captions are made
#: from them) and the stage-2 questions (with the config's phrases, the tokenizer's vocabulary).
TOWER_DATA_FILES = ("data/stage2_instruct.json", "data/scenes.json")
WEIGHT_DIRS = ("clip", "llm")
SHIPPED_RECORD = "world_build.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_checksums(root: Path, subdirs: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``root`` (or under its ``subdirs``), sorted."""
    tops = [root / d for d in subdirs] if subdirs is not None else [root]
    out = {}
    for top in tops:
        for dirpath, _, names in os.walk(top):
            for name in names:
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix()
                if rel not in skip:
                    out[rel] = sha256(path)
    return dict(sorted(out.items()))


def check_files(root: Path, expected: dict[str, str]) -> list[str]:
    """Problems (each naming a file) where ``root``'s files differ from ``expected`` checksums."""
    problems = []
    for rel, digest in expected.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256(path) != digest:
            problems.append(f"{path}: content differs from the build record (damaged or edited)")
    return problems


def digest(checksums: dict[str, str]) -> str:
    """One SHA-256 over a checksum table (order-independent)."""
    return hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()


def _without_regions(records: Any) -> Any:
    """A data file's JSON with the ``regions`` of every conversation turn left out."""
    if not isinstance(records, list):
        return records
    out = []
    for rec in records:
        if isinstance(rec, dict) and isinstance(rec.get("conversations"), list):
            turns = [{k: v for k, v in t.items() if k != "regions"} if isinstance(t, dict) else t
                     for t in rec["conversations"]]
            rec = {**rec, "conversations": turns}
        out.append(rec)
    return out


def data_digest(root: Path) -> str:
    """One digest of the data files the towers are pretrained from (:data:`TOWER_DATA_FILES`), each
    as written by the generator but without the turns' ``regions``, which no tower reads."""
    sums = {}
    for rel in TOWER_DATA_FILES:
        text = json.dumps(_without_regions(json.loads((root / rel).read_text())), indent=None, separators=(",", ":"))
        sums[rel] = hashlib.sha256((text + "\n").encode()).hexdigest()
    return digest(sums)


def shipped_world(towers_hash: str, shipped_dir: Path = SHIPPED_DIR) -> Path | None:
    """The shipped pretrained folder for this towers hash, if the package has one."""
    folder = shipped_dir / towers_hash
    return folder if (folder / SHIPPED_RECORD).is_file() else None


def ship(world_root: Path, shipped_dir: Path = SHIPPED_DIR) -> Path:
    """Copy a built world's pretrained towers and build record into ``shipped_dir/<hash>/``,
    replacing any other shipped world (the package carries one)."""
    record = json.loads((world_root / SHIPPED_RECORD).read_text())
    if record.get("weights_from") != "pretrained here":
        raise ValueError(f"{world_root} took its weights from a shipped copy; ship a world built with --from-scratch.")
    target = shipped_dir / record["towers_hash"]
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for d in WEIGHT_DIRS:
        shutil.copytree(world_root / d, tmp / d)
    shipped = {k: record[k] for k in ("format", "towers_hash", "clip", "llm") if k in record}
    shipped["config"] = {k: v for k, v in record["config"].items() if k not in DATA_ONLY_FIELDS}
    shipped["seconds_pretraining"] = {k: record["seconds"][k] for k in ("clip", "llm") if k in record.get("seconds", {})}
    shipped["data_digest"] = record["data_digest"]
    shipped["weights"] = tree_checksums(tmp, WEIGHT_DIRS)
    (tmp / SHIPPED_RECORD).write_text(json.dumps(shipped, indent=2) + "\n")
    for old in shipped_dir.iterdir() if shipped_dir.is_dir() else ():
        if old.is_dir() and old != tmp:
            shutil.rmtree(old)
    tmp.rename(target)
    return target
