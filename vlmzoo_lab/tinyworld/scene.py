"""Scenes of the tiny world: sampling and rendering.

A scene is a grey canvas cut into ``grid x grid`` cells with at most one object per cell.
Each object has a colour, a shape, a fine mark, optionally a shade (light or dark: a low-level
property) and a little geometric jitter. Scenes are
rendered at the stored resolution (``image_size * hires_factor``); the mark is a 1-px
pattern on an even-aligned square that is painted completely (pattern pixels in the mark
colour, the others in the object's colour), so every 2x2 block of it holds two mark pixels
and two object pixels whatever the mark kind: 2x box downsampling maps all kinds to the
same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from .config import TinyWorldConfig

MARK_RGB = (25, 25, 25)
BACKGROUND_RGB = (128, 128, 128)

#: 2x2 tiles of the mark kinds (1 = mark colour). Each tile has exactly two set pixels.
MARK_TILES: dict[str, np.ndarray] = {
    "horizontal": np.array([[1, 1], [0, 0]], dtype=bool),
    "vertical": np.array([[1, 0], [1, 0]], dtype=bool),
    "checkered": np.array([[1, 0], [0, 1]], dtype=bool),
}


@dataclass(frozen=True)
class WorldObject:
    """One object; ``row``/``col`` index the grid, geometry is in stored pixels."""

    colour: int
    shape: int
    mark: int
    row: int
    col: int
    radius: float
    dx: float
    dy: float
    rgb: tuple[int, int, int]
    shade: int = 0
    base_rgb: tuple[int, int, int] | None = None  # the colour before shading (worlds with shades)

    @property
    def kind(self) -> tuple[int, int]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """A list of objects (row-major order) and the background colour."""

    objects: tuple[WorldObject, ...]
    background: tuple[int, int, int]

    def with_shades_flipped(self, cfg: TinyWorldConfig) -> Scene:
        """Copy with every object's shade swapped (light <-> dark): the same scene but for its
        low-level detail (the tower's shade-invariance twin)."""
        objs = []
        for o in self.objects:
            shade = (o.shade + 1) % len(cfg.shades)
            rgb = shaded(list(o.base_rgb), cfg.shades[shade], cfg.shade_strength)
            objs.append(replace(o, shade=shade, rgb=(rgb[0], rgb[1], rgb[2])))
        return replace(self, objects=tuple(objs))

    def with_mark(self, index: int, mark: int) -> Scene:
        """Copy with object ``index``'s mark replaced (used to test mark legibility)."""
        objs = list(self.objects)
        objs[index] = replace(objs[index], mark=mark)
        return replace(self, objects=tuple(objs))


def cell_name(row: int, col: int) -> str:
    """``a1`` is the top-left cell: column letter, then row number."""
    return f"{chr(ord('a') + col)}{row + 1}"


def cell_names(grid: int) -> list[str]:
    return [cell_name(r, c) for r in range(grid) for c in range(grid)]


def cell_box(row: int, col: int, grid: int) -> list[float]:
    """The cell's box ``[x0, y0, x1, y1]`` in normalised image coordinates (0..1, y down)."""
    return [col / grid, row / grid, (col + 1) / grid, (row + 1) / grid]


def kind_prior(cfg: TinyWorldConfig) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Prior over colour x shape kinds and their popularity ranking (most frequent first).

    The ranking is a seeded permutation; probabilities fall as ``(rank + 1) ** -exponent``.
    """
    kinds = [(c, s) for c in range(len(cfg.colours)) for s in range(len(cfg.shapes))]
    rng = np.random.default_rng([cfg.seed, 7777])
    order = rng.permutation(len(kinds))
    ranked = [kinds[i] for i in order]
    weights = (np.arange(len(kinds)) + 1.0) ** (-cfg.popularity_exponent)
    probs = np.zeros((len(cfg.colours), len(cfg.shapes)))
    for (c, s), w in zip(ranked, weights):
        probs[c, s] = w
    return probs / probs.sum(), ranked


def sample_scene(rng: np.random.Generator, cfg: TinyWorldConfig, prior: np.ndarray) -> Scene:
    """Draw a scene: object count, distinct cells, kinds from ``prior``, marks, geometry."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = np.sort(rng.choice(cfg.grid * cfg.grid, size=n, replace=False))
    flat = prior.reshape(-1)
    kinds = np.searchsorted(np.cumsum(flat), rng.random(n) * flat.sum(), side="right").clip(0, flat.size - 1)
    marks = rng.integers(len(cfg.marks), size=n)
    cell_px = cfg.cell_size * cfg.hires_factor
    radius = rng.uniform(*cfg.radius_range, size=n) * cell_px
    offsets = rng.uniform(-cfg.max_offset, cfg.max_offset, size=(n, 2))
    jitter = rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, size=(n, 3))
    bg_jitter = rng.integers(-8, 9, size=3)
    shades = rng.integers(len(cfg.shades), size=n) if cfg.shades else np.zeros(n, dtype=np.int64)
    n_shapes = len(cfg.shapes)
    objs = []
    for k in range(n):
        colour, shape = divmod(int(kinds[k]), n_shapes)
        rgb = base = [min(255, max(0, v + int(j))) for v, j in zip(cfg.colours[colour][1], jitter[k])]
        if cfg.shades:
            rgb = shaded(base, cfg.shades[int(shades[k])], cfg.shade_strength)
        objs.append(
            WorldObject(
                colour=colour, shape=shape, mark=int(marks[k]),
                row=int(cells[k]) // cfg.grid, col=int(cells[k]) % cfg.grid,
                radius=float(radius[k]), dx=float(offsets[k, 0]), dy=float(offsets[k, 1]),
                rgb=(rgb[0], rgb[1], rgb[2]), shade=int(shades[k]), base_rgb=(base[0], base[1], base[2]),
            )
        )
    bg = (BACKGROUND_RGB[0] + int(bg_jitter[0]), BACKGROUND_RGB[1] + int(bg_jitter[1]), BACKGROUND_RGB[2] + int(bg_jitter[2]))
    return Scene(objects=tuple(objs), background=bg)


def shaded(rgb: list[int], shade: str, strength: float) -> list[int]:
    """``light``: blend ``strength`` of the way to white; ``dark``: to black."""
    target = 255 if shade == "light" else 0
    return [int(round(v + strength * (target - v))) for v in rgb]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    elif shape == "triangle":
        # Apex up, roughly centred so the mark (drawn at the centre) stays inside.
        draw.polygon([(cx, cy - 1.05 * r), (cx - 1.05 * r, cy + 0.75 * r), (cx + 1.05 * r, cy + 0.75 * r)], fill=rgb)
    elif shape == "cross":
        w = r * 0.42
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)
    else:
        raise ValueError(f"Unknown shape {shape!r}; drawable shapes: circle, square, triangle, cross.")


def object_centre(obj: WorldObject, cfg: TinyWorldConfig) -> tuple[float, float]:
    cell_px = cfg.cell_size * cfg.hires_factor
    return (obj.col + 0.5) * cell_px + obj.dx, (obj.row + 0.5) * cell_px + obj.dy


def mark_box(obj: WorldObject, cfg: TinyWorldConfig) -> tuple[int, int]:
    """Top-left corner (x, y) of the object's mark square, on even stored-pixel coordinates."""
    cx, cy = object_centre(obj, cfg)
    half = cfg.mark_size // 2
    x0 = 2 * int(round((cx - half) / 2))
    y0 = 2 * int(round((cy - half) / 2))
    return x0, y0


def render(scene: Scene, cfg: TinyWorldConfig) -> np.ndarray:
    """Stored-resolution RGB image ``(S, S, 3)`` uint8."""
    size = cfg.stored_size
    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy = object_centre(obj, cfg)
        _draw_shape(draw, cfg.shapes[obj.shape], cx, cy, obj.radius, obj.rgb)
    arr = np.asarray(img).copy()
    m = cfg.mark_size
    for obj in scene.objects:
        x0, y0 = mark_box(obj, cfg)
        tile = MARK_TILES[cfg.marks[obj.mark]]
        pattern = np.tile(tile, (m // 2, m // 2))
        arr[y0 : y0 + m, x0 : x0 + m] = np.where(pattern[..., None], np.array(MARK_RGB), np.array(obj.rgb))
    return arr


def box_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` blocks (float): the exact information the base view keeps."""
    h, w, c = image.shape
    return image.reshape(h // factor, factor, w // factor, factor, c).astype(np.float64).mean(axis=(1, 3))
