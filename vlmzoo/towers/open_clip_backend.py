"""open_clip vision towers and text encoders (``backend == "open_clip"``).

Spec (vision and text alike)::

    {"backend": "open_clip", "model_name": "ViT-B-32",
     "model_cfg": {...},                  # optional: a full open_clip model config
                                          # ({"embed_dim", "vision_cfg", "text_cfg", ...}); required
                                          # when model_name is not one of open_clip's built-ins
     "image_mean": [...], "image_std": [...]}   # optional (vision): normalisation of the weights

Only the needed half is built, straight from the config (``open_clip.model._build_vision_tower``
/ ``_build_text_tower``), and the contrastive heads are pruned: the vision tower drops
``proj``, ``ln_post`` and attention pooling, the text encoder drops ``text_projection``.

Vision: ``model.visual`` must be open_clip's own ``VisionTransformer`` (timm- and ResNet-based
visual towers are not supported — use the timm backend for timm trunks). Hidden states are
``visual._embeds`` (patch + class + position embedding, patch dropout, ``ln_pre``) followed by
every residual block's output, from ``visual.transformer.forward_intermediates``; ``ln_post``
is never applied. The class token is always at index 0.

Text: ``tokens`` are the ``ln_final`` outputs; ``pooled`` is open_clip's own pooling of them
(``pool_type``: EOT token by argmax for CLIP) *before* ``text_projection``. Inputs are re-padded
to ``context_length`` with the model's ``pad_id`` exactly as open_clip's tokenizer would, so
features do not depend on the batch's padding. HF-transformers text towers inside open_clip
(``hf_model_name``) are not supported — use the hf text backend.

Pretrained weights (both halves): a built-in name with ``pretrained=<tag or file>``, an
``hf-hub:`` name, a directory with ``open_clip_config.json`` (open_clip's own layout), or a
checkpoint file / directory of one together with ``model_name`` or ``model_cfg``. Files may hold a
full CLIP state dict or just the tower's (``tower.state_dict()``); they are loaded strictly
(pruned heads aside) without open_clip's third-party format conversions.

Importing this module registers the backend for vision towers and text encoders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import load_state_dict as _load_state_dict
from open_clip.model import _build_text_tower, _build_vision_tower
from open_clip.transformer import TextTransformer, text_global_pool
from open_clip.transformer import VisionTransformer as OpenClipViT
from torch import nn

from ..strategy import InstructionFeatures
from .text import TextEncoder, check_max_length, pad_to_length, register_text_backend
from .vision import CLIP_MEAN, CLIP_STD, VisionTower, register_vision_backend

_CONFIG_FILE = "open_clip_config.json"
_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# Vision parameters of the pruned heads: present in checkpoints, absent from the tower.
_VISION_HEAD_PREFIXES = ("proj", "ln_post.", "attn_pool.", "attn_pool_contrastive.")
_CLIP_NON_TEXT_KEYS = ("logit_scale", "logit_bias")


def model_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The full open_clip model config of a spec: ``spec["model_cfg"]`` or the built-in one."""
    if spec.get("model_cfg"):
        return spec["model_cfg"]
    name = spec.get("model_name")
    cfg = open_clip.get_model_config(name) if name else None
    if cfg is None:
        raise ValueError(
            f"open_clip model {name!r} is not a built-in config; put the full config in spec['model_cfg']. "
            f"Built-ins include: {', '.join(open_clip.list_models()[:8])}, ..."
        )
    return cfg


# ---------------------------------------------------------------------------------------- vision


class OpenClipVisionTower(VisionTower):
    """``model.visual`` of an open_clip ViT without its head; ``forward`` returns all hidden states."""

    def __init__(self, spec: dict[str, Any], visual: nn.Module | None = None) -> None:
        super().__init__(spec)
        if visual is None:
            cfg = model_config(spec)
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
        if not isinstance(visual, OpenClipViT):
            raise ValueError(
                f"open_clip model {spec.get('model_name')!r} has a {type(visual).__name__} image tower; the open_clip "
                "backend supports open_clip's VisionTransformer only (use backend 'timm' for timm trunks)."
            )
        visual.proj = None
        visual.ln_post = nn.Identity()
        visual.attn_pool = None
        visual.attn_pool_contrastive = None
        self.visual = visual
        self.hidden_size = visual.transformer.width
        self.num_layers = len(visual.transformer.resblocks)
        height, width = visual.image_size
        if height != width:
            raise ValueError(f"open_clip model {spec.get('model_name')!r} has a non-square input {height}x{width}.")
        self.image_size = int(height)
        self.num_patches = int(visual.grid_size[0] * visual.grid_size[1])
        self.has_cls = True
        self.image_mean = tuple(spec.get("image_mean", CLIP_MEAN))  # type: ignore[assignment]
        self.image_std = tuple(spec.get("image_std", CLIP_STD))  # type: ignore[assignment]

    def forward(self, pixel_values: torch.Tensor, num_states: int | None = None) -> tuple[torch.Tensor, ...]:
        """``(N, 3, H, W)`` -> the first ``num_states`` (default ``num_layers + 1``) hidden states
        ``(N, 1 + P, D)`` (no ``ln_post``)."""
        num_states = self._num_states(num_states)
        x = self.visual._embeds(pixel_values)
        if num_states == 1:
            return (x,)
        _, intermediates = self.visual.transformer.forward_intermediates(
            x, indices=list(range(num_states - 1)), stop_early=True
        )
        return (x, *intermediates)


def build_open_clip_tower(spec: dict[str, Any]) -> OpenClipVisionTower:
    """Randomly initialised vision tower from a spec (also used on the meta device)."""
    return OpenClipVisionTower(spec)


def load_open_clip_tower(
    name_or_path: str,
    model_name: str | None = None,
    model_cfg: dict[str, Any] | None = None,
    pretrained: str | None = None,
    **create_kwargs: Any,
) -> OpenClipVisionTower:
    """Pretrained vision tower; see the module docstring for the accepted sources.

    Args:
        name_or_path: open_clip model name (``"ViT-B-32"``, ``"hf-hub:org/repo"``), directory or file.
        model_name, model_cfg: the architecture of a local checkpoint without open_clip's config.
        pretrained: tag or file for a named model (``open_clip.create_model(..., pretrained=)``).
        create_kwargs: passed on to ``open_clip.create_model`` for named models.
    """
    source = _resolve_source(name_or_path, model_name, model_cfg, pretrained, create_kwargs)
    if isinstance(source, nn.Module):  # a full open_clip model, loaded by open_clip itself
        spec = _spec_for_loaded(name_or_path, source)
        return OpenClipVisionTower(spec, visual=source.visual)
    spec, weights = source
    tower = OpenClipVisionTower(spec)
    state_dict = _read_state_dict(weights, "visual.")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_VISION_HEAD_PREFIXES)}
    tower.visual.load_state_dict(state_dict, strict=True)
    return tower


# ------------------------------------------------------------------------------------------ text


class OpenClipTextEncoder(TextEncoder):
    """open_clip ``TextTransformer`` without ``text_projection``.

    ``pooled (N, D_t)`` is open_clip's pooled feature before projection, ``tokens (N, L, D_t)``
    the ``ln_final`` token features, ``mask`` the given attention mask. The forward pass is the
    tower's own (embeddings, blocks, ``ln_final``, ``text_global_pool``) except that the
    attention mask is built per call instead of read from the tower's non-persistent
    ``attn_mask`` buffer, which holds garbage after a model is built on the meta device and
    loaded. CoCa-style towers (appended CLS embedding) are not supported.
    """

    def __init__(self, spec: dict[str, Any], text: nn.Module | None = None) -> None:
        super().__init__(spec)
        if text is None:
            cfg = model_config(spec)
            text = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False))
        if not isinstance(text, TextTransformer):
            raise ValueError(
                f"open_clip model {spec.get('model_name')!r} has a {type(text).__name__} text tower; the open_clip "
                "backend supports open_clip's TextTransformer only (use backend 'hf' for transformers text models)."
            )
        if text.cls_emb is not None:
            raise ValueError(f"open_clip text tower of {spec.get('model_name')!r} appends a CLS embedding (CoCa); unsupported.")
        text.text_projection = None
        self.text = text
        self.hidden_size = text.width
        self.max_length = text.context_length
        self.pad_id = int(text.pad_id)
        self.causal = text.attn_mask is not None  # open_clip keeps no mask for bidirectional towers
        self.mask_padding = bool(text.use_pad_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> InstructionFeatures:
        check_max_length(self, input_ids)
        ids = pad_to_length(input_ids, attention_mask, self.max_length, self.pad_id)  # (N, C)
        text = self.text
        x = text.token_embedding(ids)
        x = x + text.positional_embedding[: ids.shape[1]].to(x.dtype)
        x = text.transformer(x, attn_mask=self._attention_bias(ids, x.dtype))
        x = text.ln_final(x)  # (N, C, D_t)
        pooled = text_global_pool(x, ids, pool_type=text.pool_type, eos_token_id=text.eos_id)
        return InstructionFeatures(pooled=pooled, tokens=x[:, : input_ids.shape[1]], mask=attention_mask)

    def _attention_bias(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive mask: ``(C, C)`` causal, or ``(N * heads, C, C)`` with padded keys masked too."""
        length = ids.shape[1]
        bias = None
        if self.causal:
            bias = torch.full((length, length), float("-inf"), device=ids.device, dtype=dtype).triu_(1)
        if self.mask_padding:
            pad = torch.zeros(ids.shape, device=ids.device, dtype=dtype).masked_fill_(ids == self.pad_id, float("-inf"))
            pad = pad[:, None, :].expand(-1, length, -1).repeat_interleave(self.text.heads, dim=0)
            bias = pad if bias is None else bias + pad
        return bias


def build_open_clip_text_encoder(spec: dict[str, Any]) -> OpenClipTextEncoder:
    """Randomly initialised text encoder from a spec."""
    return OpenClipTextEncoder(spec)


def load_open_clip_text_encoder(
    name_or_path: str,
    model_name: str | None = None,
    model_cfg: dict[str, Any] | None = None,
    pretrained: str | None = None,
    **create_kwargs: Any,
) -> OpenClipTextEncoder:
    """Pretrained text encoder; same sources and arguments as :func:`load_open_clip_tower`."""
    create_kwargs.setdefault("force_custom_text", True)  # puts the text tower in `model.text`
    source = _resolve_source(name_or_path, model_name, model_cfg, pretrained, create_kwargs)
    if isinstance(source, nn.Module):
        spec = _spec_for_loaded(name_or_path, source)
        spec.pop("image_mean", None)
        spec.pop("image_std", None)
        return OpenClipTextEncoder(spec, text=source.text)
    spec, weights = source
    encoder = OpenClipTextEncoder(spec)
    state_dict = _read_state_dict(weights, "text.")
    if any(k.startswith("visual.") for k in state_dict):  # a plain CLIP checkpoint: text keys at top level
        state_dict = {
            k: v for k, v in state_dict.items() if not k.startswith("visual.") and k not in _CLIP_NON_TEXT_KEYS
        }
    for key in ("text_projection", "text_projection.weight", "text_projection.bias"):
        state_dict.pop(key, None)
    encoder.text.load_state_dict(state_dict, strict=True)
    return encoder


# --------------------------------------------------------------------------------------- loading


def _resolve_source(
    name_or_path: str,
    model_name: str | None,
    model_cfg: dict[str, Any] | None,
    pretrained: str | None,
    create_kwargs: dict[str, Any],
) -> nn.Module | tuple[dict[str, Any], Path]:
    """Either a full open_clip model loaded by open_clip, or ``(spec, weight file)`` to load by hand."""
    path = Path(name_or_path)
    if path.is_dir() and (path / _CONFIG_FILE).is_file() and model_cfg is None:
        return open_clip.create_model(f"local-dir:{path}", **create_kwargs)
    if not path.exists():
        if model_cfg is not None or model_name is not None:
            raise ValueError(
                f"{name_or_path!r} is not a local path: model_name/model_cfg describe local weights only "
                "(for a named model pass its tag or weight file as pretrained=...)."
            )
        return open_clip.create_model(name_or_path, pretrained=pretrained, **create_kwargs)
    if model_name is None and model_cfg is None:
        raise ValueError(
            f"Loading open_clip weights from {name_or_path!r} needs model_name=... (a built-in config) or "
            f"model_cfg=... (a full model config), or a directory with {_CONFIG_FILE}."
        )
    spec: dict[str, Any] = {"backend": "open_clip", "model_name": model_name or path.stem}
    if model_cfg is not None:
        spec["model_cfg"] = model_cfg
    return spec, _find_weights(path) if path.is_dir() else path


def _spec_for_loaded(name_or_path: str, model: nn.Module) -> dict[str, Any]:
    """Spec that rebuilds a model open_clip loaded (offline: non-built-in configs are inlined)."""
    path = Path(name_or_path)
    if path.is_dir():
        config = json.loads((path / _CONFIG_FILE).read_text())
        spec: dict[str, Any] = {"backend": "open_clip", "model_name": path.name, "model_cfg": config["model_cfg"]}
    elif name_or_path in open_clip.list_models():
        spec = {"backend": "open_clip", "model_name": name_or_path}
    else:  # hf-hub: names: keep the config so the spec rebuilds without the hub
        model_cfg = open_clip.get_model_config(name_or_path)
        spec = {"backend": "open_clip", "model_name": name_or_path, "model_cfg": model_cfg}
    preprocess = getattr(model.visual, "preprocess_cfg", None) or {}
    if "mean" in preprocess and "std" in preprocess:
        spec["image_mean"], spec["image_std"] = list(preprocess["mean"]), list(preprocess["std"])
    return spec


def _read_state_dict(weights: Path, prefix: str) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict; keys under ``prefix`` (if any) are selected with it stripped."""
    state_dict = _load_state_dict(str(weights))
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def _find_weights(directory: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"Expected one open_clip weight file in {directory}; found {[p.name for p in candidates]}."
        )
    return candidates[0]


register_vision_backend("open_clip", build_open_clip_tower, load_open_clip_tower)
register_text_backend("open_clip", build_open_clip_text_encoder, load_open_clip_text_encoder)

__all__ = [
    "OpenClipVisionTower",
    "OpenClipTextEncoder",
    "build_open_clip_tower",
    "build_open_clip_text_encoder",
    "load_open_clip_tower",
    "load_open_clip_text_encoder",
    "model_config",
]
