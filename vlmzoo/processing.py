"""``VLMProcessor``: conversations + images -> the batch a :class:`~vlmzoo.VLMForConditionalGeneration` eats.

Batch keys (B samples, T tokens, N images in the batch, L instruction tokens):

* ``input_ids`` ``(B, T)`` long: each ``<image>`` is expanded to ``num_visual_tokens`` copies of
  the image token id (as transformers' Llava processor does), where the placeholder stands or, with
  ``visual_tokens_first``, at the start of the sequence (before BOS);
* ``attention_mask`` ``(B, T)`` long: 1 = real token, 0 = padding;
* ``labels`` ``(B, T)`` long: -100 except at the template's target tokens (training only, i.e.
  absent with ``add_generation_prompt=True``);
* ``instruction_mask`` ``(B, T)`` bool: True at the instruction span's tokens (``instruction_rule``:
  the first user message's text, or every text token before the first reply's role name);
* ``pixel_values`` ``(N, 3, H, W)`` float: one entry per ``<image>``, in row-major order (sample 0's
  images first); absent when the batch has no image;
* ``pixel_values_hr`` ``(N, 3, f*H, f*W)`` float: the crop view (scale f > 1 in the input spec's
  ``image_views``): the same images, row for row, from their high-resolution versions resized to f
  times the tower's size; only when the spec has that view and high-res images are given;
* ``image_keys`` list of N str: the files each image was read from, when every sample names them
  (:class:`~vlmzoo.data.LlavaJsonDataset` items do); the frozen-feature cache's keys in training;
* ``instruction_input_ids`` / ``instruction_attention_mask`` ``(N, L)``: the query text (``query_text``: the
  last user message, i.e. the question being answered) of the sample each image belongs to, tokenised by the text-encoder tokenizer (truncated to
  ``text_max_length``); only with a ``text_tokenizer`` and at least one image;
* ``region_mask`` ``(N, g*g)`` float: the regions (boxes) of each image's query, the last user
  message's ``regions`` (:mod:`vlmzoo.data.regions`), rasterised over the tower's g x g patch grid
  (row-major; 1 where a patch's centre lies in a box); every image of a sample gets its sample's
  mask. Only when the input spec asks for it (``query_region_grid`` g > 0) and there is an image;
  a sample with an image whose query has no ``regions`` field is then an error naming it.

Every setting that depends on the model (visual tokens per image, image views, instruction rule,
visual tokens first) comes from its :class:`~vlmzoo.strategy.InputSpec`, which the model stores in
its config: :meth:`VLMProcessor.from_pretrained` reads it from the folder's ``config.json`` and
:meth:`VLMProcessor.for_model` from the model; the processor saves none of it.

Images are padded to a square with the mean colour (LLaVA-1.5) before a ``CLIPImageProcessor``
resizes and normalises them; every view goes through the same steps, its scale f multiplying every
size of the image processor.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    BatchFeature,
    CLIPImageProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
)

from .data.regions import query_regions, region_patch_mask
from .data.templates import (
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    ConversationTemplate,
    EncodedConversation,
    TemplateEncoder,
    _BUILTIN,
    get_template,
)
from .strategy import InputSpec, InstructionSpanRule, view_key, view_name
from .towers.vision import CLIP_MEAN, CLIP_STD

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG_NAME = "vlm_processor_config.json"
MODEL_CONFIG_NAME = "config.json"  # the VLMConfig saved beside the processor: its input_spec
# Keys of vlm_processor_config.json written before the input spec lived in the model config.
_LEGACY_SPEC_KEYS = ("num_visual_tokens", "high_res_factor", "instruction_rule", "visual_tokens_first")
TEXT_TOKENIZER_SUBFOLDER = "text_tokenizer"
_MAX_REMEMBERED_INSTRUCTIONS = 200_000  # tokenize_instructions' memory of distinct texts

Messages = Sequence[Mapping[str, str]]


def _padded(row: Sequence[Any], width: int, value: Any, left: bool) -> list[Any]:
    """``row`` filled with ``value`` to ``width`` items, on the left or on the right."""
    fill = [value] * (width - len(row))
    return fill + list(row) if left else list(row) + fill


def make_image_processor(
    image_size: int = 336,
    image_mean: Sequence[float] = CLIP_MEAN,
    image_std: Sequence[float] = CLIP_STD,
) -> CLIPImageProcessor:
    """A ``CLIPImageProcessor`` producing ``(3, image_size, image_size)`` inputs for a tower."""
    return CLIPImageProcessor(
        size={"shortest_edge": int(image_size)},
        crop_size={"height": int(image_size), "width": int(image_size)},
        image_mean=list(image_mean),
        image_std=list(image_std),
    )


def pad_to_square(image: Image.Image, background: Sequence[float]) -> Image.Image:
    """Centre ``image`` (converted to RGB) on a square canvas of colour ``background`` (0..1 floats)."""
    image = image.convert("RGB")
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(c * 255) for c in background))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


class VLMProcessor:
    """Tokenizer + image processor (+ optional text-encoder tokenizer) behind one conversation template,
    for the model whose :class:`~vlmzoo.strategy.InputSpec` it is given.

    Args:
        tokenizer: the LLM's tokenizer; must contain ``image_token`` as a single token and (for
            batching) a pad token.
        input_spec: the model's input spec (``model.config.get_input_spec()``): visual tokens per
            image, image views, instruction rule, visual tokens first. Its only source: use
            :meth:`for_model` or :meth:`from_pretrained` to get it from a model or a saved folder.
        image_processor: resizes/normalises images; default :func:`make_image_processor` (336 px, CLIP stats).
        text_tokenizer: tokenizer of the instruction text encoder, for strategies that need
            instruction text features.
        template: conversation template name or :class:`~vlmzoo.data.ConversationTemplate`.
        image_token: placeholder in message text and token in the vocabulary.
        text_max_length: truncation length of the instruction for the text encoder.
        pad_to_square: pad images to a square with the mean colour before resizing (LLaVA-1.5).
    """

    def __init__(
        self,
        tokenizer: Any,
        input_spec: InputSpec,
        image_processor: Any | None = None,
        text_tokenizer: Any | None = None,
        template: str | ConversationTemplate = "vicuna_v1",
        image_token: str = DEFAULT_IMAGE_TOKEN,
        text_max_length: int = 77,
        pad_to_square: bool = True,
    ) -> None:
        if not isinstance(input_spec, InputSpec):
            raise TypeError(f"input_spec must be an InputSpec (e.g. model.config.get_input_spec()), got {input_spec!r}.")
        self.tokenizer = tokenizer
        self.input_spec = input_spec
        self.image_processor = image_processor if image_processor is not None else make_image_processor()
        self.text_tokenizer = text_tokenizer
        self.template = get_template(template)
        self.image_token = image_token
        self.text_max_length = int(text_max_length)
        self.pad_to_square = bool(pad_to_square)
        # Validates that the image token and the template's markers are single tokens, and the rule.
        self.encoder = TemplateEncoder(
            tokenizer, self.template, image_token, input_spec.num_visual_tokens, input_spec.instruction_span_rule,
            input_spec.visual_tokens_first,
        )
        self._instruction_ids: dict[tuple[str, int], list[int]] = {}  # tokenize_instructions' memory

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def for_model(
        cls,
        model_or_config: Any,
        tokenizer: Any,
        image_processor: Any | None = None,
        text_tokenizer: Any | None = None,
        template: str | ConversationTemplate = "vicuna_v1",
        **kwargs: Any,
    ) -> "VLMProcessor":
        """A processor for a model or its ``VLMConfig``: the input spec is the config's
        (``config.get_input_spec()``, written when the model was built), the image processor follows
        ``model.vision_tower`` (size, mean, std) or, from a config, ``config.vision_config``. The
        tokenizer must map ``config.image_token`` to ``config.image_token_id``; a spec that reads
        instruction text needs a ``text_tokenizer``. ``text_max_length`` defaults to the model's text
        encoder limit (at most 77). Remaining ``kwargs`` go to the constructor.
        """
        is_model = hasattr(model_or_config, "config")
        config = model_or_config.config if is_model else model_or_config
        spec = config.get_input_spec()
        if spec.instruction_text and text_tokenizer is None:
            raise ValueError(f"Strategy {config.strategy!r} needs instruction text features: pass text_tokenizer=...")
        image_token = getattr(config, "image_token", DEFAULT_IMAGE_TOKEN)
        token_id = tokenizer.convert_tokens_to_ids(image_token)
        if token_id != config.image_token_id:
            raise ValueError(
                f"The tokenizer maps the image token {image_token!r} to id {token_id}, but the model's "
                f"config.image_token_id is {config.image_token_id}."
            )
        encoder = getattr(model_or_config, "text_encoder", None) if is_model else None
        if encoder is not None and "text_max_length" not in kwargs:
            # Truncate to what the encoder accepts (SigLIP: 64) as well as to CLIP's 77.
            kwargs["text_max_length"] = min(77, encoder.max_length)
        if image_processor is None:
            tower = getattr(model_or_config, "vision_tower", None) if is_model else None
            image_processor = _tower_image_processor(tower, config)
        return cls(tokenizer, spec, image_processor=image_processor, text_tokenizer=text_tokenizer,
                   template=template, image_token=image_token, **kwargs)

    def with_template(self, template: str | dict[str, Any] | ConversationTemplate,
                      pad_to_square: bool | None = None) -> "VLMProcessor":
        """The same tokenizers, image processing and input spec under another conversation template
        (name or spec); ``pad_to_square`` (``None``: this processor's) pads images to a square (True)
        or lets the image processor resize the short side and centre-crop (False). ``self`` when
        nothing changes."""
        template = get_template(template)
        if self.template == template and pad_to_square in (None, self.pad_to_square):
            return self
        return type(self)(self.tokenizer, self.input_spec, image_processor=self.image_processor,
                          text_tokenizer=self.text_tokenizer, template=template, image_token=self.image_token,
                          text_max_length=self.text_max_length,
                          pad_to_square=self.pad_to_square if pad_to_square is None else pad_to_square)

    # ---- pieces ------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.encoder.image_token_id

    @property
    def num_visual_tokens(self) -> int:
        return self.input_spec.num_visual_tokens

    @property
    def high_res_factor(self) -> int:
        """The crop view's scale f (1: the model reads the base view only)."""
        return self.input_spec.high_res_factor

    @property
    def instruction_rule(self) -> InstructionSpanRule:
        return self.input_spec.instruction_span_rule

    @property
    def visual_tokens_first(self) -> bool:
        return self.input_spec.visual_tokens_first

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, H, W)`` of one processed image."""
        crop = getattr(self.image_processor, "crop_size", None)
        size = crop if getattr(self.image_processor, "do_center_crop", False) and crop else self.image_processor.size
        return 3, int(size["height"]), int(size["width"])

    def view_shape(self, scale: int) -> tuple[int, int, int]:
        """``(3, s*H, s*W)`` of one processed image of the view of scale ``s``."""
        _, h, w = self.image_shape
        return 3, scale * h, scale * w

    def view_folders(self, images: str | os.PathLike, high_res_images: str | os.PathLike | None = None) -> dict[int, str]:
        """scale -> the folder each view this processor makes is read from (same relative paths in
        each): the base view from ``images``; the crop view, when the input spec has one, from
        ``high_res_images`` if given (else the model cuts its crops from the base view upsampled)."""
        return {scale: os.fspath(folder) for scale, folder in self._view_sources(images, high_res_images).items()}

    def _view_sources(self, base: Any, high_res: Any) -> dict[int, Any]:
        """scale -> where each view of the input spec comes from: the base view from ``base``, the
        crop view (if the spec has one) from ``high_res`` when given (``None``: not made)."""
        sources = {1: base}
        if high_res is not None and self.high_res_factor > 1:
            sources[self.high_res_factor] = high_res
        return sources

    def encode(
        self, messages: Messages, max_length: int | None = None, add_generation_prompt: bool = False
    ) -> EncodedConversation:
        """Tokenise one conversation with the processor's template (see :class:`TemplateEncoder`)."""
        return self.encoder.encode(messages, max_length=max_length, add_generation_prompt=add_generation_prompt)

    def preprocess_images(self, images: Sequence[Image.Image], scale: int = 1) -> torch.Tensor:
        """PIL images -> ``(N, 3, s*H, s*W)`` float pixel values of the view of scale ``s`` (``N`` may be 0).

        Every view gets the same padding, resizing (every size of the image processor times s) and
        normalisation; an image already of the view's size is only normalised.
        """
        if scale not in self.input_spec.image_views:
            raise ValueError(f"scale={scale} is not one of the input spec's image views {self.input_spec.image_views}.")
        shape = self.view_shape(scale)
        if not images:
            return torch.zeros(0, *shape)
        if self.pad_to_square:
            images = [pad_to_square(im, self.image_processor.image_mean) for im in images]
        fast = self._normalize_only(images, shape)
        if fast is not None:
            return fast
        kwargs = self._scaled_sizes(scale) if scale > 1 else {}
        pixels = self.image_processor(list(images), return_tensors="pt", **kwargs)["pixel_values"]
        if scale > 1 and tuple(pixels.shape[1:]) != shape:
            raise ValueError(
                f"The image processor ({type(self.image_processor).__name__}) made x{scale} pixel values of "
                f"shape {tuple(pixels.shape[1:])} with sizes {kwargs}; expected {shape}."
            )
        return pixels

    def _normalize_only(self, images: Sequence[Image.Image], shape: tuple[int, int, int]) -> torch.Tensor | None:
        """``(N, 3, H, W)`` for images already ``H x W`` RGB, whose resizing and centre crop are
        the identity: only rescale and normalise, as the image processor would (its per-image
        overhead is most of a small image's cost). ``None`` when any step would change pixels."""
        ip = self.image_processor
        _, h, w = shape
        if not all(im.size == (w, h) and im.mode == "RGB" for im in images):
            return None
        if not (getattr(ip, "do_rescale", False) and getattr(ip, "do_normalize", False)):
            return None
        arr = torch.from_numpy(np.stack([np.asarray(im) for im in images]))  # (N, H, W, 3) uint8
        mean = torch.tensor(ip.image_mean, dtype=torch.float32)
        std = torch.tensor(ip.image_std, dtype=torch.float32)
        # (x * rescale - mean) / std as one multiply-add, channels first: (N, 3, H, W)
        scale, shift = float(ip.rescale_factor) / std, -mean / std
        pixels = arr.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        return pixels.mul_(scale.view(3, 1, 1)).add_(shift.view(3, 1, 1))

    def _scaled_sizes(self, f: int) -> dict[str, dict[str, int]]:
        """The image processor's ``size`` / ``crop_size`` with every edge length times f."""
        out = {}
        for name in ("size", "crop_size"):
            size = getattr(self.image_processor, name, None)
            if size is None:
                continue
            get = size.get if isinstance(size, Mapping) else (lambda key, s=size: getattr(s, key, None))
            scaled = {k: int(get(k)) * f for k in ("height", "width", "shortest_edge", "longest_edge") if get(k) is not None}
            if scaled:
                out[name] = scaled
        return out

    def tokenize_instructions(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Instruction texts -> ``(N, L)`` ids and attention mask from the text-encoder tokenizer.

        The same as ``text_tokenizer(texts, padding=True, truncation=True, ...)``; with a transformers
        tokenizer each distinct text is tokenized once and remembered (questions recur across a
        data set: ~2 ms saved per batch of 32 at tiny scale).
        """
        tok = self.text_tokenizer
        if tok is None:
            raise ValueError("This processor has no text_tokenizer.")
        pad_id = getattr(tok, "pad_token_id", None)
        if not texts or not isinstance(tok, PreTrainedTokenizerBase) or pad_id is None:
            out = tok(list(texts), padding=True, truncation=True, max_length=self.text_max_length, return_tensors="pt")
            return out["input_ids"], out["attention_mask"]
        rows = []
        for text in texts:
            key = (text, self.text_max_length)
            ids = self._instruction_ids.get(key)
            if ids is None:
                ids = tok(text, truncation=True, max_length=self.text_max_length)["input_ids"]
                if len(self._instruction_ids) < _MAX_REMEMBERED_INSTRUCTIONS:
                    self._instruction_ids[key] = ids
            rows.append(ids)
        width = max(len(r) for r in rows)
        left = tok.padding_side == "left"
        ids = torch.tensor([_padded(r, width, pad_id, left) for r in rows], dtype=torch.long)
        mask = torch.tensor([_padded([1] * len(r), width, 0, left) for r in rows], dtype=torch.long)
        return ids, mask

    def pad(
        self,
        features: Sequence[Mapping[str, Any]],
        padding_side: str = "right",
        return_labels: bool = True,
    ) -> BatchFeature:
        """Collate per-sample features into a batch.

        Each feature has ``input_ids``, ``labels`` and ``instruction_mask`` (lists of length T_i),
        ``pixel_values`` ``(n_i, 3, H, W)`` and ``query_text`` (str), and optionally the other
        views of the input spec (``pixel_values_hr`` ``(n_i, 3, f*H, f*W)``; a view one sample with
        images has, every one must have), ``image_keys`` (``n_i`` str), ``id`` (named in errors) and,
        for an input spec with a region grid, ``query_regions`` (boxes, or ``None``: not given).
        Returns the batch keys described in the module docstring, padded to the longest sample on
        ``padding_side``.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if not features:
            raise ValueError("Cannot collate an empty list of samples.")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token (e.g. to its unk or eos token).")
        width = max(len(f["input_ids"]) for f in features)
        left = padding_side == "left"

        def padded(row: Sequence[Any], value: Any) -> list[Any]:
            return _padded(row, width, value, left)

        data: dict[str, Any] = {
            "input_ids": torch.tensor([padded(f["input_ids"], pad_id) for f in features], dtype=torch.long),
            "attention_mask": torch.tensor([padded([1] * len(f["input_ids"]), 0) for f in features], dtype=torch.long),
        }
        if return_labels:
            data["labels"] = torch.tensor([padded(f["labels"], IGNORE_INDEX) for f in features], dtype=torch.long)
        data["instruction_mask"] = torch.tensor([padded(f["instruction_mask"], False) for f in features], dtype=torch.bool)

        pixels = [f["pixel_values"] for f in features if len(f["pixel_values"])]
        if pixels:
            with_images = [(i, f) for i, f in enumerate(features) if len(f["pixel_values"])]
            for scale in self.input_spec.image_views:
                key = view_key(scale)
                if not any(f.get(key) is not None for _, f in with_images):
                    continue  # a view not given (the crop view: the model cuts crops from the base view)
                for i, f in with_images:
                    rows = len(f[key]) if f.get(key) is not None else 0
                    if rows != len(f["pixel_values"]):
                        raise ValueError(
                            f"Sample {i} has {len(f['pixel_values'])} image(s) but {rows} {view_name(scale)}(s); "
                            f"{key} must hold every image of the batch or none."
                        )
                data[key] = torch.cat([f[key] for _, f in with_images])
            if all("image_keys" in f for _, f in with_images):
                data["image_keys"] = [key for _, f in with_images for key in f["image_keys"]]
            if self.text_tokenizer is not None:
                texts = [f["query_text"] for f in features for _ in range(len(f["pixel_values"]))]
                ids, mask = self.tokenize_instructions(texts)
                data["instruction_input_ids"], data["instruction_attention_mask"] = ids, mask
            if self.input_spec.query_regions:
                data["region_mask"] = self._region_mask(with_images)
        return BatchFeature(data=data)

    def _region_mask(self, with_images: Sequence[tuple[int, Mapping[str, Any]]]) -> torch.Tensor:
        """(sample index, feature) of the samples with images -> ``(N, g*g)`` query region masks."""
        grid = self.input_spec.query_region_grid
        rows = []
        for i, f in with_images:
            regions = f.get("query_regions")
            if regions is None:
                name = f"Sample {i}" + (f" (record {f['id']!r})" if f.get("id") is not None else "")
                raise ValueError(f"{name} has an image but its query (the last user message) has no 'regions', which "
                                 f"this model reads (input spec query_region_grid={grid}); give it the boxes the "
                                 "question is about, [] if none.")
            rows += [region_patch_mask(regions, grid)] * len(f["pixel_values"])
        return torch.stack(rows)

    # ---- main entry point --------------------------------------------------------------------------
    def __call__(
        self,
        conversations: Messages | Sequence[Messages],
        images: Any = None,
        high_res_images: Any = None,
        add_generation_prompt: bool = False,
        return_tensors: str | None = "pt",
        padding_side: str | None = None,
        max_length: int | None = None,
    ) -> BatchFeature:
        """Encode one conversation or a batch of them, with their images.

        Args:
            conversations: one conversation (a list of ``{"role", "content"}`` dicts) or a list of them;
                a user message may carry ``"regions"`` (boxes, :mod:`vlmzoo.data.regions`), read for a
                model whose input spec has a region grid.
            images: per sample, a list of PIL images (one per ``<image>``, in order), a single image,
                or ``None``; for a single conversation, its images directly.
            high_res_images: the same images at high resolution, in the same layout as ``images``
                (``None`` = none): the source of the crop view (``pixel_values_hr``) when the input
                spec has one, ignored otherwise.
            add_generation_prompt: end each sample with the assistant header (generation); no labels.
            return_tensors: only ``"pt"`` is supported.
            padding_side: default ``"left"`` for generation, ``"right"`` for training.
            max_length: truncate longer samples (counted in a warning; cutting into image tokens is an error).

        Returns:
            A ``BatchFeature`` with the keys of the module docstring.
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"Only return_tensors='pt' is supported, got {return_tensors!r}.")
        single = bool(conversations) and isinstance(conversations[0], Mapping)
        batch: list[Messages] = [conversations] if single else list(conversations)  # type: ignore[list-item]
        if single:
            images = [images]
            high_res_images = None if high_res_images is None else [high_res_images]
        elif images is None:
            images = [None] * len(batch)
        elif len(images) != len(batch):
            raise ValueError(f"Got {len(batch)} conversations but images for {len(images)} samples.")
        views = self._view_sources(images, high_res_images)
        for scale, view_images in views.items():
            if len(view_images) != len(batch):
                raise ValueError(f"Got {len(batch)} conversations but {view_name(scale)}s for {len(view_images)} samples.")

        features = []
        n_truncated = 0
        for i, (messages, sample_images) in enumerate(zip(batch, images)):
            sample_images = _image_list(sample_images)
            enc = self.encode(messages, max_length=max_length, add_generation_prompt=add_generation_prompt)
            if enc.num_images != len(sample_images):
                raise ValueError(
                    f"Sample {i} has {enc.num_images} {self.image_token!r} placeholder(s) but "
                    f"{len(sample_images)} image(s) were given."
                )
            n_truncated += enc.truncated
            feature = {
                "input_ids": enc.input_ids,
                "labels": enc.labels,
                "instruction_mask": enc.instruction_mask,
                "query_text": enc.query_text,
            }
            if self.input_spec.query_regions:
                feature["query_regions"] = query_regions(messages)
            for scale, view_images in views.items():
                sample_view = sample_images if scale == 1 else _image_list(view_images[i])
                if len(sample_view) != len(sample_images):
                    raise ValueError(f"Sample {i} has {len(sample_images)} image(s) but {len(sample_view)} "
                                     f"{view_name(scale)}(s).")
                feature[view_key(scale)] = self.preprocess_images(sample_view, scale)
            features.append(feature)
        if n_truncated:
            logger.warning("Truncated %d of %d samples to max_length=%d tokens.", n_truncated, len(batch), max_length)
        side = padding_side or ("left" if add_generation_prompt else "right")
        return self.pad(features, padding_side=side, return_labels=not add_generation_prompt)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
        """Token ids ``(B, T)`` -> texts (the LLM tokenizer's ``batch_decode``)."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    # ---- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        template = self.template.name if _BUILTIN.get(self.template.name) == self.template else self.template.to_dict()
        return {
            "processor_class": type(self).__name__,
            "template": template,
            "image_token": self.image_token,
            "text_max_length": self.text_max_length,
            "pad_to_square": self.pad_to_square,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write tokenizer, image processor, ``text_tokenizer/`` and ``vlm_processor_config.json``.

        Meant to share a directory with the model (no file names collide with the model's): the
        input spec is not written here but read back from the model's ``config.json``.
        """
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
        if self.text_tokenizer is not None:
            self.text_tokenizer.save_pretrained(os.path.join(save_directory, TEXT_TOKENIZER_SUBFOLDER))
        with open(os.path.join(save_directory, PROCESSOR_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config: Any | None = None, **overrides: Any) -> "VLMProcessor":
        """Load what :meth:`save_pretrained` wrote (a local directory) for the model saved there.

        The input spec is the model's: ``config.get_input_spec()`` when a ``VLMConfig`` is given
        (e.g. that of a model rebuilt with other strategy fields), else the ``input_spec`` of the
        directory's ``config.json``. A folder saved before the spec lived in the model config keeps
        loading: its processor config's own counts are read instead. ``overrides`` replace saved
        processor settings (``template``, ``text_max_length``, ...).
        """
        config_path = os.path.join(directory, PROCESSOR_CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"No {PROCESSOR_CONFIG_NAME} in {directory!s}; was it saved with VLMProcessor.save_pretrained?")
        with open(config_path, encoding="utf-8") as f:
            saved = json.load(f)
        saved.pop("processor_class", None)
        legacy = {key: saved.pop(key) for key in _LEGACY_SPEC_KEYS if key in saved}
        spec = config.get_input_spec() if config is not None else _saved_input_spec(directory, legacy)
        template = saved.pop("template")
        saved["template"] = template if isinstance(template, str) else ConversationTemplate.from_dict(template)
        saved.update(overrides)
        # The directory's config.json is the VLM's, not the LLM's: let tokenizer_config.json alone
        # pick the tokenizer class (a blank config stops AutoTokenizer from reading config.json).
        text_dir = os.path.join(directory, TEXT_TOKENIZER_SUBFOLDER)
        if "text_tokenizer" not in saved and os.path.isdir(text_dir):
            saved["text_tokenizer"] = AutoTokenizer.from_pretrained(text_dir, config=PreTrainedConfig())
        if "tokenizer" not in saved:
            saved["tokenizer"] = AutoTokenizer.from_pretrained(directory, config=PreTrainedConfig())
        if "image_processor" not in saved:
            saved["image_processor"] = AutoImageProcessor.from_pretrained(directory)
        return cls(input_spec=spec, **saved)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(template={self.template.name!r}, image_token={self.image_token!r}, "
            f"image_shape={self.image_shape}, input_spec={self.input_spec}, "
            f"text_tokenizer={'yes' if self.text_tokenizer is not None else 'no'})"
        )


def _image_list(images: Any) -> list[Image.Image]:
    """A sample's images: ``None`` -> ``[]``, one image -> ``[image]``, a sequence -> a list."""
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    return list(images)


def _saved_input_spec(directory: str | os.PathLike, legacy: dict[str, Any]) -> InputSpec:
    """The ``input_spec`` of the model config saved in ``directory``, else (a folder saved before the
    spec lived there) the one its processor config's ``legacy`` counts describe."""
    path = os.path.join(directory, MODEL_CONFIG_NAME)
    stored = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            stored = json.load(f).get("input_spec")
    if stored is not None:
        return InputSpec.from_dict(stored, where=f"{path}: input_spec")
    if "num_visual_tokens" not in legacy:
        raise ValueError(f"{directory!s} holds no input spec: no 'input_spec' in {MODEL_CONFIG_NAME} (a model saved with "
                         f"VLMForConditionalGeneration.save_pretrained) and no 'num_visual_tokens' in {PROCESSOR_CONFIG_NAME}; "
                         "pass config=<the model's VLMConfig>.")
    factor = int(legacy.get("high_res_factor", 1))
    return InputSpec(num_visual_tokens=int(legacy["num_visual_tokens"]), image_views=(1,) if factor == 1 else (1, factor),
                     instruction_span_rule=legacy.get("instruction_rule", "first_user_text"),
                     visual_tokens_first=bool(legacy.get("visual_tokens_first", False)))


def _tower_image_processor(tower: Any, config: Any) -> CLIPImageProcessor:
    """The image processor of a built tower (size, mean, std), else of ``config.vision_config``."""
    if tower is not None:
        return make_image_processor(tower.image_size, tower.image_mean, tower.image_std)
    spec = config.vision_config or {}
    if "image_size" not in spec:
        raise ValueError("config.vision_config has no 'image_size': pass image_processor=...")
    siglip = str(spec.get("model_type", "")).startswith("siglip")
    stats = ((0.5,) * 3, (0.5,) * 3) if siglip else (CLIP_MEAN, CLIP_STD)
    return make_image_processor(spec["image_size"], *stats)
