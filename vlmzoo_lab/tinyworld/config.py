"""``TinyWorldConfig``: every knob of the tiny world (data, tower pretraining, LLM pretraining).

The whole build is a pure function of this config (and :data:`FORMAT_VERSION`), so its hash
keys the on-disk cache: change any field and the world is rebuilt. The pretrained towers depend on
every field except the :data:`DATA_ONLY_FIELDS`, which shape only files no tower is pretrained on:
:meth:`TinyWorldConfig.towers_hash` leaves them out, so the towers shipped with the package serve
every world that differs from theirs only there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from vlmzoo.utils import build_dataclass

#: Bump when a code change alters what a given config builds (invalidates every cached world).
FORMAT_VERSION = 2

#: Fields of :class:`TinyWorldConfig` that change only data the towers are not pretrained on (the
#: stage-1 caption file: the tiny CLIP's contrastive captions and the tiny Llama's corpus are made
#: from the scenes without them); :meth:`TinyWorldConfig.towers_hash` ignores them.
DATA_ONLY_FIELDS: tuple[str, ...] = ("caption_details", "caption_order")

#: Values of :attr:`TinyWorldConfig.caption_order`.
CAPTION_ORDERS: tuple[str, ...] = ("row_major", "shuffled")


@dataclass(frozen=True)
class TinyClipConfig:
    """Tiny CLIP tower and its stage-0 pretraining (contrastive + per-patch auxiliary heads).

    Attributes:
        vision_hidden_size, vision_layers, vision_heads: ViT width / depth / heads.
        text_hidden_size, text_layers, text_heads: text transformer width / depth / heads.
        projection_dim: shared image-text embedding size.
        max_text_positions: text context (77 as in CLIP, so TG-LLaVA's truncation rule holds).
        steps, batch_size, lr, warmup_frac, weight_decay: optimisation.
        aux_weight: weight of the per-patch classifiers on hidden_states[-2] (base view).
        hires_images_per_step: images per step whose four 2x crops also get the per-patch
            heads (cell colour/shape + fine mark); teaches the tower the zoomed-in scale.
        hires_weight: weight of the crop losses.
        shade_layer: hidden state (index into ``hidden_states``, 1 = after the first block) whose
            patches get a per-cell light/dark classifier (worlds with ``shades``): low-level
            evidence in an early layer.
        shade_invariance_weight: weight of a shade-invariance loss on the patches of the
            ``shade_invariance_layers``: each of ``shade_twins_per_step`` images is also encoded
            with every object's shade swapped, and the squared difference of the two images'
            patch features (relative to their variance) is penalised, so those deep layers lose
            shade as deep layers of a real tower lose low-level detail (0 = off).
        shade_invariance_layers: hidden states made shade-invariant (-2: the layer LLaVA reads).
        shade_twins_per_step: images per step encoded with shades swapped.
    """

    vision_hidden_size: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    projection_dim: int = 128
    max_text_positions: int = 77
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    hires_images_per_step: int = 24
    hires_weight: float = 1.0
    shade_layer: int = 1
    shade_invariance_weight: float = 2.0
    shade_invariance_layers: tuple[int, ...] = (-2, -1)
    shade_twins_per_step: int = 32


@dataclass(frozen=True)
class TinyLLMConfig:
    """Tiny Llama and its text pretraining on context-grounded world text.

    Attributes:
        hidden_size, layers, heads, intermediate_size, max_positions: model shape.
        steps, batch_size, lr, warmup_frac, weight_decay: optimisation (linear warm-up, cosine decay).
        continue_steps, continue_lr: then a warm restart: pretraining continues this many steps on
            fresh documents, with a new optimiser and a new warm-up/cosine cycle peaking at
            ``continue_lr`` (0 steps = none, the first two worlds' LLM). The longer-read LLM copies
            answers from its context more reliably, which the VLM's baseline needs (docs/tiny_world.md).
        max_len: documents are cut to this many tokens.
        max_embedding_cosine: the built LLM must keep the words that questions are made of
            (colour and shape names) apart: mean pairwise input-embedding cosine in each such
            group below this, or the build fails.
    """

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 512
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.0
    continue_steps: int = 2000
    continue_lr: float = 1e-3
    max_len: int = 128
    max_embedding_cosine: float = 0.5


@dataclass(frozen=True)
class TinyWorldConfig:
    """The tiny world: grid-aligned scenes of coloured shapes, questions, and tiny pretrained towers.

    Geometry: images are *rendered and stored* at ``image_size * hires_factor`` px (96 by
    default); the tower sees them at ``image_size`` (48) with patch = cell = ``image_size //
    grid`` px (12), so each grid cell is exactly one visual token. Fine marks are 1-px
    patterns at the stored resolution whose 2x2 block means are identical for every mark kind:
    downsampling to ``image_size`` erases them, the 2x crops keep them.

    Attributes:
        seed: master seed; everything (images, questions, weights) is deterministic from it.
        image_size: base (tower) resolution in px.
        hires_factor: stored resolution = ``image_size * hires_factor``; the fine marks need it.
        grid: cells per side (cell names: column letter a.. + row number 1.., e.g. ``b3``).
        min_objects, max_objects: objects per image (at most one per cell).
        colours: colour names -> RGB.
        shapes: shape names (circle, square, triangle, cross are drawable).
        marks: fine-mark kinds (1-px patterns inside each object).
        shades: object shade kinds (``light``: blended towards white, ``dark``: towards black, by
            ``shade_strength``); ``()`` = no shades and no ``shade`` questions (the first world).
        shade_strength: blend fraction of the shades (0..1); smaller is harder.
        max_count: count answers range over 0..max_count (balanced).
        popularity_exponent: object-kind prior ~ (rank + 1) ** -exponent over a seeded ranking
            of the colour x shape kinds, so "popular" POPE negatives are meaningful.
        popular_top_k: POPE "popular" negatives come from the top-k kinds of that ranking.
        radius_range: object radius as a fraction of the cell size.
        max_offset: object centre jitter in stored px.
        colour_jitter: per-object RGB jitter (+-) in 0..255 units.
        mark_size: side of the mark square in stored px (even).
        n_train_images: images for stage 1 (captions) and stage 2 (questions).
        n_caption_images: stage-1 captions use the first this-many train images (<= n_train).
        caption_details: stage-1 captions also name each object's shade and fine mark
            (``"light red circle at b3 with checkered pattern"``), so stage 1 already trains
            reading them from any visual token that carries them; ``False``: colour, shape and cell
            only. The base view does not show the marks and layer -2 is nearly blind to shade, so
            for ``llava`` those words stay guesses; strategies that see the 2x crops or the early
            layers can learn them (docs/tiny_world.md has the measurements).
        caption_order: order of the objects in a stage-1 caption: ``shuffled`` (a fixed random
            order per image), in which a caption can name an object's cell only by reading it off
            that object's visual token, never by scanning the grid; or ``row_major`` (reading order).
        max_turns: stage-2 records have 1..max_turns Q/A turns (turn-count weights below).
        turn_weights: relative frequency of 1, 2, ... max_turns turns.
        n_text_only: stage-2 text-only records (caption in the text, no image).
        n_eval_per_type: held-out eval questions per question type (one per eval image).
        png_compress_level: zlib level for the PNGs (1 = fast).
        workers: processes for rendering / PNG writing.
        threads: torch threads for pretraining.
        clip, llm: tower / LLM pretraining configs.
    """

    seed: int = 0
    image_size: int = 48
    hires_factor: int = 2
    grid: int = 4
    min_objects: int = 2
    max_objects: int = 6
    colours: tuple[tuple[str, tuple[int, int, int]], ...] = (
        ("red", (215, 45, 45)),
        ("green", (40, 170, 70)),
        ("blue", (45, 90, 225)),
        ("yellow", (230, 205, 40)),
        ("purple", (150, 60, 200)),
    )
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    marks: tuple[str, ...] = ("horizontal", "vertical", "checkered")
    shades: tuple[str, ...] = ("light", "dark")
    shade_strength: float = 0.3
    max_count: int = 3
    popularity_exponent: float = 0.6
    popular_top_k: int = 5
    radius_range: tuple[float, float] = (0.34, 0.44)
    max_offset: float = 1.5
    colour_jitter: int = 14
    mark_size: int = 6
    n_train_images: int = 16000
    n_caption_images: int = 16000
    caption_details: bool = True
    caption_order: str = "shuffled"
    max_turns: int = 4
    turn_weights: tuple[float, ...] = (0.4, 0.25, 0.2, 0.15)
    n_text_only: int = 160
    n_eval_per_type: int = 600
    png_compress_level: int = 1
    workers: int = 2
    threads: int = 2
    clip: TinyClipConfig = field(default_factory=TinyClipConfig)
    llm: TinyLLMConfig = field(default_factory=TinyLLMConfig)

    def __post_init__(self) -> None:
        if self.image_size % self.grid:
            raise ValueError(f"image_size {self.image_size} must be a multiple of grid {self.grid}.")
        if self.hires_factor != 2:
            raise ValueError("Only hires_factor=2 is supported (marks are built from 2x2 blocks).")
        if self.mark_size % 2 or self.mark_size <= 0:
            raise ValueError(f"mark_size must be a positive even number, got {self.mark_size}.")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid**2:
            raise ValueError(f"Need 1 <= min_objects <= max_objects <= grid**2, got {self.min_objects}, {self.max_objects}.")
        if len(self.turn_weights) != self.max_turns:
            raise ValueError(f"turn_weights needs {self.max_turns} entries, got {len(self.turn_weights)}.")
        if self.caption_order not in CAPTION_ORDERS:
            raise ValueError(f"caption_order must be one of {', '.join(CAPTION_ORDERS)}, got {self.caption_order!r}.")
        if self.n_caption_images > self.n_train_images:
            raise ValueError("n_caption_images cannot exceed n_train_images.")
        unknown = [x for x in self.shades if x not in ("light", "dark")]
        if unknown:
            raise ValueError(f"Unknown shades {unknown}; shades are 'light' and 'dark'.")
        if not 0.0 < self.shade_strength < 1.0:
            raise ValueError(f"shade_strength must be in (0, 1), got {self.shade_strength}.")
        if self.grid > 9:
            raise ValueError("Cell names use one digit per row: grid must be <= 9.")

    # ----------------------------------------------------------------- derived sizes
    @property
    def cell_size(self) -> int:
        """Cell side at base resolution = the tower's patch size."""
        return self.image_size // self.grid

    @property
    def stored_size(self) -> int:
        """Side of the stored PNGs."""
        return self.image_size * self.hires_factor

    @property
    def colour_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.colours)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Stable hash of the config and the format version (the cache key)."""
        return _hash({"format": FORMAT_VERSION, "config": self.to_dict()})

    def towers_config(self) -> dict[str, Any]:
        """The fields the pretrained towers depend on: every field but :data:`DATA_ONLY_FIELDS`."""
        return {k: v for k, v in self.to_dict().items() if k not in DATA_ONLY_FIELDS}

    def towers_hash(self) -> str:
        """Stable hash of :meth:`towers_config` and the format version (the key of shipped towers)."""
        return _hash({"format": FORMAT_VERSION, "config": self.towers_config()})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TinyWorldConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise with a 'did you mean' hint, wrong types name the key."""
        return build_dataclass(cls, dict(values), "TinyWorldConfig")


def _hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def small_test_config(**overrides: Any) -> TinyWorldConfig:
    """A seconds-scale config for tests and smoke runs."""
    base: dict[str, Any] = {
        "n_train_images": 64,
        "n_caption_images": 64,
        "n_text_only": 4,
        "n_eval_per_type": 12,
        "workers": 1,
        "clip": TinyClipConfig(
            vision_hidden_size=32, vision_layers=2, vision_heads=2, text_hidden_size=32, text_layers=1,
            text_heads=2, projection_dim=32, steps=3, batch_size=16, hires_images_per_step=4,
        ),
        "llm": TinyLLMConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64, steps=3, batch_size=8,
                             continue_steps=2, max_embedding_cosine=1.01),
    }
    base.update(overrides)
    return TinyWorldConfig(**base)
