"""Cost of every strategy: reference scale on the meta device, tiny scale on this machine.

Three parts (``scripts/benchmark.py`` runs them and writes JSON + Markdown):

* :func:`reference_costs` — each ``configs/<arch>/reference*.yaml`` built on the meta device:
  parameters per module group, visual tokens, prefill FLOPs of one image + N text tokens counted
  by running the model under a FLOP counter (:mod:`vlmzoo.flops`).
* :func:`tiny_costs` — each strategy at the tiny world's sizes (random init, no world needed):
  training-step time, prefill latency, decode latency with and without the KV cache, peak memory.
  Strategies are measured round-robin, so drift of the machine spreads over all of them.
* :func:`time_models` — any models over the same inputs, measured in turn (the ``llava`` strategy
  against transformers' ``LlavaForConditionalGeneration`` uses it: ``vlmzoo_lab/llava_vs_transformers.py``).

Timings are medians of ``repeats`` after a warm-up call, on ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

from vlmzoo.build import build_on_meta
from vlmzoo.config import load_run_config, strategy_config_files, strategy_run_config
from vlmzoo.configuration import VLMConfig
from vlmzoo.flops import prefill_flops
from vlmzoo.modeling import VLMForConditionalGeneration
from vlmzoo.towers.text import HFTextEncoder
from vlmzoo.towers.vision import HFVisionTower
from vlmzoo.training.groups import group_layout

from .tinyworld.config import TinyWorldConfig
from .tinyworld.pretrain import clip_config, llm_config

N_TEXT = 40
BATCH = 32
NEW_TOKENS = 32


# ---- reference scale (meta device) -----------------------------------------------------------------
def reference_config_files(archs: list[str]) -> list[Path]:
    """The ``reference*.yaml`` run configs each arch ships (``configs/<arch>/`` or its class's
    ``config_dir``; :func:`vlmzoo.config.strategy_config_files`), the reference config first, variants after."""
    files: list[Path] = []
    for arch in archs:
        found = sorted(strategy_config_files(arch, "reference*.yaml"), key=lambda p: (p.stem != "reference", p.stem))
        files.extend(found)
    return files


def reference_costs(config_file: Path, n_text: int = N_TEXT, model=None) -> dict[str, Any]:
    """Parameters per module group, visual tokens and prefill FLOPs of one reference config
    (``model``: the config already built on the meta device, else it is built here)."""
    cfg = load_run_config(config_file)
    model = build_on_meta(cfg) if model is None else model
    params = dict(model.named_parameters())
    groups = {name: sum(params[n].numel() for n in names) for name, names in group_layout(model).groups.items() if names}
    return {
        "config": f"{config_file.parent.name}/{config_file.name}",
        "strategy": cfg.model.strategy,
        "llm": model.config.text_config.model_type,
        "parameters": {**groups, "total": sum(p.numel() for p in params.values())},
        "visual_tokens": model.strategy.num_visual_tokens,
        "prefill_flops": prefill_flops(model, n_text),
        "n_text": n_text,
    }


# ---- tiny scale (this CPU) -------------------------------------------------------------------------
class _Vocab:
    """Stands in for the tiny world's tokenizer where only its size and special ids matter."""

    def __init__(self, size: int) -> None:
        self.size, self.pad_token_id, self.bos_token_id, self.eos_token_id = size, 0, 1, 2

    def __len__(self) -> int:
        return self.size


def tiny_world_config(strategy: str, vocab_size: int = 96):
    """A :class:`~vlmzoo.VLMConfig` at the tiny world's sizes (its CLIP and Llama shapes, the last
    vocabulary id as the image token) with the strategy fields of its tiny config
    (:func:`vlmzoo.config.strategy_run_config`; the config dataclass's defaults for a strategy without one)
    and the tiny CLIP's text tower if the config names a text encoder or the strategy reads instruction text."""
    world = TinyWorldConfig()
    vocab = _Vocab(vocab_size)
    clip = clip_config(world, vocab)
    path, first = strategy_run_config(strategy, "tiny")
    run = load_run_config(path, first, resolve_vars=False)
    fields = dict(
        vision_config=HFVisionTower.spec_from_config(clip.vision_config),
        text_config=llm_config(world, vocab).to_dict(),
        text_encoder_config=HFTextEncoder.spec_from_config(clip.text_config),
        strategy=strategy,
        strategy_config=dict(run.model.strategy_config),
        image_token_id=vocab_size - 1,
    )
    if not run.model.text_encoder:
        with torch.device("meta"):
            if not VLMForConditionalGeneration(VLMConfig(**fields)).strategy.needs.instruction_text:
                fields["text_encoder_config"] = None
    return VLMConfig(**fields)


def synthetic_batch(model, batch: int, n_text: int = N_TEXT, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` rows of ``n_text`` random text tokens with one image's placeholders after the first
    (before it, for a strategy whose visual tokens open the sequence); instruction inputs when the
    strategy reads instruction text; a region mask when it reads the query's regions."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    text = torch.randint(3, cfg.image_token_id, (batch, n_text), generator=g)
    image = torch.full((batch, model.strategy.num_visual_tokens), cfg.image_token_id)
    if model.strategy.needs.visual_tokens_first:
        ids = torch.cat([image, text], dim=1)
    else:
        ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
    size = model.vision_tower.image_size
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
        "instruction_mask": (ids != cfg.image_token_id) & (torch.arange(ids.shape[1]) > image.shape[1]),
    }
    if model.strategy.needs.instruction_text:
        inputs["instruction_input_ids"] = torch.randint(3, 50, (batch, 12), generator=g)
        inputs["instruction_attention_mask"] = torch.ones(batch, 12, dtype=torch.long)
    if model.strategy.needs.query_regions:
        inputs["region_mask"] = (torch.rand(batch, model.vision_tower.num_patches, generator=g) < 0.1).float()
    return inputs


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _Timer:
    """The training step, prefill and decode of one model, as closures over fixed inputs: a
    training batch, a 1-prompt batch (latency) and a ``B``-prompt batch (throughput, as the
    evaluator decodes)."""

    def __init__(self, model, train_inputs: dict[str, torch.Tensor], prompts: dict[str, torch.Tensor], optimizer,
                 image_token_id: int) -> None:
        self.model, self.train_inputs, self.prompts, self.optimizer = model, train_inputs, prompts, optimizer
        self.prompt = {k: v[:1] for k, v in prompts.items()}
        # A random-weight model may pick the image placeholder; without a cache the next step would
        # then count one image token too many.
        self.suppress = [image_token_id]

    def train_step(self) -> None:
        self.model.train()
        loss = self.model(**self.train_inputs).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def prefill(self) -> None:
        self.model.eval()
        self.model(**self.prompt, use_cache=True)

    @torch.no_grad()
    def generate(self, use_cache: bool = True, batched: bool = False) -> torch.Tensor:
        self.model.eval()
        inputs = self.prompts if batched else self.prompt
        return self.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                   do_sample=False, use_cache=use_cache, pad_token_id=0, suppress_tokens=self.suppress)


def _timer_for(model, batch: int, inputs_like=None) -> _Timer:
    """Timer over synthetic inputs shaped for ``inputs_like`` (default ``model``, a vlmzoo model)."""
    source = inputs_like if inputs_like is not None else model
    train = synthetic_batch(source, batch)
    train["labels"] = train["input_ids"].masked_fill(train["input_ids"] == source.config.image_token_id, -100)
    prompts = synthetic_batch(source, batch, seed=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return _Timer(model, train, prompts, optimizer, source.config.image_token_id)


def _time_all(timers: dict[str, _Timer], repeats: int, cacheless: bool) -> dict[str, dict[str, float]]:
    """Medians (seconds) per timer: train_step, prefill, generate (1 prompt), generate_batch (B
    prompts), and with ``cacheless`` both generations again without the KV cache. One warm-up
    call each, then ``repeats`` rounds over all timers in turn."""
    def measures(t: _Timer) -> dict[str, Callable[[], Any]]:
        fns = {"train_step": t.train_step, "prefill": t.prefill, "generate": t.generate,
               "generate_batch": lambda: t.generate(batched=True)}
        if cacheless:
            fns["generate_no_cache"] = lambda: t.generate(use_cache=False)
            fns["generate_batch_no_cache"] = lambda: t.generate(use_cache=False, batched=True)
        return fns

    for t in timers.values():
        for fn in measures(t).values():
            fn()
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in timers}
    for _ in range(repeats):
        for name, t in timers.items():
            for key, fn in measures(t).items():
                samples[name].setdefault(key, []).append(_seconds(fn))
    out: dict[str, dict[str, float]] = {}
    for name, by_key in samples.items():
        med = {key: statistics.median(v) for key, v in by_key.items()}
        med["decode_token"] = (med["generate"] - med["prefill"]) / (NEW_TOKENS - 1)
        med["batch_tokens_per_s"] = timers[name].prompts["input_ids"].shape[0] * NEW_TOKENS / med["generate_batch"]
        if cacheless:
            med["cache_speedup"] = med["generate_no_cache"] / med["generate"]
            med["cache_speedup_batch"] = med["generate_batch_no_cache"] / med["generate_batch"]
        out[name] = med
    return out


def time_models(models: dict[str, Any], like, batch: int = BATCH, repeats: int = 5,
                core_inputs_only: bool = False) -> dict[str, dict[str, float]]:
    """Training step, prefill and decode of several models on the same synthetic inputs (shaped
    for the vlmzoo model ``like``), measured in turn. ``core_inputs_only`` drops the instruction
    inputs, for models outside vlmzoo that take only ids, mask, pixels and labels."""
    timers = {name: _timer_for(model, batch, inputs_like=like) for name, model in models.items()}
    if core_inputs_only:
        for t in timers.values():
            for inputs in (t.train_inputs, t.prompts, t.prompt):
                for key in ("instruction_mask", "instruction_input_ids", "instruction_attention_mask"):
                    inputs.pop(key, None)
    return _time_all(timers, repeats, cacheless=False)


def tiny_costs(strategies: list[str], repeats: int = 5, batch: int = BATCH) -> dict[str, dict[str, Any]]:
    """Step / prefill / decode timings of each strategy at tiny-world size (see the module doc)."""
    timers, info = {}, {}
    for name in strategies:
        torch.manual_seed(0)
        model = VLMForConditionalGeneration(tiny_world_config(name))
        timers[name] = _timer_for(model, batch)
        info[name] = {
            "visual_tokens": model.strategy.num_visual_tokens,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
    timings = _time_all(timers, repeats, cacheless=True)
    for name in strategies:
        info[name].update(timings[name])
        info[name]["peak_memory_mib"] = peak_train_memory_mib(timers[name])
    return info


def peak_train_memory_mib(timer: _Timer) -> float:
    """Peak bytes of tensors alive during one training step (CPU allocator, via the profiler)."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        timer.train_step()
    events = sorted(
        ((e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage),
        key=lambda x: x[0],
    )
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak / 2**20
