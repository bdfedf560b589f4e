"""The `crop_tokens` positive control: the base view's patches and every high-res crop patch as
visual tokens (tiny configs of tests/tiny.py), and its reference config on meta."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import architectures.crop_tokens  # noqa: F401  registers it even in a venv installed before it existed
from tiny import IMAGE_SIZE, IMAGE_TOKEN_ID, NUM_PATCHES, PATCH, left_pad, prompt_ids, tiny_model
from vlmzoo import TokenGrid, VLMForConditionalGeneration

REPO = Path(__file__).resolve().parent.parent
SIDE = IMAGE_SIZE // PATCH  # 4 patches per side


def _visual_tokens(model, pixels, pixels_hr=None) -> torch.Tensor:
    """The strategy's visual tokens ``(N, T_v, d_llm)`` for one prompt per image."""
    n = model.strategy.num_visual_tokens
    ids, mask = left_pad([prompt_ids(n, [1, 5], [6]) for _ in range(len(pixels))])
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    if pixels_hr is not None:
        batch["pixel_values_hr"] = pixels_hr
    with torch.no_grad():
        return model(**batch).image_hidden_states


def test_token_count_needs_and_grids():
    model = tiny_model("crop_tokens")
    s = model.strategy
    assert s.num_visual_tokens == NUM_PATCHES + 4 * NUM_PATCHES == 80
    assert (s.needs.high_res_factor, s.needs.high_res_layers, s.needs.vision_layers) == (2, (-2,), (-2,))
    assert s.needs.instruction_text == () and not s.needs.instruction_span
    assert s.visual_token_grids == (TokenGrid(0, SIDE, SIDE, "base patches"), TokenGrid(16, 2 * SIDE, 2 * SIDE, "crop patches"))
    assert s.visual_token_grids[-1].stop == s.num_visual_tokens

    crops_only = tiny_model("crop_tokens", strategy_config={"include_base": False, "high_res_factor": 3}).strategy
    assert crops_only.num_visual_tokens == 9 * NUM_PATCHES
    assert crops_only.visual_token_grids == (TokenGrid(0, 3 * SIDE, 3 * SIDE, "crop patches"),)
    assert crops_only.needs.high_res_factor == 3
    with pytest.raises(ValueError, match=r"crop_tokens\]\.high_res_factor must be >= 2"):
        tiny_model("crop_tokens", strategy_config={"high_res_factor": 1})


def test_merge_crops_lays_the_crop_patches_out_over_the_whole_image():
    """Crop-major patches, each labelled with its (row, col) in the 2x image, come out in raster order."""
    from architectures.crop_tokens import merge_crops

    f, s = 2, 3
    labels = torch.zeros(1, f * f * s * s, 2)
    for crop in range(f * f):
        for p in range(s * s):
            labels[0, crop * s * s + p] = torch.tensor([(crop // f) * s + p // s, (crop % f) * s + p % s])
    merged = merge_crops(labels, f, s)[0]
    want = torch.tensor([[r, c] for r in range(f * s) for c in range(f * s)], dtype=torch.float)
    torch.testing.assert_close(merged, want)


def test_each_crop_token_reads_its_own_high_res_patch(pixels):
    """Through the core's crops and tower (layer 0: patch embeddings, no attention mixing): changing
    one patch of the 2x image changes exactly the crop token of that patch, at its place in the
    declared (2s) x (2s) grid, and no base token."""
    model = tiny_model("crop_tokens", strategy_config={"vision_layer": 0})
    g = torch.Generator().manual_seed(3)
    hr = torch.randn(1, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE, generator=g)
    before = _visual_tokens(model, pixels[:1], hr)
    grid = model.strategy.visual_token_grids[1]
    for row, col in [(0, 0), (2, 5), (7, 3), (5, 7)]:
        changed_hr = hr.clone()
        changed_hr[..., row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH] += 1.0
        after = _visual_tokens(model, pixels[:1], changed_hr)
        moved = ((after - before).abs().amax(-1) > 1e-6)[0].nonzero().flatten().tolist()
        assert moved == [grid.start + row * grid.cols + col], (row, col, moved)


def test_base_tokens_equal_llava_and_a_llava_checkpoint_loads(pixels, tmp_path):
    """The base view is `llava`'s: same connector name, so llava weights load with nothing missing,
    and its first P tokens are llava's tokens; the crops come from pixel_values_hr when given."""
    llava = tiny_model("llava", seed=0)
    llava.save_pretrained(tmp_path)
    crops = tiny_model("crop_tokens").config
    model, info = VLMForConditionalGeneration.from_pretrained(tmp_path, config=crops, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens = _visual_tokens(model, pixels)
    torch.testing.assert_close(tokens[:, :NUM_PATCHES], _visual_tokens(llava, pixels), rtol=0, atol=0)
    hr = torch.randn(len(pixels), 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE, generator=torch.Generator().manual_seed(4))
    with_hr = _visual_tokens(model, pixels, hr)
    torch.testing.assert_close(with_hr[:, :NUM_PATCHES], tokens[:, :NUM_PATCHES], rtol=0, atol=0)
    assert not torch.allclose(with_hr[:, NUM_PATCHES:], tokens[:, NUM_PATCHES:])


def test_gradients_reach_the_connector_not_the_tower(pixels):
    model = tiny_model("crop_tokens").train()
    n = model.strategy.num_visual_tokens
    ids, mask = left_pad([prompt_ids(n, [1, 5], [6, 7])])
    labels = ids.clone()
    labels[:, : n + 2] = -100
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels[:1], labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.strategy.connector.parameters())
    assert all(p.grad is None for p in model.vision_tower.parameters())


def test_declared_as_an_entry_point():
    """pyproject.toml registers it as the built-ins are (the installed metadata follows on reinstall)."""
    section = (REPO / "pyproject.toml").read_text().split('[project.entry-points."vlmzoo.strategies"]', 1)[1]
    section = section.split("\n[", 1)[0]
    assert re.search(r'^crop_tokens = "architectures\.crop_tokens"$', section, flags=re.M)


def test_reference_config_on_meta():
    """configs/crop_tokens/reference.yaml: CLIP-L/336, 576 + 4 x 576 tokens, llava's connector only,
    and a context that holds them."""
    from vlmzoo.build import build_on_meta
    from vlmzoo.config import load_run_config

    cfg = load_run_config(REPO / "configs" / "crop_tokens" / "reference.yaml", resolve_vars=False)
    model = build_on_meta(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert model.strategy.num_visual_tokens == 576 + 4 * 576 == 2880
    assert sum(p.numel() for p in model.strategy.parameters()) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert cfg.data.max_length >= 2880 + 512


def test_marking_the_named_object_moves_its_base_and_crop_tokens_only(pixels):
    """mark_named_object: the query's regions are needed; v starts at zero (a fresh model equals
    plain crop_tokens); once v is non-zero exactly the marked base patch and its 2 x 2 crop patches
    change, and v gets gradient only through a non-empty mask."""
    plain = tiny_model("crop_tokens", seed=3)
    model = tiny_model("crop_tokens", strategy_config={"mark_named_object": True})
    assert model.strategy.needs.query_regions and not plain.strategy.needs.query_regions
    assert model.config.get_input_spec().query_region_grid == SIDE
    model.load_state_dict(plain.state_dict(), strict=False)
    assert [n for n, _ in model.strategy.marker.named_parameters()] == ["v"]
    n = model.strategy.num_visual_tokens
    ids, mask = left_pad([prompt_ids(n, [1, 5], [6])])
    hr = torch.randn(1, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    regions = torch.zeros(1, NUM_PATCHES)
    regions[0, 6] = 1  # row 1, column 2 of the 4 x 4 base grid
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels[:1], pixel_values_hr=hr, region_mask=regions)
    with torch.no_grad():
        before = model(**batch).image_hidden_states
        torch.testing.assert_close(before, plain(**{k: v for k, v in batch.items() if k != "region_mask"}).image_hidden_states,
                                   rtol=0, atol=0)
        model.strategy.marker.v.copy_(torch.randn(model.strategy.marker.v.shape, generator=torch.Generator().manual_seed(0)))
        after = model(**batch).image_hidden_states
    moved = ((after - before).abs().amax(-1) > 0)[0].nonzero().flatten().tolist()
    crop = model.strategy.visual_token_grids[1]
    assert moved == [6] + sorted(crop.start + r * crop.cols + c for r in (2, 3) for c in (4, 5))

    model.strategy.marker.v.data.zero_()
    labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, -100).masked_fill(mask == 0, -100)
    model.train()(**batch, labels=labels).loss.backward()
    assert model.strategy.marker.v.grad.abs().sum() > 0
    model.zero_grad()
    model(**{**batch, "region_mask": torch.zeros_like(regions)}, labels=labels).loss.backward()
    assert model.strategy.marker.v.grad.abs().sum() == 0
