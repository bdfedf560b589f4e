"""The interface between the shared core and a vision-guidance strategy.

A strategy is an ``nn.Module`` built from its own config dataclass and the core's dimensions
(:class:`CoreDims`). It declares what it needs (:class:`StrategyNeeds`) and how many visual
tokens it produces; the core computes exactly that and calls :meth:`GuidanceStrategy.forward`
with a :class:`GuidanceInputs`. Two kinds fit the same interface:

* input-level strategies (LLaVA, TG-LLaVA, IGVA) return ``visual_embeds`` that replace the
  image placeholder tokens in the LLM's input embeddings;
* in-LLM strategies (TA-LLaVA) also return an ``llm_context`` and list the decoder layers after
  which :meth:`GuidanceStrategy.adapt` must run. The core calls ``adapt`` on the prefill pass
  only (decode steps run the plain LLM on its cache) and passes the context through the
  forward call, never through module state.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .utils import build_dataclass

TextFeatureKind = Literal["pooled", "tokens"]
InstructionSpanRule = Literal["first_user_text", "before_reply_role"]


@dataclass(frozen=True)
class StrategyNeeds:
    """What the core must compute for a strategy.

    Attributes:
        vision_layers: indices into the tower's hidden states (``0`` = embedding output, ``-1`` =
            last layer, as in transformers' ``hidden_states`` tuples).
        drop_cls: drop the CLS token from patch features (it is still given in ``cls``).
        high_res_factor: if > 1, the (normalised) image is upsampled by this factor, cut into
            ``factor**2`` crops of the tower's input size and passed through the tower in one batch.
        high_res_layers: which tower layers to return for the crops.
        instruction_text: which text-encoder outputs of each image's *query* are needed (``()`` =
            no text encoder). The query is the last user message, the question being answered
            (``EncodedConversation.query_text``); it is not the instruction span below.
        instruction_span: the strategy reads the *instruction span*'s token positions in the LLM
            sequence (``instruction_mask``): by default the first user message
            (``instruction_span_rule``).
        instruction_span_rule: which tokens ``instruction_mask`` marks (the processor applies it):
            ``"first_user_text"``: the text of the first user message, nothing else;
            ``"before_reply_role"``: every text token before the role name of the first assistant
            header -- BOS, template markers, a system prompt, the first user turn and the header's
            opening special marker (Gemma: ``<start_of_turn>``); never an image token.
        visual_tokens_first: each sample's visual tokens open its sequence (before BOS, after any
            left padding), images in order, and the ``<image>`` placeholders leave the text; else
            they stand where the placeholders are.
        query_regions: the strategy reads the regions of each image's query (the boxes of the last
            user message, :mod:`vlmzoo.data.regions`) as ``GuidanceInputs.region_mask`` ``(N, P)``,
            a mask over the tower's (square) patch grid; every sample with an image must give them.
    """

    vision_layers: tuple[int, ...] = (-2,)
    drop_cls: bool = True
    high_res_factor: int = 1
    high_res_layers: tuple[int, ...] = (-2,)
    instruction_text: tuple[TextFeatureKind, ...] = ()
    instruction_span: bool = False
    instruction_span_rule: InstructionSpanRule = "first_user_text"
    visual_tokens_first: bool = False
    query_regions: bool = False


@dataclass(frozen=True)
class InputSpec:
    """What a model's inputs must hold: the one description of them that the processor, dataset,
    collator, evaluator and tools read. A strategy derives it (:attr:`GuidanceStrategy.input_spec`),
    the model stores it in ``VLMConfig.input_spec`` (so ``config.json`` carries it) and
    ``VLMProcessor`` builds from it; nothing else keeps a copy.

    Attributes:
        num_visual_tokens: image tokens per ``<image>`` (the processor expands each placeholder to these).
        image_views: the views of each image the model reads, as scales of the tower's input size:
            ``1`` is the base view (``pixel_values``); a scale f > 1 is the picture at f times the
            tower's size, which the core cuts into f x f crops (``pixel_values_hr``; from the base view
            upsampled when not given). At most one scale > 1.
        instruction_text: the text-encoder features of the query read (``()``: no query text is tokenised
            for an encoder).
        instruction_span: the strategy reads ``instruction_mask``.
        instruction_span_rule: which tokens ``instruction_mask`` marks (see :class:`StrategyNeeds`).
        visual_tokens_first: each sample's visual tokens open its sequence (see :class:`StrategyNeeds`).
        query_region_grid: side g of the tower's patch grid onto which the query's regions are
            rasterised (``region_mask`` ``(N, g*g)``); 0: the model reads no regions.
    """

    num_visual_tokens: int
    image_views: tuple[int, ...] = (1,)
    instruction_text: tuple[TextFeatureKind, ...] = ()
    instruction_span: bool = False
    instruction_span_rule: InstructionSpanRule = "first_user_text"
    visual_tokens_first: bool = False
    query_region_grid: int = 0

    def __post_init__(self) -> None:
        if int(self.num_visual_tokens) != self.num_visual_tokens or self.num_visual_tokens < 1:
            raise ValueError(f"InputSpec.num_visual_tokens must be an integer >= 1, got {self.num_visual_tokens!r}.")
        views = tuple(self.image_views)
        if not views or views[0] != 1 or any(int(v) != v or v < 1 for v in views) or len(set(views)) != len(views):
            raise ValueError(f"InputSpec.image_views must start with the base view 1 and list distinct integer "
                             f"scales >= 1, got {self.image_views!r}.")
        if len(views) > 2:
            raise ValueError(f"InputSpec.image_views holds at most one high-res scale, got {self.image_views!r}.")
        if int(self.query_region_grid) != self.query_region_grid or self.query_region_grid < 0:
            raise ValueError(f"InputSpec.query_region_grid must be an integer >= 0, got {self.query_region_grid!r}.")
        object.__setattr__(self, "image_views", tuple(int(v) for v in views))
        object.__setattr__(self, "instruction_text", tuple(self.instruction_text))

    @classmethod
    def from_needs(cls, needs: StrategyNeeds, num_visual_tokens: int, num_patches: int = 0) -> "InputSpec":
        """The spec of a strategy's ``needs``; ``num_patches`` (the tower's P) sets the region grid
        when the strategy reads the query's regions (P must then be a square)."""
        grid = 0
        if needs.query_regions:
            grid = math.isqrt(num_patches)
            if grid < 1 or grid * grid != num_patches:
                raise ValueError(f"A strategy reading the query's regions needs a square patch grid, but the tower has "
                                 f"{num_patches} patches.")
        return cls(
            num_visual_tokens=int(num_visual_tokens),
            image_views=(1,) if needs.high_res_factor == 1 else (1, needs.high_res_factor),
            instruction_text=needs.instruction_text,
            instruction_span=needs.instruction_span,
            instruction_span_rule=needs.instruction_span_rule,
            visual_tokens_first=needs.visual_tokens_first,
            query_region_grid=grid,
        )

    @property
    def high_res_factor(self) -> int:
        """The scale of the crop view, or 1 when the model reads the base view only."""
        return max(self.image_views)

    @property
    def query_regions(self) -> bool:
        """Whether batches carry ``region_mask`` (the query's regions over the patch grid)."""
        return self.query_region_grid > 0

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "input_spec") -> "InputSpec":
        """The inverse of :meth:`to_dict`; unknown or missing keys are errors naming ``where``."""
        if not isinstance(values, dict) or "num_visual_tokens" not in values:
            raise ValueError(f"{where} must be a mapping with 'num_visual_tokens', got {values!r}.")
        return build_dataclass(cls, values, where=where)


def view_key(scale: int) -> str:
    """The batch key of an image view: ``pixel_values`` for the base view (scale 1),
    ``pixel_values_hr`` for the crop view (scale f > 1)."""
    return "pixel_values" if scale == 1 else "pixel_values_hr"


def view_name(scale: int) -> str:
    """How messages name one image of a view: ``"image"`` (base view) or ``"high-res image"``."""
    return "image" if scale == 1 else "high-res image"


@dataclass(frozen=True)
class CoreDims:
    """Sizes of the shared core that a strategy is built against.

    Attributes:
        vision_hidden_size: channels D_v of the tower's hidden states.
        vision_num_patches: patch tokens P per image (CLS excluded).
        vision_num_layers: transformer layers of the tower (hidden states has this + 1 entries).
        vision_has_cls: whether the tower prepends a CLS token.
        text_encoder_hidden_size: D_t of the instruction text encoder, or ``None`` if absent.
        llm_config: the LLM's own config (``hidden_size`` = d_llm, heads, norms, ...).
    """

    vision_hidden_size: int
    vision_num_patches: int
    vision_num_layers: int
    vision_has_cls: bool
    llm_config: Any
    text_encoder_hidden_size: int | None = None

    @property
    def llm_hidden_size(self) -> int:
        return self.llm_config.hidden_size


@dataclass(frozen=True)
class TokenGrid:
    """A run of a strategy's visual tokens laid out row-major over the whole image.

    Token ``start + r * cols + c`` of the strategy's ``num_visual_tokens`` covers the cell in row
    ``r`` (top to bottom) and column ``c`` (left to right) of a ``rows x cols`` grid over the image
    the tower sees; cells need not be square (e.g. 1 x 8-patch strips). Used by attention maps
    (:mod:`vlmzoo_lab.visualize`), never by training.

    Attributes:
        start: index of the grid's first token among the strategy's visual tokens.
        rows / cols: grid shape; the grid holds ``rows * cols`` consecutive tokens.
        label: a short name for plots (e.g. ``"patches"``).
    """

    start: int
    rows: int
    cols: int
    label: str = ""

    def __post_init__(self) -> None:
        if self.start < 0 or self.rows < 1 or self.cols < 1:
            raise ValueError(f"TokenGrid needs start >= 0 and rows, cols >= 1, got {self}.")

    @property
    def size(self) -> int:
        return self.rows * self.cols

    @property
    def stop(self) -> int:
        return self.start + self.size

    def to_map(self, weights: torch.Tensor) -> torch.Tensor:
        """``(..., num_visual_tokens)`` per-token values -> ``(..., rows, cols)``."""
        return weights[..., self.start : self.stop].reshape(*weights.shape[:-1], self.rows, self.cols)


def patch_grid(num_patches: int, start: int = 0, label: str = "patches") -> tuple[TokenGrid, ...]:
    """The tower's P patch tokens (raster order) as a square grid, or ``()`` if P is not a square."""
    side = math.isqrt(num_patches)
    return (TokenGrid(start, side, side, label),) if side * side == num_patches else ()


@dataclass
class VisionFeatures:
    """Tower outputs for the N images of a batch.

    Attributes:
        layers: requested layer -> patch features ``(N, P, D_v)`` (CLS dropped if asked).
        cls: requested layer -> CLS feature ``(N, D_v)``; empty if the tower has no CLS.
        high_res: requested layer -> crop features ``(N, factor**2 * P, D_v)``, crops in
            row-major order (TL, TR, BL, BR for factor 2); empty unless asked for.
    """

    layers: dict[int, torch.Tensor]
    cls: dict[int, torch.Tensor] = field(default_factory=dict)
    high_res: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class InstructionFeatures:
    """Text-encoder features of each image's instruction.

    Attributes:
        pooled: ``(N, D_t)`` pooled instruction embedding, or ``None``.
        tokens: ``(N, L, D_t)`` token features, or ``None``.
        mask: ``(N, L)`` 1 for real tokens, 0 for padding (with ``tokens``).
    """

    pooled: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass
class GuidanceInputs:
    """Everything the core hands a strategy on the prefill pass.

    Attributes:
        vision: tower features of the N images in the batch.
        text: instruction features from the text encoder, if the strategy asked for them.
        image_batch_index: ``(N,)`` which sample (row of ``input_ids``) each image belongs to.
        input_ids: ``(B, T)`` the LLM token ids (image placeholders included).
        attention_mask: ``(B, T)`` 1 = real token, 0 = padding.
        image_token_mask: ``(B, T)`` True at image placeholder positions.
        instruction_mask: ``(B, T)`` True at the instruction span's tokens (``instruction_span_rule``), if asked for.
        llm_embed_tokens: the LLM's input embedding (some strategies embed the instruction with it).
        region_mask: ``(N, P)`` float, 1 at the patches (row-major) whose centre lies in a region of
            the image's query, if asked for (``StrategyNeeds.query_regions``).
    """

    vision: VisionFeatures
    image_batch_index: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_token_mask: torch.Tensor
    text: InstructionFeatures | None = None
    instruction_mask: torch.Tensor | None = None
    llm_embed_tokens: nn.Module | None = None
    region_mask: torch.Tensor | None = None


@dataclass
class StrategyOutput:
    """What a strategy returns.

    Attributes:
        visual_embeds: ``(N, num_visual_tokens, d_llm)``, scattered into the image placeholders.
        llm_context: per-call state for :meth:`GuidanceStrategy.adapt` (in-LLM strategies only).
        aux_loss: a scalar added to the LM loss (e.g. a regulariser), or ``None``.
        extras: tensors a caller may ask for (e.g. IGVA's layer weights ``(N, K)``).
    """

    visual_embeds: torch.Tensor
    llm_context: Any = None
    aux_loss: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ZeroInitEquivalence:
    """An identity a strategy promises; the conformance suite (``tests/test_conformance.py``) checks it.

    With ``overrides`` on its config and freshly initialised, the strategy computes exactly (bit for
    bit) the visual tokens and logits of ``reference`` built with ``reference_overrides``, once every
    weight of that reference model is loaded into it by name. This is what a zero-initialised branch
    or a switched-off module promises: a model started from the reference's checkpoint starts
    exactly where the reference stands.

    Attributes:
        overrides: fields of this strategy's config (e.g. ``{"use_dp": False}``).
        reference: a registered strategy name, or ``None`` for this strategy itself.
        reference_overrides: fields of the reference's config (e.g. ``{"use_allocator": False}``).
    """

    overrides: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None
    reference_overrides: dict[str, Any] = field(default_factory=dict)


ExtraSummary = Literal["mean_by_question_type"]


@dataclass(frozen=True)
class ExtraOutput:
    """An extra tensor a strategy returns in :attr:`StrategyOutput.extras`, and how reports summarise it.

    The comparison study, its report and ``scripts/strategy_extras.py`` handle every declared extra
    by these fields alone (no strategy is named there).

    Attributes:
        key: the key in ``StrategyOutput.extras`` (e.g. ``"layer_weights"``).
        summary: ``"mean_by_question_type"``: the tensor is ``(N, K)`` (one row per image); reports
            give its mean (and std) per eval question type, a table, a CSV column and a bar plot.
        title: what it is, for headings and plots (e.g. ``"layer weights"``).
        component: prefix of the K column names (``w`` -> ``w1 .. wK``).
        description: one line for the CSV column's documentation.
    """

    key: str
    summary: ExtraSummary = "mean_by_question_type"
    title: str = ""
    component: str = "v"
    description: str = ""

    def __post_init__(self) -> None:
        if not self.key.isidentifier():
            raise ValueError(f"ExtraOutput.key must be a Python identifier, got {self.key!r}.")
        if self.summary not in ("mean_by_question_type",):
            raise ValueError(f"ExtraOutput({self.key!r}).summary must be 'mean_by_question_type', got {self.summary!r}.")

    @property
    def heading(self) -> str:
        return self.title or self.key.replace("_", " ")


@dataclass
class StrategyConfig:
    """Base of every strategy's config dataclass; fields must be JSON-serialisable."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class GuidanceStrategy(nn.Module):
    """Base class of all strategies. Subclass it, set ``config_class``, and register it.

    Subclasses implement :attr:`needs`, :attr:`num_visual_tokens` and :meth:`forward`; in-LLM
    strategies also :attr:`adapter_layers` and :meth:`adapt`. Strategies whose tokens sit at image
    positions declare them in :attr:`visual_token_grids` (attention maps use it). A strategy that
    reduces exactly to another one under some config (a zero-initialised branch, a module switched
    off) lists it in :attr:`zero_init_equivalences`. Extras that reports should summarise are listed
    in :attr:`extra_outputs`; run configs shipped with the package sit in :attr:`config_dir`.
    """

    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig
    strategy_name: ClassVar[str] = ""  # set by the registry
    zero_init_equivalences: ClassVar[tuple[ZeroInitEquivalence, ...]] = ()
    #: extras of :attr:`StrategyOutput.extras` that reports summarise (:class:`ExtraOutput`).
    extra_outputs: ClassVar[tuple[ExtraOutput, ...]] = ()
    #: a folder of run configs shipped with the strategy's package (``reference.yaml``, variants),
    #: found exactly as ``configs/<name>/`` is (:func:`vlmzoo.config.strategy_config_files`).
    config_dir: ClassVar[str | os.PathLike | None] = None

    def __init__(self, config: StrategyConfig, dims: CoreDims) -> None:
        super().__init__()
        self.config = config
        self.dims = dims

    @classmethod
    def build_config(cls, values: dict[str, Any] | StrategyConfig | None) -> StrategyConfig:
        """Turn a plain dict into the strategy's config dataclass; unknown keys and values of the
        wrong type are errors naming the field."""
        if isinstance(values, cls.config_class):
            return values
        return build_dataclass(cls.config_class, values, where=f"strategy_config[{cls.strategy_name}]")

    # ---- declarations -------------------------------------------------------------------
    @property
    def needs(self) -> StrategyNeeds:
        return StrategyNeeds()

    @property
    def num_visual_tokens(self) -> int:
        """Tokens this strategy puts in place of one ``<image>`` (the processor expands to this)."""
        raise NotImplementedError

    @property
    def input_spec(self) -> InputSpec:
        """What the model's inputs hold for this strategy (from :attr:`needs` and
        :attr:`num_visual_tokens`); stored in ``VLMConfig.input_spec`` by the model."""
        return InputSpec.from_needs(self.needs, self.num_visual_tokens, self.dims.vision_num_patches)

    @property
    def adapter_layers(self) -> tuple[int, ...]:
        """LLM decoder-layer indices after which :meth:`adapt` runs (prefill only)."""
        return ()

    @property
    def visual_token_grids(self) -> tuple[TokenGrid, ...]:
        """Which of the ``num_visual_tokens`` tokens map to image positions, and how.

        Each :class:`TokenGrid` is a run of tokens covering the whole image as a ``rows x cols``
        grid (runs must not overlap; tokens outside every grid, e.g. learned latents, are not
        spatial). Default ``()``: no token maps to an image position (e.g. a learned prefix), so
        no attention map can be drawn. A patch-per-token strategy returns
        ``patch_grid(self.dims.vision_num_patches)``.
        """
        return ()

    def module_groups(self) -> dict[str, nn.Module]:
        """Named parameter groups that training stages freeze, train or give their own lr.

        Default: every direct child module under its attribute name.
        """
        return dict(self.named_children())

    # ---- computation ----------------------------------------------------------------------
    def forward(self, inputs: GuidanceInputs) -> StrategyOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def adapt(self, layer_idx: int, hidden_states: torch.Tensor, context: Any) -> torch.Tensor:
        """Update ``hidden_states`` ``(B, T, d_llm)`` after LLM layer ``layer_idx`` (in-LLM only)."""
        raise NotImplementedError(f"{type(self).__name__} lists adapter layers but does not implement adapt().")

