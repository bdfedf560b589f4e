"""Stage-0 pretraining of the tiny world's towers: a tiny CLIP and a tiny Llama.

(a) :func:`pretrain_clip` trains a transformers ``CLIPModel`` (ViT patch = grid cell, so one
token per cell) with the usual contrastive loss on image/caption pairs, plus linear per-patch
classifiers on ``hidden_states[-2]`` - the layer LLaVA reads - predicting each cell's colour,
shape (or empty), row and column. A few images per step are also shown as the four 2x crops
(TL, TR, BL, BR) of their high-resolution render, with heads for the cell's colour/shape and
its fine mark: the tower learns the zoomed-in scale that detail-perceiver strategies use,
while the base view, where the marks are erased, never gets a mark target. In worlds with
shades, a light/dark head reads ``hidden_states[1]`` and an invariance loss against the same
scenes with every shade swapped trains shade out of the deep layers (:func:`shade_invariance_loss`);
:func:`shade_probe` then measures which layers still hold it. The heads are discarded; only the
``CLIPModel`` is saved.

(b) :func:`pretrain_llm` trains a ``LlamaForCausalLM`` on :mod:`vlmzoo.tinyworld.corpus`
(context-grounded text) and then checks that colour/shape/mark/number word embeddings stayed
apart (:func:`check_word_embeddings`); a collapsed LLM fails the build loudly.

Both are saved with ``save_pretrained`` next to their tokenizer (and CLIP's image processor),
so they load by path exactly like hub checkpoints.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from .config import TinyWorldConfig
from .corpus import Document, make_corpus
from .questions import NUMBER_WORDS, TEMPLATES, caption, plural
from .scene import Scene, render

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Log = Callable[[str], None]


# ============================================================================ shared helpers
def _lr_lambda(total: int, warmup_frac: float) -> Callable[[int], float]:
    warmup = max(1, int(total * warmup_frac))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


class _Threads:
    """Context manager setting torch's intra-op threads (restored afterwards)."""

    def __init__(self, n: int) -> None:
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.old)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` in [0, 1] -> CLIP-normalised."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def base_view(hires_uint8: torch.Tensor, factor: int) -> torch.Tensor:
    """Base-resolution pixels in [0, 1] exactly as stored in the base PNGs (rounded box mean)."""
    x = hires_uint8.permute(0, 3, 1, 2).float()
    return torch.round(F.avg_pool2d(x, factor)) / 255.0


def hires_crops(hires_uint8: torch.Tensor, factor: int) -> torch.Tensor:
    """``(N, S, S, 3)`` uint8 -> ``(N * factor**2, 3, S/f, S/f)`` crops in [0, 1], row-major (TL, TR, BL, BR)."""
    x = hires_uint8.permute(0, 3, 1, 2).float() / 255.0
    n, c, s, _ = x.shape
    t = s // factor
    x = x.reshape(n, c, factor, t, factor, t).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n * factor * factor, c, t, t)


def cell_targets(scenes: list[Scene], cfg: TinyWorldConfig) -> dict[str, torch.Tensor]:
    """Per-cell targets ``(N, grid*grid)``: colour (C = none), shape (S = empty), mark and shade
    (-100 = empty)."""
    g = cfg.grid
    colour = np.full((len(scenes), g * g), len(cfg.colours), dtype=np.int64)
    shape = np.full((len(scenes), g * g), len(cfg.shapes), dtype=np.int64)
    mark = np.full((len(scenes), g * g), -100, dtype=np.int64)
    shade = np.full((len(scenes), g * g), -100, dtype=np.int64)
    for i, s in enumerate(scenes):
        for o in s.objects:
            colour[i, o.row * g + o.col] = o.colour
            shape[i, o.row * g + o.col] = o.shape
            mark[i, o.row * g + o.col] = o.mark
            shade[i, o.row * g + o.col] = o.shade
    return {k: torch.from_numpy(v) for k, v in (("colour", colour), ("shape", shape), ("mark", mark), ("shade", shade))}


def crop_cell_index(cfg: TinyWorldConfig) -> torch.Tensor:
    """``(factor**2, grid*grid)``: for crop q and its patch p, the full-image cell it lies in."""
    g, f = cfg.grid, cfg.hires_factor
    idx = torch.empty(f * f, g * g, dtype=torch.long)
    for q in range(f * f):
        qr, qc = divmod(q, f)
        for p in range(g * g):
            pr, pc = divmod(p, g)
            row = (qr * g + pr) // f
            col = (qc * g + pc) // f
            idx[q, p] = row * g + col
    return idx


# ============================================================================ (a) tiny CLIP
def clip_config(cfg: TinyWorldConfig, tokenizer: PreTrainedTokenizerFast) -> CLIPConfig:
    c = cfg.clip
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": c.text_hidden_size,
        "intermediate_size": 4 * c.text_hidden_size,
        "num_hidden_layers": c.text_layers,
        "num_attention_heads": c.text_heads,
        "max_position_embeddings": c.max_text_positions,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "projection_dim": c.projection_dim,
    }
    vision = {
        "hidden_size": c.vision_hidden_size,
        "intermediate_size": 4 * c.vision_hidden_size,
        "num_hidden_layers": c.vision_layers,
        "num_attention_heads": c.vision_heads,
        "image_size": cfg.image_size,
        "patch_size": cfg.cell_size,
        "projection_dim": c.projection_dim,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=c.projection_dim)


class _PatchHeads(nn.Module):
    """Linear classifiers on patch features (discarded after pretraining)."""

    def __init__(self, dim: int, sizes: dict[str, int]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in sizes.items()})

    def forward(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = x.new_zeros(())
        accs: dict[str, float] = {}
        for name, head in self.heads.items():
            logits = head(x).flatten(0, 1)
            tgt = targets[name].reshape(-1)
            loss = loss + F.cross_entropy(logits, tgt, ignore_index=-100)
            keep = tgt != -100
            accs[name] = (logits[keep].argmax(-1) == tgt[keep]).float().mean().item() if keep.any() else float("nan")
        return loss, accs


def image_processor(cfg: TinyWorldConfig) -> CLIPImageProcessor:
    """CLIP-style processor for the base PNGs (already ``image_size`` px: resize is the identity)."""
    return CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def pretrain_clip(
    cfg: TinyWorldConfig,
    scenes: list[Scene],
    hires: np.ndarray,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: str,
    log: Log = print,
) -> dict[str, float]:
    """Train and save the tiny CLIP; returns final training-batch head accuracies and timing."""
    c = cfg.clip
    t0 = time.perf_counter()
    with _Threads(cfg.threads):
        torch.manual_seed(cfg.seed)
        model = CLIPModel(clip_config(cfg, tokenizer))
        model.train()
        dim, g2 = c.vision_hidden_size, cfg.grid * cfg.grid
        n_col, n_shape = len(cfg.colours) + 1, len(cfg.shapes) + 1
        base_heads = _PatchHeads(dim, {"colour": n_col, "shape": n_shape, "row": cfg.grid, "col": cfg.grid})
        crop_heads = _PatchHeads(dim, {"colour": n_col, "shape": n_shape, "mark": len(cfg.marks)})
        heads = [base_heads, crop_heads]
        if cfg.shades:
            # Low-level evidence in an early layer: a light/dark head on hidden_states[shade_layer];
            # the deep layers are trained to be invariant to it (shade_invariance_loss).
            shade_head = _PatchHeads(dim, {"shade": len(cfg.shades)})
            heads.append(shade_head)
        params = list(model.parameters()) + [p for h in heads for p in h.parameters()]
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c.steps, c.warmup_frac))

        captions = [caption(s, cfg) for s in scenes]
        enc = tokenizer(captions, padding=True, truncation=True, max_length=c.max_text_positions, return_tensors="pt")
        targets = cell_targets(scenes, cfg)
        rows = torch.arange(g2) // cfg.grid
        cols = torch.arange(g2) % cfg.grid
        crop_idx = crop_cell_index(cfg)
        hires_t = torch.from_numpy(hires)
        gen = torch.Generator().manual_seed(cfg.seed)
        n = len(scenes)
        perm, pos = torch.randperm(n, generator=gen), 0
        stats: dict[str, float] = {}
        log_every = max(1, c.steps // 6)
        for step in tqdm(range(c.steps), desc="[tinyworld] tiny CLIP", unit="step", mininterval=2, leave=False):
            if pos + c.batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos : pos + c.batch_size]
            pos += c.batch_size
            b = len(idx)
            pixels = normalize(base_view(hires_t[idx], cfg.hires_factor))
            vis = model.vision_model(pixel_values=pixels, output_hidden_states=True)
            img_emb = F.normalize(model.visual_projection(vis.pooler_output), dim=-1)
            txt = model.text_model(input_ids=enc.input_ids[idx], attention_mask=enc.attention_mask[idx])
            txt_emb = F.normalize(model.text_projection(txt.pooler_output), dim=-1)
            scale = model.logit_scale.clamp(max=math.log(100.0)).exp()
            logits = scale * img_emb @ txt_emb.T
            labels = torch.arange(b)
            loss_con = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
            contrastive_acc = (logits.argmax(-1) == labels).float().mean().item()

            patches = vis.hidden_states[-2][:, 1:]
            base_t = {"colour": targets["colour"][idx], "shape": targets["shape"][idx],
                      "row": rows.expand(b, g2), "col": cols.expand(b, g2)}
            loss_aux, acc_base = base_heads(patches, base_t)
            if cfg.shades:
                loss_shade, acc_shade = shade_head(vis.hidden_states[c.shade_layer][:, 1:], {"shade": targets["shade"][idx]})
                loss_inv = shade_invariance_loss(model, vis.hidden_states, [scenes[int(i)] for i in idx], cfg)
                loss_aux = loss_aux + loss_shade + c.shade_invariance_weight * loss_inv
                acc_base = {**acc_base, f"shade_l{c.shade_layer}": acc_shade["shade"], "shade_invariance": loss_inv.item()}

            loss_crop = patches.new_zeros(())
            acc_crop: dict[str, float] = {}
            hb = min(c.hires_images_per_step, b)
            if hb > 0 and c.hires_weight > 0:
                hidx = idx[:hb]
                crops = normalize(hires_crops(hires_t[hidx], cfg.hires_factor))
                cvis = model.vision_model(pixel_values=crops, output_hidden_states=True)
                cpatch = cvis.hidden_states[-2][:, 1:]  # (hb * f*f, g2, D)
                cells = crop_idx.repeat(hb, 1)  # (hb * f*f, g2)
                owner = torch.arange(hb).repeat_interleave(crop_idx.shape[0]).unsqueeze(1)
                crop_t = {k: targets[k][hidx][owner, cells] for k in ("colour", "shape", "mark")}
                loss_crop, acc_crop = crop_heads(cpatch, crop_t)

            loss = loss_con + c.aux_weight * loss_aux + c.hires_weight * loss_crop
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            stats = {"loss": loss.item(), "contrastive": loss_con.item(), "contrastive_acc": contrastive_acc,
                     **{f"base_{k}": v for k, v in acc_base.items()}, **{f"crop_{k}": v for k, v in acc_crop.items()}}
            if (step + 1) % log_every == 0 or step == c.steps - 1:
                el = time.perf_counter() - t0
                accs = " ".join(f"{k}={v:.2f}" for k, v in stats.items() if k != "loss")
                log(f"[tinyworld]   clip step {step + 1}/{c.steps} loss={stats['loss']:.3f} {accs} "
                    f"({el:.0f}s, {(step + 1) / el:.2f} it/s)")
        model.eval()
        if cfg.shades:
            probe = shade_probe(model, hires_t, targets["shade"], cfg)
            log("[tinyworld]   shade probe accuracy by hidden state (MLP on frozen patches, held out): "
                + " ".join(f"{k}={v:.2f}" for k, v in probe.items()))
            stats.update({f"shade_probe_{k}": v for k, v in probe.items()})
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        image_processor(cfg).save_pretrained(out_dir)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def shade_invariance_loss(model: CLIPModel, states: tuple[torch.Tensor, ...], scenes: list[Scene],
                          cfg: TinyWorldConfig) -> torch.Tensor:
    """Mean squared difference, relative to the features' variance, between the patches of
    ``states`` (the batch's hidden states; the first ``shade_twins_per_step`` images) and those of
    the same scenes re-rendered with every shade swapped, at ``clip.shade_invariance_layers``."""
    c = cfg.clip
    n = min(c.shade_twins_per_step, len(scenes))
    if n == 0 or c.shade_invariance_weight == 0:
        return states[0].new_zeros(())
    twins = torch.from_numpy(np.stack([render(s.with_shades_flipped(cfg), cfg) for s in scenes[:n]]))
    twin_states = model.vision_model(pixel_values=normalize(base_view(twins, cfg.hires_factor)),
                                     output_hidden_states=True).hidden_states
    loss = states[0].new_zeros(())
    for layer in c.shade_invariance_layers:
        a, b = states[layer][:n, 1:], twin_states[layer][:, 1:]
        loss = loss + (a - b).pow(2).mean() / a.detach().var(dim=(0, 1)).mean().clamp_min(1e-6)
    return loss / len(c.shade_invariance_layers)


def shade_probe(model: CLIPModel, hires: torch.Tensor, shade: torch.Tensor, cfg: TinyWorldConfig,
                n_images: int = 1500, steps: int = 300) -> dict[str, float]:
    """Where the tower keeps shade: a fresh MLP probe per hidden state, trained on the patches
    of the first 2/3 of ``n_images`` base views and scored on the rest (chance 1/len(shades))."""
    n = min(n_images, hires.shape[0])
    with torch.no_grad():
        states = model.vision_model(pixel_values=normalize(base_view(hires[:n], cfg.hires_factor)),
                                    output_hidden_states=True).hidden_states
    target = shade[:n].reshape(-1)
    keep = target != -100
    split = int(n * 2 / 3) * cfg.grid * cfg.grid
    train = keep.clone()
    train[split:] = False
    test = keep.clone()
    test[:split] = False
    gen = torch.Generator().manual_seed(cfg.seed)
    out: dict[str, float] = {}
    for i, h in enumerate(states):
        x = h[:, 1:].reshape(-1, h.shape[-1])
        x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
        probe = nn.Sequential(nn.Linear(x.shape[1], 64), nn.GELU(), nn.Linear(64, len(cfg.shades)))
        for p in probe.parameters():
            nn.init.normal_(p, std=0.05, generator=gen)
        opt = torch.optim.Adam(probe.parameters(), lr=3e-3)
        for _ in range(steps):
            loss = F.cross_entropy(probe(x[train]), target[train])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out[f"h{i}"] = (probe(x[test]).argmax(-1) == target[test]).float().mean().item()
    return out


# ============================================================================ (b) tiny Llama
def llm_config(cfg: TinyWorldConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    m = cfg.llm
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.layers,
        num_attention_heads=m.heads,
        num_key_value_heads=m.heads,
        max_position_embeddings=m.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def word_groups(cfg: TinyWorldConfig) -> dict[str, list[str]]:
    """Answer words that text-only pretraining tends to merge (checked after pretraining)."""
    return {
        "colour": list(cfg.colour_names),
        "shape": list(cfg.shapes),
        "mark": list(cfg.marks),
        "count": list(NUMBER_WORDS[: cfg.max_count + 1]),
    }


def embedding_cosines(model: nn.Module, tokenizer: PreTrainedTokenizerFast, cfg: TinyWorldConfig,
                      output: bool = False) -> dict[str, float]:
    """Mean pairwise cosine of the input (or output) embeddings within each word group."""
    weight = (model.get_output_embeddings() if output else model.get_input_embeddings()).weight.detach()
    out = {}
    for group, words in word_groups(cfg).items():
        ids = tokenizer.convert_tokens_to_ids(words)
        e = F.normalize(weight[ids].float(), dim=-1)
        sim = e @ e.T
        k = len(ids)
        out[group] = float((sim.sum() - sim.diagonal().sum()) / (k * (k - 1)))
    return out


def question_word_groups(cfg: TinyWorldConfig) -> list[str]:
    """The :func:`word_groups` whose words occur in the question templates (colour, shape).

    The VLM reads these words, so their input embeddings must stay apart. Mark and number words
    occur only as answers: the VLM writes them through the untied output head, and their input
    embeddings only feed the prediction of the token after an answer.
    """
    fields = {"colour": cfg.colour_names[0], "shape": cfg.shapes[0], "shapes": plural(cfg.shapes[0])}
    words = {w.strip("?") for t in TEMPLATES.values() for w in t.format(**fields).split()}
    return [g for g, ws in word_groups(cfg).items() if any(w in words for w in ws)]


def check_word_embeddings(model: nn.Module, tokenizer: PreTrainedTokenizerFast, cfg: TinyWorldConfig) -> dict[str, float]:
    """Mean pairwise input-embedding cosine of every :func:`word_groups` group; raises if a group
    the questions are made of (:func:`question_word_groups`) collapsed (cosine >= threshold)."""
    cos = embedding_cosines(model, tokenizer, cfg)
    bad = {g: cos[g] for g in question_word_groups(cfg) if cos[g] >= cfg.llm.max_embedding_cosine}
    if bad:
        raise RuntimeError(
            "Tiny LLM pretraining collapsed the input embeddings of question words (mean pairwise cosine "
            + ", ".join(f"{g}={v:.2f}" for g, v in bad.items())
            + f" >= {cfg.llm.max_embedding_cosine}). Such an LLM cannot learn visual questions; fix the "
            "pretraining text (answers must be grounded in context) before using it."
        )
    return cos


def _encode(docs: list[Document], tokenizer: PreTrainedTokenizerFast, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer([d.text for d in docs], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


@torch.no_grad()
def context_qa_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, docs: list[Document],
                        max_len: int) -> dict[str, float]:
    """Teacher-forced accuracy of the answer word after each ``ASSISTANT:`` in chat documents."""
    chats = [d for d in docs if d.kind == "chat"]
    if not chats:
        return {}
    ids, mask = _encode(chats, tokenizer, max_len)
    pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    asst, colon = tokenizer.convert_tokens_to_ids(["ASSISTANT", ":"])
    hits: dict[str, list[int]] = {}
    for i, d in enumerate(chats):
        pos = [p for p in range(ids.shape[1] - 2) if ids[i, p] == asst and ids[i, p + 1] == colon and mask[i, p + 2]]
        for (qtype, _), p in zip(d.answers, pos):
            hits.setdefault(qtype, []).append(int(pred[i, p + 1] == ids[i, p + 2]))
    return {t: float(np.mean(h)) for t, h in hits.items() if h}


def _train_llm_cycle(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor, lr: float, cfg: TinyWorldConfig,
                     name: str, log: Log) -> float:
    """One warm-up/cosine cycle with a fresh AdamW over ``ids``/``mask`` ``(steps * batch, max_len)``,
    a batch per step; returns the last step's loss."""
    m = cfg.llm
    steps = ids.shape[0] // m.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=m.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, m.warmup_frac))
    log_every = max(1, steps // 6)
    model.train()
    t1 = time.perf_counter()
    for step in tqdm(range(steps), desc=f"[tinyworld] tiny LLM, {name}", unit="step", mininterval=2, leave=False):
        sl = slice(step * m.batch_size, (step + 1) * m.batch_size)
        bm = mask[sl]
        width = int(bm.sum(1).max())
        b_ids, bm = ids[sl, :width], bm[:, :width]
        labels = b_ids.masked_fill(bm == 0, -100)
        loss = model(input_ids=b_ids, attention_mask=bm, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == steps - 1:
            el = time.perf_counter() - t1
            log(f"[tinyworld]   llm {name} step {step + 1}/{steps} loss={loss.item():.3f} ({el:.0f}s, {(step + 1) / el:.2f} it/s)")
    return loss.item()


def pretrain_llm(cfg: TinyWorldConfig, tokenizer: PreTrainedTokenizerFast, out_dir: str, log: Log = print) -> dict[str, float]:
    """Train, check and save the tiny Llama into ``out_dir`` (which holds its tokenizer); returns metrics and timing.

    Two cycles, each on its own documents: ``llm.steps`` at ``llm.lr``, then (a warm restart)
    ``llm.continue_steps`` at ``llm.continue_lr``.
    """
    m = cfg.llm
    t0 = time.perf_counter()
    with _Threads(cfg.threads):
        torch.manual_seed(cfg.seed + 1)
        held_out = make_corpus(cfg, 256, stream=5)
        model = LlamaForCausalLM(llm_config(cfg, tokenizer))
        final_loss = float("nan")
        # (name, steps, peak lr, document stream); the held-out documents above are stream 5
        cycles = (("first cycle", m.steps, m.lr, 4), ("continued", m.continue_steps, m.continue_lr, 7))
        for name, steps, lr, stream in cycles:
            if steps <= 0:
                continue
            t = time.perf_counter()
            docs = make_corpus(cfg, steps * m.batch_size, stream=stream)
            ids, mask = _encode(docs, tokenizer, m.max_len)
            log(f"[tinyworld]   llm {name}: {len(docs)} documents, {int(mask.sum())} tokens "
                f"({time.perf_counter() - t:.1f}s)")
            final_loss = _train_llm_cycle(model, ids, mask, lr, cfg, name, log)
            del docs, ids, mask
        model.eval()
        qa = context_qa_accuracy(model, tokenizer, held_out, m.max_len)
        cos_in = check_word_embeddings(model, tokenizer, cfg)
        cos_out = embedding_cosines(model, tokenizer, cfg, output=True)
        log("[tinyworld]   llm context-QA accuracy (held out): " + " ".join(f"{k}={v:.2f}" for k, v in qa.items()))
        log("[tinyworld]   llm word-embedding mean cosine (input): " + " ".join(f"{k}={v:.2f}" for k, v in cos_in.items())
            + f"  [check: < {m.max_embedding_cosine}]  (output: "
            + " ".join(f"{k}={v:.2f}" for k, v in cos_out.items()) + ")")
        os.makedirs(out_dir, exist_ok=True)
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        model.save_pretrained(out_dir)  # beside the tokenizer, which the build saved there first
    return {"seconds": time.perf_counter() - t0, "final_loss": final_loss,
            **{f"qa_{k}": v for k, v in qa.items()}, **{f"cos_{k}": v for k, v in cos_in.items()}}
