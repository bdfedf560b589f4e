"""What every registered strategy must satisfy, as plain functions of a strategy name.

``tests/test_conformance.py`` runs them for each name of ``vlmzoo.available_strategies()`` (and on toy
strategies, to show that each check can fail); any test may call them for a strategy it registers.

Models are tiny (tests/tiny.py's widths) at the tiny world's depths: a 4-layer tower and a 4-layer
Llama, so each strategy's config defaults apply unchanged (IGVA's K = 4 layer groups, TA-LLaVA's
adapters after layers 0 and 1). A model gets the tiny CLIP text tower exactly when its strategy's
``needs.instruction_text`` asks for one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tiny import IMAGE_SIZE, IMAGE_TOKEN_ID, TINY_CLIP_TEXT, left_pad, tiny_clip_vision_spec, tiny_config
from vlmzoo import VLMConfig, VLMForConditionalGeneration, get_strategy_class
from vlmzoo.strategy import ZeroInitEquivalence

REPO = Path(__file__).resolve().parent.parent
DEPTH = 4  # tower and LLM layers, as in the tiny world
NEW_TOKENS = 4


# ---- tiny models and a batch -------------------------------------------------------------------------
def conformance_config(name: str, strategy_config: dict[str, Any] | None = None) -> VLMConfig:
    """``tiny_config(name)`` at the tiny world's depths, with a text encoder iff the strategy reads
    instruction text (asked of a strategy built on the meta device with one available)."""
    base = dict(vision_config=tiny_clip_vision_spec(num_hidden_layers=DEPTH), llm_layers=DEPTH,
                strategy_config=dict(strategy_config or {}))
    with_text = tiny_config(name, text_encoder_config=dict(TINY_CLIP_TEXT), **base)
    with torch.device("meta"):
        needs = VLMForConditionalGeneration(with_text).strategy.needs
    return with_text if needs.instruction_text else tiny_config(name, **base)


def build(name: str, strategy_config: dict[str, Any] | None = None, seed: int = 0) -> VLMForConditionalGeneration:
    torch.manual_seed(seed)
    return VLMForConditionalGeneration(conformance_config(name, strategy_config)).eval()


def batch(model: VLMForConditionalGeneration, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three left-padded rows: an image and a long question, text only, an image and a short question.

    Each image's placeholders stand after ``BOS 5`` (or open the row, before BOS, if the strategy's
    visual tokens come first); ``instruction_mask`` marks the question; ``instruction_input_ids``
    ``(2, 6)`` are the two images' instructions in the tiny text tower's vocabulary (right padded).
    """
    k = model.strategy.num_visual_tokens
    first = model.strategy.needs.visual_tokens_first
    questions = [[6, 7, 8, 9, 10], [11, 12, 13], [14, 15]]

    def row(question: list[int], image: bool) -> tuple[list[int], list[bool]]:
        if not image:
            ids = [1] + question
        elif first:
            ids = [IMAGE_TOKEN_ID] * k + [1] + question
        else:
            ids = [1, 5] + [IMAGE_TOKEN_ID] * k + question
        return ids, [False] * (len(ids) - len(question)) + [True] * len(question)

    rows = [row(questions[0], True), row(questions[1], False), row(questions[2], True)]
    ids, mask = left_pad([r[0] for r in rows])
    width = ids.shape[1]
    instruction = torch.tensor([[False] * (width - len(f)) + f for _, f in rows])
    text_ids = torch.tensor([[98, 6, 7, 8, 99, 0], [98, 14, 99, 0, 0, 0]])
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=ids, attention_mask=mask, instruction_mask=instruction,
                pixel_values=torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
                instruction_input_ids=text_ids, instruction_attention_mask=(text_ids != 0).long())


def labels_for(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = inputs["input_ids"]
    return ids.masked_fill((ids == IMAGE_TOKEN_ID) | (inputs["attention_mask"] == 0), -100)


def perturb(params: list[torch.nn.Parameter], seed: int = 7, std: float = 0.1) -> None:
    """Add N(0, std) noise, so zero-initialised branches act and a re-initialisation would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def outputs(model: VLMForConditionalGeneration, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits, visual tokens and strategy extras of one forward pass, by name."""
    with torch.no_grad():
        out = model(**inputs, output_strategy_extras=True)
    extras = {f"extras[{k}]": v for k, v in (out.strategy_extras or {}).items()}
    return {"logits": out.logits, "visual tokens": out.image_hidden_states, **extras}


def _config_dict(config: VLMConfig) -> dict[str, Any]:
    """``config.to_dict()`` without what loading fills in (the folder's path, the loaded dtype)."""

    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in ("_name_or_path", "dtype")}

    return strip(config.to_dict())


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: outputs {sorted(a)} vs {sorted(b)}"
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=lambda m, k=key: f"{what}, {k}: {m}")


# ---- the checks ----------------------------------------------------------------------------------------
def check_save_load(name: str, folder: Path) -> None:
    """save_pretrained / from_pretrained: no key missing or unexpected, the same config, and the same
    logits, visual tokens and extras bit for bit (every strategy weight perturbed first, so weights
    left to re-initialisation would show). The folder's config carries the strategy's input spec, and
    a processor saved beside the model loads it back with no override."""
    from test_templates import build_word_tokenizer
    from vlmzoo.processing import VLMProcessor, make_image_processor

    model = build(name)
    perturb(list(model.strategy.parameters()))
    inputs = batch(model)
    model.save_pretrained(folder)
    text_tok = build_word_tokenizer(auto_bos=True) if model.text_encoder is not None else None
    VLMProcessor(build_word_tokenizer(), model.config.get_input_spec(), make_image_processor(IMAGE_SIZE),
                 text_tokenizer=text_tok, template="qwen2").save_pretrained(folder)
    again, info = VLMForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    again.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert _config_dict(again.config) == _config_dict(model.config)
    spec = model.strategy.input_spec
    assert again.config.get_input_spec() == spec == again.strategy.input_spec, f"{name}: input spec"
    assert VLMProcessor.from_pretrained(folder).input_spec == spec, f"{name}: the saved processor's input spec"
    assert_same(outputs(model, inputs), outputs(again, inputs), f"{name} after save_pretrained/from_pretrained")


def check_generation(name: str) -> None:
    """Greedy generation with and without the KV cache on a left-padded batch with image and text-only
    rows: the same tokens, and the same logits at every step (strategy weights perturbed first)."""
    model = build(name)
    perturb(list(model.strategy.parameters()))
    inputs = batch(model)
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
              suppress_tokens=[IMAGE_TOKEN_ID], output_logits=True, return_dict_in_generate=True)
    cached = model.generate(**inputs, **kw, use_cache=True)
    uncached = model.generate(**inputs, **kw, use_cache=False)
    assert cached.sequences.shape == (3, inputs["input_ids"].shape[1] + NEW_TOKENS)
    for step, (a, b) in enumerate(zip(cached.logits, uncached.logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, s=step: f"{name}, step {s}: {m}")
    assert torch.equal(cached.sequences, uncached.sequences), f"{name}: cached and cache-less tokens differ"


def check_gradients(name: str) -> None:
    """For each stage that trains one group (each of the strategy's module groups, then the LLM), with
    training's own StagePlan: every parameter of the trained group gets a gradient (some non-zero),
    no parameter of another group gets one."""
    from vlmzoo.config import StageConfig
    from vlmzoo.training.groups import StagePlan, group_layout

    model = build(name).train()
    inputs = batch(model)
    labels = labels_for(inputs)
    layout = group_layout(model)
    params = dict(model.named_parameters())
    for stage in [*layout.strategy_groups, "llm"]:
        plan = StagePlan.build(model, StageConfig(train=[stage]))
        plan.apply(model)
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, labels=labels).loss
        if loss.requires_grad:  # else no trained parameter reaches the loss: every one is missed below
            loss.backward()
        for group, names in layout.groups.items():
            reached = [n for n in names if params[n].grad is not None]
            if group in plan.trained:
                missed = sorted(set(names) - set(reached))
                assert not missed, f"{name}, training {stage!r}: no gradient reaches {missed}"
                assert any(params[n].grad.any() for n in names), f"{name}, training {stage!r}: every gradient is zero"
            else:
                assert not reached, f"{name}, training {stage!r}: frozen group {group!r} got gradients: {reached[:3]}"


def check_fresh_init(name: str) -> None:
    """Every strategy parameter is set by some module's ``reset_parameters()``, as ``from_components``
    and ``from_pretrained`` (for weights a checkpoint lacks) rely on: built on meta, materialised as
    NaN, reset -> finite."""
    with torch.device("meta"):
        model = VLMForConditionalGeneration(conformance_config(name))
    strategy = model.strategy.to_empty(device="cpu")
    for p in strategy.parameters():
        p.data.fill_(float("nan"))
    for module in strategy.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    left = [n for n, p in strategy.named_parameters() if not torch.isfinite(p).all()]
    assert not left, f"{name}: no reset_parameters() initialises strategy.{left[:3]}"


def check_zero_init_equivalence(name: str, declared: ZeroInitEquivalence) -> None:
    """The declaration holds: the fresh strategy with ``overrides``, given every weight of a reference
    model, returns the reference's visual tokens and logits bit for bit; and its own new weights are
    wired in (perturbing them changes the visual tokens)."""
    reference_name = declared.reference or name
    reference = build(reference_name, declared.reference_overrides, seed=0)
    model = build(name, declared.overrides, seed=1)
    assert model.strategy.num_visual_tokens == reference.strategy.num_visual_tokens
    loaded = model.load_state_dict(reference.state_dict(), strict=False)
    assert not loaded.unexpected_keys, f"{reference_name} weights {name} has no place for: {loaded.unexpected_keys[:3]}"
    inputs = batch(model)
    a, b = outputs(reference, inputs), outputs(model, inputs)
    what = f"{name} {declared.overrides} vs {reference_name} {declared.reference_overrides}"
    for key in ("visual tokens", "logits"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=lambda m, k=key: f"{what}, {k}: {m}")
    fresh = set(loaded.missing_keys)
    new = [p for n, p in model.named_parameters() if n in fresh and n.startswith("strategy.")]
    if new:
        perturb(new)
        assert not torch.allclose(outputs(model, inputs)["visual tokens"], a["visual tokens"]), (
            f"{what}: the weights the reference lacks do not change the output")


def reference_configs(names: list[str]) -> list[tuple[str, Path]]:
    """(strategy, file) for every ``configs/<strategy>/reference*.yaml`` the strategies ship."""
    return [(n, p) for n in names for p in sorted((REPO / "configs" / n).glob("reference*.yaml"))]


def check_reference_config(name: str, path: Path) -> None:
    """The reference config builds ``name`` on the meta device (text encoder included) and one prefill
    is FLOP-counted, as scripts/benchmark.py does."""
    from vlmzoo.build import build_on_meta
    from vlmzoo.config import load_run_config
    from vlmzoo.flops import prefill_flops

    model = build_on_meta(load_run_config(path))
    assert model.config.strategy == name and all(p.is_meta for p in model.parameters())
    flops = prefill_flops(model, 40)
    assert flops["language_model"] > 1e11 and flops["vision_tower"] > 1e10 and flops["strategy"] > 0
    assert flops["total"] >= sum(v for k, v in flops.items() if k != "total")
    if model.strategy.needs.instruction_text:
        assert flops["text_encoder"] > 0
    assert sum(p.numel() for p in model.parameters()) > 1e9 and model.strategy.num_visual_tokens > 0


def zero_init_declarations(names: list[str]) -> list[tuple[str, ZeroInitEquivalence]]:
    return [(n, d) for n in names for d in get_strategy_class(n).zero_init_equivalences]
