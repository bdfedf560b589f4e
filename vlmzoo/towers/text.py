"""Instruction-text encoders: one interface over transformers, open_clip and sentence-transformers encoders.

Some strategies condition the visual features on the instruction (TG-LLaVA, IGVA, ...). They
read it through a :class:`TextEncoder`, described, like a vision tower, by a JSON-serialisable
*spec* dict stored in the model config:

* ``{"backend": "hf", "model_type": "clip_text_model" | "siglip_text_model", **config}`` — a
  transformers text model (:class:`HFTextEncoder`);
* ``{"backend": "open_clip", "model_name": "ViT-B-32", "model_cfg": {...}}`` — the text tower
  of an open_clip model (:mod:`vlmzoo.towers.open_clip_backend`);
* ``{"backend": "sentence_transformers", "model_type": "bert" | "mpnet" | ..., **config,
  "pooling": "mean", "normalize": true, "max_seq_length": 256}`` — a sentence-transformers
  model folder read with plain transformers (:mod:`vlmzoo.towers.sentence_backend`).

Every encoder maps ``input_ids, attention_mask`` (``(N, L)``, right-padded) to
:class:`~vlmzoo.strategy.InstructionFeatures` with ``pooled (N, D_t)``, ``tokens (N, L, D_t)``
and ``mask (N, L)``; ``D_t`` is :attr:`TextEncoder.hidden_size`. Projection heads of the
contrastive models are never applied.

Tokenizers (see :func:`text_tokenizer_for`):

* ``hf``: the tokenizer saved with the checkpoint (``AutoTokenizer.from_pretrained(path)``).
  CLIP: pad to the longest sequence with an attention mask. SigLIP was trained on sequences
  padded to ``max_length`` (64) without a mask; :class:`HFTextEncoder` re-pads internally, so
  any right padding gives the same features.
* ``open_clip``: ``open_clip.get_tokenizer(model_name)`` (pads with 0 to ``context_length``);
  shorter right-padded batches are accepted and re-padded internally.

* ``sentence_transformers``: the model folder's own tokenizer (``AutoTokenizer``), its
  ``model_max_length`` set to the folder's ``max_seq_length``.

New backends register with :func:`register_text_backend` (builder, optional loader and
tokenizer). Optional ones are imported lazily on first use (:data:`_OPTIONAL_TEXT_BACKENDS`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from ..strategy import InstructionFeatures
from ..utils import hf_config_spec, nearest_names
from .loading import load_tower


class TextEncoder(nn.Module):
    """Base class. ``forward(input_ids, attention_mask)`` returns :class:`InstructionFeatures`.

    Attributes (set by subclasses):
        hidden_size: channels D_t of both ``pooled`` and ``tokens``.
        max_length: longest input (in tokens) the encoder accepts.
        spec: the JSON-serialisable dict that rebuilds the encoder.
    """

    hidden_size: int
    max_length: int

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = dict(spec)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> InstructionFeatures:
        """``(N, L)`` ids and mask (1 = token, 0 = right padding) -> pooled ``(N, D_t)``,
        tokens ``(N, L, D_t)`` and mask ``(N, L)``."""
        raise NotImplementedError


def check_max_length(encoder: TextEncoder, input_ids: torch.Tensor) -> None:
    """Raise if ``input_ids (N, L)`` is longer than the encoder's ``max_length``."""
    if input_ids.shape[1] > encoder.max_length:
        raise ValueError(
            f"Instruction has {input_ids.shape[1]} tokens but the {encoder.spec.get('backend')!r} text encoder "
            f"accepts at most {encoder.max_length}; truncate when tokenizing."
        )


def pad_to_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, length: int, pad_id: int) -> torch.Tensor:
    """``(N, L)`` right-padded ids -> ``(N, length)`` with every padding position set to ``pad_id``
    (``attention_mask`` ``None``: no padding inside the ``L`` tokens).

    For encoders trained on fixed-length, unmasked inputs: their features then do not depend on
    how the batch was padded.
    """
    ids = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, pad_id)
    return F.pad(ids, (0, length - ids.shape[1]), value=pad_id)


class HFTextEncoder(TextEncoder):
    """transformers ``CLIPTextModel`` / ``SiglipTextModel``.

    ``pooled`` is the model's ``pooler_output``: for CLIP the final-layer-normed feature of the
    EOS token (the model's own pooling), for SigLIP its ``head`` applied to the last position of
    the ``max_length``-padded sequence. ``tokens`` is ``last_hidden_state`` (after the final
    layer norm), truncated to the input length.
    """

    def __init__(self, spec: dict[str, Any], model: nn.Module | None = None) -> None:
        super().__init__(spec)
        if model is None:
            cfg_dict = {k: v for k, v in spec.items() if k not in ("backend", "attn_implementation")}
            if "model_type" not in cfg_dict:
                raise ValueError(f"hf text_encoder spec needs a 'model_type'; got keys {sorted(cfg_dict)}.")
            hf_config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
            attn = spec.get("attn_implementation", "sdpa")
            model = _hf_text_model_class(hf_config)._from_config(hf_config, attn_implementation=attn)
        self.model = model
        cfg = model.config
        self.hidden_size = cfg.hidden_size
        self.max_length = cfg.max_position_embeddings
        # SigLIP pools the last position of a fixed-length, unmasked sequence.
        self.pad_to_max_length = cfg.model_type.startswith("siglip")
        self.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        projection_size = getattr(cfg, "projection_size", cfg.hidden_size)
        if projection_size != cfg.hidden_size:
            raise ValueError(
                f"{cfg.model_type} pools to {projection_size} channels but its tokens have {cfg.hidden_size}; "
                "the text encoder needs one width D_t for both."
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> InstructionFeatures:
        check_max_length(self, input_ids)
        length = input_ids.shape[1]
        if self.pad_to_max_length:
            ids = pad_to_length(input_ids, attention_mask, self.max_length, self.pad_token_id)
            out = self.model(input_ids=ids, return_dict=True)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        tokens = out.last_hidden_state[:, :length]
        return InstructionFeatures(pooled=out.pooler_output, tokens=tokens, mask=attention_mask)

    @staticmethod
    def spec_from_config(hf_config: Any) -> dict[str, Any]:
        return hf_config_spec(hf_config)


# Text-only models that transformers' AutoModel does not map (v5 maps CLIPTextConfig only).
_HF_TEXT_MODELS = {
    "clip_text_model": "CLIPTextModel",
    "siglip_text_model": "SiglipTextModel",
    "siglip2_text_model": "Siglip2TextModel",
}


def _hf_text_model_class(text_config: Any) -> type[nn.Module]:
    model_type = text_config.model_type
    if model_type in _HF_TEXT_MODELS:
        return getattr(transformers, _HF_TEXT_MODELS[model_type])
    model_class = MODEL_MAPPING.get(type(text_config), None) if "vision" not in model_type else None
    if model_class is None:
        raise ValueError(
            f"No transformers text model for model_type {model_type!r}; "
            f"supported: {', '.join(sorted(_HF_TEXT_MODELS))} (or full CLIP/SigLIP checkpoints)."
        )
    return model_class


def load_hf_text_encoder(name_or_path: str, **kwargs: Any) -> HFTextEncoder:
    """Text tower of a full CLIP/SigLIP checkpoint (``CLIPModel`` dir) or of a text-only one.

    Raises if any text-tower weight is missing from the checkpoint (vision weights are ignored:
    :func:`~vlmzoo.towers.loading.load_tower`).
    """
    config = AutoConfig.from_pretrained(name_or_path)
    text_config = getattr(config, "text_config", None) or config
    model_class = _hf_text_model_class(text_config)
    model = load_tower(model_class, name_or_path, "text-tower",
                       attn_implementation=kwargs.get("attn_implementation", "sdpa"))
    return HFTextEncoder(HFTextEncoder.spec_from_config(model.config), model=model)


TextBuilder = Callable[[dict[str, Any]], TextEncoder]
TextLoader = Callable[..., TextEncoder]
TextTokenizerLoader = Callable[[dict[str, Any], "str | None"], Any]

_TEXT_BACKENDS: dict[str, TextBuilder] = {"hf": HFTextEncoder}
_TEXT_LOADERS: dict[str, TextLoader] = {"hf": load_hf_text_encoder}
_TEXT_TOKENIZERS: dict[str, TextTokenizerLoader] = {}
_TEXT_SPEC_READERS: dict[str, Callable[[str], dict[str, Any]]] = {}


def _import_open_clip_backend() -> None:
    from . import open_clip_backend  # noqa: F401  (registers "open_clip" for vision and text)


def _import_sentence_backend() -> None:
    from . import sentence_backend  # noqa: F401  (registers "sentence_transformers")


# Backends whose module is imported (and registers itself) on first use.
_OPTIONAL_TEXT_BACKENDS: dict[str, Callable[[], None]] = {
    "open_clip": _import_open_clip_backend,
    "sentence_transformers": _import_sentence_backend,
}


def register_text_backend(
    name: str,
    builder: TextBuilder,
    loader: TextLoader | None = None,
    tokenizer: TextTokenizerLoader | None = None,
    spec_reader: Callable[[str], dict[str, Any]] | None = None,
) -> None:
    """Add a text-encoder backend: ``builder(spec)`` (random init), optionally
    ``loader(name_or_path, **kw)`` (pretrained), ``tokenizer(spec, name_or_path)`` (its tokenizer)
    and ``spec_reader(name_or_path)`` (the spec of a pretrained encoder without its weights)."""
    if name in _TEXT_BACKENDS:
        registered = ", ".join(sorted(_TEXT_BACKENDS))
        raise ValueError(f"Text backend {name!r} is already registered. Registered: {registered}.")
    _TEXT_BACKENDS[name] = builder
    if loader is not None:
        _TEXT_LOADERS[name] = loader
    if tokenizer is not None:
        _TEXT_TOKENIZERS[name] = tokenizer
    if spec_reader is not None:
        _TEXT_SPEC_READERS[name] = spec_reader


def _hf_text_spec(name_or_path: str) -> dict[str, Any]:
    config = AutoConfig.from_pretrained(name_or_path)
    return HFTextEncoder.spec_from_config(getattr(config, "text_config", None) or config)


_TEXT_SPEC_READERS["hf"] = _hf_text_spec


def text_encoder_spec_from_pretrained(name_or_path: str, backend: str = "hf") -> dict[str, Any]:
    """The spec of a pretrained encoder read from its config files only (for meta-device builds)."""
    _ensure_text_backend(backend)
    if backend not in _TEXT_SPEC_READERS:
        raise ValueError(f"Text backend {backend!r} cannot read a spec from {name_or_path!r}: give model.text_encoder_config.")
    return _TEXT_SPEC_READERS[backend](name_or_path)


def known_text_backends() -> list[str]:
    return sorted(set(_TEXT_BACKENDS) | set(_OPTIONAL_TEXT_BACKENDS))


def _ensure_text_backend(name: str) -> None:
    if name not in _TEXT_BACKENDS and name in _OPTIONAL_TEXT_BACKENDS:
        _OPTIONAL_TEXT_BACKENDS[name]()
    if name not in _TEXT_BACKENDS:
        known = known_text_backends()
        near = nearest_names(name, known)
        raise ValueError(
            f"Unknown text encoder backend {name!r}"
            + (f" (did you mean {near[0]!r}?)" if near else "")
            + f". Known backends: {', '.join(known)}."
        )


def build_text_encoder(spec: dict[str, Any]) -> TextEncoder:
    """Randomly initialised text encoder from its spec (weights come later from a checkpoint)."""
    if "backend" not in spec:
        known = ", ".join(known_text_backends())
        raise ValueError(f"text encoder spec needs a 'backend' key ({known}); got keys {sorted(spec)}.")
    _ensure_text_backend(spec["backend"])
    return _TEXT_BACKENDS[spec["backend"]](spec)


def load_pretrained_text_encoder(name_or_path: str, backend: str = "hf", **kwargs: Any) -> TextEncoder:
    """Load a pretrained text encoder by hub name or local path; ``encoder.spec`` describes it."""
    _ensure_text_backend(backend)
    if backend not in _TEXT_LOADERS:
        raise ValueError(f"Text backend {backend!r} cannot load pretrained weights.")
    return _TEXT_LOADERS[backend](name_or_path, **kwargs)


def text_tokenizer_for(spec: dict[str, Any], name_or_path: str | None = None) -> Any:
    """The tokenizer an encoder expects (its native object; the processor wraps it).

    * ``hf``: ``AutoTokenizer.from_pretrained(name_or_path)`` — the checkpoint's own tokenizer;
      returns a dict of ``input_ids`` / ``attention_mask``.
    * ``open_clip``: ``open_clip.get_tokenizer(name_or_path or spec["model_name"])`` with the
      spec's context length; ``tokenizer(texts)`` returns ``(N, context_length)`` ids padded
      with 0 (mask = ``ids != 0``).
    """
    backend = spec.get("backend")
    if backend == "hf":
        if name_or_path is None:
            raise ValueError("The hf text encoder's tokenizer is loaded from its checkpoint: pass name_or_path.")

        return AutoTokenizer.from_pretrained(name_or_path)
    if backend == "open_clip":
        import open_clip

        text_cfg = (spec.get("model_cfg") or {}).get("text_cfg", {})
        return open_clip.get_tokenizer(
            name_or_path or spec["model_name"], context_length=text_cfg.get("context_length")
        )
    if backend in _OPTIONAL_TEXT_BACKENDS:
        _ensure_text_backend(backend)
    if backend in _TEXT_TOKENIZERS:
        return _TEXT_TOKENIZERS[backend](spec, name_or_path)
    raise ValueError(f"No tokenizer known for text backend {backend!r}.")


__all__ = [
    "TextEncoder",
    "HFTextEncoder",
    "build_text_encoder",
    "load_pretrained_text_encoder",
    "text_encoder_spec_from_pretrained",
    "register_text_backend",
    "known_text_backends",
    "text_tokenizer_for",
    "check_max_length",
    "pad_to_length",
]
