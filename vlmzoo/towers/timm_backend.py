"""timm vision towers (``vision_config["backend"] == "timm"``).

Spec::

    {"backend": "timm", "model_name": "vit_base_patch16_clip_224.openai",
     "model_kwargs": {"img_size": 336},            # optional, passed to timm.create_model
     "pretrained_cfg_overlay": {"mean": [...], "std": [...]}}   # optional, normalisation only

The tower is ``timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)``.
Any timm model with a flat ``model.blocks`` sequence of token blocks works (ViT, DeiT, EVA,
SigLIP/CLIP ViTs, DINOv2, ...). Hidden states are collected with hooks on ``model.blocks``
around ``model.forward_features``: index 0 is the input of block 0 (after patch embedding,
prefix tokens, position embedding, patch dropout and ``norm_pre``), index ``i`` the output of
block ``i``. The final ``model.norm`` is not applied to any of them.

Prefix tokens: the CLS token (if the model has one) is kept at index 0; any other prefix tokens
(register tokens, DeiT's distillation token) are dropped, so every state is
``(N, has_cls + P, D)``.

Importing this module registers the backend with :mod:`vlmzoo.towers.vision`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .vision import VisionTower, collect_block_states, register_vision_backend

# Weight files looked for in a local directory, in order of preference.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class TimmVisionTower(VisionTower):
    """A timm ViT-family model; ``forward`` returns all ``num_layers + 1`` hidden states."""

    def __init__(self, spec: dict[str, Any], model: nn.Module | None = None) -> None:
        super().__init__(spec)
        if model is None:
            model = _create_model(spec)
        blocks = getattr(model, "blocks", None)
        patch_embed = getattr(model, "patch_embed", None)
        if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0 or patch_embed is None:
            raise ValueError(
                f"timm model {spec.get('model_name')!r} ({type(model).__name__}) is not a ViT-style model with "
                "`patch_embed` and a flat `blocks` sequence; the timm vision backend supports only those."
            )
        self.model = model
        self.hidden_size = int(getattr(model, "embed_dim", None) or model.num_features)
        self.num_layers = len(blocks)
        height, width = _pair(patch_embed.img_size)
        if height != width:
            raise ValueError(f"timm model {spec.get('model_name')!r} has a non-square input {height}x{width}.")
        self.image_size = height
        self.num_patches = int(patch_embed.num_patches)
        self.has_cls = getattr(model, "cls_token", None) is not None
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", int(self.has_cls)))
        cfg = model.pretrained_cfg
        self.image_mean = tuple(float(v) for v in cfg.get("mean", self.image_mean))  # type: ignore[assignment]
        self.image_std = tuple(float(v) for v in cfg.get("std", self.image_std))  # type: ignore[assignment]

    def forward(self, pixel_values: torch.Tensor, num_states: int | None = None) -> tuple[torch.Tensor, ...]:
        """``(N, 3, H, W)`` -> the first ``num_states`` (default ``num_layers + 1``) block inputs/outputs
        ``(N, has_cls + P, D)`` (pre final norm)."""
        run = functools.partial(self.model.forward_features, pixel_values)
        states = collect_block_states(run, self.model.blocks, self._num_states(num_states))
        return tuple(self._keep_cls_and_patches(s) for s in states)

    def _keep_cls_and_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, num_prefix + P, D)`` -> ``(N, has_cls + P, D)``; drops register/distillation tokens."""
        if self.num_prefix_tokens == int(self.has_cls):
            return x
        patches = x[:, self.num_prefix_tokens :]
        return torch.cat([x[:, :1], patches], dim=1) if self.has_cls else patches


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _create_model(spec: dict[str, Any], **load_kwargs: Any) -> nn.Module:
    """``timm.create_model`` from a spec; ``load_kwargs`` (``pretrained``, overlay) load weights."""
    if "model_name" not in spec:
        raise ValueError(f"timm vision_config needs a 'model_name'; got keys {sorted(spec)}.")
    overlay = dict(spec.get("pretrained_cfg_overlay") or {})
    overlay.update(load_kwargs.pop("pretrained_cfg_overlay", {}))
    return timm.create_model(
        spec["model_name"],
        pretrained=load_kwargs.pop("pretrained", False),
        num_classes=0,
        pretrained_cfg_overlay=overlay or None,
        **{k: v for k, v in (spec.get("model_kwargs") or {}).items() if k != "num_classes"},
        **load_kwargs,
    )


def build_timm_tower(spec: dict[str, Any]) -> TimmVisionTower:
    """Randomly initialised tower from a spec (also used on the meta device)."""
    return TimmVisionTower(spec)


def load_timm_tower(
    name_or_path: str,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **create_kwargs: Any,
) -> TimmVisionTower:
    """Load a pretrained timm tower.

    Args:
        name_or_path: one of
            * a timm model name (optionally ``name.tag`` or ``hf-hub:org/repo``): timm's own
              pretrained weights (needs the hub or timm's cache);
            * a weight file (``.safetensors`` / ``.pth`` / ``.bin``) holding a timm state dict, e.g.
              ``tower.model.state_dict()`` or a timm checkpoint; ``model_name`` is then required;
            * a directory with such a file; if it also holds timm's ``config.json``
              (``architecture``, ``model_args``, ``pretrained_cfg``) no ``model_name`` is needed.
        model_name: timm architecture for local weights (overrides a directory's config).
        model_kwargs: extra ``timm.create_model`` kwargs recorded in the spec (e.g. ``img_size``).
        create_kwargs: passed to ``timm.create_model`` but not recorded (e.g. ``cache_dir``).

    Local weights go through timm's own pretrained loading (``pretrained_cfg_overlay``), so its
    checkpoint filters apply (e.g. position-embedding resizing); classifier weights are dropped
    and every tower weight must be present (strict load).
    """
    model_kwargs = dict(model_kwargs or {})
    path = Path(name_or_path)
    if not path.exists():
        named = {"model_name": name_or_path, "model_kwargs": model_kwargs}
        model = _create_model(named, pretrained=True, **create_kwargs)
        spec = _spec_for_named_model(name_or_path, model, model_kwargs)
        return TimmVisionTower(spec, model=model)

    overlay: dict[str, Any] = {}
    if path.is_dir():
        weights = _find_weights(path)
        config = _read_timm_config(path)
        if config is not None:
            model_name = model_name or config["architecture"]
            stored_args = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
            model_kwargs = {**stored_args, **model_kwargs}
            pcfg = config.get("pretrained_cfg", config)
            overlay = {k: list(pcfg[k]) for k in ("mean", "std") if k in pcfg}
    else:
        weights = path
    if model_name is None:
        raise ValueError(
            f"Loading timm weights from {name_or_path!r} needs model_name=... (the timm architecture), "
            "or a directory with timm's config.json."
        )
    spec: dict[str, Any] = {"backend": "timm", "model_name": model_name, "model_kwargs": model_kwargs}
    if overlay:
        spec["pretrained_cfg_overlay"] = overlay
    state_dict = timm.models.load_state_dict(str(weights))
    classifier = timm.models.get_pretrained_cfg_value(model_name, "classifier") or ()
    for name in (classifier,) if isinstance(classifier, str) else classifier:
        state_dict.pop(f"{name}.weight", None)
        state_dict.pop(f"{name}.bias", None)
    # num_classes=0 in the overlay keeps timm's load strict (it relaxes it when class counts differ).
    load_overlay = {"state_dict": state_dict, "num_classes": 0, "custom_load": False}
    model = _create_model(spec, pretrained=True, pretrained_cfg_overlay=load_overlay, **create_kwargs)
    model.pretrained_cfg.pop("state_dict", None)  # do not keep a second copy of the weights alive
    return TimmVisionTower(spec, model=model)


def _spec_for_named_model(name: str, model: nn.Module, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A spec that rebuilds ``model`` offline (hub names resolve to their architecture)."""
    if ":" not in name:  # a registry name, possibly with a .tag: rebuilds with the same pretrained_cfg
        return {"backend": "timm", "model_name": name, "model_kwargs": model_kwargs}
    cfg = model.pretrained_cfg
    stored_args = {k: v for k, v in (getattr(model, "pretrained_model_args", None) or {}).items() if k != "num_classes"}
    return {
        "backend": "timm",
        "model_name": cfg["architecture"],
        "model_kwargs": {**stored_args, **model_kwargs},
        "pretrained_cfg_overlay": {"mean": list(cfg["mean"]), "std": list(cfg["std"])},
    }


def _read_timm_config(directory: Path) -> dict[str, Any] | None:
    """timm's ``config.json`` (as written by ``timm.models.push_to_hf``), or ``None``."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    return config if "architecture" in config else None


def _find_weights(directory: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"Expected one timm weight file in {directory} ({', '.join(_WEIGHT_FILES)} or a single "
            f"*{'/*'.join(_WEIGHT_SUFFIXES)}); found {[p.name for p in candidates]}."
        )
    return candidates[0]


register_vision_backend("timm", build_timm_tower, load_timm_tower)

__all__ = ["TimmVisionTower", "build_timm_tower", "load_timm_tower"]
