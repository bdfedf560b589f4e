"""LoRA adapters (through peft) on a vlmzoo model: attaching a stage's adapter, the saved layout,
loading it back, merging it into the weights.

A model folder (a stage's ``final/`` or ``checkpoint-N/``) of a model with an adapter holds::

    model.safetensors                 every weight under the names a plain vlmzoo model has; the
                                      adapted layers' base weights unmerged (so it is the model
                                      without the adapter)
    lora/adapter_config.json          peft's LoraConfig of the adapter
    lora/adapter_model.safetensors    its weights in peft's format: the module path, then
                                      ``lora_A.weight`` / ``lora_B.weight`` (no adapter name), and
                                      the trained copies of ``modules_to_save``

Inside a model the adapter is peft's, injected in place (:func:`peft.inject_adapter_in_model`)
under the name ``default``: parameter names gain ``.base_layer.`` and ``.lora_A.default.``; the
files above never carry them, so saving, resuming and saving again keeps every key as it was.
:meth:`VLMForConditionalGeneration.from_pretrained <vlmzoo.VLMForConditionalGeneration.from_pretrained>`
attaches a folder's adapter (peft needed); :func:`merge_adapter` folds it into the weights, after
which the model saves as a plain folder that loads without peft.

Adapted modules are chosen by module group (:mod:`vlmzoo.training.groups`): ``target_modules`` is
matched only inside the groups of :class:`LoraSpec` ``groups`` (default the LLM), and the adapter's
parameters form their own group, ``lora``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import INSTALL_HINT, QUANTIZE_CHOICES, LoraSpec, check_spec, peft_available
from .module_groups import (  # noqa: F401 (adapter_parameter_names, has_adapter: this module's API too)
    ADAPTER_KEY, STRATEGY_ALIAS, adapter_parameter_names, group_layout, group_modules, has_adapter,
)

logger = logging.getLogger(__name__)

ADAPTER_DIRNAME = "lora"
ADAPTER_NAME = "default"  # peft's default adapter name; never written to a file
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_GROUP = "lora"

# State-dict keys that belong to the adapter, and the segments peft inserts into the base's keys.
_BASE_SEGMENT = re.compile(r"\.(base_layer|original_module)(?=\.)")


# ---- which modules ------------------------------------------------------------------------------
def group_module_names(model: nn.Module) -> dict[str, str]:
    """Module group -> the path of its module in ``model`` (``llm`` -> ``language_model``, ...)."""
    path = {id(m): n for n, m in model.named_modules() if n}
    return {g: path[id(m)] for g, m in group_modules(model).items() if id(m) in path}


def target_names(model: nn.Module, spec: LoraSpec, where: str) -> list[str]:
    """Full paths of the modules ``spec`` adapts; errors name the key and what exists."""
    groups = group_module_names(model)
    layout = group_layout(model)
    wanted = layout.expand(list(spec.groups), f"{where}.groups")
    if "text_encoder" in wanted:
        raise ValueError(f"{where}.groups lists 'text_encoder', which runs under torch.no_grad and cannot train.")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: list[str] = []
    linear_leaves: set[str] = set()
    for group in wanted:
        if group == STRATEGY_ALIAS or group not in groups:  # parameters outside every named module
            raise ValueError(f"{where}.groups: {group!r} is not one module; name the strategy's groups instead.")
        prefix = groups[group]
        module = model.get_submodule(prefix)
        for name, sub in module.named_modules():
            full = f"{prefix}.{name}" if name else prefix
            if isinstance(sub, nn.Linear):
                linear_leaves.add(full.rsplit(".", 1)[-1])
            if spec.target_modules == "all-linear":
                chosen = isinstance(sub, nn.Linear) and sub is not output
            else:
                chosen = bool(name) and any(full.endswith("." + t) for t in spec.target_modules)
            if chosen:
                out.append(full)
    if not out:
        raise ValueError(f"{where}.target_modules: {spec.target_modules!r} matches no module of group(s) "
                         f"{', '.join(wanted)}; their linear layers are named {', '.join(sorted(linear_leaves)[:12]) or '(none)'}.")
    return out


def lora_config(model: nn.Module, spec: LoraSpec, where: str = "lora"):
    """peft's ``LoraConfig`` for ``spec`` on ``model``: ``target_modules`` as one regex over the
    modules' full paths (group prefixes x leaf names), checked to select exactly :func:`target_names`."""
    from peft import LoraConfig

    names = target_names(model, spec, where)
    prefixes = sorted({p for p in group_module_names(model).values() if any(n == p or n.startswith(p + ".") for n in names)})
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    pattern = (rf"^(?:{'|'.join(re.escape(p) for p in prefixes)})(?:\..+)?\.(?:{'|'.join(re.escape(x) for x in leaves)})$")
    matched = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    if sorted(matched) != sorted(names):
        extra = sorted(set(matched) - set(names))
        raise ValueError(f"{where}.target_modules: the modules named {', '.join(leaves)} in those groups include "
                         f"non-target ones ({', '.join(extra[:4])}); list the modules more precisely.")
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=pattern,
                      modules_to_save=list(spec.modules_to_save) or None, bias="none")


# ---- attaching, finding -------------------------------------------------------------------------
def attach(model: nn.Module, config, seed: int | None = None) -> None:
    """Inject a fresh adapter (peft ``LoraConfig`` ``config``) into ``model`` in place. ``seed``:
    the adapter's random init is drawn from it without touching the global RNG, so a resumed run
    starts a stage from the same adapter as an uninterrupted one."""
    from peft import inject_adapter_in_model

    if has_adapter(model):
        raise ValueError("The model already has an adapter; merge it first (vlmzoo.lora.merge_adapter).")
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    model.train(was_training)  # new modules (the adapter's dropout) start in train mode


def saved_adapter_dir(folder: str | os.PathLike) -> Path | None:
    path = Path(folder) / ADAPTER_DIRNAME
    return path if (path / ADAPTER_CONFIG).is_file() else None


def load_saved_config(folder: str | os.PathLike):
    """The ``LoraConfig`` saved in ``folder/lora`` (``None``: no adapter there). Without peft: an
    error saying the folder needs it or a merge."""
    adapter = saved_adapter_dir(folder)
    if adapter is None:
        return None
    if not peft_available():
        raise ImportError(f"{folder} holds a LoRA adapter ({adapter}); loading it needs peft: {INSTALL_HINT}. "
                          f"Or merge it once into a plain folder: python scripts/merge_lora.py {folder} --output OUT.")
    from peft import LoraConfig

    return LoraConfig.from_pretrained(str(adapter))


def attach_saved(model: nn.Module, folder: str | os.PathLike) -> bool:
    """Inject the adapter saved in ``folder/lora`` and load its weights; -> whether there was one.
    A key of the file that the model does not take, or an adapter weight it leaves unset, is an error."""
    config = load_saved_config(folder)
    if config is None:
        return False
    attach(model, config)
    load_adapter_weights(model, load_file(str(Path(folder) / ADAPTER_DIRNAME / ADAPTER_WEIGHTS)), folder)
    return True


def load_adapter_weights(model: nn.Module, weights: dict[str, torch.Tensor], folder: Any) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if ADAPTER_KEY.search(k)]
    if unexpected or missing:
        raise ValueError(f"The adapter in {folder} does not fit the model: unexpected {unexpected[:3]}, missing {missing[:3]}.")


# ---- state dicts --------------------------------------------------------------------------------
def base_key(key: str) -> str:
    """A key of the adapted model -> the plain model's key (``q_proj.base_layer.weight`` -> ``q_proj.weight``)."""
    return _BASE_SEGMENT.sub("", key)


def base_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A full state dict of an adapted model -> the plain model's state dict (adapter keys dropped,
    peft's segments removed from the base keys). For a QLoRA model (``model`` given), the quantized
    layers' weights are the full-precision ones they were quantized from (:func:`quantize_base`)."""
    base = {base_key(k): v for k, v in state_dict.items() if not ADAPTER_KEY.search(k)}
    originals = quantized_originals(model) if model is not None else {}
    if originals:
        modules = tuple(k[: -len(".weight")] for k in originals)
        base = {k: v for k, v in base.items() if not _quantization_state(k, modules)}
        base.update(originals)
    return base


# ---- QLoRA --------------------------------------------------------------------------------------
_ORIGINALS_ATTR = "_vlmzoo_quantized_originals"


def quantized_originals(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain key -> the full-precision weight (CPU) of each layer :func:`quantize_base` quantized."""
    return getattr(model, _ORIGINALS_ATTR, None) or {}


def _quantization_state(key: str, modules: tuple[str, ...]) -> bool:
    """Whether ``key`` is a quantized layer's packed weight or quantization state (absmax, SCB...)."""
    return any(key == m + ".weight" or key.startswith(m + ".weight.") or key in (m + ".SCB", m + ".weight_format")
               for m in modules)


def quantize_base(model: nn.Module, spec: LoraSpec, where: str) -> int:
    """QLoRA: every ``nn.Linear`` of ``spec.groups`` (but the output layer) becomes a bitsandbytes
    layer on the current CUDA device (``4bit``: NF4, computing in the weights' dtype; ``8bit``:
    LLM.int8), frozen. The full-precision weights stay on the CPU: saves write them (the folder
    is the unquantized model plus the adapter, so a merge is exact), and a resume leaves the
    quantized layers as quantized at the stage's start. -> the number of layers quantized."""
    import bitsandbytes as bnb

    device = torch.device("cuda", torch.cuda.current_device())
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    originals: dict[str, torch.Tensor] = {}
    prefixes = [group_module_names(model)[g] for g in _adapted_groups(model, spec, where)]
    for prefix in prefixes:
        for name, sub in list(model.get_submodule(prefix).named_modules()):
            if not isinstance(sub, nn.Linear) or sub is output or not name:
                continue
            full = f"{prefix}.{name}"
            weight = sub.weight.detach().to("cpu")
            originals[full + ".weight"] = weight.clone()
            if spec.quantize == "4bit":
                layer = bnb.nn.Linear4bit(sub.in_features, sub.out_features, bias=sub.bias is not None,
                                          compute_dtype=weight.dtype, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(sub.in_features, sub.out_features, bias=sub.bias is not None,
                                            has_fp16_weights=False, threshold=6.0)
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if sub.bias is not None:
                layer.bias = nn.Parameter(sub.bias.detach().to("cpu"), requires_grad=False)
            parent, _, child = full.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to(device))  # .to(cuda) quantizes
    model.to(device)
    setattr(model, _ORIGINALS_ATTR, originals)
    logger.info("QLoRA: %d linear layers of %s held in %s.", len(originals), ", ".join(prefixes), spec.quantize)
    return len(originals)


def _adapted_groups(model: nn.Module, spec: LoraSpec, where: str) -> list[str]:
    return group_layout(model).expand(list(spec.groups), f"{where}.groups")


def adapter_file_state(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights as peft writes them (no adapter name in the keys)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER_NAME)


def save_adapter(model: nn.Module, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``folder/lora/`` (config + weights) of the model's adapter; ``state_dict``: a full
    state dict of the model (e.g. gathered by DeepSpeed) to take the weights from."""
    out = Path(folder) / ADAPTER_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    model.peft_config[ADAPTER_NAME].save_pretrained(str(out))
    weights = {k: v.detach().contiguous() for k, v in adapter_file_state(model, state_dict).items()}
    save_file(weights, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


def load_base_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load a folder's plain weights (``model.safetensors`` or its shards) into an adapted model,
    strictly: every base weight of the model is set, no key of the files is left over."""
    directory = Path(folder)
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    own = model.state_dict()
    originals = quantized_originals(model)
    modules = tuple(k[: -len(".weight")] for k in originals)
    by_base = {base_key(k): k for k in own if not ADAPTER_KEY.search(k) and not _quantization_state(base_key(k), modules)}
    seen: set[str] = set(originals)
    with torch.no_grad():
        for name in files:
            for key, tensor in load_file(str(directory / name)).items():
                if key in originals:  # frozen in a QLoRA stage: as quantized at the stage's start
                    continue
                if key not in by_base:
                    raise ValueError(f"{directory / name}: {key} is not a weight of this model.")
                own[by_base[key]].copy_(tensor)
                seen.add(key)
    missing = sorted(set(by_base) - seen - set(_tied_keys(model)))
    if missing:
        raise ValueError(f"{directory}: no weights for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}.")


def _tied_keys(model: nn.Module) -> list[str]:
    """Keys a save leaves out because they share another key's tensor (tied embeddings)."""
    seen: dict[int, str] = {}
    tied = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr() if tensor.device.type != "meta" else id(tensor)
        if ptr in seen:
            tied.append(base_key(name))
        else:
            seen[ptr] = name
    return tied


def load_checkpoint(model: nn.Module, folder: str | os.PathLike) -> None:
    """Resume: the checkpoint's base weights and adapter into ``model``, which already carries an
    adapter of the same config."""
    saved = load_saved_config(folder)
    if saved is None:
        raise ValueError(f"{folder} holds no adapter ({ADAPTER_DIRNAME}/), but the stage trains one.")
    if not same_adapter(saved, model.peft_config[ADAPTER_NAME]):
        raise ValueError(f"The adapter in {folder} was made with another LoRA config than the stage's.")
    load_base_weights(model, folder)
    load_adapter_weights(model, load_file(str(Path(folder) / ADAPTER_DIRNAME / ADAPTER_WEIGHTS)), folder)


_COMPARED = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "bias", "use_rslora", "use_dora")


def same_adapter(a, b) -> bool:
    """Whether two ``LoraConfig`` describe the same adapter (so training one can continue the other)."""
    def norm(value):
        return sorted(value) if isinstance(value, (list, set, tuple)) else value
    return all(norm(getattr(a, k, None)) == norm(getattr(b, k, None)) for k in _COMPARED)


# ---- merging ------------------------------------------------------------------------------------
def merge_adapter(model: nn.Module) -> int:
    """Fold the adapter into the weights (``W += alpha/r * B A``; ``modules_to_save`` copies
    replace their originals) and remove every trace of peft, in place: the model is then a plain
    vlmzoo model. -> the number of modules merged."""
    if not has_adapter(model):
        return 0
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
            replacement = module.get_base_layer()
        elif isinstance(module, ModulesToSaveWrapper):
            replacement = module.modules_to_save[ADAPTER_NAME]
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        replaced += 1
    del model.peft_config
    return replaced
