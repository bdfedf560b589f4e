"""Run configs: YAML files with ``_base_`` inheritance, dotted command-line overrides, typed sections.

A run config file is YAML. ``_base_: [relative/file.yaml, ...]`` lists files it inherits from;
they are deep-merged in order, then the file itself on top (mappings merge key by key, anything
else replaces; a mapping with integer keys patches single items of a list, e.g.
``training: {stages: {0: {lr: 1e-3}}}``). Overrides use the same dotted paths on the command
line, values parsed as YAML::

    training.stages.0.lr=1e-3   model.strategy_config.vision_layer=-3   eval.data=null

String values may refer to ``${configs_dir}`` (this repository's ``configs/`` folder) and to
``${NAME.FIELD}`` of a registered variable provider (:mod:`vlmzoo.variables`; e.g. the tiny
world's ``${tiny_world.llm_dir}``), whose settings are the top-level ``NAME`` section. Resolving
never builds anything: training and evaluation call :func:`prepare_run_files` first. Unknown keys
anywhere are errors that name the key, where it is and the nearest valid keys.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from .config_tree import apply_override, interpolate, load_yaml_tree, parse_override
from .registry import STRATEGIES, UnknownStrategyError, available_strategies, get_strategy_class
from .utils import ConfigKeyError, atomic_write_text, build_dataclass, nearest_names, unknown_key_error
from .variables import VariableResolver, prepare_variables, variable_providers

CONFIGS_DIR = Path(os.environ.get("VLMZOO_CONFIGS_DIR", Path(__file__).resolve().parent.parent / "configs"))


# ---- sections ------------------------------------------------------------------------------------
@dataclass
class ModelSection:
    """What to build. Either pretrained components by name or path (``vision_tower``, ``llm``,
    ``text_encoder``) or explicit configs (``vision_config``, ``text_config``,
    ``text_encoder_config``) for building on the meta device; reference configs give both.

    Attributes:
        strategy: registered strategy name (required; ``--arch NAME`` picks its config,
            :func:`strategy_run_config`); ``strategy_config`` holds its fields (unset ones: the defaults of
            the strategy's config dataclass).
        vision_tower / vision_backend: tower hub name or local path, and its backend (``hf``,
            ``timm``, ``open_clip``).
        llm: causal LM hub name or local path; ``tokenizer`` defaults to it.
        text_encoder / text_encoder_backend: instruction encoder, for strategies that need one.
        image_token: placeholder text; added to the tokenizer if absent.
        image_token_id: only for meta builds from explicit configs (default: a new vocabulary entry);
            pretrained builds take the id from the tokenizer.
        dtype: dtype the pretrained weights are loaded in (``float32``, ``bfloat16``, ``float16``).
        init_from: a saved vlmzoo model folder (e.g. a trained ``llava``) whose weights are loaded
            by name over the freshly built model before the first stage: another strategy starts
            from its shared weights (tower, LLM, connector) and keeps its own new modules as built.
            The log lists loaded, kept and dropped weights; a shape mismatch is an error naming the key.
    """

    strategy: str | None = None
    strategy_config: dict[str, Any] = field(default_factory=dict)
    vision_tower: str | None = None
    vision_backend: str = "hf"
    llm: str | None = None
    tokenizer: str | None = None
    text_encoder: str | None = None
    text_encoder_backend: str = "hf"
    vision_config: dict[str, Any] | None = None
    text_config: dict[str, Any] | None = None
    text_encoder_config: dict[str, Any] | None = None
    image_token: str = "<image>"
    image_token_id: int | None = None
    llm_attn_implementation: str = "sdpa"
    freeze_vision_tower: bool = True
    dtype: str = "float32"
    init_from: str | None = None


@dataclass
class DataSection:
    """Defaults shared by every stage and the evaluation.

    Attributes:
        images: image folder used when a stage or the eval names none.
        high_res_images: optional folder holding the same relative image paths as ``images``, each
            image stored at (at least) f times the tower's resolution, for strategies with a
            high-res factor f > 1 (``StrategyNeeds.high_res_factor``, e.g. TG-LLaVA's TG-DP). The
            processor resizes them to ``(f*H, f*W)`` and batches them as ``pixel_values_hr``, so the
            strategy's crops come from them instead of from the base image upsampled. A stage or
            the eval reading another ``images`` folder than ``data.images`` gets a high-res folder
            only by naming its own ``high_res_images``; a missing high-res file is an error. Ignored by strategies
            without a high-res factor.
        max_length: truncate token sequences to this length (``None`` = no limit). Either way a
            sample longer than the LLM's ``max_position_embeddings`` is an error before training.
        num_workers: data-loader worker processes (kept alive across epochs); 0 loads in the
            training process.
        check_images: how every image of every stage and of the eval is checked before the first
            step: ``decode`` (default: each file is decoded once, in parallel; files already
            decoded unchanged are remembered, see :mod:`vlmzoo.data.checks`), ``exists`` (the file
            exists), ``none``.
        allow_absolute_image_paths: an image path must resolve inside its image folder (no ``..``
            leaving it, no absolute path, no symlink pointing out of it). ``true`` allows absolute
            paths and symlinks that lead out of the folder; ``..`` climbing out of it stays an error.
    """

    images: str | None = None
    high_res_images: str | None = None
    max_length: int | None = None
    num_workers: int = 0
    check_images: str = "decode"
    allow_absolute_image_paths: bool = False


@dataclass
class LoraSpec:
    """``training.stages.N.lora``: a LoRA adapter trained in the stage (peft's ``LoraConfig``).

    Attributes:
        r / alpha / dropout: rank, scaling numerator (the update is ``alpha / r * B A``) and the
            dropout on the adapter's input.
        target_modules: ``all-linear`` (every ``nn.Linear`` of the groups except the LLM's output
            layer), or names matched as peft matches them (a module whose path ends with
            ``.NAME``, e.g. ``q_proj``), only inside ``groups``.
        groups: module groups the adapter goes into (default ``[llm]``; also the tower or a
            strategy group). A group a stage adapts cannot also be in its ``train`` list.
        modules_to_save: modules (by peft's suffix match) trained fully alongside the adapter and
            saved with it (e.g. ``[lm_head]``).
        quantize: ``4bit`` / ``8bit``: QLoRA, the base weights held by bitsandbytes (needs a CUDA
            GPU and bitsandbytes; checked when the config is loaded). ``null``: full precision.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    groups: list[str] = field(default_factory=lambda: ["llm"])
    modules_to_save: list[str] = field(default_factory=list)
    quantize: str | None = None


QUANTIZE_CHOICES = ("4bit", "8bit")  # LoraSpec.quantize
INSTALL_HINT = "pip install -e '.[lora]' (peft)"


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def check_spec(spec: LoraSpec, where: str) -> None:
    """Value ranges, and what this machine needs for the spec; a ``ValueError`` naming ``where``
    and what is missing. Imports nothing heavy."""
    if spec.r < 1:
        raise ValueError(f"{where}.r: must be >= 1, got {spec.r!r}.")
    if spec.alpha <= 0:
        raise ValueError(f"{where}.alpha: must be > 0, got {spec.alpha!r}.")
    if not 0.0 <= spec.dropout < 1.0:
        raise ValueError(f"{where}.dropout: must be in [0, 1), got {spec.dropout!r}.")
    if not spec.groups:
        raise ValueError(f"{where}.groups: name at least one module group (e.g. [llm]).")
    if isinstance(spec.target_modules, str) and spec.target_modules != "all-linear":
        raise ValueError(f"{where}.target_modules: {spec.target_modules!r}; use all-linear or a list of names (e.g. [q_proj, v_proj]).")
    if isinstance(spec.target_modules, list) and not spec.target_modules:
        raise ValueError(f"{where}.target_modules: empty; use all-linear or name modules (e.g. [q_proj, v_proj]).")
    if not peft_available():
        raise ValueError(f"{where}: LoRA needs the peft package, which is not installed: {INSTALL_HINT}.")
    if spec.quantize is not None:
        if spec.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"{where}.quantize: must be one of {', '.join(QUANTIZE_CHOICES)} or null, got {spec.quantize!r}.")
        missing = []
        if not torch.cuda.is_available():
            missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
        if importlib.util.find_spec("bitsandbytes") is None:
            missing.append("the bitsandbytes package (pip install bitsandbytes)")
        if missing:
            raise ValueError(f"{where}.quantize={spec.quantize}: QLoRA holds the base weights in bitsandbytes' "
                             f"{spec.quantize} format and needs {' and '.join(missing)}, which this machine lacks. "
                             f"Set {where}.quantize=null to train the same adapter over full-precision weights.")


@dataclass
class StageConfig:
    """One training stage: data, template, which module groups train and how.

    Attributes:
        name: folder name of the stage's checkpoints (unique within a run).
        data: LLaVA-format JSON file; ``images``: its image folder (default ``data.images``).
        high_res_images: the same images at f times the tower's resolution (see
            :class:`DataSection`); default ``data.high_res_images`` when ``images`` is unset or
            ``data.images``.
        template: conversation template (``plain`` for alignment, ``vicuna_v1`` for instructions), or
            a built-in one with fields replaced: ``{base: vicuna_v1, default_system: null}``.
        pad_to_square: ``true`` pads each image to a square with the mean colour before resizing
            (LLaVA-1.5); ``false`` resizes its short side and centre-crops (the image processor's
            own steps); ``null`` (default) keeps the previous stage's choice (at the start: pad).
            The processor saved with the stage keeps it, so a run's evaluation follows its last stage.
        train: module groups that train; every other group is frozen. Groups: ``vision_tower``,
            ``text_encoder``, ``llm``, the strategy's ``module_groups()`` names, and ``strategy``
            (all of the strategy's groups).
        lr: learning rate of every trained group without an entry in ``group_lr``.
        group_lr: per-group learning rates (a strategy sub-group's entry beats ``strategy``'s).
        epochs / max_steps: length of the stage; ``max_steps > 0`` wins.
        batch_size: per-device batch; ``grad_accum`` micro-batches per optimiser step.
        warmup: linear warmup, a ratio of the stage's steps if < 1, else a step count.
        scheduler: transformers scheduler name (``cosine``, ``linear``, ``constant_with_warmup``...).
        save_steps: checkpoint every this many steps (for resuming; ``None``: no checkpoints, an
            interrupted stage starts again). Checkpoints are written under a temporary name and
            renamed when complete (see :mod:`vlmzoo.training.checkpoints`).
        deepspeed: this stage's DeepSpeed JSON (default ``training.deepspeed``), e.g. ZeRO-3 for the
            stage that trains the LLM.
        strategy_config: strategy fields that differ in this stage from ``model.strategy_config``
            (e.g. IGVA's stage 1 ``{use_allocator: false}``). A stage whose starting model was built
            with other strategy fields rebuilds it with this stage's and loads the previous stage's
            weights by name; the log lists the weights that start fresh and those dropped.
        lora: a LoRA adapter trained in this stage (:class:`LoraSpec`, :mod:`vlmzoo.lora`); its
            groups are adapted, not trained fully, and the groups in ``train`` train alongside
            (LLaVA's LoRA recipe: ``train: [connector]`` with ``lora: {groups: [llm]}``). Its
            learning rate is ``lr`` unless ``group_lr.lora`` sets one. A stage after a LoRA stage
            continues training the saved adapter when its ``lora`` describes the same adapter,
            else starts from the weights with the adapter merged in.
    """

    name: str = "stage"
    data: str | None = None
    images: str | None = None
    high_res_images: str | None = None
    template: str | dict[str, Any] = "plain"
    pad_to_square: bool | None = None
    train: list[str] = field(default_factory=lambda: ["strategy"])
    lr: float = 1e-3
    group_lr: dict[str, float] = field(default_factory=dict)
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 32
    grad_accum: int = 1
    warmup: float = 0.03
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_steps: int | None = 500
    deepspeed: str | None = None
    strategy_config: dict[str, Any] = field(default_factory=dict)
    lora: LoraSpec | None = None


@dataclass
class TrainingSection:
    """How stages run: precision, distribution, logging, checkpoints.

    Attributes:
        stages: run in order; each starts from the previous stage's weights.
        deepspeed: path of a DeepSpeed JSON config (``None`` = plain DDP / single process).
        report_to: transformers integrations (``wandb``, ``tensorboard``...); ``[]`` = none.
        wandb_project: sets ``WANDB_PROJECT`` when ``wandb`` is reported to.
        resume: continue the run found in the output directory: completed stages are skipped,
            an interrupted one continues from its newest intact checkpoint. ``false``: train from
            scratch into an empty (or new) output directory; a non-empty one is an error.
        on_config_change: what a resumed run does with a stage trained under another config
            (every stage records its config's hash): ``error`` (default: an error naming the keys
            that differ) or ``retrain`` (that stage and every later one are deleted and trained again).
        group_by_length: batch samples of similar length together (as LLaVA's
            ``group_by_modality_length``), so little compute goes to padding.
        cache_vision_features: keep a frozen tower's features of every image in memory so later
            epochs do not encode it again (:mod:`vlmzoo.feature_cache`); for small-scale runs only.
        cache_text_features: the same for the (always frozen) instruction text encoder, per
            distinct instruction.
    """

    stages: list[StageConfig] = field(default_factory=list)
    bf16: bool = False
    fp16: bool = False
    deepspeed: str | None = None
    report_to: list[str] = field(default_factory=list)
    wandb_project: str | None = None
    logging_steps: int = 10
    save_total_limit: int | None = 1
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch"
    adam_beta2: float = 0.999
    disable_tqdm: bool = False
    resume: bool = True
    on_config_change: str = "error"
    group_by_length: bool = False
    cache_vision_features: bool = False
    cache_text_features: bool = False


@dataclass
class EvalSection:
    """Held-out evaluation after training (and ``scripts/eval.py``).

    Attributes:
        data / images: evaluation JSON and its image folder; ``data: null`` skips evaluation.
        high_res_images: the same images at f times the tower's resolution (see
            :class:`DataSection`); default ``data.high_res_images`` when ``images`` is unset or
            ``data.images``.
        train_data: training answers for the blind control (default: the last stage's data).
        template: conversation template of the prompts (default: the one saved with the model); a
            name or a ``{base: NAME, ...}`` mapping as in :class:`StageConfig`.
        question_type_key: record field holding the question type (records without it: ``"all"``).
        batch_size / max_new_tokens: greedy generation settings.
        max_samples: evaluate only the first N records (``None`` = all).
    """

    data: str | None = None
    images: str | None = None
    high_res_images: str | None = None
    train_data: str | None = None
    template: str | dict[str, Any] | None = None
    question_type_key: str = "question_type"
    batch_size: int = 64
    max_new_tokens: int = 16
    max_samples: int | None = None


@dataclass
class OutputSection:
    """Attributes:
    dir: run folder (default ``outputs/<name>-<config hash>``, so the same command resumes).
    name: run name (default: the config file's ``<strategy>-<scale>``).
    """

    dir: str | None = None
    name: str | None = None


@dataclass
class RunConfig:
    """A whole run: model, data, stages, evaluation, output, seed."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)
    seed: int = 0
    #: the sections of registered variable providers (``NAME -> typed settings``); in YAML and in
    #: :meth:`to_dict` each is a top-level ``NAME`` section (e.g. ``tiny_world: {cache_dir: ...}``).
    variables: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        tree = dataclasses.asdict(self)
        tree.update(tree.pop("variables"))
        return tree

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def stage_images(self, stage: StageConfig) -> str | None:
        return stage.images or self.data.images

    def stage_high_res_images(self, stage: StageConfig) -> str | None:
        """The stage's high-res image folder: its own, else ``data.high_res_images`` when the stage
        also reads ``data.images`` (a stage with another ``images`` folder and no ``high_res_images`` has none)."""
        return _high_res_folder(stage.images, stage.high_res_images, self.data)

    def eval_images(self) -> str | None:
        return self.eval.images or self.data.images

    def eval_high_res_images(self) -> str | None:
        """As :meth:`stage_high_res_images`, for the ``eval`` section."""
        return _high_res_folder(self.eval.images, self.eval.high_res_images, self.data)

    def stage_strategy_config(self, stage: StageConfig) -> dict[str, Any]:
        """The strategy fields a stage trains with: ``model.strategy_config`` updated by the stage's own."""
        return {**self.model.strategy_config, **stage.strategy_config}

    def eval_train_data(self) -> str | None:
        if self.eval.train_data:
            return self.eval.train_data
        return self.training.stages[-1].data if self.training.stages else None


def _high_res_folder(own_images: str | None, own_high_res: str | None, data: DataSection) -> str | None:
    """``data.high_res_images`` holds the high-res versions of ``data.images`` only: a section
    reading another image folder gets a high-res folder only by naming one."""
    if own_high_res:
        return own_high_res
    if own_images and os.path.normpath(own_images) != os.path.normpath(data.images or ""):
        return None
    return data.high_res_images


# ---- provider sections ---------------------------------------------------------------------------
_CORE_SECTIONS = frozenset(f.name for f in dataclasses.fields(RunConfig))


def provider_sections(tree: dict[str, Any]) -> dict[str, Any]:
    """The top-level sections of ``tree`` owned by a variable provider, typed (``name -> settings``);
    a key that is neither a core section nor a provider's is an error naming it."""
    providers = variable_providers()
    sections = {}
    for key, value in tree.items():
        if key in _CORE_SECTIONS:
            continue
        if key not in providers:
            valid = sorted(_CORE_SECTIONS - {"variables"} | set(providers))
            raise unknown_key_error(str(key), valid, "config")
        sections[key] = build_dataclass(providers[key].settings_type, value, f"config.{key}")
    return sections


def _typed(tree: dict[str, Any]) -> RunConfig:
    """``tree`` as a :class:`RunConfig`, its provider sections typed into ``variables``."""
    core = {k: v for k, v in tree.items() if k in _CORE_SECTIONS and k != "variables"}
    cfg = build_dataclass(RunConfig, core, "config")
    cfg.variables = provider_sections(tree)
    return cfg


def prepare_run_files(cfg: RunConfig) -> None:
    """Make the files the config's provider variables point at exist (e.g. build the tiny world):
    what training and evaluation call before they read data."""
    prepare_variables(cfg.variables)


# ---- entry points --------------------------------------------------------------------------------
_NOT_STRATEGIES = ("base",)  # folders of configs/ that hold shared bases, not strategies
#: The shared tiny-world base: the tiny recipe of a registered strategy that ships no ``tiny.yaml``.
TINY_BASE = "base/tiny_world.yaml"


def strategy_config_dirs(name: str) -> list[Path]:
    """Folders holding run configs of strategy ``name``: ``configs/<name>/`` of this repository, then
    the ``config_dir`` its class declares (configs shipped with a third-party package)."""
    dirs = [CONFIGS_DIR / name] if name not in _NOT_STRATEGIES and (CONFIGS_DIR / name).is_dir() else []
    cls = STRATEGIES.find(name)
    if cls is not None and cls.config_dir is not None:
        own = Path(cls.config_dir)
        if not own.is_dir():
            raise FileNotFoundError(f"Strategy {name!r} declares config_dir {own}, which is not a folder.")
        dirs.append(own)
    return dirs


def strategy_config_files(name: str, pattern: str = "*.yaml") -> list[Path]:
    """The run configs of strategy ``name`` matching ``pattern`` (e.g. ``reference*.yaml``), sorted by
    stem; a stem in ``configs/<name>/`` hides the same stem in the strategy's own ``config_dir``."""
    found: dict[str, Path] = {}
    for folder in strategy_config_dirs(name):
        for path in sorted(folder.glob(pattern)):
            found.setdefault(path.stem, path)
    return [found[stem] for stem in sorted(found)]


def strategy_run_config(strategy: str, scale: str = "tiny") -> tuple[Path, tuple[str, ...]]:
    """The run config of ``--arch NAME --scale SCALE`` (``--arch`` names a strategy) as
    ``(file, overrides applied first)``.

    ``SCALE.yaml`` of the strategy's config folders (:func:`strategy_config_files`) if there is one;
    else, for ``tiny`` and any registered strategy, the shared tiny base (:data:`TINY_BASE`) with
    ``model.strategy=NAME`` and the strategy's config dataclass defaults: a strategy installed from
    another package trains on the tiny world with no config file. An unknown strategy or scale is an
    error naming the ones that exist.
    """
    registered = available_strategies()
    files = {p.stem: p for p in strategy_config_files(strategy)} if strategy not in _NOT_STRATEGIES else {}
    if scale in files:
        return files[scale], ()
    if strategy in registered and scale == "tiny":
        return CONFIGS_DIR / TINY_BASE, (f"model.strategy={json.dumps(strategy)}", f"output.name={json.dumps(strategy + '-tiny')}")
    if strategy not in registered and not files:
        near = nearest_names(strategy, registered)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise FileNotFoundError(f"No strategy {strategy!r}: none is registered under that name and {CONFIGS_DIR} has "
                                f"no folder {strategy}/.{hint} Registered strategies: {', '.join(registered)}.")
    scales = sorted({*files, *(("tiny",) if strategy in registered else ())})
    raise FileNotFoundError(f"No {scale!r} config for strategy {strategy!r}; available: {', '.join(scales)}.")


def strategy_run_config_path(strategy: str, scale: str = "tiny") -> Path:
    """The file of :func:`strategy_run_config` (its overrides dropped: use :func:`strategy_run_config` to load it)."""
    return strategy_run_config(strategy, scale)[0]


def load_config_tree(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Merged YAML of ``path`` (``None``: all defaults) with the dotted ``overrides`` applied
    (not yet typed or interpolated)."""
    tree = load_yaml_tree(path) if path is not None else {}
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(tree, parts, value)
    return tree


def load_run_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), resolve_vars: bool = True) -> RunConfig:
    """Load, merge, override, check, interpolate and type a run config (``path=None``: defaults).

    ``output.name`` defaults to ``<parent folder>-<file stem>`` (``llava-tiny``); ``output.dir``
    to ``outputs/<name>-<hash of the merged config>``.
    """
    tree = load_config_tree(path, overrides)
    _typed(tree)  # schema errors before variables are resolved
    tree["output"] = dict(tree.get("output") or {})
    if not tree["output"].get("name"):
        tree["output"]["name"] = f"{Path(path).resolve().parent.name}-{Path(path).stem}" if path else "run"
    if not tree["output"].get("dir"):
        tree["output"]["dir"] = str(Path("outputs") / f"{tree['output']['name']}-{config_hash(tree)}")
    if resolve_vars:
        resolve = VariableResolver(provider_sections(tree), {"configs_dir": str(CONFIGS_DIR)})
        tree = interpolate(tree, resolve)
        for name, settings in resolve.used.items():  # the section records the folder its variables name
            section = {**dataclasses.asdict(settings), **(tree.get(name) or {})}
            root = variable_providers()[name].values(settings).get("root")
            tree[name] = section if root is None else {**section, "root": root}
    cfg = _typed(tree)
    validate(cfg)
    return cfg


def run_config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Type and check an already merged config (e.g. a ``resolved_config.yaml``)."""
    cfg = _typed(values)
    validate(cfg)
    return cfg


def config_hash(tree: dict[str, Any], length: int = 8) -> str:
    """Stable short hash of a config tree, ignoring ``output.dir``."""
    tree = copy.deepcopy(tree)
    (tree.get("output") or {}).pop("dir", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:length]


def validate(cfg: RunConfig) -> None:
    """Checks a schema cannot express: value ranges, choices, the strategy and its fields, unique
    stage names. Each failure is a ``ValueError`` (or :class:`ConfigKeyError`) naming the key."""
    check_ranges(cfg)

    if cfg.model.strategy is None:  # allowed where no model is built (scripts/eval.py reads the saved one)
        strategy_cls = None
    else:
        try:
            strategy_cls = get_strategy_class(cfg.model.strategy)
        except UnknownStrategyError as exc:
            raise ConfigKeyError(f"model.strategy: {exc.args[0]}") from None
        strategy_cls.build_config(dict(cfg.model.strategy_config))  # unknown fields, wrong types
    names = [s.name for s in cfg.training.stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"training.stages: stage names must be unique; repeated: {', '.join(dupes)}.")
    for i, stage in enumerate(cfg.training.stages):
        if stage.max_steps <= 0 and stage.epochs <= 0:
            raise ValueError(f"training.stages.{i} ({stage.name!r}): set epochs > 0 or max_steps > 0.")
        if stage.lora is not None:
            check_spec(stage.lora, f"training.stages.{i}.lora")
        if stage.strategy_config and strategy_cls is not None:
            try:
                strategy_cls.build_config(cfg.stage_strategy_config(stage))
            except (ConfigKeyError, TypeError) as exc:
                raise type(exc)(f"training.stages.{i}.strategy_config: {exc}") from None


# ---- value ranges --------------------------------------------------------------------------------
_CHOICES = {
    "data.check_images": ("decode", "exists", "none"),
    "training.on_config_change": ("error", "retrain"),
}


def _need(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"{key}: must be {rule}, got {value!r}.")


def check_ranges(cfg: RunConfig) -> None:
    """Every numeric field in its range and every closed choice among its values; the first
    failure is a one-line ``ValueError`` naming the dotted key, the rule and the value."""
    d, t, e = cfg.data, cfg.training, cfg.eval
    for key, value in (("data.check_images", d.check_images), ("training.on_config_change", t.on_config_change)):
        _need(value in _CHOICES[key], key, value, "one of " + ", ".join(_CHOICES[key]))
    _need(d.max_length is None or d.max_length >= 1, "data.max_length", d.max_length, ">= 1 or null")
    _need(d.num_workers >= 0, "data.num_workers", d.num_workers, ">= 0")
    _need(t.logging_steps >= 1, "training.logging_steps", t.logging_steps, ">= 1")
    _need(t.save_total_limit is None or t.save_total_limit >= 1, "training.save_total_limit", t.save_total_limit,
          ">= 1 or null")
    _need(0.0 <= t.adam_beta2 < 1.0, "training.adam_beta2", t.adam_beta2, "in [0, 1)")
    _need(not (t.bf16 and t.fp16), "training.fp16", t.fp16, "false when training.bf16 is true")
    _need(e.batch_size >= 1, "eval.batch_size", e.batch_size, ">= 1")
    _need(e.max_new_tokens >= 1, "eval.max_new_tokens", e.max_new_tokens, ">= 1")
    _need(e.max_samples is None or e.max_samples >= 1, "eval.max_samples", e.max_samples, ">= 1 or null")
    _need(0 <= cfg.seed < 2**32, "seed", cfg.seed, "in [0, 2**32)")
    for i, stage in enumerate(t.stages):
        where = f"training.stages.{i}"
        _need(stage.lr > 0, f"{where}.lr", stage.lr, "> 0")
        for group, lr in stage.group_lr.items():
            _need(lr > 0, f"{where}.group_lr.{group}", lr, "> 0")
        _need(stage.batch_size >= 1, f"{where}.batch_size", stage.batch_size, ">= 1")
        _need(stage.grad_accum >= 1, f"{where}.grad_accum", stage.grad_accum, ">= 1")
        _need(stage.epochs >= 0, f"{where}.epochs", stage.epochs, ">= 0")
        _need(stage.max_steps == -1 or stage.max_steps >= 1, f"{where}.max_steps", stage.max_steps, ">= 1, or -1 (epochs)")
        _need(stage.save_steps is None or stage.save_steps >= 1, f"{where}.save_steps", stage.save_steps, ">= 1 or null")
        _need(stage.warmup >= 0, f"{where}.warmup", stage.warmup, ">= 0 (a ratio if < 1, else steps)")
        _need(stage.weight_decay >= 0, f"{where}.weight_decay", stage.weight_decay, ">= 0")
        _need(stage.max_grad_norm >= 0, f"{where}.max_grad_norm", stage.max_grad_norm, ">= 0 (0: no clipping)")


# ---- a run's identity ----------------------------------------------------------------------------
# Keys that do not change what a run trains: a run may continue with them changed.
RESUMABLE_KEYS = (
    "eval", "output", "training.report_to", "training.wandb_project", "training.disable_tqdm",
    "training.logging_steps", "training.save_total_limit", "training.resume", "training.on_config_change",
    "data.num_workers", "data.check_images", "data.allow_absolute_image_paths",
)  # and each provider section's ``locations`` (vlmzoo.variables)
RESUMABLE_STAGE_KEYS = ("save_steps",)


def training_identity(tree: dict[str, Any]) -> dict[str, Any]:
    """What a run trains, as a plain tree: ``tree`` (a :meth:`RunConfig.to_dict`) without the
    :data:`RESUMABLE_KEYS` and the provider sections' ``locations``, and with every path inside a
    provider's ``root`` folder written as ``NAME:<folder name>/...`` (e.g. ``tiny_world:<world
    hash>/...``), so the same files in another cache are the same run."""
    tree = copy.deepcopy(tree)
    providers = variable_providers()
    roots = {name: (tree.get(name) or {}).get("root") for name in tree if name in providers}
    resumable = [*RESUMABLE_KEYS, *(f"{name}.{key}" for name in roots for key in providers[name].locations)]
    for key in resumable:
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    for stage in (tree.get("training") or {}).get("stages") or []:
        for key in RESUMABLE_STAGE_KEYS:
            stage.pop(key, None)
    for name, root in roots.items():
        if root:
            tree = _alias_paths(tree, os.path.normpath(root), f"{name}:{Path(root).name}")
    return tree


def _alias_paths(tree: Any, root: str, alias: str) -> Any:
    if isinstance(tree, dict):
        return {k: _alias_paths(v, root, alias) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_alias_paths(v, root, alias) for v in tree]
    if isinstance(tree, str) and (tree == root or tree.startswith(root + os.sep)):
        return alias + tree[len(root):]
    return tree


def stage_identity(tree: dict[str, Any], index: int) -> dict[str, Any]:
    """What stage ``index``'s weights depend on: the model, data and training settings, the seed,
    and stages ``0..index`` (a stage starts from the previous one's weights); see :func:`training_identity`."""
    ident = training_identity(tree)
    training = dict(ident.get("training") or {})
    stages = training.pop("stages", [])
    if not 0 <= index < len(stages):
        raise IndexError(f"training.stages has {len(stages)} stages, no stage {index}.")
    return {"model": ident.get("model"), "data": ident.get("data"), "training": training,
            "stages": stages[: index + 1], "seed": ident.get("seed"),
            **{name: ident[name] for name in variable_providers() if name in ident}}


def identity_hash(identity: dict[str, Any]) -> str:
    """A stable 16-hex-digit hash of an identity tree."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_resolved_config(cfg: RunConfig, directory: str | os.PathLike) -> Path:
    """Write ``resolved_config.yaml`` (every default filled in, every variable resolved)."""
    path = Path(directory) / "resolved_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, cfg.to_yaml())
    return path


def diff_configs(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config trees."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            out += diff_configs(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [k for i, (x, y) in enumerate(zip(a, b)) for k in diff_configs(x, y, f"{prefix}.{i}")]
    return [] if a == b else [prefix or "(root)"]


# ---- command line --------------------------------------------------------------------------------
def add_config_arguments(parser, strategy_flag: bool = True) -> None:
    """``--config FILE`` (and ``--arch NAME [--scale S]``: a registered strategy) plus trailing ``key=value`` overrides."""
    group = parser.add_mutually_exclusive_group(required=False)
    group.add_argument("--config", help="run config YAML file")
    if strategy_flag:
        group.add_argument("--arch", help="registered strategy: its <scale>.yaml (configs/<arch>/ or the strategy's "
                           "config_dir), else for tiny the shared tiny base with the strategy's defaults")
        parser.add_argument("--scale", default="tiny", help="config file of --arch (default: tiny)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides, values parsed as YAML (e.g. training.stages.0.lr=1e-3)",
    )


def config_from_args(args, extra_overrides: Sequence[str] = ()) -> RunConfig:
    """The run config the parsed command line names (``extra_overrides`` come last)."""
    path, first = args.config, ()
    if path is None and getattr(args, "arch", None):
        path, first = strategy_run_config(args.arch, args.scale)
    return load_run_config(path, [*first, *args.overrides, *extra_overrides])
