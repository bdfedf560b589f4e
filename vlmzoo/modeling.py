"""``VLMForConditionalGeneration``: the shared core every strategy plugs into.

Data path (prefill pass, i.e. when ``pixel_values`` are given)::

    pixel_values (N, 3, H, W) --tower--> hidden states --select--> VisionFeatures
    instruction ids (N, L)   --text encoder (if the strategy asks)--> InstructionFeatures
    strategy(GuidanceInputs) --> visual_embeds (N, T_v, d_llm) [+ llm_context for in-LLM adapters]
    LLM input embeddings: image placeholder positions <- visual_embeds (masked_scatter)
    LLM forward (decoder-layer hooks call strategy.adapt on the prefill pass only) --> logits, loss

Decode steps (``pixel_values`` absent, cache present) run the plain LLM on its cache.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput

from .configuration import VLMConfig
from . import lora
from .feature_cache import FeatureCaches, InstructionFeatureCache, VisionFeatureCache
from .registry import get_strategy_class
from .strategy import CoreDims, GuidanceInputs, GuidanceStrategy, InstructionFeatures, StrategyNeeds, VisionFeatures
from .towers.text import build_text_encoder
from .towers.vision import VisionTower, build_vision_tower

logger = logging.getLogger(__name__)

ADAPTER_CONTEXT_KWARG = "vlm_adapter_context"
# Inputs only the prefill pass consumes; generate() drops them on decode steps.
PREFILL_ONLY_INPUTS = ("pixel_values", "pixel_values_hr", "instruction_input_ids", "instruction_attention_mask", "instruction_mask",
                       "region_mask")


@dataclass
class VLMCausalLMOutputWithPast(ModelOutput):
    """Output of :class:`VLMForConditionalGeneration`.

    Attributes:
        loss: LM loss (+ the strategy's auxiliary loss), when ``labels`` are given.
        logits: ``(B, T, vocab)``.
        past_key_values: the LLM's KV cache.
        hidden_states / attentions: the LLM's, when asked for.
        image_hidden_states: ``(N, T_v, d_llm)`` the strategy's visual tokens (prefill only).
        strategy_extras: the strategy's extra tensors (e.g. layer weights) when
            ``output_strategy_extras=True``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None
    strategy_extras: dict[str, torch.Tensor] | None = None


class VLMPreTrainedModel(PreTrainedModel):
    config: VLMConfig
    config_class = VLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # Sub-models (LLM, HF towers) are dispatched to their own _init_weights by transformers;
        # everything else (strategy modules, timm/open_clip towers) uses its own reset_parameters,
        # which is where a strategy puts special inits (zero-init branches, N(0, 0.02) latents).
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


class VLMForConditionalGeneration(VLMPreTrainedModel, GenerationMixin):
    """A LLaVA-style VLM whose vision guidance is a registered :class:`GuidanceStrategy`.

    Submodules: ``vision_tower``, optional ``text_encoder``, ``strategy``, ``language_model``
    (any ``AutoModelForCausalLM``).
    """

    def __init__(self, config: VLMConfig) -> None:
        super().__init__(config)
        _check_attn_implementation(config.llm_attn_implementation)
        strategy_cls = get_strategy_class(config.strategy)  # an unknown name fails before any weight is made
        self.vision_tower: VisionTower = build_vision_tower(config.vision_config)
        self.language_model = AutoModelForCausalLM.from_config(
            config.text_config, attn_implementation=_llm_attn_implementation(config)
        )
        self.text_encoder = None
        if config.text_encoder_config is not None:
            self.text_encoder = build_text_encoder(config.text_encoder_config)
        self.strategy: GuidanceStrategy = strategy_cls(config.get_strategy_config(), self._core_dims())
        self._check_strategy_fits()
        # The one record of what the inputs hold; processors and data pipelines build from it.
        config.input_spec = self.strategy.input_spec.to_dict()
        self._adapter_hooks: list[Any] = []
        self._install_adapter_hooks()
        self._freeze_towers()
        self.post_init()

    # ---- construction helpers ------------------------------------------------------------
    def _core_dims(self) -> CoreDims:
        tower = self.vision_tower
        return CoreDims(
            vision_hidden_size=tower.hidden_size,
            vision_num_patches=tower.num_patches,
            vision_num_layers=tower.num_layers,
            vision_has_cls=tower.has_cls,
            llm_config=self.config.text_config,
            text_encoder_hidden_size=None if self.text_encoder is None else self.text_encoder.hidden_size,
        )

    def _check_strategy_fits(self) -> None:
        needs = self.strategy.needs
        if needs.instruction_text and self.text_encoder is None:
            raise ValueError(
                f"Strategy {self.config.strategy!r} needs instruction text features {needs.instruction_text}, "
                "but the config has no text_encoder_config."
            )
        n_states = self.vision_tower.num_layers + 1
        for layer in (*needs.vision_layers, *needs.high_res_layers):
            if not -n_states <= layer < n_states:
                raise ValueError(
                    f"Strategy {self.config.strategy!r} asks for vision layer {layer}, but the tower has "
                    f"{n_states} hidden states (indices {-n_states}..{n_states - 1})."
                )

    def _freeze_towers(self) -> None:
        if self.config.freeze_vision_tower:
            self.vision_tower.requires_grad_(False)
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(False)

    def _install_adapter_hooks(self) -> None:
        """Hook the decoder layers the strategy adapts after; the LLM's modules and config stay untouched."""
        for handle in self._adapter_hooks:
            handle.remove()
        self._adapter_hooks = []
        if not self.strategy.adapter_layers:
            return
        layers = decoder_layers(self.language_model)
        for idx in self.strategy.adapter_layers:
            if not 0 <= idx < len(layers):
                raise ValueError(f"Strategy adapter layer {idx} is outside the LLM's {len(layers)} layers.")
            self._adapter_hooks.append(layers[idx].register_forward_hook(self._make_adapter_hook(idx), with_kwargs=True))

    def _make_adapter_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            context = kwargs.get(ADAPTER_CONTEXT_KWARG)
            if context is None:  # decode step, or a plain LLM call
                return None
            if isinstance(output, tuple):
                return (self.strategy.adapt(layer_idx, output[0], context), *output[1:])
            return self.strategy.adapt(layer_idx, output, context)

        return hook

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, load_adapter: bool = True, **kwargs):
        """transformers' ``from_pretrained``; a folder that holds a LoRA adapter (``lora/``, see
        :mod:`vlmzoo.lora`) gets it attached (peft needed, else an error saying so) unless
        ``load_adapter=False``. A merged folder (``scripts/merge_lora.py``) is a plain model."""
        result = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if load_adapter and os.path.isdir(str(pretrained_model_name_or_path)):
            lora.attach_saved(result[0] if isinstance(result, tuple) else result, pretrained_model_name_or_path)
        return result

    @classmethod
    def from_components(
        cls,
        config: VLMConfig,
        vision_tower: VisionTower,
        language_model: PreTrainedModel,
        text_encoder: nn.Module | None = None,
    ) -> VLMForConditionalGeneration:
        """Assemble a model from pretrained parts (loaded by name or path); the strategy is fresh.

        The skeleton is built on the meta device, so no memory is spent on weights that are
        replaced; only the strategy's parameters are materialised and initialised.
        """
        with torch.device("meta"):
            model = cls(config)
        model.vision_tower = vision_tower
        model.language_model = language_model
        model.text_encoder = text_encoder
        device = next(language_model.parameters()).device
        model.strategy.to_empty(device=device)
        for module in model.strategy.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        model._install_adapter_hooks()
        model._freeze_towers()
        return model

    # ---- embeddings (GenerationMixin / Trainer conventions) ------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ---- vision and text ------------------------------------------------------------------
    def encode_images(
        self,
        pixel_values: torch.Tensor,
        needs: StrategyNeeds | None = None,
        pixel_values_hr: torch.Tensor | None = None,
        image_keys: Sequence[str] | None = None,
        cache: VisionFeatureCache | None = None,
    ) -> VisionFeatures:
        """``(N, 3, H, W)`` -> the features ``needs`` asks for (see :class:`VisionFeatures`).

        With a high-res factor f, the crops are cut from ``pixel_values_hr`` ``(N, 3, f*H, f*W)``
        when given (an image resized to f times the tower's size), else from ``pixel_values``
        upsampled x f (TG-LLaVA's reference); all crops go through the tower in one batched pass.
        Tower passes stop at the deepest layer asked for. With a ``cache`` and the tower frozen,
        images seen before are not encoded again (keyed by ``image_keys``, the N images' files,
        when given); a tower that trains bypasses the cache.
        """
        needs = needs or self.strategy.needs
        track_grad = torch.is_grad_enabled() and not self.config.freeze_vision_tower
        if cache is not None and not track_grad:
            compute = functools.partial(self._encode_images, needs=needs, track_grad=False)
            return cache.encode(compute, needs, pixel_values, pixel_values_hr, image_keys)
        return self._encode_images(pixel_values, pixel_values_hr, needs=needs, track_grad=track_grad)

    def _encode_images(
        self, pixel_values: torch.Tensor, pixel_values_hr: torch.Tensor | None, *, needs: StrategyNeeds, track_grad: bool
    ) -> VisionFeatures:
        tower = self.vision_tower
        n_states = tower.num_layers + 1
        factor = needs.high_res_factor
        layers = [layer % n_states for layer in needs.vision_layers]
        hr_layers = [layer % n_states for layer in needs.high_res_layers] if factor > 1 else []
        pixel_values = pixel_values.to(dtype=self.vision_dtype)
        n = pixel_values.shape[0]
        features = VisionFeatures(layers={}, cls={})
        with torch.set_grad_enabled(track_grad):
            states = tower(pixel_values, num_states=max(layers) + 1)
            for requested, layer in zip(needs.vision_layers, layers):
                features.layers[requested] = _patch_tokens(states[layer], tower.has_cls, needs.drop_cls)
                if tower.has_cls:
                    features.cls[requested] = states[layer][:, 0]
            if factor > 1:
                # A pass of its own: the base features stay bit-identical to a strategy without crops.
                source = None if pixel_values_hr is None else pixel_values_hr.to(dtype=self.vision_dtype)
                crop_states = tower(high_res_crops(pixel_values, factor, source), num_states=max(hr_layers) + 1)
                for requested, layer in zip(needs.high_res_layers, hr_layers):
                    patches = _patch_tokens(crop_states[layer], tower.has_cls, drop_cls=True)  # (N * f^2, P, D_v)
                    features.high_res[requested] = patches.reshape(n, factor * factor * patches.shape[1], -1)
        return features

    def encode_instructions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: InstructionFeatureCache | None = None
    ) -> InstructionFeatures:
        """``(N, L)`` instruction ids (right padded) -> the frozen text encoder's features; through
        ``cache`` when given. ``attention_mask`` ``None`` means every token is real; it reaches the
        encoder as ``None`` (a meta-device FLOP count has no mask values to read)."""
        with torch.no_grad():
            if cache is not None:
                mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
                return cache.encode(self.text_encoder, input_ids, mask)
            return self.text_encoder(input_ids, attention_mask)

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    # ---- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        pixel_values_hr: torch.FloatTensor | None = None,
        image_keys: Sequence[str] | None = None,
        feature_caches: FeatureCaches | None = None,
        output_strategy_extras: bool = False,
        region_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> VLMCausalLMOutputWithPast:
        r"""
        Args:
            input_ids: ``(B, T)``; each image is ``num_visual_tokens`` copies of ``config.image_token_id``.
            pixel_values: ``(N, 3, H, W)``, one per image placeholder run, in row-major order.
            attention_mask: ``(B, T)``, 1 for real tokens (left or right padding).
            labels: ``(B, T)``, -100 where no loss is taken.
            instruction_input_ids / instruction_attention_mask: ``(N, L)`` the instruction of each
                image's sample, in the text encoder's vocabulary (strategies that need text features).
            instruction_mask: ``(B, T)`` True at the instruction's tokens (strategies that need the span).
            pixel_values_hr: ``(N, 3, f*H, f*W)`` the images at f times the tower's size, for strategies
                with a high-res factor f (else their crops come from ``pixel_values`` upsampled).
            image_keys: N str, the files each image was read from: the keys of the vision feature
                cache (training); ignored without one.
            feature_caches: memos of the frozen encoders' features (:mod:`vlmzoo.feature_cache`),
                owned by the caller (a training run); read and filled on this call only.
            output_strategy_extras: return the strategy's extra tensors (e.g. layer weights).
            region_mask: ``(N, P)`` the regions of each image's query over the tower's patch grid
                (strategies that read them; the VLMProcessor makes it for such a model).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        is_prefill = past_key_values is None or past_key_values.get_seq_length() == 0

        strategy_out = None
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids to locate the image placeholder tokens.")
            strategy_out = self._run_strategy(
                input_ids, pixel_values, attention_mask, instruction_input_ids, instruction_attention_mask,
                instruction_mask, pixel_values_hr, image_keys, feature_caches, region_mask,
            )
            image_mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
            visual = strategy_out.visual_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, visual)
            if is_prefill and strategy_out.llm_context is not None:
                kwargs[ADAPTER_CONTEXT_KWARG] = strategy_out.llm_context
        elif is_prefill and input_ids is not None and (input_ids == self.config.image_token_id).any():
            n = int((input_ids == self.config.image_token_id).sum())
            raise ValueError(f"input_ids contain {n} image tokens (id {self.config.image_token_id}) but no pixel_values were given.")

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        loss = outputs.loss
        if loss is not None and strategy_out is not None and strategy_out.aux_loss is not None:
            loss = loss + strategy_out.aux_loss
        if loss is not None and strategy_out is None and self.training:
            loss = loss + self._zero_strategy_term()
        return VLMCausalLMOutputWithPast(
            loss=loss,
            logits=outputs.logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=None if strategy_out is None else strategy_out.visual_embeds,
            strategy_extras=strategy_out.extras if (strategy_out is not None and output_strategy_extras) else None,
        )

    def _zero_strategy_term(self) -> torch.Tensor:
        """0 x the sum of the strategy's trainable parameters, for a batch of text-only samples.

        The strategy does not run without images, so its parameters would get no gradient; under
        DDP or ZeRO every rank must reduce the same parameters. TG-LLaVA's and LLaVA's reference
        feed a zero image whose features are then dropped; this gives the same exact-zero gradient
        without running the towers.
        """
        params = [p for p in self.strategy.parameters() if p.requires_grad]
        if not params:
            return torch.zeros((), device=self.device)
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    def _run_strategy(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        instruction_input_ids: torch.Tensor | None,
        instruction_attention_mask: torch.Tensor | None,
        instruction_mask: torch.Tensor | None,
        pixel_values_hr: torch.Tensor | None = None,
        image_keys: Sequence[str] | None = None,
        caches: FeatureCaches | None = None,
        region_mask: torch.Tensor | None = None,
    ):
        needs = self.strategy.needs
        caches = caches or FeatureCaches()
        image_token_mask = input_ids == self.config.image_token_id
        image_batch_index = self._image_batch_index(image_token_mask, pixel_values.shape[0])
        text = None
        if needs.instruction_text:
            if instruction_input_ids is None:
                raise ValueError(
                    f"Strategy {self.config.strategy!r} needs instruction text: pass instruction_input_ids "
                    "(the VLMProcessor produces them when it has a text tokenizer)."
                )
            text = self.encode_instructions(instruction_input_ids, instruction_attention_mask, caches.text)
        if needs.instruction_span and instruction_mask is None:
            raise ValueError(f"Strategy {self.config.strategy!r} needs instruction_mask (from the VLMProcessor).")
        if needs.query_regions:
            region_mask = self._checked_region_mask(region_mask, pixel_values.shape[0])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if needs.visual_tokens_first and attention_mask.dim() == 2:
            _check_visual_tokens_first(image_token_mask, attention_mask, self.config.strategy)
        inputs = GuidanceInputs(
            vision=self.encode_images(pixel_values, needs, pixel_values_hr, image_keys, caches.vision),
            image_batch_index=image_batch_index,
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_token_mask=image_token_mask,
            text=text,
            instruction_mask=instruction_mask,
            llm_embed_tokens=self.get_input_embeddings(),
            region_mask=region_mask if needs.query_regions else None,
        )
        out = self.strategy(inputs)
        expected = (pixel_values.shape[0], self.strategy.num_visual_tokens, self.config.text_config.hidden_size)
        if tuple(out.visual_embeds.shape) != expected:
            raise RuntimeError(
                f"Strategy {self.config.strategy!r} returned visual_embeds of shape {tuple(out.visual_embeds.shape)}, "
                f"expected {expected} (images, num_visual_tokens, LLM hidden size)."
            )
        return out

    def _checked_region_mask(self, region_mask: torch.Tensor | None, num_images: int) -> torch.Tensor:
        """The ``(N, P)`` region mask a strategy reading the query's regions needs, checked."""
        expected = (num_images, self.vision_tower.num_patches)
        if region_mask is None:
            raise ValueError(f"Strategy {self.config.strategy!r} reads the query's regions: pass region_mask {expected} "
                             "(the VLMProcessor makes it from the last user message's 'regions').")
        if tuple(region_mask.shape) != expected:
            raise ValueError(f"region_mask has shape {tuple(region_mask.shape)}; expected {expected} "
                             "(images, the tower's patches).")
        return region_mask

    def _image_batch_index(self, image_token_mask: torch.Tensor, num_images: int) -> torch.Tensor:
        """Check placeholder counts against the images given; -> ``(N,)`` sample index per image."""
        per_image = self.strategy.num_visual_tokens
        counts = image_token_mask.sum(dim=1)
        total = int(counts.sum())
        if total != num_images * per_image:
            raise ValueError(
                f"Image features and image tokens do not match: input_ids hold {total} image tokens, but "
                f"{num_images} image(s) x {per_image} visual tokens per image (strategy {self.config.strategy!r}) "
                f"= {num_images * per_image} are needed. Expand each <image> with the VLMProcessor of this model."
            )
        bad = (counts % per_image) != 0
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"Sample {row} holds {int(counts[row])} image tokens, not a multiple of the strategy's "
                f"{per_image} visual tokens per image."
            )
        return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts // per_image)

    # ---- generation -------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, *args: Any, is_first_iteration: bool | None = False, **kwargs: Any):
        use_cache = kwargs.get("use_cache", True)
        if not is_first_iteration and use_cache is not False:
            for key in PREFILL_ONLY_INPUTS:
                kwargs.pop(key, None)
        elif kwargs.get("instruction_mask") is not None:
            # Without a cache every step re-reads the whole sequence: generated tokens are not instruction.
            input_ids = args[0] if args else kwargs["input_ids"]
            mask = kwargs["instruction_mask"]
            kwargs["instruction_mask"] = F.pad(mask, (0, input_ids.shape[1] - mask.shape[1]), value=False)
        return super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)


def _check_visual_tokens_first(image_token_mask: torch.Tensor, attention_mask: torch.Tensor, strategy: str) -> None:
    """``(B, T)`` masks: every row's image tokens must be its first real tokens (after left padding)."""
    start = attention_mask.long().argmax(dim=1, keepdim=True)  # first real token (0 with right padding)
    position = torch.arange(image_token_mask.shape[1], device=image_token_mask.device)[None, :]
    expected = (position >= start) & (position < start + image_token_mask.sum(dim=1, keepdim=True))
    bad = (expected != image_token_mask).any(dim=1)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"Strategy {strategy!r} puts its visual tokens at the start of the sequence "
            f"(StrategyNeeds.visual_tokens_first), but sample {row}'s image tokens are not its first tokens. "
            "Build the processor for this model: VLMProcessor.for_model(model, ...)."
        )


def _patch_tokens(states: torch.Tensor, has_cls: bool, drop_cls: bool) -> torch.Tensor:
    return states[:, 1:] if (has_cls and drop_cls) else states


def high_res_crops(pixel_values: torch.Tensor, factor: int, high_res: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N * factor**2, 3, H, W)``: a ``factor x factor`` grid of crops in
    row-major order (TL, TR, BL, BR for factor 2) of ``high_res`` ``(N, 3, factor*H, factor*W)``, or,
    without it, of ``pixel_values`` upsampled x ``factor`` (bilinear)."""
    n, c, h, w = pixel_values.shape
    if high_res is None:
        big = F.interpolate(pixel_values, scale_factor=factor, mode="bilinear", align_corners=False)
    elif tuple(high_res.shape) != (n, c, factor * h, factor * w):
        raise ValueError(
            f"pixel_values_hr has shape {tuple(high_res.shape)}; expected {(n, c, factor * h, factor * w)} "
            f"(the images of pixel_values at {factor}x the tower's size)."
        )
    else:
        big = high_res
    crops = big.reshape(n, c, factor, h, factor, w).permute(0, 2, 4, 1, 3, 5)
    return crops.reshape(n * factor * factor, c, h, w)


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (``model.layers`` for Llama, Qwen2, Gemma2, ...)."""
    base = getattr(language_model, language_model.base_model_prefix, language_model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"Cannot find decoder layers in {type(language_model).__name__}: expected "
            f"`{language_model.base_model_prefix}.layers` to be an nn.ModuleList."
        )
    return layers


def _llm_attn_implementation(config: VLMConfig) -> str:
    """The configured attention, except that an LLM class without SDPA support (e.g. Gemma-2,
    whose logit soft-capping SDPA cannot express) falls back to eager with a log line."""
    name = config.llm_attn_implementation
    llm_cls = AutoModelForCausalLM._model_mapping[type(config.text_config)]
    if name == "sdpa" and not getattr(llm_cls, "_supports_sdpa", False):
        logger.info("%s does not support SDPA attention; using eager attention.", llm_cls.__name__)
        return "eager"
    return name


def _check_attn_implementation(name: str) -> None:
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "llm_attn_implementation='flash_attention_2' needs the flash-attn package, which is not installed "
            "(it needs a CUDA GPU: `pip install flash-attn --no-build-isolation`). Use 'sdpa' (the default) instead."
        )
    if name not in ("sdpa", "eager", "flash_attention_2", "flex_attention"):
        raise ValueError(
            f"Unknown llm_attn_implementation {name!r}; choose 'sdpa', 'eager', 'flash_attention_2' or 'flex_attention'."
        )
