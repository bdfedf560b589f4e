"""The tiny world: a synthetic image-question world and its pretrained tiny towers, built once.

:func:`build_tiny_world` generates the data set (:mod:`.generate`), builds the word-level
tokenizers (:mod:`.tokenizer`), pretrains a tiny CLIP and a tiny Llama (:mod:`.pretrain`) and
saves them as ordinary Hugging Face checkpoints, so runs load them by path exactly as they load
hub checkpoints. The result is cached under ``<cache>/tiny_world/<config hash>/`` (``<cache>`` is
the ``cache_dir`` argument, else ``$VLMZOO_CACHE``, else ``~/.cache/vlmzoo``) and reused by every
later call with the same config.

Builds are safe: concurrent callers (``torchrun`` ranks, a study's workers, two shells) wait on one
lock and the first builds; a build works in ``<hash>.building`` and renames it only when complete;
an interrupted build resumes there (data, tokenizer and tiny CLIP are one phase, the tiny LLM the
next); the manifest records every file's SHA-256, and a cached world with a missing or changed
file is reported by name and rebuilt. When the package ships pretrained towers for the config
(:mod:`.files`), the build generates only the data and takes the towers from the package.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlmzoo.utils import default_cache_dir

from .config import FORMAT_VERSION, TinyClipConfig, TinyLLMConfig, TinyWorldConfig, small_test_config
from .files import (
    SHIPPED_DIR,
    SHIPPED_RECORD,
    WEIGHT_DIRS,
    check_files,
    shipped_world,
    tree_checksums,
)
from .files import data_digest as world_data_digest
from .generate import generate_world
from .pretrain import pretrain_clip, pretrain_llm
from .questions import QUESTION_TYPES, every_phrase
from .tokenizer import save_tokenizers

__all__ = [
    "FORMAT_VERSION",
    "QUESTION_TYPES",
    "TinyClipConfig",
    "TinyLLMConfig",
    "TinyWorldConfig",
    "TinyWorldPaths",
    "build_tiny_world",
    "default_cache_dir",
    "small_test_config",
    "world_root",
]

logger = logging.getLogger(__name__)
MANIFEST = "world_build.json"


@dataclass(frozen=True)
class TinyWorldPaths:
    """Everything a run needs from a built world (the ``${tiny_world.FIELD}`` config variables).

    Attributes:
        root: the world's cache folder.
        data_dir: the data set root (JSON files, ``images/``, ``images_2x/``).
        images_dir: base-resolution images (what the tower sees; JSON ``image`` paths are relative to it).
        hires_images_dir: the same images at 2x, where fine marks are legible.
        stage1_json, stage2_json, eval_json: LLaVA-format files (captions, instructions, held-out eval).
        clip_dir: tiny ``CLIPModel`` checkpoint (+ its tokenizer and image processor).
        llm_dir: tiny ``LlamaForCausalLM`` checkpoint (+ its tokenizer).
        tokenizer_dir: the LLM tokenizer (= ``llm_dir``).
    """

    root: Path
    data_dir: Path
    images_dir: Path
    hires_images_dir: Path
    stage1_json: Path
    stage2_json: Path
    eval_json: Path
    clip_dir: Path
    llm_dir: Path
    tokenizer_dir: Path

    @classmethod
    def at(cls, root: Path) -> TinyWorldPaths:
        data = root / "data"
        return cls(
            root=root, data_dir=data, images_dir=data / "images", hires_images_dir=data / "images_2x",
            stage1_json=data / "stage1_captions.json", stage2_json=data / "stage2_instruct.json",
            eval_json=data / "eval.json", clip_dir=root / "clip", llm_dir=root / "llm", tokenizer_dir=root / "llm",
        )

    def manifest(self) -> dict[str, Any]:
        """The build record: config, timings, pretraining metrics."""
        return json.loads((self.root / MANIFEST).read_text())


def world_root(cache_dir: str | os.PathLike | None, config: TinyWorldConfig) -> Path:
    """The folder of ``config``'s world: ``<cache root>/tiny_world/<config hash>`` (nothing is built)."""
    return Path(cache_dir or default_cache_dir()).expanduser() / "tiny_world" / config.config_hash()


_ANNOUNCED: set[Path] = set()
_PHASES = ".phases"


def build_tiny_world(
    cache_dir: str | os.PathLike | None = None,
    config: TinyWorldConfig | dict[str, Any] | None = None,
    *,
    force: bool = False,
    from_scratch: bool = False,
    shipped_dir: str | os.PathLike | None = None,
    log: Any = None,
) -> TinyWorldPaths:
    """Build (or reuse from the cache, after checking its files) the tiny world of ``config``; -> its paths.

    Args:
        cache_dir: cache root (default :func:`default_cache_dir`).
        config: a :class:`TinyWorldConfig` or a dict of its fields (overrides of the defaults).
        force: rebuild even if a complete cached world exists.
        from_scratch: pretrain the towers even if the package ships them for this config.
        shipped_dir: where shipped pretrained worlds are looked up (default: the package's).
        log: a ``str -> None`` progress sink (default: this module's logger at INFO).
    """
    if config is None:
        config = TinyWorldConfig()
    elif isinstance(config, dict):
        config = TinyWorldConfig.from_dict(config)
    log = log or logger.info
    root = world_root(cache_dir, config)
    paths = TinyWorldPaths.at(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / MANIFEST).is_file() and not force:
            problems = [] if root in _ANNOUNCED else _check_cached(root, log)
            if not problems:
                if root not in _ANNOUNCED:  # once per process: a study resolves the world for every run
                    _ANNOUNCED.add(root)
                    log(f"[tinyworld] using cached world {root}")
                return paths
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            log(f"[tinyworld] the cached world is damaged, rebuilding it: {'; '.join(problems[:3])}{more}")
        _ANNOUNCED.discard(root)
        tmp = root.with_name(root.name + ".building")
        if force:
            shutil.rmtree(tmp, ignore_errors=True)
        shipped = None if from_scratch else shipped_world(config.towers_hash(), Path(shipped_dir or SHIPPED_DIR))
        log(f"[tinyworld] building the tiny world into {root} (once; cached afterwards"
            + ("; pretrained towers shipped with the package)" if shipped else ")"))
        record = _build(config, TinyWorldPaths.at(tmp), log, shipped)
        record["paths"] = {k: str(v) for k, v in asdict(paths).items()}
        record["files"] = tree_checksums(tmp, skip=(MANIFEST,))
        shutil.rmtree(tmp / _PHASES, ignore_errors=True)
        record["files"] = {k: v for k, v in record["files"].items() if not k.startswith(_PHASES + "/")}
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        _ANNOUNCED.add(root)
    log(f"[tinyworld] built in {record['seconds']['total']:.0f}s: {root}")
    return paths


def _check_cached(root: Path, log: Any) -> list[str]:
    """Problems with a cached world's files (each naming the file); a world recorded before
    manifests listed checksums gets them now."""
    manifest = json.loads((root / MANIFEST).read_text())
    if "files" not in manifest:
        manifest["files"] = tree_checksums(root, skip=(MANIFEST,))
        (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        log(f"[tinyworld] recorded the checksums of {len(manifest['files'])} files of {root}")
        return []
    return check_files(root, manifest["files"])


def _build(cfg: TinyWorldConfig, paths: TinyWorldPaths, log: Any, shipped: Path | None) -> dict[str, Any]:
    """Build into ``paths.root``, resuming a phase an interrupted build finished there."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    marker = paths.root / _PHASES / "towers.json"
    done = json.loads(marker.read_text()) if marker.is_file() else None
    if done is not None and not check_files(paths.root, done["files"]) and done["config_hash"] == cfg.config_hash():
        log("[tinyworld]   resuming an interrupted build: data, tokenizer and tiny CLIP are done")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(paths.llm_dir)
        seconds, clip_metrics, data_digest = done["seconds"], done["clip"], done["data_digest"]
    else:
        shutil.rmtree(paths.root, ignore_errors=True)
        world = generate_world(cfg, str(paths.data_dir), keep_train_hires=shipped is None, log=log)
        seconds["data"] = time.perf_counter() - t0
        data_digest = world_data_digest(paths.root)
        if shipped is not None:
            record = json.loads((shipped / SHIPPED_RECORD).read_text())
            if record["data_digest"] == data_digest:
                return _install_shipped(cfg, paths, shipped, record, seconds, t0, log)
            log(f"[tinyworld]   the generated data differ from the data the shipped towers ({shipped}) were "
                "pretrained on; pretraining them here instead")
            world = generate_world(cfg, str(paths.data_dir), keep_train_hires=True, log=log)
        tokenizer, clip_metrics = _pretrain_towers(cfg, paths, world, seconds, log)
        marker.parent.mkdir(parents=True, exist_ok=True)
        files = tree_checksums(paths.root, ("data", *WEIGHT_DIRS))
        marker.write_text(json.dumps({"config_hash": cfg.config_hash(), "files": files, "seconds": seconds,
                                      "clip": clip_metrics, "data_digest": data_digest}))
    t = time.perf_counter()
    log("[tinyworld]   pretraining the tiny LLM (context-grounded text)")
    llm_metrics = pretrain_llm(cfg, tokenizer, str(paths.llm_dir), log=log)
    seconds["llm"] = time.perf_counter() - t
    seconds["total"] = sum(v for k, v in seconds.items() if k != "total")
    return {"format": FORMAT_VERSION, "config_hash": cfg.config_hash(), "towers_hash": cfg.towers_hash(),
            "config": cfg.to_dict(),
            "seconds": {k: round(v, 1) for k, v in seconds.items()}, "clip": clip_metrics, "llm": llm_metrics,
            "weights_from": "pretrained here", "data_digest": data_digest}


def _pretrain_towers(cfg: TinyWorldConfig, paths: TinyWorldPaths, world: Any, seconds: dict[str, float],
                     log: Any) -> tuple[Any, dict[str, float]]:
    t = time.perf_counter()
    texts = every_phrase(cfg) + _json_texts(paths.stage2_json)
    tokenizer = save_tokenizers(texts, str(paths.llm_dir), str(paths.clip_dir), cfg.clip.max_text_positions)
    clip_tokenizer = AutoTokenizer.from_pretrained(paths.clip_dir)
    seconds["tokenizer"] = time.perf_counter() - t
    log(f"[tinyworld]   tokenizer: {len(tokenizer)} tokens")
    t = time.perf_counter()
    log("[tinyworld]   pretraining the tiny CLIP (contrastive + per-patch heads)")
    clip_metrics = pretrain_clip(cfg, world.train_scenes, world.train_hires, clip_tokenizer, str(paths.clip_dir), log=log)
    seconds["clip"] = time.perf_counter() - t
    return tokenizer, clip_metrics


def _install_shipped(cfg: TinyWorldConfig, paths: TinyWorldPaths, shipped: Path, record: dict[str, Any],
                     seconds: dict[str, float], t0: float, log: Any) -> dict[str, Any]:
    """Copy the shipped towers into the world and check them against the shipped checksums."""
    t = time.perf_counter()
    for d in WEIGHT_DIRS:
        shutil.copytree(shipped / d, paths.root / d)
    problems = check_files(paths.root, record["weights"])
    if problems:
        raise RuntimeError(f"The shipped pretrained towers in {shipped} are damaged: {'; '.join(problems)}. "
                           "Reinstall the package, or rebuild with scripts/build_world.py --from-scratch.")
    seconds["towers_shipped"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    log(f"[tinyworld]   pretrained towers from the package, checksums verified ({shipped.name})")
    return {"format": FORMAT_VERSION, "config_hash": cfg.config_hash(), "towers_hash": cfg.towers_hash(),
            "config": cfg.to_dict(),
            "seconds": {k: round(v, 1) for k, v in seconds.items()}, "clip": record.get("clip"),
            "llm": record.get("llm"), "weights_from": "shipped with the package",
            "seconds_pretraining": record.get("seconds_pretraining"), "data_digest": record["data_digest"]}


def _json_texts(path: Path) -> list[str]:
    """Every conversation turn of a LLaVA JSON file (the tokenizer must cover them all)."""
    records = json.loads(path.read_text())
    return [turn["value"] for rec in records for turn in rec["conversations"]]
