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
* ``pixel_values_hr`` ``(N, 3, f*H, f*W)`` float: the same images, row for row, from their native
  high-resolution versions resized to f times the tower's size (f = ``high_res_factor``, the
  strategy's ``StrategyNeeds.high_res_factor``); only when f > 1 and high-res images are given;
* ``image_keys`` list of N str: the files each image was read from, when every sample names them
  (:class:`~vlmzoo.data.LlavaJsonDataset` items do); the frozen-feature cache's keys in training;
* ``instruction_input_ids`` / ``instruction_attention_mask`` ``(N, L)``: the query text (``query_text``: the
  last user message, i.e. the question being answered) of the sample each image belongs to, tokenised by the text-encoder tokenizer (truncated to
  ``text_max_length``); only with a ``text_tokenizer`` and at least one image.

Images are padded to a square with the mean colour (LLaVA-1.5) before a ``CLIPImageProcessor``
resizes and normalises them; high-res images go through the same steps with every size of the
image processor multiplied by f.
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

from .data.templates import (
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    ConversationTemplate,
    EncodedConversation,
    TemplateEncoder,
    _BUILTIN,
    get_template,
)
from .strategy import InstructionSpanRule, StrategyNeeds
from .towers.vision import CLIP_MEAN, CLIP_STD

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG_NAME = "vlm_processor_config.json"
TEXT_TOKENIZER_SUBFOLDER = "text_tokenizer"
_MAX_REMEMBERED_INSTRUCTIONS = 200_000  # tokenize_instructions' memory of distinct texts

Messages = Sequence[Mapping[str, str]]


def _padded(row: Sequence[Any], width: int, value: Any, left: bool) -> list[Any]:
    """``row`` filled with ``value`` to ``width`` items, on the left or on the right."""
    fill = [value] * (width - len(row))
    return fill + list(row) if left else list(row) + fill


def processor_options(needs: StrategyNeeds) -> dict[str, Any]:
    """The processor settings a strategy's needs fix: ``high_res_factor``, ``instruction_rule``,
    ``visual_tokens_first`` (e.g. ``VLMProcessor.from_pretrained(d, **processor_options(model.strategy.needs))``)."""
    return {
        "high_res_factor": needs.high_res_factor,
        "instruction_rule": needs.instruction_span_rule,
        "visual_tokens_first": needs.visual_tokens_first,
    }


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
    """Tokenizer + image processor (+ optional text-encoder tokenizer) behind one conversation template.

    Args:
        tokenizer: the LLM's tokenizer; must contain ``image_token`` as a single token and (for
            batching) a pad token.
        image_processor: resizes/normalises images; default :func:`make_image_processor` (336 px, CLIP stats).
        text_tokenizer: tokenizer of the instruction text encoder, for strategies that need
            instruction text features.
        template: conversation template name or :class:`~vlmzoo.data.ConversationTemplate`.
        image_token: placeholder in message text and token in the vocabulary.
        num_visual_tokens: image tokens per image; must equal ``model.strategy.num_visual_tokens``.
        text_max_length: truncation length of the instruction for the text encoder.
        pad_to_square: pad images to a square with the mean colour before resizing (LLaVA-1.5).
        high_res_factor: the strategy's ``StrategyNeeds.high_res_factor`` f. When f > 1, high-res
            images passed along with the images become ``pixel_values_hr`` ``(N, 3, f*H, f*W)``;
            with f = 1 they are ignored.
        instruction_rule: which tokens ``instruction_mask`` marks: the strategy's
            ``StrategyNeeds.instruction_span_rule`` (see ``vlmzoo.data.templates.INSTRUCTION_SPAN_RULES``).
        visual_tokens_first: the strategy's ``StrategyNeeds.visual_tokens_first``: each sample's
            image tokens open its sequence (before BOS, after left padding) and the ``<image>``
            placeholders leave the text.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any | None = None,
        text_tokenizer: Any | None = None,
        template: str | ConversationTemplate = "vicuna_v1",
        image_token: str = DEFAULT_IMAGE_TOKEN,
        num_visual_tokens: int = 576,
        text_max_length: int = 77,
        pad_to_square: bool = True,
        high_res_factor: int = 1,
        instruction_rule: InstructionSpanRule = "first_user_text",
        visual_tokens_first: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor if image_processor is not None else make_image_processor()
        self.text_tokenizer = text_tokenizer
        self.template = get_template(template)
        self.image_token = image_token
        self.num_visual_tokens = int(num_visual_tokens)
        self.text_max_length = int(text_max_length)
        self.pad_to_square = bool(pad_to_square)
        if int(high_res_factor) != high_res_factor or high_res_factor < 1:
            raise ValueError(f"high_res_factor must be an integer >= 1, got {high_res_factor!r}.")
        self.high_res_factor = int(high_res_factor)
        # Validates that the image token and the template's markers are single tokens, and the rule.
        self.encoder = TemplateEncoder(
            tokenizer, self.template, image_token, self.num_visual_tokens, instruction_rule, visual_tokens_first
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
        num_visual_tokens: int | None = None,
        high_res_factor: int | None = None,
        **kwargs: Any,
    ) -> "VLMProcessor":
        """A processor matching a model (or its ``VLMConfig``).

        From a model: ``num_visual_tokens`` is ``model.strategy.num_visual_tokens``, the settings
        of :func:`processor_options` (``high_res_factor``, ``instruction_rule``,
        ``visual_tokens_first``) come from ``model.strategy.needs`` and the image processor
        follows ``model.vision_tower`` (size, mean, std). From a config the strategy is not built,
        so ``num_visual_tokens`` must be given (and those settings, when the strategy's differ from
        the defaults); the image size comes from ``config.vision_config["image_size"]``. The tokenizer must map ``config.image_token`` to
        ``config.image_token_id``. ``text_max_length`` defaults to the model's text encoder limit
        (at most 77). Remaining ``kwargs`` go to the constructor.
        """
        is_model = hasattr(model_or_config, "config")
        config = model_or_config.config if is_model else model_or_config
        strategy = getattr(model_or_config, "strategy", None) if is_model else None
        tower = getattr(model_or_config, "vision_tower", None) if is_model else None
        if num_visual_tokens is None:
            if strategy is None:
                raise ValueError(
                    "VLMProcessor.for_model got a config, whose strategy is not built: pass num_visual_tokens=... "
                    "(or pass the model itself)."
                )
            num_visual_tokens = strategy.num_visual_tokens
        elif strategy is not None and strategy.num_visual_tokens != num_visual_tokens:
            raise ValueError(f"num_visual_tokens={num_visual_tokens} differs from the model strategy's {strategy.num_visual_tokens}.")
        needs = getattr(strategy, "needs", None)
        if needs is not None:
            if high_res_factor is not None and high_res_factor != needs.high_res_factor:
                raise ValueError(f"high_res_factor={high_res_factor} differs from the model strategy's {needs.high_res_factor}.")
            high_res_factor = needs.high_res_factor
            for key, value in processor_options(needs).items():
                if key != "high_res_factor" and kwargs.setdefault(key, value) != value:
                    raise ValueError(f"{key}={kwargs[key]!r} differs from the model strategy's {value!r}.")
        if strategy is not None and strategy.needs.instruction_text and text_tokenizer is None:
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
            if tower is not None:
                image_processor = make_image_processor(tower.image_size, tower.image_mean, tower.image_std)
            else:
                spec = config.vision_config or {}
                if "image_size" not in spec:
                    raise ValueError("config.vision_config has no 'image_size': pass image_processor=...")
                siglip = str(spec.get("model_type", "")).startswith("siglip")
                stats = ((0.5,) * 3, (0.5,) * 3) if siglip else (CLIP_MEAN, CLIP_STD)
                image_processor = make_image_processor(spec["image_size"], *stats)
        return cls(
            tokenizer,
            image_processor=image_processor,
            text_tokenizer=text_tokenizer,
            template=template,
            image_token=image_token,
            num_visual_tokens=num_visual_tokens,
            high_res_factor=1 if high_res_factor is None else high_res_factor,
            **kwargs,
        )

    # ---- pieces ------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.encoder.image_token_id

    @property
    def instruction_rule(self) -> InstructionSpanRule:
        return self.encoder.instruction_rule  # type: ignore[return-value]

    @property
    def visual_tokens_first(self) -> bool:
        return self.encoder.visual_tokens_first

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, H, W)`` of one processed image."""
        crop = getattr(self.image_processor, "crop_size", None)
        size = crop if getattr(self.image_processor, "do_center_crop", False) and crop else self.image_processor.size
        return 3, int(size["height"]), int(size["width"])

    @property
    def high_res_shape(self) -> tuple[int, int, int]:
        """``(3, f*H, f*W)`` of one processed high-res image."""
        _, h, w = self.image_shape
        return 3, self.high_res_factor * h, self.high_res_factor * w

    def encode(
        self, messages: Messages, max_length: int | None = None, add_generation_prompt: bool = False
    ) -> EncodedConversation:
        """Tokenise one conversation with the processor's template (see :class:`TemplateEncoder`)."""
        return self.encoder.encode(messages, max_length=max_length, add_generation_prompt=add_generation_prompt)

    def preprocess_images(self, images: Sequence[Image.Image], high_res: bool = False) -> torch.Tensor:
        """PIL images -> ``(N, 3, H, W)`` float pixel values (``N`` may be 0).

        ``high_res=True``: -> ``(N, 3, f*H, f*W)``, the same padding, resizing (every size of the
        image processor times f) and normalisation; an image already of that size is only normalised.
        """
        if high_res and self.high_res_factor == 1:
            raise ValueError("high_res=True needs a processor with high_res_factor > 1.")
        shape = self.high_res_shape if high_res else self.image_shape
        if not images:
            return torch.zeros(0, *shape)
        if self.pad_to_square:
            images = [pad_to_square(im, self.image_processor.image_mean) for im in images]
        fast = self._normalize_only(images, shape)
        if fast is not None:
            return fast
        kwargs = self._high_res_sizes() if high_res else {}
        pixels = self.image_processor(list(images), return_tensors="pt", **kwargs)["pixel_values"]
        if high_res and tuple(pixels.shape[1:]) != shape:
            raise ValueError(
                f"The image processor ({type(self.image_processor).__name__}) made high-res pixel values of "
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

    def _high_res_sizes(self) -> dict[str, dict[str, int]]:
        """The image processor's ``size`` / ``crop_size`` with every edge length times f."""
        f, out = self.high_res_factor, {}
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
        ``pixel_values`` ``(n_i, 3, H, W)`` and ``query_text`` (str), and optionally
        ``pixel_values_hr`` ``(n_i, 3, f*H, f*W)`` (then every sample with images must have it)
        and ``image_keys`` (``n_i`` str).
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
            data["pixel_values"] = torch.cat(pixels)
            with_images = [(i, f) for i, f in enumerate(features) if len(f["pixel_values"])]
            has_hr = [f.get("pixel_values_hr") is not None for _, f in with_images]
            if any(has_hr):
                for (i, f), hr in zip(with_images, has_hr):
                    if not hr or len(f["pixel_values_hr"]) != len(f["pixel_values"]):
                        n_hr = len(f["pixel_values_hr"]) if hr else 0
                        raise ValueError(
                            f"Sample {i} has {len(f['pixel_values'])} image(s) but {n_hr} high-res image(s); "
                            "pixel_values_hr must hold every image of the batch or none."
                        )
                data["pixel_values_hr"] = torch.cat([f["pixel_values_hr"] for _, f in with_images])
            if all("image_keys" in f for _, f in with_images):
                data["image_keys"] = [key for _, f in with_images for key in f["image_keys"]]
            if self.text_tokenizer is not None:
                texts = [f["query_text"] for f in features for _ in range(len(f["pixel_values"]))]
                ids, mask = self.tokenize_instructions(texts)
                data["instruction_input_ids"], data["instruction_attention_mask"] = ids, mask
        return BatchFeature(data=data)

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
            conversations: one conversation (a list of ``{"role", "content"}`` dicts) or a list of them.
            images: per sample, a list of PIL images (one per ``<image>``, in order), a single image,
                or ``None``; for a single conversation, its images directly.
            high_res_images: the same images at high resolution, in the same layout as ``images``
                (``None`` = none): -> ``pixel_values_hr`` when ``high_res_factor`` > 1, ignored otherwise.
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
        use_hr = high_res_images is not None and self.high_res_factor > 1
        if use_hr and len(high_res_images) != len(batch):
            raise ValueError(f"Got {len(batch)} conversations but high-res images for {len(high_res_images)} samples.")

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
                "pixel_values": self.preprocess_images(sample_images),
            }
            if use_hr:
                sample_hr = _image_list(high_res_images[i])
                if len(sample_hr) != len(sample_images):
                    raise ValueError(f"Sample {i} has {len(sample_images)} image(s) but {len(sample_hr)} high-res image(s).")
                feature["pixel_values_hr"] = self.preprocess_images(sample_hr, high_res=True)
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
            "num_visual_tokens": self.num_visual_tokens,
            "text_max_length": self.text_max_length,
            "pad_to_square": self.pad_to_square,
            "high_res_factor": self.high_res_factor,
            "instruction_rule": self.instruction_rule,
            "visual_tokens_first": self.visual_tokens_first,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write tokenizer, image processor, ``text_tokenizer/`` and ``vlm_processor_config.json``.

        Meant to share a directory with the model (no file names collide with the model's).
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
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any) -> "VLMProcessor":
        """Load what :meth:`save_pretrained` wrote (a local directory); ``overrides`` replace config values."""
        config_path = os.path.join(directory, PROCESSOR_CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"No {PROCESSOR_CONFIG_NAME} in {directory!s}; was it saved with VLMProcessor.save_pretrained?")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        config.pop("processor_class", None)
        template = config.pop("template")
        config["template"] = template if isinstance(template, str) else ConversationTemplate.from_dict(template)
        config.update(overrides)
        # The directory's config.json is the VLM's, not the LLM's: let tokenizer_config.json alone
        # pick the tokenizer class (a blank config stops AutoTokenizer from reading config.json).
        text_dir = os.path.join(directory, TEXT_TOKENIZER_SUBFOLDER)
        if "text_tokenizer" not in config and os.path.isdir(text_dir):
            config["text_tokenizer"] = AutoTokenizer.from_pretrained(text_dir, config=PreTrainedConfig())
        if "tokenizer" not in config:
            config["tokenizer"] = AutoTokenizer.from_pretrained(directory, config=PreTrainedConfig())
        if "image_processor" not in config:
            config["image_processor"] = AutoImageProcessor.from_pretrained(directory)
        return cls(**config)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(template={self.template.name!r}, image_token={self.image_token!r}, "
            f"num_visual_tokens={self.num_visual_tokens}, image_shape={self.image_shape}, "
            f"high_res_factor={self.high_res_factor}, instruction_rule={self.instruction_rule!r}, "
            f"visual_tokens_first={self.visual_tokens_first}, "
            f"text_tokenizer={'yes' if self.text_tokenizer is not None else 'no'})"
        )


def _image_list(images: Any) -> list[Image.Image]:
    """A sample's images: ``None`` -> ``[]``, one image -> ``[image]``, a sequence -> a list."""
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    return list(images)


def processor_with_template(processor, template: str | dict[str, Any], pad_to_square: bool | None = None):
    """The same tokenizers and image processing under another conversation template (name or spec);
    ``pad_to_square`` (``None``: the processor's) pads images to a square (True) or lets the image
    processor resize the short side and centre-crop (False)."""
    template = get_template(template)
    if processor.template == template and pad_to_square in (None, processor.pad_to_square):
        return processor
    return VLMProcessor(
        processor.tokenizer,
        image_processor=processor.image_processor,
        text_tokenizer=processor.text_tokenizer,
        template=template,
        image_token=processor.image_token,
        num_visual_tokens=processor.num_visual_tokens,
        text_max_length=processor.text_max_length,
        pad_to_square=processor.pad_to_square if pad_to_square is None else pad_to_square,
        high_res_factor=processor.high_res_factor,
        instruction_rule=processor.instruction_rule,
        visual_tokens_first=processor.visual_tokens_first,
    )
