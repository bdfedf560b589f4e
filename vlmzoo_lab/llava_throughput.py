"""Training throughput of a ``llava`` run config's stage against transformers' Llava + ``Trainer``.

``scripts/benchmark.py --parts training`` runs :func:`training_throughput` on the default run
(``configs/llava/tiny.yaml``, its stage 2). Both sides train on the same batches:

* **vlmzoo**: the run's model as the run builds it (:func:`~vlmzoo.training.runner.load_stage_start`),
  the stage's :class:`~vlmzoo.training.groups.StagePlan` (trained groups, per-group learning rates)
  and :class:`~vlmzoo.training.trainer.VLMTrainer` with the run's frozen-tower feature cache
  (``training.cache_vision_features``), warm: every image of the timed batches was encoded once
  before timing, as a long stage that sees each image several times has encoded most of them.
* **transformers**: ``LlavaForConditionalGeneration`` with the same sizes and weights (copied with
  :func:`converters.llava_hf.map_llava_key`, the llava-hf key mapping), the same trainable
  parameters and optimizer groups (tower frozen), trained by a plain ``transformers.Trainer``.

The batches (``input_ids``, ``attention_mask``, ``labels``, ``pixel_values``; ``B`` rows each) are
the stage's first ones in the run's seeded length-grouped order, collated once before timing, so
data loading is outside both timings; what it costs per batch is measured separately. Both trainers
get the same ``TrainingArguments`` (the stage's optimizer, schedule, clipping, logging). In each of
``rounds`` rounds, each side trains ``warmup + steps / rounds`` steps (who goes first alternates
between rounds); the first ``warmup`` steps of a round are not timed. Step times come from trainer callbacks, split into the
image features (tower, or the cache), forward + backward (with gradient clipping), optimizer step
and the rest (batch fetch, scheduler, ``zero_grad``, logging).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from converters.llava_hf import RECOMPUTED_BUFFERS, VISION, map_llava_key
from vlmzoo.config import CONFIGS_DIR, RunConfig, load_run_config, prepare_run_files
from vlmzoo.data import LlavaJsonDataset, VLMDataCollator
from vlmzoo.feature_cache import FeatureCaches, InstructionFeatureCache, VisionFeatureCache
from vlmzoo.training.groups import StagePlan
from vlmzoo.training.preflight import position_limit
from vlmzoo.training.runner import load_stage_start, training_arguments
from vlmzoo.training.trainer import SeededLengthGroupedSampler, VLMTrainer

DEFAULT_CONFIG = CONFIGS_DIR / "llava" / "tiny.yaml"
HF_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values")
SPLIT = ("image_features", "forward_backward", "optimizer", "other")


# ---- the transformers twin ---------------------------------------------------------------------
def transformers_twin(model) -> LlavaForConditionalGeneration:
    """``LlavaForConditionalGeneration`` with the sizes, weights, attention implementations and
    trainable parameters of the vlmzoo ``llava`` model ``model``."""
    cfg = model.config
    fields = cfg.strategy_config
    if cfg.strategy != "llava" or fields.get("connector_depth", 2) != 2:
        raise ValueError(f"transformers' Llava has a 2-layer projector on one tower layer; model.strategy="
                         f"{cfg.strategy!r}, connector_depth={fields.get('connector_depth')!r} has no twin there.")
    vision = {k: v for k, v in cfg.vision_config.items() if k != "backend"}
    hf_config = LlavaConfig(
        vision_config=vision, text_config=cfg.text_config.to_dict(), image_token_index=cfg.image_token_id,
        image_seq_length=model.strategy.num_visual_tokens, projector_hidden_act=fields["connector_act"],
        vision_feature_layer=fields["vision_layer"], vision_feature_select_strategy="default",
    )
    attn = {"text_config": model.language_model.config._attn_implementation,
            "vision_config": model.vision_tower.model.config._attn_implementation}
    twin = LlavaForConditionalGeneration._from_config(hf_config, attn_implementation=attn, dtype=model.dtype)
    ours = dict(model.state_dict())
    own_params = dict(model.named_parameters())
    tower_prefix = "vision_model." if any(k.startswith(VISION + "vision_model.") for k in ours) else ""
    copied: set[str] = set()
    with torch.no_grad():
        for key, tensor in twin.state_dict().items():
            mapped = map_llava_key(key, tower_prefix)
            if mapped is None or mapped[0] not in ours:
                if RECOMPUTED_BUFFERS.search(key):
                    continue
                raise ValueError(f"transformers' Llava key {key} maps to no tensor of the vlmzoo model ({mapped}).")
            tensor.copy_(ours[mapped[0]])
            copied.add(mapped[0])
        for key, param in twin.named_parameters():
            param.requires_grad_(own_params[map_llava_key(key, tower_prefix)[0]].requires_grad)
    missing = [k for k in ours if k not in copied and not RECOMPUTED_BUFFERS.search(k)]
    if missing:
        raise ValueError(f"{len(missing)} vlmzoo tensors have no place in transformers' Llava: {missing[:5]}")
    return twin


def twin_param_groups(model, twin, groups: list[dict]) -> list[dict]:
    """``model``'s optimizer parameter groups with every parameter replaced by ``twin``'s copy."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    ours = {n: p for n, p in model.named_parameters()}
    tower_prefix = "vision_model." if any(k.startswith(VISION + "vision_model.") for k in ours) else ""
    theirs = {map_llava_key(n, tower_prefix)[0]: p for n, p in twin.named_parameters()}
    return [{**g, "params": [theirs[name_of[id(p)]] for p in g["params"]]} for g in groups]


# ---- timing -----------------------------------------------------------------------------------
class StepClock(TrainerCallback):
    """Per optimizer step: wall time since the previous step ended, forward + backward (from the
    step's start to the optimizer step, with clipping) and the optimizer step, in seconds."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._last_end: float | None = None
        self._marks: dict[str, float] = {}
        self.image_features = 0.0  # added to by a wrapper around the model's image encoding

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_end = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._marks = {"begin": time.perf_counter()}
        self.image_features = 0.0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._marks["pre_optimizer"] = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._marks["optimizer"] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        m = self._marks
        total = now - self._last_end
        forward_backward = m["pre_optimizer"] - m["begin"] - self.image_features
        optimizer = m["optimizer"] - m["pre_optimizer"]
        self.steps.append({"total": total, "image_features": self.image_features, "forward_backward": forward_backward,
                           "optimizer": optimizer, "other": total - self.image_features - forward_backward - optimizer})
        self._last_end = now


def _timed(fn: Callable, clock: StepClock) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.image_features += time.perf_counter() - start
    return wrapper


class _Batches(torch.utils.data.Dataset):
    """Already collated batches, one per item (a trainer reads them with batch size 1 in order)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.batches[i]


def _unwrap(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]


def summarize(steps: list[dict[str, float]], rows: Sequence[int]) -> dict[str, Any]:
    """Samples/s over timed steps (``rows[i]``: samples of step i) and the mean split per step (s)."""
    total = sum(s["total"] for s in steps)
    return {
        "samples_per_s": sum(rows) / total,
        "step_s": total / len(steps),
        "split_s": {k: sum(s[k] for s in steps) / len(steps) for k in SPLIT},
        "timed_steps": len(steps),
    }


# ---- the stage's batches ------------------------------------------------------------------------
def stage_batches(cfg: RunConfig, stage_index: int, processor, n_batches: int, model=None,
                  features_cached: Callable[[str], bool] | None = None) -> tuple[list[dict[str, Any]], float]:
    """The stage's first ``n_batches`` collated batches in the run's order (the seeded
    length-grouped sampler of :class:`~vlmzoo.training.trainer.VLMTrainer`, else a seeded
    permutation) -> (batches, seconds per batch to load and collate them)."""
    stage = cfg.training.stages[stage_index]
    processor = processor.with_template(stage.template, stage.pad_to_square)
    dataset = LlavaJsonDataset(stage.data, processor, cfg.stage_images(stage),
                               high_res_folder=cfg.stage_high_res_images(stage), max_length=cfg.data.max_length,
                               max_positions=position_limit(model) if model is not None else None,
                               features_cached=features_cached)
    size = stage.batch_size * stage.grad_accum
    if n_batches * size > len(dataset):
        raise ValueError(f"{stage.data}: {len(dataset)} records, fewer than {n_batches} batches of {size}.")
    if cfg.training.group_by_length:
        order = list(SeededLengthGroupedSampler(size, lengths=dataset.lengths, seed=cfg.seed))
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    collate = VLMDataCollator(processor)
    start = time.perf_counter()
    batches = [collate([dataset[j] for j in order[i * size:(i + 1) * size]]) for i in range(n_batches)]
    return batches, (time.perf_counter() - start) / n_batches


# ---- the measurement ----------------------------------------------------------------------------
def training_throughput(
    config: str | Path = DEFAULT_CONFIG,
    overrides: Sequence[str] = (),
    stage: str | int = -1,
    steps: int = 150,
    warmup: int = 10,
    rounds: int = 2,
) -> dict[str, Any]:
    """Samples/s of a ``llava`` run config's stage (default: its last) with vlmzoo's trainer path
    and with transformers' Llava + ``Trainer`` on the same batches; the ratio vlmzoo / transformers
    (above 1: vlmzoo is faster) and each side's mean step split (see the module doc)."""
    if steps < rounds or rounds < 1 or warmup < 1:
        raise ValueError(f"need rounds >= 1, steps >= rounds and warmup >= 1; got steps={steps}, warmup={warmup}, "
                         f"rounds={rounds}.")
    cfg = load_run_config(config, list(overrides))
    names = [s.name for s in cfg.training.stages]
    index = names.index(stage) if isinstance(stage, str) and stage in names else stage
    if not isinstance(index, int) or not -len(names) <= index < len(names):
        raise ValueError(f"{config}: no stage {stage!r}; stages: {', '.join(names)}.")
    index %= len(names)
    stage_cfg = cfg.training.stages[index]
    prepare_run_files(cfg)

    model, processor = load_stage_start(cfg, None, stage_cfg)
    plan = StagePlan.build(model, stage_cfg, where=f"training.stages.{index}")
    plan.apply(model)
    twin = transformers_twin(model)
    per_round = steps // rounds
    n_batches = warmup + per_round
    batches, data_s = stage_batches(cfg, index, processor, n_batches, model)

    # Same function first: logits and loss of both models on the first batch.
    first = {k: batches[0][k] for k in HF_INPUTS if k in batches[0]}
    with torch.no_grad():
        model.eval(), twin.eval()
        ours, theirs = model(**batches[0]), twin(**first)
        logit_diff = (ours.logits - theirs.logits).abs().max().item()
        loss_diff = abs(ours.loss.item() - theirs.loss.item())
    model.train(), twin.train()

    # The run's caches; the vision cache warm (the encoding of each image timed: the cost of a miss).
    caches = FeatureCaches()
    encode_s_per_image = None
    if cfg.training.cache_vision_features and "vision_tower" not in plan.trained:
        caches.vision = VisionFeatureCache()
        start = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                if "pixel_values" in b:
                    model.encode_images(b["pixel_values"], image_keys=b.get("image_keys"), cache=caches.vision)
        encode_s_per_image = (time.perf_counter() - start) / max(len(caches.vision), 1)
        caches.vision.hits = caches.vision.misses = 0
    if cfg.training.cache_text_features and model.text_encoder is not None:
        caches.text = InstructionFeatureCache()
    cached_data_s = None
    if caches.vision is not None and cfg.data.num_workers == 0:  # the run's dataset skips reading cached images
        _, cached_data_s = stage_batches(cfg, index, processor, n_batches, model,
                                         functools.partial(caches.vision.contains, model.strategy.needs))
    hf_batches = [{k: b[k] for k in HF_INPUTS if k in b} for b in batches]
    rows = [int(b["input_ids"].shape[0]) for b in batches[warmup:]]

    clocks = {"vlmzoo": StepClock(), "transformers": StepClock()}
    model.encode_images = _timed(model.encode_images, clocks["vlmzoo"])
    tower = twin.model.vision_tower
    tower.forward = _timed(tower.forward, clocks["transformers"])
    timed: dict[str, list[dict[str, float]]] = {"vlmzoo": [], "transformers": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        short = dataclasses.replace(stage_cfg, max_steps=n_batches, batch_size=1, grad_accum=1, save_steps=0)
        base = training_arguments(cfg, short)
        args = {side: dataclasses.replace(base, output_dir=str(Path(tmp) / side), report_to="none", disable_tqdm=True,
                                          train_sampling_strategy="sequential", logging_first_step=False)
                for side in clocks}
        def vlmzoo_trainer() -> Trainer:
            return VLMTrainer(model=model, args=args["vlmzoo"], train_dataset=_Batches(batches), data_collator=_unwrap,
                              stage_plan=plan, callbacks=[clocks["vlmzoo"]],
                              feature_caches=caches if (caches.vision, caches.text) != (None, None) else None)

        def transformers_trainer() -> Trainer:
            opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(args["transformers"], twin)
            opt_kwargs.pop("lr", None)  # every group carries the rate vlmzoo's plan gives it
            decay = set(VLMTrainer.get_decay_parameter_names(None, model))  # the rule reads no trainer state
            groups = twin_param_groups(model, twin, plan.param_groups(model, decay, short.weight_decay))
            return Trainer(model=twin, args=args["transformers"], train_dataset=_Batches(hf_batches),
                           data_collator=_unwrap, callbacks=[clocks["transformers"]],
                           optimizers=(opt_cls(groups, **opt_kwargs), None))

        make = {"vlmzoo": vlmzoo_trainer, "transformers": transformers_trainer}
        for r in range(rounds):
            for side in (list(make) if r % 2 == 0 else list(make)[::-1]):  # who goes first alternates
                clocks[side].steps = []
                trainer = make[side]()
                trainer.remove_callback(PrinterCallback)  # no log lines between the timings
                trainer.train()
                timed[side] += clocks[side].steps[warmup:]
    wall = time.perf_counter() - started

    result: dict[str, Any] = {side: summarize(timed[side], rows * rounds) for side in timed}
    result["vlmzoo"]["data_s_per_batch"] = cached_data_s if cached_data_s is not None else data_s
    result["transformers"]["data_s_per_batch"] = data_s
    for side in clocks:
        r = result[side]
        r["samples_per_s_with_data"] = sum(rows) / (r["step_s"] * len(rows) + r["data_s_per_batch"] * len(rows))
    trainable = {side: sum(p.numel() for p in m.parameters() if p.requires_grad)
                 for side, m in (("vlmzoo", model), ("transformers", twin))}
    config_path = Path(config).resolve()
    repo = CONFIGS_DIR.parent.resolve()
    result.update({
        "config": str(config_path.relative_to(repo)) if config_path.is_relative_to(repo) else str(config),
        "stage": stage_cfg.name,
        "batch_size": stage_cfg.batch_size * stage_cfg.grad_accum,
        "steps": per_round * rounds,
        "warmup_steps": warmup,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "ratio": result["vlmzoo"]["samples_per_s"] / result["transformers"]["samples_per_s"],
        "ratio_with_data": result["vlmzoo"]["samples_per_s_with_data"] / result["transformers"]["samples_per_s_with_data"],
        # what skipping the tower alone would give: the transformers step without its tower time
        "ratio_from_skipping_the_tower": result["transformers"]["step_s"] / (
            result["transformers"]["step_s"] - result["transformers"]["split_s"]["image_features"]),
        "max_abs_logit_difference": logit_diff,
        "loss_difference": loss_diff,
        "trainable_parameters": trainable,
        "parameters": sum(p.numel() for p in model.parameters()),
        "visual_tokens": model.strategy.num_visual_tokens,
        "tokens_per_batch": sum(int(b["attention_mask"].sum()) for b in batches) / len(batches),
        "feature_cache": None if caches.vision is None else {
            "images": len(caches.vision), "encode_s_per_image": encode_s_per_image,
            "hits": caches.vision.hits, "misses": caches.vision.misses,
        },
        "seconds": wall,
    })
    return result


def training_table(result: dict[str, Any]) -> str:
    """Markdown: both sides' samples/s and step split, the ratio, and what was held equal."""
    ours, theirs = result["vlmzoo"], result["transformers"]
    cache = result["feature_cache"]
    cache_text = ("no vision feature cache" if cache is None else
                  f"vision feature cache warm (each of the {cache['images']} images of the batches encoded once "
                  f"before timing: {1000 * cache['encode_s_per_image']:.2f} ms per image)")
    out = [
        f"Stage `{result['stage']}` of `{result['config']}`: batch {result['batch_size']} "
        f"(~{result['tokens_per_batch']:.0f} tokens, {result['visual_tokens']} visual tokens per image), "
        f"{result['steps']} timed steps per side after {result['warmup_steps']} warm-up steps in each of "
        f"{result['rounds']} alternating rounds, {result['threads']} threads. Same batches, weights (max |logit "
        f"difference| {result['max_abs_logit_difference']:.1e}), trainable parameters "
        f"({result['trainable_parameters']['vlmzoo']:,} of {result['parameters']:,}), optimizer and schedule; "
        f"{cache_text}. Times in ms, means per step.",
        "",
        "| | vlmzoo: `VLMTrainer` | transformers: `LlavaForConditionalGeneration` + `Trainer` |",
        "|---|---:|---:|",
        f"| **samples/s** | **{ours['samples_per_s']:.0f}** | **{theirs['samples_per_s']:.0f}** |",
        f"| training step | {1000 * ours['step_s']:.1f} | {1000 * theirs['step_s']:.1f} |",
    ]
    labels = {"image_features": "image features (tower or cache)", "forward_backward": "forward + backward (+ clipping)",
              "optimizer": "optimizer step", "other": "other (batch fetch, scheduler, zero_grad, logging)"}
    for key, label in labels.items():
        out.append(f"| {label} | {1000 * ours['split_s'][key]:.1f} | {1000 * theirs['split_s'][key]:.1f} |")
    out += [
        f"| data loading + collation per batch (outside the timed steps) | {1000 * ours['data_s_per_batch']:.1f} | "
        f"{1000 * theirs['data_s_per_batch']:.1f} |",
        f"| samples/s counting data loading | {ours['samples_per_s_with_data']:.0f} | {theirs['samples_per_s_with_data']:.0f} |",
        "",
        f"Ratio vlmzoo / transformers (above 1: vlmzoo is faster): **{result['ratio']:.2f}x** "
        f"({result['ratio_with_data']:.2f}x counting data loading). Removing the tower's time from the "
        f"transformers step alone would give {result['ratio_from_skipping_the_tower']:.2f}x.",
    ]
    return "\n".join(out)
