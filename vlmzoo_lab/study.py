"""A comparison study: several strategies x several seeds, trained and evaluated alike, in one table.

``scripts/compare.py --archs llava igva --seeds 3`` trains every ``(strategy, seed)`` pair through
:func:`vlmzoo.training.run_training` (the code path of ``scripts/train.py``) from the config
``scripts/train.py --arch ARCH --scale SCALE`` would use (:func:`vlmzoo.config.strategy_run_config`) with
the same trailing overrides, then collects per run:

* accuracy per question type, overall and macro, and the blind control (``eval/eval_metrics.json``);
* parameters: ``total`` and ``trainable`` (the last stage's, from its ``stage_complete.json``) and
  ``strategy`` (every parameter outside the core groups vision tower / text encoder / LLM: what the
  strategy adds, its connector included);
* visual tokens per image (the saved processor's ``num_visual_tokens``);
* training time: the sum of the stages' ``runtime_s``;
* for every extra output the strategy declares (:attr:`vlmzoo.GuidanceStrategy.extra_outputs`, e.g.
  IGVA's layer weights), its mean per question type;
* generation latency: the median wall time of one greedy answer of exactly ``eval.max_new_tokens``
  tokens (batch 1, after one warm-up) over the first ``latency_prompts`` eval questions;
* the training loss log of every stage (``<stage>/final/trainer_state.json``).

Every strategy must see the same training data and steps and the same evaluation questions (the
"budget", :func:`run_budget`); a study whose configs differ there is refused unless asked.

Layout of ``--out`` (default ``outputs/study``)::

    runs/<arch>-s<seed>/      one run folder each (see vlmzoo.training.runner)
    runs/<arch>-s<seed>/study_measurements.json   latency + visual tokens of that run
    results.md                the table (mean ± std over seeds), also printed
    results.csv               one row per run (kind=run) plus kind=mean and kind=std rows per strategy
    claims.csv                one row per claim, question type and method of configs/claims.yaml whose
                              method the study ran: its negative and positive controls side by side,
                              effect, noise and verdict (vlmzoo_lab.study_claims; also a table in results.md)
    accuracy.png              accuracy per question type per strategy, std error bars, blind control
    loss.png                  training loss vs. step per strategy (mean over seeds), stage boundaries
    <extra>.png               per declared extra (e.g. layer_weights.png): its mean per question type

Parallel runs: ``--jobs N`` trains and evaluates N runs at a time, each in its own process with
``cores // N`` torch threads (on a small CPU two 1-thread runs get more done than one 2-thread
run: a tiny model's ops are too small to keep two threads busy). The generation latency is then
measured afterwards, one run at a time in the main process, so that no run is timed under
another's load.

Reuse: running the same study again skips the completed stages of every run (the runner's resume),
re-uses ``eval/eval_metrics.json`` when no stage had to train and the ``eval`` section is unchanged,
and re-uses ``study_measurements.json`` likewise. ``results.csv`` columns are listed in
:data:`vlmzoo_lab.study_report.CSV_DOC`; the table and plots are written by
:mod:`vlmzoo_lab.study_report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from vlmzoo.build import torch_dtype
from vlmzoo.config import (
    CONFIGS_DIR,
    diff_configs,
    load_run_config,
    prepare_run_files,
    strategy_config_files,
    strategy_run_config,
)
from vlmzoo.evaluation import (
    METRICS_FILE,
    evaluate_run,
    generation_batch,
    greedy_generate,
    image_first_messages,
    load_eval_records,
    load_for_eval,
    record_views,
)
from vlmzoo.registry import available_strategies
from vlmzoo.training.groups import CORE_GROUPS
from vlmzoo.training.runner import FINAL_DIRNAME, TRAINER_STATE_FILE, run_training
from vlmzoo.utils import setup_logging

from .analysis import extras_by_question_type
from .study_claims import load_claims
from .study_report import write_outputs

logger = logging.getLogger(__name__)

RUNS_DIRNAME = "runs"
MEASUREMENTS_FILE = "study_measurements.json"
#: Bump when measure_generation measures something new (older measurement files are redone).
MEASUREMENTS_VERSION = 4


# ---- spec ----------------------------------------------------------------------------------------
@dataclass
class StudySpec:
    """What to compare.

    Attributes:
        archs: registered strategies (``ARCH``, or ``ARCH:STEM`` for its config ``STEM.yaml``);
            :func:`main` defaults to every registered strategy with a ``<scale>.yaml`` (at
            ``tiny``: every one, see :func:`default_archs`).
        seeds: one run per strategy and seed.
        out: study folder.
        scale: config file stem (``tiny`` -> ``configs/<arch>/tiny.yaml``).
        config_dir: folder holding ``<arch>/<scale>.yaml`` (default: this repository's ``configs/``).
        overrides: dotted ``key=value`` overrides applied to every run.
        max_eval: evaluate only the first N questions (``eval.max_samples``); ``None``: the config's.
        latency_prompts: eval questions timed for the generation latency (0: not measured).
        allow_unequal_budgets: accept configs whose data / steps / eval questions differ.
        jobs: runs trained and evaluated at the same time, each in its own process.
        claims: the claims file for ``claims.csv`` (``None``: ``configs/claims.yaml``).
    """

    archs: Sequence[str] = ()
    seeds: Sequence[int] = (0,)
    out: str | os.PathLike = "outputs/study"
    scale: str = "tiny"
    config_dir: str | os.PathLike | None = None
    overrides: Sequence[str] = ()
    max_eval: int | None = None
    latency_prompts: int = 5
    allow_unequal_budgets: bool = False
    jobs: int = 1
    claims: str | os.PathLike | None = None


@dataclass
class RunRecord:
    """The numbers of one ``(arch, seed)`` run."""

    arch: str
    seed: int
    run_dir: Path
    reused: bool
    trained_stages: list[str]
    accuracy: float
    macro_accuracy: float
    n_eval: int
    per_type: dict[str, float]
    blind_accuracy: float | None
    blind_per_type: dict[str, float]
    params_total: int
    params_trainable: int
    params_strategy: int
    visual_tokens: int | None
    train_time_s: float
    latency_ms: float | None
    #: per declared extra (key): ``{"title", "component", "description", "by_type": {type: {"n", "mean", "std"}}}``
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stage_ends: list[int] = field(default_factory=list)


@dataclass
class StudyResult:
    spec: StudySpec
    runs: list[RunRecord]
    table: str
    files: dict[str, Path]


# ---- configs -------------------------------------------------------------------------------------
def split_variant(name: str, scale: str) -> tuple[str, str]:
    """``"tg_llava"`` -> ``("tg_llava", scale)``; ``"tg_llava:tiny_fom_only"`` -> ``("tg_llava", "tiny_fom_only")``."""
    arch, _, stem = name.partition(":")
    return arch, stem or scale


def config_source(spec: StudySpec, arch: str) -> tuple[Path, tuple[str, ...]]:
    """The config of a study entry as ``(file, overrides applied first)``: the strategy's
    ``<scale>.yaml`` (:func:`vlmzoo.config.strategy_run_config`: its config folders, else the shared tiny base
    for a strategy that ships none), or of ``arch:stem`` (an ablation variant) its ``<stem>.yaml``;
    with ``config_dir``, ``<config_dir>/<arch>/<stem>.yaml``."""
    folder, stem = split_variant(arch, spec.scale)
    if spec.config_dir is None:
        return strategy_run_config(folder, stem)
    path = Path(spec.config_dir) / folder / f"{stem}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--config-dir: no {path} (arch {folder!r}, config {stem!r}).")
    return path, ()


def config_path(spec: StudySpec, arch: str) -> Path:
    """The file of :func:`config_source`."""
    return config_source(spec, arch)[0]


def load_presets(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """``configs/presets.yaml``: named studies (``archs``, optional ``description``)."""
    path = Path(path) if path else CONFIGS_DIR / "presets.yaml"
    presets = (yaml.safe_load(path.read_text()) or {}).get("presets") or {}
    for name, preset in presets.items():
        if not isinstance(preset, dict) or not preset.get("archs"):
            raise ValueError(f"{path}: preset {name!r} needs an 'archs' list.")
    return presets


def preset_archs(name: str, path: str | os.PathLike | None = None) -> list[str]:
    """The study entries of preset ``name``; an unknown name lists the presets that exist."""
    presets = load_presets(path)
    if name not in presets:
        raise KeyError(f"Unknown preset {name!r}. Presets: {', '.join(sorted(presets))}.")
    return list(presets[name]["archs"])


def default_archs(scale: str = "tiny", config_dir: str | os.PathLike | None = None) -> list[str]:
    """Every registered strategy with a ``<scale>.yaml`` (:func:`vlmzoo.config.strategy_config_files`;
    at ``tiny`` every one: a strategy without a tiny config runs the shared tiny base), or with
    ``config_dir`` those with ``<config_dir>/<arch>/<scale>.yaml``."""
    if config_dir:
        return [a for a in available_strategies() if (Path(config_dir) / a / f"{scale}.yaml").is_file()]
    return [a for a in available_strategies() if scale == "tiny" or strategy_config_files(a, f"{scale}.yaml")]


def run_name(arch: str, seed: int) -> str:
    return f"{arch.replace(':', '@')}-s{seed}"


def run_dir(spec: StudySpec, arch: str, seed: int) -> Path:
    return Path(spec.out) / RUNS_DIRNAME / run_name(arch, seed)


def run_overrides(spec: StudySpec, arch: str, seed: int) -> list[str]:
    """The overrides of one run of :func:`config_path`'s file: the entry's own (:func:`config_source`),
    the study's, then seed, output folder and name."""
    extra = [f"seed={seed}", f"output.dir={run_dir(spec, arch, seed)}", f"output.name={run_name(arch, seed)}"]
    if spec.max_eval is not None:
        extra.append(f"eval.max_samples={spec.max_eval}")
    return [*config_source(spec, arch)[1], *spec.overrides, *extra]


def run_budget(cfg) -> dict[str, Any]:
    """What must be equal between the strategies of a study: training data and steps, eval questions."""
    stages = [
        {"data": s.data, "images": cfg.stage_images(s), "max_steps": s.max_steps, "epochs": s.epochs,
         "batch_size": s.batch_size, "grad_accum": s.grad_accum}
        for s in cfg.training.stages
    ]
    e = cfg.eval
    return {"stages": stages, "eval": {"data": e.data, "max_samples": e.max_samples, "max_new_tokens": e.max_new_tokens},
            "blind_train_data": cfg.eval_train_data()}


def check_budgets(budgets: dict[str, dict[str, Any]], paths: dict[str, Path]) -> None:
    archs = list(budgets)
    for arch in archs[1:]:
        diffs = diff_configs(budgets[archs[0]], budgets[arch])
        if diffs:
            raise ValueError(
                f"{paths[arch]} ({arch}) trains or evaluates differently from {paths[archs[0]]} ({archs[0]}) at: "
                f"{', '.join(diffs[:8])}. A study compares strategies under one budget; align the configs "
                "or pass --allow-unequal-budgets."
            )


# ---- one run -------------------------------------------------------------------------------------
def _previous_eval_section(out: Path) -> dict[str, Any] | None:
    path = out / "resolved_config.yaml"
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get("eval")


def train_and_evaluate(
    cfg, latency_prompts: int = 5, measure: bool = True
) -> tuple[dict[str, Any], dict[str, Any] | None, list, bool]:
    """Train (resuming) and evaluate one run, re-using a finished run's files.

    -> ``(eval_metrics, measurements, stage results, reused)``; ``reused`` is True when no stage
    trained and both the eval metrics and the measurements came from disk. ``measure=False``
    skips the measurements (``None``)."""
    out = Path(cfg.output.dir)
    eval_file = out / "eval" / METRICS_FILE
    same_eval = _previous_eval_section(out) == dataclasses.asdict(cfg.eval)
    result = run_training(cfg, evaluate=False)
    trained = [s.name for s in result.stages if not s.skipped]
    if not trained and same_eval and eval_file.is_file():
        logger.info("%s: finished run; eval metrics reused from %s", out, eval_file)
        metrics, eval_reused = json.loads(eval_file.read_text()), True
    else:
        metrics, eval_reused = evaluate_run(cfg, result.final_model_dir, out / "eval"), False
    if not measure:
        return metrics, None, result.stages, False

    meas_file = out / MEASUREMENTS_FILE
    wanted = {"model": str(Path(result.final_model_dir).resolve()), "latency_prompts": latency_prompts,
              "eval": dataclasses.asdict(cfg.eval), "version": MEASUREMENTS_VERSION}
    old = json.loads(meas_file.read_text()) if meas_file.is_file() else None
    if not trained and old is not None and all(old.get(k) == v for k, v in wanted.items()):
        measurements, meas_reused = old, True
    else:
        measurements = {**wanted, **measure_generation(cfg, result.final_model_dir, latency_prompts)}
        meas_file.write_text(json.dumps(measurements, indent=2) + "\n")
        meas_reused = False
    return metrics, measurements, result.stages, (not trained and eval_reused and meas_reused)


def measure_generation(cfg, model_dir: str | os.PathLike, n_prompts: int) -> dict[str, Any]:
    """Visual tokens per image, and the median latency (ms) of one greedy answer of exactly
    ``eval.max_new_tokens`` tokens at batch 1 over the first ``n_prompts`` eval questions."""
    model, processor = load_for_eval(model_dir, cfg.eval.template, torch_dtype(cfg.model.dtype))
    out: dict[str, Any] = {"visual_tokens": int(processor.num_visual_tokens), "latency_ms": None}
    if n_prompts <= 0 or not cfg.eval.data:
        return out
    records = load_eval_records(cfg.eval.data, cfg.eval.question_type_key, n_prompts)
    images_dir = cfg.eval.images or cfg.data.images or os.path.dirname(os.path.abspath(cfg.eval.data))
    folders = processor.view_folders(images_dir, cfg.eval_high_res_images())  # as the evaluator reads them
    n_new = cfg.eval.max_new_tokens
    times = []
    for i, rec in enumerate([records[0], *records]):  # the first one warms up
        images, high_res = record_views(rec, folders)
        batch = generation_batch(model, processor, [image_first_messages(rec.messages, len(rec.images))], [images],
                                 None if high_res is None else [high_res])
        start = time.perf_counter()
        greedy_generate(model, processor, batch, n_new, min_new_tokens=n_new)
        if i:
            times.append(time.perf_counter() - start)
    out["latency_ms"] = round(1000 * statistics.median(times), 3)
    out["extras"] = declared_extras_by_type(model, processor, cfg, images_dir)
    return out


def declared_extras_by_type(model, processor, cfg, images_dir: str) -> dict[str, dict[str, Any]]:
    """Each extra the model's strategy declares with ``summary="mean_by_question_type"``, averaged per
    question type over the eval questions (:func:`vlmzoo_lab.analysis.extras_by_question_type`):
    ``{key: {"title", "component", "description", "by_type"}}``; ``{}`` for a strategy declaring none."""
    declared = [e for e in model.strategy.extra_outputs if e.summary == "mean_by_question_type"]
    records = [r for r in load_eval_records(cfg.eval.data, cfg.eval.question_type_key, cfg.eval.max_samples) if r.images]
    if not declared or not records:
        return {}
    return {e.key: {"title": e.heading, "component": e.component, "description": e.description,
                    "by_type": extras_by_question_type(model, processor, records, images_dir, key=e.key,
                                                       batch_size=cfg.eval.batch_size)}
            for e in declared}


def stage_trainer_state(stage_dir: Path) -> dict[str, Any] | None:
    """A stage's Trainer state: ``final/trainer_state.json``, else its latest checkpoint's."""
    path = stage_dir / FINAL_DIRNAME / TRAINER_STATE_FILE
    if not path.is_file():
        checkpoints = sorted(stage_dir.glob("checkpoint-*/" + TRAINER_STATE_FILE),
                             key=lambda p: int(p.parent.name.split("-")[-1]))
        if not checkpoints:
            return None
        path = checkpoints[-1]
    return json.loads(path.read_text())


def collect_run(arch: str, seed: int, cfg, metrics, measurements, stages, reused: bool) -> RunRecord:
    """One :class:`RunRecord` from a run's eval metrics, stage metrics and trainer states."""
    last = stages[-1].metrics.get("parameters") or {}
    if not last:
        raise ValueError(f"{stages[-1].final_dir}/stage_complete.json has no 'parameters' entry.")
    blind = metrics.get("blind") or {}
    steps: list[int] = []
    losses: list[float] = []
    ends: list[int] = []
    offset = 0
    for stage in stages:
        state = stage_trainer_state(Path(cfg.output.dir) / stage.name)
        if state is None:
            logger.warning("%s: no trainer_state.json; its losses are missing from loss.png.", stage.final_dir)
        for entry in (state or {}).get("log_history", []):
            if "loss" in entry:
                steps.append(offset + int(entry["step"]))
                losses.append(float(entry["loss"]))
        offset += int(stage.metrics.get("global_step") or 0)
        ends.append(offset)
    return RunRecord(
        arch=arch, seed=seed, run_dir=Path(cfg.output.dir), reused=reused,
        trained_stages=[s.name for s in stages if not s.skipped],
        accuracy=metrics["accuracy"], macro_accuracy=metrics["macro_accuracy"], n_eval=metrics["n"],
        per_type={t: v["accuracy"] for t, v in metrics["per_type"].items()},
        blind_accuracy=blind.get("accuracy"),
        blind_per_type={t: v["accuracy"] for t, v in blind.get("per_type", {}).items()},
        params_total=sum(g["total"] for g in last.values()),
        params_trainable=sum(g["trainable"] for g in last.values()),
        params_strategy=sum(g["total"] for name, g in last.items() if name not in CORE_GROUPS),
        visual_tokens=measurements.get("visual_tokens"),
        train_time_s=round(sum(float(s.metrics.get("runtime_s") or 0.0) for s in stages), 2),
        latency_ms=measurements.get("latency_ms"), extras=measurements.get("extras") or {},
        loss_steps=steps, losses=losses, stage_ends=ends,
    )


# ---- the study -----------------------------------------------------------------------------------
def run_study(spec: StudySpec) -> StudyResult:
    """Train, evaluate and measure every ``(arch, seed)`` of ``spec``; write the table, CSV and plots."""
    if not spec.archs or not spec.seeds:
        raise ValueError("A study needs at least one arch and one seed.")
    claims = load_claims(spec.claims)  # a malformed claims file fails before hours of training
    paths = {arch: config_path(spec, arch) for arch in spec.archs}
    # Seed-major order: an interrupted study already has every strategy at its first seeds.
    configs = {(a, s): load_run_config(paths[a], run_overrides(spec, a, s)) for s in spec.seeds for a in spec.archs}
    if not spec.allow_unequal_budgets:
        check_budgets({a: run_budget(configs[(a, spec.seeds[0])]) for a in spec.archs}, paths)
    for cfg in configs.values():  # once, before any worker starts (the first call builds, the rest verify)
        prepare_run_files(cfg)
    if spec.jobs > 1:
        train_in_parallel(spec, paths, list(configs))
    runs = []
    for (arch, seed), cfg in configs.items():
        logger.info("Study run %s seed %d -> %s", arch, seed, cfg.output.dir)
        metrics, measurements, stages, reused = train_and_evaluate(cfg, spec.latency_prompts)
        runs.append(collect_run(arch, seed, cfg, metrics, measurements, stages, reused))
        logger.info("Study run %s seed %d: %s", arch, seed, "reused (nothing trained or evaluated)" if reused
                    else f"trained stages: {', '.join(runs[-1].trained_stages) or 'none'}")
    table, files = write_outputs(spec, runs, claims)
    return StudyResult(spec=spec, runs=runs, table=table, files=files)


def train_in_parallel(spec: StudySpec, paths: dict[str, Path], runs: list[tuple[str, int]]) -> None:
    """Train and evaluate ``runs`` (``(arch, seed)`` pairs) ``spec.jobs`` at a time, each in a
    fresh process with ``cores // jobs`` torch threads; the caller then collects them (reused)."""
    threads = max(1, (os.cpu_count() or 1) // spec.jobs)
    logger.info("Study: %d runs, %d at a time with %d torch thread(s) each", len(runs), spec.jobs, threads)
    with ProcessPoolExecutor(max_workers=spec.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_train_one, str(paths[a]), run_overrides(spec, a, s)): (a, s) for a, s in runs}
        failed = []
        for future, (arch, seed) in futures.items():
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - reported with the run's name, then raised below
                logger.error("Study run %s seed %d failed: %s", arch, seed, exc)
                failed.append(f"{arch} seed {seed}: {exc}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(runs)} study runs failed:\n  " + "\n  ".join(failed))


def _init_worker(threads: int) -> None:
    setup_logging()
    torch.set_num_threads(threads)


def _train_one(config_path: str, overrides: list[str]) -> None:
    cfg = load_run_config(config_path, overrides)
    logger.info("Study run %s -> %s (worker %d)", cfg.output.name, cfg.output.dir, os.getpid())
    train_and_evaluate(cfg, measure=False)


# ---- command line --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``scripts/compare.py``: the study of :func:`run_study`; prints the markdown table."""
    parser = argparse.ArgumentParser(
        description="Train and evaluate several strategies with the same data, budget and seeds; "
        "write results.md, results.csv, claims.csv, accuracy.png and loss.png.",
        epilog="Example: scripts/compare.py --archs llava igva --seeds 3 --out outputs/study",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--archs", nargs="+", help="strategies (default: every registered one with a <scale>.yaml); "
                       "ARCH:STEM takes configs/ARCH/STEM.yaml (an ablation variant)")
    which.add_argument("--preset", help="a named study of configs/presets.yaml (the seed papers' ablations)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    seeds.add_argument("--seed-list", type=int, nargs="+", help="explicit seeds")
    parser.add_argument("--scale", default="tiny", help="config file stem: <scale>.yaml of each strategy's configs (default "
                        "tiny; a strategy without a tiny.yaml runs the shared tiny base)")
    parser.add_argument("--config-dir", help="folder holding <arch>/<scale>.yaml (default: the repository's configs/)")
    parser.add_argument("--out", default="outputs/study", help="study folder (default outputs/study)")
    parser.add_argument("--max-eval", type=int, help="evaluate only the first N questions of the eval file (eval.max_samples; the "
                        "file is ordered by type, so a small N may cover only some types)")
    parser.add_argument("--latency-prompts", type=int, default=5, help="questions timed for latency (0: skip)")
    parser.add_argument("--allow-unequal-budgets", action="store_true",
                        help="accept configs whose training data / steps / eval questions differ")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, each in its own process "
                        "with cores/jobs torch threads (default 1; 2 is fastest on a 2-core CPU)")
    parser.add_argument("--claims", help="claims file for claims.csv (default: the repository's configs/claims.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides applied to every run")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow the flags
    if args.seed_list is None and args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    setup_logging()
    if args.preset:
        try:
            archs = preset_archs(args.preset)
        except KeyError as err:
            parser.error(str(err.args[0]))
    else:
        archs = args.archs or default_archs(args.scale, args.config_dir)
    spec = StudySpec(
        archs=archs, seeds=args.seed_list or list(range(args.seeds)), out=args.out, scale=args.scale,
        config_dir=args.config_dir, overrides=args.overrides, max_eval=args.max_eval,
        latency_prompts=args.latency_prompts, allow_unequal_budgets=args.allow_unequal_budgets, jobs=args.jobs,
        claims=args.claims,
    )
    start = time.perf_counter()
    result = run_study(spec)
    print(result.table)
    reused = sum(r.reused for r in result.runs)
    print(f"\n{len(result.runs)} runs ({reused} reused) in {(time.perf_counter() - start) / 60:.1f} min wall time. "
          + "  ".join(f"{k}: {v}" for k, v in result.files.items()))
    return 0
