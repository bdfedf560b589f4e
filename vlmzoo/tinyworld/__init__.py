"""The tiny world: a synthetic image-question world and its pretrained tiny towers, built once.

:func:`build_tiny_world` generates the data set (:mod:`.generate`), builds the word-level
tokenizers (:mod:`.tokenizer`), pretrains a tiny CLIP and a tiny Llama (:mod:`.pretrain`) and
saves them as ordinary Hugging Face checkpoints, so runs load them by path exactly as they load
hub checkpoints. The result is cached under ``<cache>/tiny_world/<config hash>/`` (``<cache>`` is
the ``cache_dir`` argument, else ``$VLMZOO_CACHE``, else ``~/.cache/vlmzoo``) and reused by every
later call with the same config; concurrent callers (e.g. ``torchrun`` ranks) wait on one lock.
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

from .config import FORMAT_VERSION, TinyClipConfig, TinyLLMConfig, TinyWorldConfig, small_test_config
from .questions import QUESTION_TYPES

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


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLMZOO_CACHE") or Path.home() / ".cache" / "vlmzoo")


def world_root(cache_dir: str | os.PathLike | None, config: TinyWorldConfig) -> Path:
    """The folder of ``config``'s world: ``<cache root>/tiny_world/<config hash>`` (nothing is built)."""
    return Path(cache_dir or default_cache_dir()).expanduser() / "tiny_world" / config.config_hash()


_ANNOUNCED: set[Path] = set()


def build_tiny_world(
    cache_dir: str | os.PathLike | None = None,
    config: TinyWorldConfig | dict[str, Any] | None = None,
    *,
    force: bool = False,
    log: Any = None,
) -> TinyWorldPaths:
    """Build (or reuse from the cache) the tiny world of ``config``; -> its paths.

    Args:
        cache_dir: cache root (default :func:`default_cache_dir`).
        config: a :class:`TinyWorldConfig` or a dict of its fields (overrides of the defaults).
        force: rebuild even if a complete cached world exists.
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
            if root not in _ANNOUNCED:  # once per process: a study resolves the world for every run
                _ANNOUNCED.add(root)
                log(f"[tinyworld] using cached world {root}")
            return paths
        log(f"[tinyworld] building the tiny world into {root} (once; cached afterwards)")
        tmp = root.with_name(root.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        record = _build(config, TinyWorldPaths.at(tmp), log)
        record["paths"] = {k: str(v) for k, v in asdict(paths).items()}
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    log(f"[tinyworld] built in {record['seconds']['total']:.0f}s: {root}")
    return paths


def _build(cfg: TinyWorldConfig, paths: TinyWorldPaths, log: Any) -> dict[str, Any]:
    from .generate import generate_world
    from .pretrain import pretrain_clip, pretrain_llm
    from .questions import every_phrase
    from .tokenizer import save_tokenizers

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    world = generate_world(cfg, str(paths.data_dir), keep_train_hires=True, log=log)
    seconds["data"] = time.perf_counter() - t0

    t = time.perf_counter()
    texts = every_phrase(cfg) + _json_texts(paths.stage2_json)
    tokenizer = save_tokenizers(texts, str(paths.llm_dir), str(paths.clip_dir), cfg.clip.max_text_positions)
    from transformers import AutoTokenizer

    clip_tokenizer = AutoTokenizer.from_pretrained(paths.clip_dir)
    seconds["tokenizer"] = time.perf_counter() - t
    log(f"[tinyworld]   tokenizer: {len(tokenizer)} tokens")

    t = time.perf_counter()
    log("[tinyworld]   pretraining the tiny CLIP (contrastive + per-patch heads)")
    clip_metrics = pretrain_clip(cfg, world.train_scenes, world.train_hires, clip_tokenizer, str(paths.clip_dir), log=log)
    seconds["clip"] = time.perf_counter() - t

    t = time.perf_counter()
    log("[tinyworld]   pretraining the tiny LLM (context-grounded text)")
    llm_metrics = pretrain_llm(cfg, tokenizer, str(paths.llm_dir), log=log)
    seconds["llm"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return {"format": FORMAT_VERSION, "config_hash": cfg.config_hash(), "config": cfg.to_dict(),
            "seconds": {k: round(v, 1) for k, v in seconds.items()}, "clip": clip_metrics, "llm": llm_metrics}


def _json_texts(path: Path) -> list[str]:
    """Every conversation turn of a LLaVA JSON file (the tokenizer must cover them all)."""
    records = json.loads(path.read_text())
    return [turn["value"] for rec in records for turn in rec["conversations"]]
