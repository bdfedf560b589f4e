"""Vision towers: one interface over transformers, timm and open_clip backbones.

A tower is described by a plain, JSON-serialisable *spec* dict stored in
``VLMConfig.vision_config``: ``{"backend": "hf", **hf_config_dict}`` for transformers CLIP /
SigLIP vision models, ``{"backend": "timm" | "open_clip", "model_name": ..., ...}`` for the
others. :func:`build_vision_tower` builds a randomly initialised tower from a spec (the path
``from_pretrained`` and the meta device take); :func:`load_pretrained_vision_tower` loads real
weights by hub name or local path and returns the tower together with its spec.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from ..utils import hf_config_spec, nearest_names
from .loading import load_tower

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionTower(nn.Module):
    """Base class. ``forward(pixel_values, num_states)`` returns the first ``num_states`` hidden states.

    Attributes (set by subclasses):
        hidden_size: channels D_v.
        num_layers: transformer blocks; ``forward`` returns ``num_layers + 1`` states.
        num_patches: patch tokens P per image.
        has_cls: whether index 0 of the token axis is a CLS token.
        image_size: square input side in pixels.
        image_mean, image_std: normalisation the tower was trained with.
    """

    hidden_size: int
    num_layers: int
    num_patches: int
    has_cls: bool
    image_size: int
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = dict(spec)

    def forward(self, pixel_values: torch.Tensor, num_states: int | None = None) -> tuple[torch.Tensor, ...]:
        """``(N, 3, H, W)`` -> the first ``num_states`` (default all ``num_layers + 1``) hidden states,
        each ``(N, has_cls + P, D_v)``. Blocks past the last requested state do not run."""
        raise NotImplementedError

    def _num_states(self, num_states: int | None) -> int:
        total = self.num_layers + 1
        if num_states is None:
            return total
        if not 1 <= num_states <= total:
            raise ValueError(f"num_states must be in 1..{total} for a tower of {self.num_layers} layers, got {num_states}.")
        return num_states


class _StopTower(Exception):
    """Raised by a block hook once the last requested hidden state is recorded."""


def collect_block_states(run: Callable[[], Any], blocks: Sequence[nn.Module], num_states: int) -> list[torch.Tensor]:
    """Call ``run()`` (a tower forward) recording the input of ``blocks[0]`` and each block's output
    (``num_layers + 1`` hidden states); the forward stops once ``num_states`` are recorded."""
    states: list[torch.Tensor] = []

    def record(x: Any) -> None:
        states.append(x[0] if isinstance(x, tuple) else x)
        if len(states) >= num_states:
            raise _StopTower

    def block_input(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        record(args[0] if args else kwargs["hidden_states"])

    handles = [blocks[0].register_forward_pre_hook(block_input, with_kwargs=True)]
    handles += [block.register_forward_hook(lambda _m, _a, out: record(out)) for block in blocks]
    try:
        run()
    except _StopTower:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(states) != num_states:
        raise RuntimeError(f"Expected {num_states} hidden states from the tower's blocks, got {len(states)}.")
    return states


class HFVisionTower(VisionTower):
    """transformers vision models that return ``hidden_states`` (CLIP, SigLIP, ...)."""

    def __init__(self, spec: dict[str, Any], model: nn.Module | None = None) -> None:
        super().__init__(spec)
        if model is None:
            cfg_dict = {k: v for k, v in spec.items() if k != "backend"}
            model_type = cfg_dict.pop("model_type")
            hf_config = AutoConfig.for_model(model_type, **cfg_dict)
            model = AutoModel.from_config(hf_config, attn_implementation=spec.get("attn_implementation", "sdpa"))
        self.model = model
        cfg = model.config
        self.hidden_size = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.image_size = cfg.image_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        # CLIP-style towers prepend a class embedding; SigLIP has none.
        self.has_cls = hasattr(getattr(model, "vision_model", model).embeddings, "class_embedding")
        if cfg.model_type.startswith("siglip"):
            self.image_mean = self.image_std = (0.5, 0.5, 0.5)

    def forward(self, pixel_values: torch.Tensor, num_states: int | None = None) -> tuple[torch.Tensor, ...]:
        blocks = getattr(self.model, "vision_model", self.model).encoder.layers
        run = functools.partial(self.model, pixel_values=pixel_values)
        return tuple(collect_block_states(run, blocks, self._num_states(num_states)))

    @staticmethod
    def spec_from_config(hf_config: Any) -> dict[str, Any]:
        return hf_config_spec(hf_config)


_BACKENDS: dict[str, Callable[[dict[str, Any]], VisionTower]] = {"hf": HFVisionTower}
_PRETRAINED_LOADERS: dict[str, Callable[[str], VisionTower]] = {}


def register_vision_backend(
    name: str,
    builder: Callable[[dict[str, Any]], VisionTower],
    pretrained_loader: Callable[[str], VisionTower] | None = None,
) -> None:
    """Add a tower backend: ``builder(spec)`` (random init) and optionally ``pretrained_loader(name)``."""
    if name in _BACKENDS:
        raise ValueError(f"Vision backend {name!r} is already registered. Registered: {', '.join(sorted(_BACKENDS))}.")
    _BACKENDS[name] = builder
    if pretrained_loader is not None:
        _PRETRAINED_LOADERS[name] = pretrained_loader


def _ensure_backend(name: str) -> None:
    if name not in _BACKENDS and name in _OPTIONAL_BACKENDS:
        _OPTIONAL_BACKENDS[name]()  # importing the module registers it
    if name not in _BACKENDS:
        known = sorted(set(_BACKENDS) | set(_OPTIONAL_BACKENDS))
        near = nearest_names(name, known)
        raise ValueError(
            f"Unknown vision tower backend {name!r} in vision_config['backend']"
            + (f" (did you mean {near[0]!r}?)" if near else "")
            + f". Known backends: {', '.join(known)}."
        )


def _import_timm_backend() -> None:
    from . import timm_backend  # noqa: F401


def _import_open_clip_backend() -> None:
    from . import open_clip_backend  # noqa: F401


_OPTIONAL_BACKENDS: dict[str, Callable[[], None]] = {
    "timm": _import_timm_backend,
    "open_clip": _import_open_clip_backend,
}


def build_vision_tower(spec: dict[str, Any]) -> VisionTower:
    """Randomly initialised tower from its spec (weights come later from a checkpoint)."""
    if "backend" not in spec:
        raise ValueError(f"vision_config needs a 'backend' key ('hf', 'timm' or 'open_clip'); got keys {sorted(spec)}.")
    _ensure_backend(spec["backend"])
    return _BACKENDS[spec["backend"]](spec)


def load_pretrained_vision_tower(name_or_path: str, backend: str = "hf", **kwargs: Any) -> VisionTower:
    """Load a pretrained tower by hub name or local directory; ``tower.spec`` describes it.

    For ``hf``, a full CLIP/SigLIP checkpoint (vision + text) or a vision-only one both work; a
    missing vision weight is an error (:func:`~vlmzoo.towers.loading.load_tower`).
    """
    if backend == "hf":
        config = AutoConfig.from_pretrained(name_or_path)
        vision_config = getattr(config, "vision_config", None) or config
        model = load_tower(_hf_vision_model_class(vision_config), name_or_path, "vision tower",
                           attn_implementation=kwargs.get("attn_implementation", "sdpa"))
        spec = HFVisionTower.spec_from_config(model.config)
        return HFVisionTower(spec, model=model)
    _ensure_backend(backend)
    if backend not in _PRETRAINED_LOADERS:
        raise ValueError(f"Vision backend {backend!r} cannot load pretrained weights by name.")
    return _PRETRAINED_LOADERS[backend](name_or_path, **kwargs)


def _hf_vision_model_class(vision_config: Any) -> type[nn.Module]:
    return MODEL_MAPPING[type(vision_config)]
