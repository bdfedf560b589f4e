"""Everything a run reads, checked before its first training step.

:func:`check_data` (before any model is loaded): every stage still to train and the evaluation
(JSON, records, ``<image>`` counts, image paths inside their folders, image files present and,
with ``data.check_images=decode``, decodable: :mod:`vlmzoo.data.checks`), and the blind
control's training file. :func:`check_lengths` (once the first model to train is loaded): every
such stage tokenised with its template (the ``datasets`` cache keeps it for the stage) and each
sample's length, like each evaluation prompt's plus ``eval.max_new_tokens``, against the LLM's
``max_position_embeddings``; a stage's high-res images when its strategy reads them. The first
problem is an error naming the config key, the file and the record.
"""

from __future__ import annotations

import logging
import os
from ..config import RunConfig
from ..data.checks import check_data_file, image_problems
from ..data.records import LlavaDataError, iter_json_records
from ..strategy import view_name

logger = logging.getLogger(__name__)


def _folder(images: str | None, json_path: str) -> str:
    return images if images else os.path.dirname(os.path.abspath(json_path))


def check_data(cfg: RunConfig, stages: list[int], evaluate: bool) -> None:
    """Tokenizer-free checks of the data of ``stages`` (indices) and, if ``evaluate``, of the eval."""
    mode, absolute = cfg.data.check_images, cfg.data.allow_absolute_image_paths
    for i in stages:
        stage, where = cfg.training.stages[i], f"training.stages.{i}"
        if not stage.data:
            raise ValueError(f"{where}.data is not set (the stage's LLaVA JSON file).")
        n = check_data_file(stage.data, _folder(cfg.stage_images(stage), stage.data), mode=mode, allow_absolute=absolute)
        logger.info("[%s] %s: %d records checked (images: %s).", stage.name, stage.data, n, mode)
    if evaluate and cfg.eval.data:
        from ..evaluation import load_eval_records

        records = load_eval_records(cfg.eval.data, cfg.eval.question_type_key, cfg.eval.max_samples)
        folder = _folder(cfg.eval_images(), cfg.eval.data)
        if not os.path.isdir(folder):
            raise LlavaDataError(os.path.abspath(cfg.eval.data), f"image folder not found: {folder}")
        rows = [(k, r.id, r.images) for k, r in enumerate(records)]
        for index, rid, reason in image_problems(rows, [(folder, "image")], mode, absolute)[:1]:
            raise LlavaDataError(os.path.abspath(cfg.eval.data), reason, rid, index)
        train_data = cfg.eval_train_data()
        if train_data and train_data not in {cfg.training.stages[i].data for i in stages}:
            for _ in iter_json_records(train_data):  # the blind control's file: readable JSON
                pass
        logger.info("eval %s: %d records checked (images: %s).", cfg.eval.data, len(records), mode)


def position_limit(model) -> int | None:
    """The LLM's ``max_position_embeddings`` (``None`` if its config has none)."""
    limit = getattr(model.config.text_config, "max_position_embeddings", None)
    return int(limit) if limit else None


def check_lengths(cfg: RunConfig, stages: list[int], model, processor, evaluate: bool) -> None:
    """Tokenise the data of ``stages`` with ``processor`` (each stage's template) and check lengths
    against the LLM's positions; check the eval prompts too if ``evaluate``."""
    from ..data import LlavaJsonDataset

    limit = position_limit(model)
    if limit is not None and cfg.data.max_length is not None and cfg.data.max_length > limit:
        raise ValueError(f"data.max_length: {cfg.data.max_length} is more than the LLM's {limit} positions "
                         "(max_position_embeddings); set it to at most that.")
    for i in stages:
        stage = cfg.training.stages[i]
        LlavaJsonDataset(
            stage.data, processor.with_template(stage.template), cfg.stage_images(stage),
            high_res_folder=cfg.stage_high_res_images(stage), max_length=cfg.data.max_length, max_positions=limit,
            check_images=cfg.data.check_images, allow_absolute_paths=cfg.data.allow_absolute_image_paths,
        )
    if evaluate and cfg.eval.data:
        _check_eval(cfg, processor, limit)


def _check_eval(cfg: RunConfig, processor, limit: int | None) -> None:
    from ..evaluation import image_first_messages, load_eval_records

    e = cfg.eval
    path = os.path.abspath(e.data)
    records = load_eval_records(e.data, e.question_type_key, e.max_samples)
    views = [(folder, view_name(scale)) for scale, folder in
             processor.view_folders(cfg.eval_images() or "", cfg.eval_high_res_images()).items() if scale > 1]
    if views:
        rows = [(k, r.id, r.images) for k, r in enumerate(records)]
        for index, rid, reason in image_problems(rows, views, cfg.data.check_images,
                                                 cfg.data.allow_absolute_image_paths)[:1]:
            raise LlavaDataError(path, reason, rid, index)
    if limit is None:
        return
    template = e.template or cfg.training.stages[-1].template
    prompts = processor.with_template(template)
    for k, rec in enumerate(records):
        enc = prompts.encode(image_first_messages(rec.messages, len(rec.images)), add_generation_prompt=True)
        if len(enc) + e.max_new_tokens > limit:
            raise LlavaDataError(path, f"the prompt is {len(enc)} tokens; with eval.max_new_tokens={e.max_new_tokens} "
                                 f"it needs more than the LLM's {limit} positions (max_position_embeddings).", rec.id, k)
