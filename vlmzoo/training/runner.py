"""Run every stage of a run config in order, resumably, then evaluate.

Output folder layout (``cfg.output.dir``)::

    resolved_config.yaml          the full config of the run (defaults filled, variables resolved)
    <stage name>/checkpoint-N/    Trainer checkpoints (weights, optimizer, scheduler, RNG, state) and
                                  vlmzoo_checkpoint.json (files, config hash, loss sum), written
                                  atomically (:mod:`vlmzoo.training.checkpoints`)
    <stage name>/final/           the stage's model + processor (from_pretrained-loadable),
                                  stage_complete.json (metrics, parameter counts, the config hash)
                                  and trainer_state.json (the Trainer's state, incl. its log
                                  history); written as tmp-final/ and renamed when complete
    eval/eval_metrics.json        evaluation of the last stage's model (+ predictions.jsonl)

A stage with a LoRA adapter (``training.stages.N.lora``) writes its model as a plain model's
weights plus ``lora/`` (peft's adapter files) in each checkpoint and in ``final/``
(:mod:`vlmzoo.lora`); the next stage continues that adapter or starts from it merged.

A stage starts from the previous stage's ``final`` weights. Running the same config into the same
folder again resumes: completed stages are skipped, an interrupted stage continues from its newest
intact checkpoint with optimizer, scheduler, RNG and data-order state, so the final weights are
bit-identical to an uninterrupted run's. Outputs of another config are never reused
(:mod:`vlmzoo.training.run_folder`), and every stage's data is checked before the first step
(:mod:`vlmzoo.training.preflight`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import TrainerCallback, TrainingArguments

from ..build import build_model_and_processor, torch_dtype
from ..config import RunConfig, StageConfig, prepare_run_files, save_resolved_config
from ..configuration import VLMConfig
from ..data import LlavaJsonDataset, VLMDataCollator
from ..evaluation import evaluate_run
from ..feature_cache import FeatureCaches, InstructionFeatureCache, VisionFeatureCache
from .. import lora
from ..lora import ADAPTER_DIRNAME
from ..modeling import VLMForConditionalGeneration
from ..processing import VLMProcessor
from ..registry import get_strategy_class
from ..utils import atomic_write_text
from .checkpoints import Checkpoint, find_resume_checkpoint, fsync_tree, publish
from .groups import StagePlan
from .preflight import check_data, check_lengths, position_limit
from .run_folder import (
    FINAL_DIRNAME,
    STAGE_DONE_FILE,
    StageStatus,
    check_output_dir,
    lock_run_folder,
    plan_stages,
    read_json,
    settle_stale_stages,
)
from .trainer import VLMTrainer

logger = logging.getLogger(__name__)

FINAL_TMP_DIRNAME = "tmp-final"
TRAINER_STATE_FILE = "trainer_state.json"


@dataclass
class StageResult:
    name: str
    final_dir: Path
    skipped: bool
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    output_dir: Path
    final_model_dir: Path
    stages: list[StageResult]
    eval_metrics: dict[str, Any] | None = None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def stage_final_dir(cfg: RunConfig, stage: StageConfig) -> Path:
    return Path(cfg.output.dir) / stage.name / FINAL_DIRNAME


def stage_is_complete(cfg: RunConfig, stage: StageConfig) -> bool:
    """Whether the stage's ``final/`` is complete *for this config* (see :func:`plan_stages`)."""
    index = next(i for i, s in enumerate(cfg.training.stages) if s.name == stage.name)
    return plan_stages(cfg)[index].done is not None


def run_training(
    cfg: RunConfig,
    *,
    evaluate: bool = True,
    callbacks: list[TrainerCallback] | None = None,
) -> RunResult:
    """Train every stage of ``cfg`` (skipping those complete for this config), then evaluate on
    ``cfg.eval.data``. Before anything trains: the run folder is checked against the config
    (:mod:`vlmzoo.training.run_folder`) and so is every stage's data and the eval's
    (:mod:`vlmzoo.training.preflight`)."""
    if not cfg.training.stages:
        raise ValueError("training.stages is empty: nothing to train.")
    prepare_run_files(cfg)  # e.g. builds the tiny world on first use (safe across processes)
    out = Path(cfg.output.dir)
    main = is_main_process()
    if main:
        check_output_dir(cfg)  # before the lock file is made: resume=false wants an empty folder
    first_args = training_arguments(cfg, cfg.training.stages[0])  # sets up the processes of a distributed run
    lock = lock_run_folder(cfg) if main else None
    try:
        return _run_locked(cfg, out, main, first_args, evaluate, callbacks)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg: RunConfig, out: Path, main: bool, first_args: TrainingArguments, evaluate: bool,
                callbacks: list[TrainerCallback] | None) -> RunResult:
    with first_args.main_process_first(desc="run folder and data checks"):
        statuses = settle_stale_stages(cfg, plan_stages(cfg), main=main)
        to_train = [s.index for s in statuses if s.done is None]
        check_data(cfg, to_train, evaluate=evaluate and bool(cfg.eval.data))
    if main:
        save_resolved_config(cfg, out)
    if "wandb" in cfg.training.report_to:
        if cfg.training.wandb_project:
            os.environ["WANDB_PROJECT"] = cfg.training.wandb_project
        os.environ.setdefault("WANDB_DIR", str(out.resolve()))
        (out / "wandb").mkdir(parents=True, exist_ok=True)

    results: list[StageResult] = []
    previous: Path | None = None
    checked_lengths = False
    feature_cache = VisionFeatureCache() if cfg.training.cache_vision_features else None
    text_cache = InstructionFeatureCache() if cfg.training.cache_text_features else None
    for i, stage in enumerate(cfg.training.stages):
        final_dir = stage_final_dir(cfg, stage)
        status = statuses[i]
        if status.done is not None:
            logger.info("Stage %d/%d %r is complete (%s); skipping.", i + 1, len(cfg.training.stages), stage.name, final_dir)
            results.append(StageResult(stage.name, final_dir, skipped=True, metrics=status.done))
        else:
            model, processor = load_stage_start(cfg, previous, stage)
            if not checked_lengths:
                with first_args.main_process_first(desc="tokenised data checks"):
                    check_lengths(cfg, to_train, model, processor, evaluate=evaluate and bool(cfg.eval.data))
                checked_lengths = True
            metrics = train_stage(cfg, i, model, processor, callbacks=callbacks, feature_cache=feature_cache,
                                  text_cache=text_cache, status=status)
            results.append(StageResult(stage.name, final_dir, skipped=False, metrics=metrics))
            del model
        previous = final_dir

    result = RunResult(output_dir=out, final_model_dir=previous, stages=results)
    if evaluate and cfg.eval.data and main:
        result.eval_metrics = evaluate_run(cfg, previous, out / "eval")
    return result


def load_stage_start(cfg: RunConfig, previous_final: Path | None, stage: StageConfig | None = None):
    """The model a stage starts from: pretrained components, or the previous stage's final weights.

    The strategy is built with the stage's fields (:meth:`RunConfig.stage_strategy_config`). When
    they differ from those the previous stage's model was saved with, that model is rebuilt with the
    stage's fields and its weights loaded by name (see :func:`rebuild_with_strategy_config`).
    """
    fields = cfg.stage_strategy_config(stage) if stage is not None else dict(cfg.model.strategy_config)
    if previous_final is None:
        torch.manual_seed(cfg.seed)  # the fresh strategy's initialisation
        model_section = dataclasses.replace(cfg.model, strategy_config=fields)
        model, processor = build_model_and_processor(dataclasses.replace(cfg, model=model_section))
        if cfg.model.init_from:
            load_weights_by_name(model, cfg.model.init_from)
        return _with_stage_adapter(cfg, model, None, stage), processor

    dtype = torch_dtype(cfg.model.dtype)
    try:
        config = VLMConfig.from_pretrained(previous_final)
        wanted = get_strategy_class(config.strategy).build_config(fields).to_dict()
        if wanted == config.strategy_config:
            model = VLMForConditionalGeneration.from_pretrained(previous_final, dtype=dtype, load_adapter=False)
            processor = VLMProcessor.from_pretrained(previous_final)
        else:
            torch.manual_seed(cfg.seed)  # the initialisation of modules new in this stage
            model, processor = rebuild_with_strategy_config(previous_final, config, wanted, dtype)
        return _with_stage_adapter(cfg, model, previous_final, stage), processor
    except (SafetensorError, OSError) as exc:  # a damaged file of a completed stage
        raise ValueError(f"Cannot load the previous stage's model from {previous_final}: {type(exc).__name__}: {exc}. "
                         f"Delete {previous_final.parent} to train that stage again.") from exc


def _with_stage_adapter(cfg: RunConfig, model, previous_final: Path | None, stage: StageConfig | None):
    """The stage's LoRA adapter on ``model``: the previous stage's adapter continued when the stage's
    ``lora`` describes the same one, else merged into the weights, then a fresh one (drawn from the
    run's seed and the stage's index) when the stage has ``lora``."""
    index = next((i for i, s in enumerate(cfg.training.stages) if stage is not None and s.name == stage.name), 0)
    where = f"training.stages.{index}.lora"
    wanted = lora.lora_config(model, stage.lora, where) if stage is not None and stage.lora is not None else None
    saved = lora.load_saved_config(previous_final) if previous_final is not None else None
    if saved is not None and wanted is not None and lora.same_adapter(saved, wanted):
        if stage.lora.quantize:
            lora.quantize_base(model, stage.lora, where)
        lora.attach_saved(model, previous_final)
        logger.info("[%s] continues training the LoRA adapter of %s.", stage.name, previous_final)
        return model
    if saved is not None:
        lora.attach_saved(model, previous_final)
        logger.info("LoRA adapter of %s merged into the weights (%d modules).", previous_final, lora.merge_adapter(model))
    if wanted is not None:
        if stage.lora.quantize:
            lora.quantize_base(model, stage.lora, where)
        lora.attach(model, wanted, seed=cfg.seed + index)
        logger.info("[%s] LoRA adapter r=%d alpha=%g on %s.", stage.name, stage.lora.r, stage.lora.alpha,
                    ", ".join(stage.lora.groups))
    return model


def rebuild_with_strategy_config(model_dir: Path, config, strategy_config: dict[str, Any], dtype: torch.dtype):
    """Load the model saved in ``model_dir`` into the same architecture built with other strategy
    fields; log which weights load, which start fresh (initialised as a new model's) and which are
    dropped. -> ``(model, processor)``: the saved processor serving the new model's input spec."""
    changed = sorted(k for k in strategy_config if strategy_config[k] != config.strategy_config.get(k))
    logger.info("Strategy %r rebuilt with %s (saved model: %s).", config.strategy,
                ", ".join(f"{k}={strategy_config[k]!r}" for k in changed),
                ", ".join(f"{k}={config.strategy_config.get(k)!r}" for k in changed))
    config.strategy_config = strategy_config
    model, info = VLMForConditionalGeneration.from_pretrained(model_dir, config=config, dtype=dtype,
                                                              output_loading_info=True, load_adapter=False)
    n_loaded = len(model.state_dict()) - len(info["missing_keys"])
    logger.info("Loaded %d weight tensors from %s.", n_loaded, model_dir)
    log_key_groups("New (fresh init)", info["missing_keys"])
    log_key_groups("Dropped (unused)", info["unexpected_keys"])
    return model, VLMProcessor.from_pretrained(model_dir, config=model.config)


def load_weights_by_name(model, model_dir: str | os.PathLike, what: str = "model.init_from",
                         verbose: bool = True) -> dict[str, list[str]]:
    """Copy the weights saved in ``model_dir`` (``model.safetensors`` or its shards) into ``model``
    wherever a parameter or buffer of the same name exists; log (``verbose``) and return which were
    ``loaded``, which ``kept`` their built values (absent from the checkpoint) and which were
    ``dropped`` (absent from the model). A shape mismatch or an unreadable file raises, naming
    ``what``, the file and (for a shape) the key and both shapes."""
    directory = Path(model_dir)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{what}: no model.safetensors (or its index) in {directory}.")
    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "kept": [], "dropped": []}
    with torch.no_grad():
        for name in files:
            try:
                with safe_open(str(directory / name), framework="pt") as f:
                    for key in f.keys():
                        if key not in own:
                            report["dropped"].append(key)
                            continue
                        tensor = f.get_tensor(key)
                        if tuple(tensor.shape) != tuple(own[key].shape):
                            raise ValueError(
                                f"{what}: {directory / name} has {key} of shape {tuple(tensor.shape)}, "
                                f"the model built from this config has {tuple(own[key].shape)}."
                            )
                        own[key].copy_(tensor)
                        report["loaded"].append(key)
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"{what}: cannot read {directory / name}: {exc}") from None
    loaded = set(report["loaded"])
    report["kept"] = [k for k in own if k not in loaded]
    if verbose:
        logger.info("%s %s: loaded %d weight tensors.", what, directory, len(report["loaded"]))
        log_key_groups("Kept as built (not in the checkpoint)", report["kept"])
        log_key_groups("Dropped (not in this model)", report["dropped"])
    return report


def log_key_groups(label: str, keys: list[str], depth: int = 2) -> None:
    """Log parameter names grouped by their first ``depth`` components, one line per group:
    ``"<label>: strategy.allocator.* (36 tensors)"``."""
    counts: dict[str, int] = {}
    for key in keys:
        prefix = ".".join(key.split(".")[:depth])
        counts[prefix] = counts.get(prefix, 0) + 1
    for prefix, count in counts.items():
        logger.info("%s: %s.* (%d tensors)", label, prefix, count)


def training_arguments(cfg: RunConfig, stage: StageConfig) -> TrainingArguments:
    t = cfg.training
    return TrainingArguments(
        output_dir=str(Path(cfg.output.dir) / stage.name),
        run_name=f"{cfg.output.name}/{stage.name}",
        per_device_train_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps,
        learning_rate=stage.lr,
        lr_scheduler_type=stage.scheduler,
        warmup_steps=stage.warmup,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        optim=t.optim,
        adam_beta2=t.adam_beta2,
        bf16=t.bf16,
        fp16=t.fp16,
        deepspeed=stage.deepspeed or t.deepspeed,
        activation_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if stage.save_steps else "no",
        save_steps=stage.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to=list(t.report_to) or "none",
        disable_tqdm=t.disable_tqdm,
        seed=cfg.seed,
        dataloader_num_workers=cfg.data.num_workers,
        dataloader_persistent_workers=cfg.data.num_workers > 0,  # no worker restart per epoch
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        use_cpu=not torch.cuda.is_available(),
    )


def train_stage(
    cfg: RunConfig,
    index: int,
    model,
    processor,
    callbacks: list[TrainerCallback] | None = None,
    feature_cache: VisionFeatureCache | None = None,
    text_cache: InstructionFeatureCache | None = None,
    status: StageStatus | None = None,
) -> dict[str, Any]:
    """Train stage ``index`` on ``model`` (from its newest intact checkpoint, if any); save its final
    model + processor; -> stage metrics. ``status``: the stage's :func:`plan_stages` entry (default:
    computed here)."""
    stage = cfg.training.stages[index]
    where = f"training.stages.{index}"
    tag = f"[{stage.name}]"
    if not stage.data:
        raise ValueError(f"{where}.data is not set (the stage's LLaVA JSON file).")
    status = status or plan_stages(cfg)[index]
    plan = StagePlan.build(model, stage, where=where)
    plan.apply(model)
    logger.info("%s stage %d/%d: %s", tag, index + 1, len(cfg.training.stages), ", ".join(plan.trained) + " train")
    for line in plan.count_lines(model):
        logger.info("%s %s", tag, line)

    caches = FeatureCaches()  # this stage's: the run owns the caches, the trainer hands them to the model
    if feature_cache is not None:
        if plan.tower_changes:  # its features change from step to step
            feature_cache.clear()
        else:
            caches.vision = feature_cache
            logger.info("%s frozen vision tower: features cached per image (training.cache_vision_features; "
                        "%d images from earlier stages)", tag, len(feature_cache))
    if text_cache is not None and model.text_encoder is not None:
        caches.text = text_cache
    # a record whose images' features are cached is not read from disk (see LlavaJsonDataset)
    features_cached = (functools.partial(caches.vision.contains, model.strategy.needs)
                       if caches.vision is not None and cfg.data.num_workers == 0 else None)
    args = training_arguments(cfg, stage)
    processor = processor.with_template(stage.template, stage.pad_to_square)

    with args.main_process_first(desc=f"{stage.name} dataset"):
        dataset = LlavaJsonDataset(stage.data, processor, cfg.stage_images(stage),
                                   high_res_folder=cfg.stage_high_res_images(stage), max_length=cfg.data.max_length,
                                   max_positions=position_limit(model), check_images=cfg.data.check_images,
                                   allow_absolute_paths=cfg.data.allow_absolute_image_paths,
                                   features_cached=features_cached)
        # the main process first: it sets damaged checkpoints aside, the others then only read
        checkpoint = find_resume_checkpoint(Path(args.output_dir), tidy=is_main_process())
    if checkpoint is not None and checkpoint.config_hash != status.config_hash:
        raise ValueError(f"{checkpoint.path} was written by another config (hash {checkpoint.config_hash}, this "
                         f"stage's is {status.config_hash}); see training.on_config_change.")
    trainer = VLMTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=VLMDataCollator(processor),
        processing_class=processor,
        stage_plan=plan,
        callbacks=callbacks,
        checkpoint_info={"stage": stage.name, "config_hash": status.config_hash, "config": status.identity},
        loss_sum_start=float(checkpoint.manifest.get("loss_sum", 0.0)) if checkpoint else 0.0,
        feature_caches=caches if (caches.vision is not None or caches.text is not None) else None,
    )
    start = time.perf_counter()
    if checkpoint is not None and _holds_last_step(checkpoint):
        # Killed after the last checkpoint, before final/: its weights are the stage's result.
        logger.info("%s %s holds the stage's last step; its weights become the final model.", tag, checkpoint.path)
        state = json.loads((checkpoint.path / TRAINER_STATE_FILE).read_text())
        global_step, log_history = int(state["global_step"]), state.get("log_history", [])
        loss_sum = float(checkpoint.manifest.get("loss_sum", float("nan")))
    else:
        if checkpoint is not None:
            logger.info("%s resuming from %s", tag, checkpoint.path)
        output = trainer.train(resume_from_checkpoint=str(checkpoint.path) if checkpoint else None)
        global_step, log_history, loss_sum = output.global_step, trainer.state.log_history, trainer.loss_sum()
    runtime = time.perf_counter() - start

    cache = caches.vision
    if cache is not None:
        logger.info("%s vision feature cache: %d images, %.0f MiB, %d hits / %d misses so far in this run; "
                    "%d records served without reading their images", tag, len(cache), cache.bytes / 2**20, cache.hits,
                    cache.misses, dataset.reads_saved)
    if caches.text is not None:
        logger.info("%s text feature cache: %d instructions, %d hits / %d misses so far in this run",
                    tag, len(caches.text), caches.text.hits, caches.text.misses)
    metrics = {
        "stage": stage.name,
        "global_step": global_step,
        "train_loss": loss_sum / global_step if global_step else None,  # every step's, across resumes
        "last_logged_loss": _last_logged_loss(log_history),
        "runtime_s": round(runtime, 2),  # this process's share
        "resumed_from": str(checkpoint.path) if checkpoint else None,
        "samples": len(dataset),
        "parameters": plan.counts(model),
        "trained_groups": plan.trained,
        "group_lr": plan.lrs,
        "config_hash": status.config_hash,
        "config": status.identity,
    }
    final_dir = stage_final_dir(cfg, stage)
    save_final(trainer, final_dir, metrics, checkpoint if checkpoint is not None and _holds_last_step(checkpoint) else None)
    logger.info("%s done: %d steps in %.1fs, final model in %s", tag, global_step, runtime, final_dir)
    return metrics


def _holds_last_step(checkpoint: Checkpoint) -> bool:
    state = read_json(checkpoint.path / TRAINER_STATE_FILE) or {}
    return bool(state.get("max_steps")) and int(state.get("global_step", 0)) >= int(state["max_steps"])


# Files of a checkpoint that are training state, not the model a final/ folder holds.
_NOT_MODEL_FILES = re.compile(r"^(optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state.*\.pth|"
                              r"vlmzoo_checkpoint\.json|latest|zero_to_(fp32|torch)\.py)$")


def save_final(trainer: VLMTrainer, final_dir: Path, metrics: dict[str, Any], from_checkpoint: Checkpoint | None = None) -> None:
    """Write the stage's ``final/`` atomically: model + processor (saved from the trainer, or copied
    from ``from_checkpoint``, a checkpoint of the stage's last step), ``trainer_state.json`` and,
    last, ``stage_complete.json`` go into ``tmp-final/``, which is flushed to disk and renamed."""
    tmp = final_dir.with_name(FINAL_TMP_DIRNAME)
    main = trainer.is_world_process_zero()
    if main and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    if from_checkpoint is None:
        trainer.save_model(str(tmp))
    if main:
        if from_checkpoint is not None:  # the same bytes the uninterrupted run saved there
            tmp.mkdir(parents=True)
            for path in sorted(from_checkpoint.path.iterdir()):
                if path.is_file() and not _NOT_MODEL_FILES.match(path.name):
                    shutil.copyfile(path, tmp / path.name)
                elif path.is_dir() and path.name == ADAPTER_DIRNAME:  # the LoRA adapter (vlmzoo.lora)
                    shutil.copytree(path, tmp / path.name)
        else:
            trainer.state.save_to_json(str(tmp / TRAINER_STATE_FILE))  # log history: loss curves
        fsync_tree(tmp)
        atomic_write_text(tmp / STAGE_DONE_FILE, json.dumps(metrics, indent=2) + "\n")
        publish(tmp, final_dir)
    trainer.accelerator.wait_for_everyone()


def _last_logged_loss(log_history: list[dict[str, Any]]) -> float | None:
    losses = [h["loss"] for h in log_history if "loss" in h]
    return losses[-1] if losses else None
