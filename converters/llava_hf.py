"""Import released LLaVA-1.5 weights (the transformers ``llava`` / llava-hf format) into vlmzoo.

A llava-hf checkpoint directory holds ``config.json`` (``model_type: "llava"``), safetensors
weights (one file or shards plus ``model.safetensors.index.json``) and tokenizer / processor
files. :func:`convert_llava_hf` turns it into a vlmzoo ``llava`` checkpoint that
``VLMForConditionalGeneration.from_pretrained(dst)`` loads:

* **config**: ``vision_config`` -> a ``{"backend": "hf", ...}`` tower spec, ``text_config`` as is,
  ``image_token_index`` -> ``image_token_id``, ``vision_feature_layer`` -> ``vision_layer``,
  ``projector_hidden_act`` -> ``connector_act``. Checkpoints vlmzoo's ``llava`` strategy would
  compute differently (a "full" feature selection on a CLS tower, several feature layers, a
  projector without bias) are refused with a :class:`ConversionError`.
* **weights**: streamed tensor by tensor with safetensors, never as a whole model; peak memory is
  about one output shard. Every key layout transformers has used is accepted (see
  :data:`KEY_RULES`); a key no rule maps is an error naming it, and every key the vlmzoo model
  expects must be produced.
* **tokenizer / processor**: the files listed in :data:`TOKENIZER_FILES` are copied, then a
  ``VLMProcessor`` (``vicuna_v1`` template, the source tokenizer and image processor) is saved
  next to the weights (:func:`save_vlm_processor`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmzoo.configuration import VLMConfig

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Copied from the source when present: what a tokenizer (and its chat template) and ``generate``
# need (``tokenizer_config.json`` loses its ``processor_class: LlavaProcessor``). The llava-hf
# processor configs (``processor_config.json``, ``preprocessor_config.json``) describe
# ``LlavaProcessor`` and are not copied; the saved ``VLMProcessor`` writes its own.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

VISION = "vision_tower.model."
#: ``(source prefix, vlmzoo prefix)``, first match wins. Layouts accepted: released llava-hf
#: repos (``save_pretrained`` of 4.x): ``language_model.model.*``, ``language_model.lm_head.*``,
#: ``vision_tower.vision_model.*``, ``multi_modal_projector.*``; ``save_pretrained`` of v5: the
#: same but ``vision_tower.*`` (v5's ``CLIPVisionModel`` has no ``vision_model`` level); the
#: in-memory ``state_dict()`` of 4.52+ / v5 (e.g. a checkpoint written straight from it):
#: ``model.language_model.*``, ``lm_head.*``, ``model.vision_tower[.vision_model].*``,
#: ``model.multi_modal_projector.*``. A leading ``vision_model.`` inside the tower is normalised to
#: whatever the installed transformers' vision model uses.
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.", VISION),
    ("vision_tower.", VISION),
    ("model.multi_modal_projector.linear_1.", "strategy.connector.layers.0."),
    ("multi_modal_projector.linear_1.", "strategy.connector.layers.0."),
    ("model.multi_modal_projector.linear_2.", "strategy.connector.layers.2."),
    ("multi_modal_projector.linear_2.", "strategy.connector.layers.2."),
    ("model.language_model.", "language_model.model."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("lm_head.", "language_model.lm_head."),
)
#: Buffers old transformers versions saved but current ones recompute; dropped when the vlmzoo
#: model has no such key.
RECOMPUTED_BUFFERS = re.compile(r"(^|\.)(embeddings\.position_ids|rotary_emb\.inv_freq)$")

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConversionError(ValueError):
    """The source cannot be converted faithfully; the message says why and names the keys."""


@dataclass
class TensorEntry:
    """One source tensor and where it goes (``dst_key`` ``None`` = dropped, see ``note``)."""

    src_key: str
    src_file: str
    shape: tuple[int, ...]
    src_dtype: torch.dtype
    dst_key: str | None = None
    dst_dtype: torch.dtype | None = None
    note: str = ""

    @property
    def nbytes(self) -> int:
        """Size once written (in ``dst_dtype``)."""
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * (self.dst_dtype or self.src_dtype).itemsize


@dataclass
class ConversionPlan:
    """Everything :func:`convert_llava_hf` does, computed from headers only (no tensor data)."""

    src: Path
    config: VLMConfig
    dtype: torch.dtype
    entries: list[TensorEntry]
    layouts: list[str]
    model: torch.nn.Module = field(repr=False)  # the vlmzoo model on the meta device (no memory)
    shards: list[list[TensorEntry]] = field(default_factory=list)

    @property
    def num_visual_tokens(self) -> int:
        return self.model.strategy.num_visual_tokens

    @property
    def kept(self) -> list[TensorEntry]:
        return [e for e in self.entries if e.dst_key is not None]

    @property
    def dropped(self) -> list[TensorEntry]:
        return [e for e in self.entries if e.dst_key is None]

    def shard_names(self) -> list[str]:
        n = len(self.shards)
        return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def describe(self) -> str:
        """A human-readable key mapping (what ``--dry-run`` prints)."""
        lines = [
            f"source: {self.src} (layout: {', '.join(self.layouts)})",
            f"strategy: {self.config.strategy} {self.config.strategy_config}, image_token_id "
            f"{self.config.image_token_id}, dtype {_dtype_name(self.dtype)}",
            f"{len(self.kept)} tensors -> {len(self.shards)} shard(s); {len(self.dropped)} dropped",
        ]
        width = max((len(e.src_key) for e in self.entries), default=0)
        for e in self.entries:
            target = e.dst_key if e.dst_key is not None else f"(dropped: {e.note})"
            cast = "" if e.dst_dtype in (None, e.src_dtype) else f" {_dtype_name(e.src_dtype)}->{_dtype_name(e.dst_dtype)}"
            lines.append(f"  {e.src_key:<{width}} -> {target}  {list(e.shape)}{cast}")
        return "\n".join(lines)


# ---- config -------------------------------------------------------------------------------
def llava_config_to_vlm(raw: dict[str, Any], dtype: torch.dtype | None = None) -> VLMConfig:
    """A llava-hf ``config.json`` dict -> the equivalent vlmzoo ``llava`` :class:`VLMConfig`.

    Raises :class:`ConversionError` for checkpoints the ``llava`` strategy would not reproduce.
    """
    from transformers import LlavaConfig

    from vlmzoo.towers.vision import HFVisionTower, build_vision_tower

    model_type = raw.get("model_type")
    if model_type != "llava":
        raise ConversionError(
            f"Expected a LlavaForConditionalGeneration checkpoint (config model_type 'llava'), got {model_type!r}."
            + (" LLaVA-NeXT / OneVision (any-resolution tiling) are not LLaVA-1.5." if model_type else "")
        )
    cfg = LlavaConfig.from_dict(raw)
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ConversionError(
            f"vision_feature_layer={layer!r} concatenates several tower layers; vlmzoo's llava strategy reads one "
            "layer (LLaVA-1.5 uses -2)."
        )
    if not cfg.multimodal_projector_bias:
        raise ConversionError(
            "multimodal_projector_bias=False: the projector has no biases, but vlmzoo's llava connector "
            "(LLaVA-1.5's mlp2x_gelu) has them."
        )
    text = cfg.text_config.to_dict()
    if text.get("pad_token_id") is None and raw.get("pad_token_id") is not None:
        text["pad_token_id"] = raw["pad_token_id"]  # llava-hf repos keep it at the top level
    for key in ("transformers_version", "architectures", "_name_or_path", "torch_dtype"):
        text.pop(key, None)
    dtype = dtype or cfg.dtype
    if dtype is not None:
        text["dtype"] = _dtype_name(dtype)
    vision = HFVisionTower.spec_from_config(cfg.vision_config)
    for key in ("id2label", "label2id", "problem_type", "return_dict", "output_hidden_states", "output_attentions"):
        vision.pop(key, None)
    config = VLMConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=cfg.image_token_index,
        strategy="llava",
        strategy_config={"vision_layer": layer, "connector_depth": 2, "connector_act": cfg.projector_hidden_act},
    )
    if dtype is not None:
        config.dtype = dtype
    select = cfg.vision_feature_select_strategy
    if select != "default":
        raise ConversionError(
            f"vision_feature_select_strategy={select!r} is not LLaVA-1.5, which uses 'default' (drop the CLS "
            "token, project the patch tokens); 'full' also projects the CLS token, which vlmzoo's llava strategy "
            "does not."
        )
    with torch.device("meta"):
        tower = build_vision_tower(config.vision_config)
    if not tower.has_cls:
        raise ConversionError(
            f"vision_feature_select_strategy='default' drops the first token, but this "
            f"{config.vision_config.get('model_type')} tower has no CLS token: transformers drops a patch token "
            "there, vlmzoo's llava strategy keeps them all."
        )
    if cfg.image_seq_length != tower.num_patches:
        logger.warning(
            "config image_seq_length=%s, but the tower gives %s patch tokens per image; vlmzoo expands each image "
            "placeholder to %s tokens.", cfg.image_seq_length, tower.num_patches, tower.num_patches,
        )
    return config


def _meta_model(config: VLMConfig):
    from vlmzoo.modeling import VLMForConditionalGeneration

    with torch.device("meta"):
        return VLMForConditionalGeneration(config)


# ---- keys ---------------------------------------------------------------------------------
def map_llava_key(key: str, tower_prefix: str = "") -> tuple[str, str] | None:
    """llava-hf key -> ``(vlmzoo key, layout name)``, or ``None`` if no rule matches.

    ``tower_prefix`` is what the installed vision model puts before ``embeddings.`` etc.
    (``""`` for transformers v5's ``CLIPVisionModel``, ``"vision_model."`` for 4.x).
    """
    for src, dst in KEY_RULES:
        if key.startswith(src):
            rest = key[len(src):]
            in_memory = src.startswith("model.") or src == "lm_head."
            layout = "state_dict (model.*)" if in_memory else "saved (language_model.*)"
            if dst == VISION:
                if rest.startswith("vision_model."):
                    rest = rest[len("vision_model."):]
                elif not in_memory:
                    layout = "v5 saved (vision_tower.* without vision_model)"
                rest = tower_prefix + rest
            return dst + rest, layout
    return None


def _expected_keys(model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], list[set[str]]]:
    """State-dict keys -> shapes, and groups of names sharing one tensor (tied weights)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    by_id: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), set()).add(name)
    tied = [names for names in by_id.values() if len(names) > 1]
    return shapes, tied


# ---- source files -------------------------------------------------------------------------
def source_weight_files(src: Path) -> list[str]:
    """The safetensors files of a checkpoint directory, in index order."""
    index = src / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise ConversionError(f"{index} lists shard(s) that are not in {src}: {', '.join(missing)}.")
        return files
    if (src / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    found = sorted(p.name for p in src.glob("*.safetensors"))
    if found:
        return found
    bins = sorted(p.name for p in src.glob("*.bin"))
    raise ConversionError(
        f"No safetensors weights in {src}"
        + (f" (found {', '.join(bins)}: re-save them as safetensors first, e.g. with "
           "LlavaForConditionalGeneration.from_pretrained(src).save_pretrained(dir))" if bins else "")
        + "."
    )


def read_headers(src: Path, files: Iterable[str]) -> list[TensorEntry]:
    """Name, shape and dtype of every tensor, read from the safetensors headers only."""
    from safetensors import safe_open

    entries: list[TensorEntry] = []
    seen: dict[str, str] = {}
    for name in files:
        with safe_open(str(src / name), framework="pt") as f:
            for key in f.keys():
                if key in seen:
                    raise ConversionError(f"Tensor {key!r} is stored twice, in {seen[key]} and {name}.")
                seen[key] = name
                info = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(info.get_dtype())
                if dtype is None:
                    raise ConversionError(f"Tensor {key!r} in {name} has unsupported dtype {info.get_dtype()}.")
                entries.append(TensorEntry(key, name, tuple(info.get_shape()), dtype))
    return entries


# ---- planning -----------------------------------------------------------------------------
def plan_conversion(
    src: str | Path,
    dtype: str | torch.dtype = "auto",
    max_shard_size: int | str = "5GB",
) -> ConversionPlan:
    """Read config and headers, map every key, check the result against the vlmzoo model.

    Args:
        src: llava-hf checkpoint directory.
        dtype: ``"auto"`` (the source config's dtype, else the first floating tensor's),
            ``"float32"``, ``"float16"``, ``"bfloat16"`` or a ``torch.dtype``; floating tensors are cast.
        max_shard_size: output shard size limit, bytes or e.g. ``"5GB"``, ``"500MB"``.
    """
    src = Path(src)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{src} has no config.json; pass a llava-hf checkpoint directory.")
    raw = json.loads(config_file.read_text())
    entries = read_headers(src, source_weight_files(src))
    target = _resolve_dtype(dtype, raw, entries)
    config = llava_config_to_vlm(raw, target)
    config.image_token = image_token_text(src, config.image_token_id) or config.image_token
    model = _meta_model(config)
    expected, tied = _expected_keys(model)
    tower_prefix = "vision_model." if any(k.startswith(VISION + "vision_model.") for k in expected) else ""

    layouts: dict[str, None] = {}
    unmapped: list[str] = []
    for e in entries:
        mapped = map_llava_key(e.src_key, tower_prefix)
        if mapped is None or mapped[0] not in expected:
            if RECOMPUTED_BUFFERS.search(e.src_key):
                e.note = "buffer recomputed by transformers"
                continue
            unmapped.append(e.src_key if mapped is None else f"{e.src_key} (-> {mapped[0]}, not in the vlmzoo model)")
            continue
        e.dst_key, layout = mapped
        layouts[layout] = None
        e.dst_dtype = target if e.src_dtype.is_floating_point else e.src_dtype
    if unmapped:
        raise ConversionError(
            f"{len(unmapped)} source tensor(s) have no place in the vlmzoo llava model: "
            + "; ".join(unmapped[:20]) + (" ..." if len(unmapped) > 20 else "")
        )
    _check_coverage(entries, expected, tied)
    plan = ConversionPlan(
        src=src, config=config, dtype=target, entries=entries, layouts=list(layouts),
        model=model,
    )
    plan.shards = _split_shards(plan.kept, parse_size(max_shard_size))
    return plan


def _check_coverage(entries: list[TensorEntry], expected: dict[str, tuple[int, ...]], tied: list[set[str]]) -> None:
    produced: dict[str, TensorEntry] = {}
    problems: list[str] = []
    for e in entries:
        if e.dst_key is None:
            continue
        if e.dst_key in produced:
            problems.append(f"{e.dst_key} comes from both {produced[e.dst_key].src_key} and {e.src_key} (mixed layouts)")
        produced[e.dst_key] = e
        if e.shape != expected[e.dst_key]:
            problems.append(f"{e.src_key} has shape {list(e.shape)}, {e.dst_key} needs {list(expected[e.dst_key])}")
    optional = {name for group in tied if group & produced.keys() for name in group}
    missing = sorted(k for k in expected if k not in produced and k not in optional)
    if missing:
        problems.append(
            f"the vlmzoo model needs {len(missing)} tensor(s) the source lacks: " + ", ".join(missing[:20])
            + (" ..." if len(missing) > 20 else "")
        )
    if problems:
        raise ConversionError("Conversion check failed: " + "; ".join(problems) + ".")


def _split_shards(entries: list[TensorEntry], limit: int) -> list[list[TensorEntry]]:
    """Greedy, in source order (each source file is read once); a tensor larger than the limit
    gets a shard of its own."""
    shards: list[list[TensorEntry]] = []
    current: list[TensorEntry] = []
    size = 0
    for e in entries:
        if current and size + e.nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    if current:
        shards.append(current)
    return shards


def _resolve_dtype(dtype: str | torch.dtype, raw: dict[str, Any], entries: list[TensorEntry]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    if dtype != "auto":
        raise ConversionError(f"Unknown dtype {dtype!r}; choose 'auto', {', '.join(repr(d) for d in DTYPES)}.")
    declared = raw.get("dtype") or raw.get("torch_dtype")
    if isinstance(declared, str) and declared in DTYPES:
        return DTYPES[declared]
    floats = [e.src_dtype for e in entries if e.src_dtype.is_floating_point]
    return floats[0] if floats else torch.float32


def parse_size(size: int | str) -> int:
    """``5_000_000`` / ``"5GB"`` / ``"500MB"`` / ``"2GiB"`` -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"Cannot read size {size!r}; use bytes or e.g. '5GB', '500MB', '2GiB'.")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(number * base**power)


# ---- writing ------------------------------------------------------------------------------
def write_weights(plan: ConversionPlan, dst: Path) -> list[str]:
    """Stream the planned shards to ``dst`` (one output shard in memory at a time)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    names = plan.shard_names()
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard in zip(names, plan.shards):
        tensors: dict[str, torch.Tensor] = {}
        for src_file, group in _group_by_file(shard):
            with safe_open(str(plan.src / src_file), framework="pt") as f:
                for e in group:
                    tensor = f.get_tensor(e.src_key)
                    tensors[e.dst_key] = tensor.to(e.dst_dtype).contiguous()
        save_file(tensors, str(dst / name), metadata={"format": "pt"})
        for e in shard:
            weight_map[e.dst_key] = name
            total += e.nbytes
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _group_by_file(entries: list[TensorEntry]) -> Iterator[tuple[str, list[TensorEntry]]]:
    groups: dict[str, list[TensorEntry]] = {}
    for e in entries:
        groups.setdefault(e.src_file, []).append(e)
    yield from groups.items()


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the :data:`TOKENIZER_FILES` that exist in ``src``; -> their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def image_token_text(src: Path, image_token_id: int) -> str | None:
    """The placeholder string of ``image_token_id`` in the source tokenizer, if it says."""
    tok_config = src / "tokenizer_config.json"
    if tok_config.is_file():
        added = json.loads(tok_config.read_text()).get("added_tokens_decoder", {})
        entry = added.get(str(image_token_id))
        if isinstance(entry, dict) and entry.get("content"):
            return entry["content"]
    tok_json = src / "tokenizer.json"
    if tok_json.is_file():
        for entry in json.loads(tok_json.read_text()).get("added_tokens", []):
            if entry.get("id") == image_token_id:
                return entry.get("content")
    return None


def _clear_weights(dst: Path) -> None:
    for path in [*dst.glob("model*.safetensors"), dst / INDEX_FILE]:
        if path.is_file():
            path.unlink()


@dataclass
class ConversionResult:
    """What :func:`convert_llava_hf` wrote (or would write, on a dry run)."""

    plan: ConversionPlan
    dst: Path
    weight_files: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    processor_saved: bool = False
    processor_error: str | None = None


def convert_llava_hf(
    src: str | Path,
    dst: str | Path,
    dtype: str | torch.dtype = "auto",
    max_shard_size: int | str = "5GB",
    dry_run: bool = False,
    overwrite: bool = False,
    save_processor: bool = True,
) -> ConversionResult:
    """Convert the llava-hf checkpoint in ``src`` into a vlmzoo checkpoint in ``dst``.

    ``dry_run`` validates everything and returns the plan without writing. ``overwrite``
    replaces weights already in ``dst`` (refused otherwise, so stale shards never mix in).
    Returns a :class:`ConversionResult`; raises :class:`ConversionError` on any mismatch.
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ConversionError("--dst must differ from --src.")
    plan = plan_conversion(src, dtype, max_shard_size)
    result = ConversionResult(plan=plan, dst=dst)
    if dry_run:
        return result
    dst.mkdir(parents=True, exist_ok=True)
    existing = [*dst.glob("*.safetensors"), *dst.glob(INDEX_FILE)]
    if existing and not overwrite:
        raise ConversionError(f"{dst} already holds weights ({existing[0].name}, ...); pass overwrite=True / --overwrite.")
    _clear_weights(dst)
    plan.config.architectures = ["VLMForConditionalGeneration"]
    plan.config.save_pretrained(dst)
    result.weight_files = write_weights(plan, dst)
    result.copied_files = copy_tokenizer_files(src, dst)
    if save_processor:
        try:
            save_vlm_processor(plan, dst)
            result.processor_saved = True
        except Exception as exc:  # the weights are written; say loudly what is missing, and why
            result.processor_error = f"{type(exc).__name__}: {exc}"
            logger.warning("No VLMProcessor saved to %s (%s); only the tokenizer files found were copied.", dst, result.processor_error)
    _drop_llava_processor_class(dst)
    return result


def _drop_llava_processor_class(dst: Path) -> None:
    """llava-hf tokenizer configs name ``LlavaProcessor``; ``AutoProcessor`` must not build one here."""
    path = dst / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.get("processor_class") not in (None, "VLMProcessor"):
        del config["processor_class"]
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def save_vlm_processor(plan: ConversionPlan, dst: Path) -> None:
    """Save a ``VLMProcessor`` (LLaVA-1.5's ``vicuna_v1`` template) for the converted model.

    The tokenizer is the source's. The image processor is the source's (``preprocessor_config.json``,
    or the ``image_processor`` entry of a transformers v5 ``processor_config.json``) when it has
    one, else CLIP statistics at the tower's image size.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    from vlmzoo.processing import VLMProcessor

    if not any((plan.src / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise FileNotFoundError(f"{plan.src} has no tokenizer files")
    tokenizer = AutoTokenizer.from_pretrained(str(plan.src))
    image_processor = None
    if any((plan.src / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        image_processor = AutoImageProcessor.from_pretrained(str(plan.src))
    # From the (meta) model, for_model reads the visual token count and the tower's image stats.
    processor = VLMProcessor.for_model(plan.model, tokenizer, image_processor=image_processor, template="vicuna_v1")
    size = int(plan.config.vision_config["image_size"])
    if processor.image_shape[1:] != (size, size):
        raise ValueError(f"the source image processor makes {processor.image_shape} images, the tower takes {size} px")
    processor.save_pretrained(dst)


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")
