"""Attention heat maps: where on the image does the LLM look while it answers?

For one image and question (TG-LLaVA paper, figure 5):

1. the prompt is built exactly as the evaluator builds it (:func:`vlmzoo.evaluation.generation_batch`)
   and the answer is decoded greedily with the KV cache (:func:`vlmzoo.evaluation.greedy_generate`);
2. one forward pass over prompt + answer returns the LLM's attention probabilities
   ``L x (1, H, T, T)``, with the LLM switched to eager attention for that pass (SDPA and flash
   attention never materialise the probabilities);
3. rows: the query positions that *predict* the answer tokens (the last prompt position predicts
   the first answer token; see :data:`QUERY_ROWS` for the alternative); columns: the T_v image
   placeholder positions; summed over layers, heads and rows -> one weight per visual token ``(T_v,)``;
4. the strategy's :attr:`~vlmzoo.GuidanceStrategy.visual_token_grids` turn those weights into
   ``(rows, cols)`` maps, which are upsampled onto the image and drawn as heat maps (matplotlib, Agg).

A strategy that declares no grid (e.g. TA-LLaVA's learned prefix) raises :class:`NotSpatialError`.
``scripts/visualize.py`` is the command line (:func:`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from vlmzoo.data.checks import open_rgb_image
from vlmzoo.data.templates import DEFAULT_IMAGE_TOKEN
from vlmzoo.evaluation import generation_batch, greedy_generate, image_first_messages, load_for_eval, model_folder
from vlmzoo.strategy import TokenGrid

QueryRows = Literal["predicting", "answer"]
#: ``predicting``: positions P-1 .. P+A-2, whose outputs are the A answer tokens (the attention the
#: model used to choose each answer token; includes the last prompt position, which picks the first
#: one). ``answer``: positions P .. P+A-1 of the answer tokens themselves.
QUERY_ROWS: tuple[str, ...] = ("predicting", "answer")

PANEL_INCHES = (4.0, 4.6)  # width, height of one map
DPI = 100


class VisualizationError(ValueError):
    """A map cannot be drawn for this model or input; the message says why."""


class NotSpatialError(VisualizationError):
    """The strategy's visual tokens do not map to image positions."""


@dataclass
class AnswerAttention:
    """Attention from one greedy answer to one image's visual tokens.

    Attributes:
        question / answer: the question asked and the decoded answer.
        input_ids: ``(T,)`` the prompt + answer sequence of the attention pass.
        prompt_length: P, the prompt's length (the answer occupies positions P .. T-1).
        query_positions: ``(A,)`` the attention rows summed (see :data:`QUERY_ROWS`).
        token_weights: ``(T_v,)`` attention to each visual token, summed over layers, heads and rows.
        total_mass: layers x heads x rows, the attention mass of those rows (each row sums to 1);
            ``token_weights.sum() / total_mass`` is the share that went to the image.
        grids: the strategy's grids; ``maps[i]`` ``(rows_i, cols_i)`` is ``grids[i].to_map(token_weights)``.
    """

    question: str
    answer: str
    input_ids: torch.Tensor
    prompt_length: int
    query_positions: torch.Tensor
    token_weights: torch.Tensor
    total_mass: float
    grids: tuple[TokenGrid, ...]
    maps: list[torch.Tensor]

    @property
    def image_share(self) -> float:
        """Fraction of the rows' attention that lands on the image's visual tokens."""
        return float(self.token_weights.sum()) / self.total_mass

    @property
    def mapped_share(self) -> float:
        """Fraction of the visual-token weight that the grids draw (< 1 when some tokens are not spatial)."""
        total = float(self.token_weights.sum())
        return sum(float(m.sum()) for m in self.maps) / total if total > 0 else 0.0


# ---- declarations -----------------------------------------------------------------------------------
def spatial_grids(model: Any) -> tuple[TokenGrid, ...]:
    """The strategy's grids, checked against its token count; :class:`NotSpatialError` if there are none."""
    strategy = model.strategy
    grids = tuple(strategy.visual_token_grids)
    n = strategy.num_visual_tokens
    if not grids:
        raise NotSpatialError(
            f"Strategy {model.config.strategy!r} produces tokens that do not map to image positions "
            f"(its {n} visual tokens declare no TokenGrid in visual_token_grids, e.g. a learned prefix "
            "that reads the image through attention); nothing to draw."
        )
    taken = torch.zeros(n, dtype=torch.bool)
    for grid in grids:
        if grid.stop > n or taken[grid.start : grid.stop].any():
            raise ValueError(
                f"Strategy {model.config.strategy!r} declares {grid}, outside its {n} visual tokens or "
                "overlapping another grid."
            )
        taken[grid.start : grid.stop] = True
    return grids


@contextlib.contextmanager
def eager_llm_attention(model: Any) -> Iterator[None]:
    """Run the block with the LLM on eager attention, then restore its implementation.

    Only eager attention returns the attention probabilities (``output_attentions=True``); SDPA
    and flash attention compute them inside a fused kernel and return none. The switch uses
    transformers' ``PreTrainedModel.set_attn_implementation`` on ``model.language_model``.
    """
    llm = model.language_model
    previous = llm.config._attn_implementation
    if previous != "eager":
        llm.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            llm.set_attn_implementation(previous)


# ---- computation ------------------------------------------------------------------------------------
def question_messages(question: str) -> list[dict[str, str]]:
    """One user turn with the image first (LLaVA-1.5's layout, as the evaluator prompts)."""
    content = question if DEFAULT_IMAGE_TOKEN in question else f"{DEFAULT_IMAGE_TOKEN}\n{question}"
    return image_first_messages([{"role": "user", "content": content}], num_images=1)


def answer_tokens(new_tokens: torch.Tensor, processor: Any) -> torch.Tensor:
    """``(A_max,)`` generated ids -> the answer ``(A,)``: everything before the first end or pad token."""
    stops = {processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id} - {None}
    for i, token in enumerate(new_tokens.tolist()):
        if token in stops:
            return new_tokens[:i]
    return new_tokens


@torch.inference_mode()
def answer_attention(
    model: Any,
    processor: Any,
    image: Image.Image,
    question: str,
    max_new_tokens: int = 32,
    rows: QueryRows = "predicting",
    high_res_image: Image.Image | None = None,
) -> AnswerAttention:
    """Greedy answer to ``question`` about ``image`` and its attention to each visual token.

    See the module docstring for what is summed. The LLM runs eager attention for the attention
    pass only (:func:`eager_llm_attention`); generation uses the model's own implementation.
    ``high_res_image``: the same picture at a higher resolution, for a strategy with a high-res
    factor (else its crops come from ``image`` upsampled); ignored by the others.
    """
    if rows not in QUERY_ROWS:
        raise ValueError(f"rows must be one of {QUERY_ROWS}, got {rows!r}.")
    spatial_grids(model)  # before generating: a strategy without grids fails at once
    model.eval()
    high_res = None if high_res_image is None else [[high_res_image.convert("RGB")]]  # the processor ignores it at f = 1
    batch = generation_batch(model, processor, [question_messages(question)], [[image.convert("RGB")]], high_res)
    answer = answer_tokens(greedy_generate(model, processor, batch, max_new_tokens)[0], processor)
    return attention_to_image(model, processor, batch, answer, question, rows)


@torch.inference_mode()
def attention_to_image(
    model: Any,
    processor: Any,
    batch: dict[str, torch.Tensor],
    answer: torch.Tensor,
    question: str,
    rows: QueryRows = "predicting",
) -> AnswerAttention:
    """The attention from ``answer`` ``(A,)`` (cut at its end token, see :func:`answer_tokens`) to
    the image tokens of the prompt it answers.

    ``batch`` is one unpadded sample of :func:`vlmzoo.evaluation.generation_batch`: any
    conversation ending in the user turn that ``answer`` replies to (a follow-up question too);
    ``question`` is only the label the result carries.
    """
    if rows not in QUERY_ROWS:
        raise ValueError(f"rows must be one of {QUERY_ROWS}, got {rows!r}.")
    grids = spatial_grids(model)
    if answer.numel() == 0:
        raise VisualizationError(f"The model answered {question!r} with an empty answer; no answer token to attribute.")
    model.eval()
    answer = answer.to(batch["input_ids"].device)
    prompt_length, n_answer = batch["input_ids"].shape[1], answer.numel()
    full = dict(batch)
    full["input_ids"] = torch.cat([batch["input_ids"], answer[None]], dim=1)  # (1, T)
    full["attention_mask"] = F.pad(batch["attention_mask"], (0, n_answer), value=1)
    if "instruction_mask" in batch:  # answer tokens are not instruction
        full["instruction_mask"] = F.pad(batch["instruction_mask"], (0, n_answer), value=False)
    with eager_llm_attention(model):
        attentions = model(**full, output_attentions=True, logits_to_keep=1).attentions  # L x (1, H, T, T)
    if not attentions:
        raise RuntimeError("The LLM returned no attention probabilities although it runs eager attention.")

    first = prompt_length - 1 if rows == "predicting" else prompt_length
    query = torch.arange(first, first + n_answer, device=full["input_ids"].device)  # (A,)
    image_columns = (full["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)  # (T_v,)
    weights = torch.zeros(image_columns.numel(), dtype=torch.float64, device=query.device)
    for layer in attentions:
        picked = layer[0].index_select(1, query).index_select(2, image_columns)  # (H, A, T_v)
        weights += picked.double().sum(dim=(0, 1))
    weights = weights.float().cpu()
    heads = attentions[0].shape[1]
    return AnswerAttention(
        question=question,
        answer=processor.decode(answer, skip_special_tokens=True).strip(),
        input_ids=full["input_ids"][0].cpu(),
        prompt_length=prompt_length,
        query_positions=query.cpu(),
        token_weights=weights,
        total_mass=float(len(attentions) * heads * n_answer),
        grids=grids,
        maps=[grid.to_map(weights) for grid in grids],
    )


# ---- drawing ----------------------------------------------------------------------------------------
def tower_view(image_size: tuple[int, int], processor: Any) -> tuple[int, int, int]:
    """``(left, top, side)``: the square of the image, in its pixel coordinates, that the tower sees.

    With ``pad_to_square`` the image is centred on a ``max(w, h)`` square (left/top <= 0);
    otherwise the image processor's centre crop keeps a ``min(w, h)`` square (left/top >= 0).
    """
    w, h = image_size
    side = max(w, h) if processor.pad_to_square else min(w, h)
    return (w - side) // 2, (h - side) // 2, side


def heat_on_image(grid_map: torch.Tensor, image_size: tuple[int, int], view: tuple[int, int, int]) -> torch.Tensor:
    """``(rows, cols)`` map -> ``(h, w)`` heat in [0, 1] on the image's pixels (NaN outside the tower's view).

    The map is scaled to its maximum, upsampled bilinearly onto the ``side x side`` view and cut to the image.
    """
    w, h = image_size
    left, top, side = view
    scaled = grid_map.float() / grid_map.max().clamp(min=1e-12)
    up = F.interpolate(scaled[None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
    heat = torch.full((h, w), float("nan"))
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, w), min(top + side, h)
    heat[y0:y1, x0:x1] = up[y0 - top : y1 - top, x0 - left : x1 - left]
    return heat


def figure_size(num_panels: int, dpi: int = DPI) -> tuple[int, int]:
    """Pixel ``(width, height)`` of a figure of ``num_panels`` maps side by side."""
    return round(num_panels * PANEL_INCHES[0] * dpi), round(PANEL_INCHES[1] * dpi)


def draw_maps(
    image: Image.Image,
    results: Sequence[tuple[str, AnswerAttention]],
    processor: Any,
    out: str | os.PathLike,
    dpi: int = DPI,
) -> Path:
    """Write one PNG: per ``(label, result)``, one panel per grid, side by side, of size :func:`figure_size`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = image.convert("RGB")
    view = tower_view(image.size, processor)
    panels = [(label, res, grid, grid_map) for label, res in results for grid, grid_map in zip(res.grids, res.maps)]
    fig = Figure(figsize=(len(panels) * PANEL_INCHES[0], PANEL_INCHES[1]), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, res, grid, grid_map) in zip(axes, panels):
        ax.imshow(image)
        ax.imshow(heat_on_image(grid_map, image.size, view).numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0,
                  interpolation="nearest")
        ax.set_axis_off()
        name = f"{label} - {grid.label}" if len(res.grids) > 1 and grid.label else label
        stats = f"{100 * res.image_share:.1f}% of attention on image tokens"
        if res.mapped_share < 0.9995:
            stats += f", {100 * res.mapped_share:.0f}% of it drawn"
        lines = [*_wrap(name, 45), *_wrap(f"A: {res.answer}", 45), stats]
        ax.set_title("\n".join(lines), fontsize=8)
    question = results[0][1].question
    fig.suptitle("\n".join(_wrap(f"Q: {question}", 50 * len(panels))), fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.76, wspace=0.05)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, max_lines=2, placeholder=" ...")


def visualize(
    model_dirs: Sequence[str | os.PathLike],
    image_path: str | os.PathLike,
    question: str,
    out: str | os.PathLike,
    max_new_tokens: int = 32,
    rows: QueryRows = "predicting",
    template: str | None = None,
    high_res_path: str | os.PathLike | None = None,
) -> tuple[Path, list[AnswerAttention]]:
    """Load each saved model + processor, compute its :class:`AnswerAttention`, draw all side by side."""
    image = open_rgb_image(image_path)
    high_res = None if high_res_path is None else open_rgb_image(high_res_path)
    results, processor = [], None
    for model_dir in model_dirs:
        model, processor = load_for_eval(model_dir, template)
        try:
            result = answer_attention(model, processor, image, question, max_new_tokens, rows, high_res)
        except VisualizationError as exc:
            raise type(exc)(f"{model_dir}: {exc}") from None
        results.append((_label(model_dir, model), result))
        del model
    return draw_maps(image, results, processor, out), [r for _, r in results]


def _label(model_dir: str | os.PathLike, model: Any) -> str:
    parts = Path(model_dir).resolve().parts[-3:]
    return f"{model.config.strategy} ({'/'.join(parts)})"


def main(argv: list[str] | None = None) -> int:
    """``scripts/visualize.py``: answer-to-image attention heat maps of one or two saved models."""
    parser = argparse.ArgumentParser(
        description="Overlay the attention from a model's answer to its visual tokens on the image (summed over "
        "layers, heads and answer tokens)."
    )
    parser.add_argument("--model", nargs="+", required=True, metavar="DIR", type=model_folder,
                        help="folder(s) of a saved model + processor; two folders are drawn side by side")
    parser.add_argument("--compare", metavar="DIR", type=model_folder, help="a second model drawn next to the first (same as a second --model)")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", required=True, help="question about the image")
    parser.add_argument("--out", default="attention.png", help="output PNG (default: attention.png)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest greedy answer (default: 32)")
    parser.add_argument("--rows", choices=QUERY_ROWS, default="predicting",
                        help="attention rows: positions predicting the answer tokens (default) or the answer tokens")
    parser.add_argument("--template", help="conversation template other than the saved processor's")
    parser.add_argument("--high-res-image", metavar="FILE",
                        help="the same picture at a higher resolution (e.g. the tiny world's images_2x/) for strategies "
                        "with high-res crops (tg_llava); without it their crops come from --image upsampled")
    args = parser.parse_args(argv)
    model_dirs = [*args.model, *([args.compare] if args.compare else [])]
    for path in (args.image, *([args.high_res_image] if args.high_res_image else [])):
        if not os.path.exists(path):
            parser.error(f"{path} does not exist")
    try:
        out, results = visualize(model_dirs, args.image, args.question, args.out, args.max_new_tokens, args.rows,
                                 args.template, args.high_res_image)
    except VisualizationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for model_dir, res in zip(model_dirs, results):
        print(f"{model_dir}: {res.answer!r} (image share of attention {100 * res.image_share:.1f}%)")
    print(f"Wrote {out}")
    return 0
