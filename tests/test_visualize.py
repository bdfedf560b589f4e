"""Attention heat maps (vlmzoo_lab/visualize.py, scripts/visualize.py) and the strategies' token grids.

Models are tiny, saved with their processors (word-level tokenizer, qwen2 template) and given large
random weights so that attention is far from uniform and answers are several tokens long.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_templates import build_word_tokenizer
from test_tg_llava import CLIP_TEXT, LATENTS, TINY_TG
from tiny import NUM_PATCHES, TINY_LLMS, tiny_clip_vision_spec, tiny_model
from vlmzoo import TokenGrid, VLMConfig, VLMForConditionalGeneration
from vlmzoo_lab import visualize as vz
from vlmzoo.processing import VLMProcessor

QUESTION = "What colour is it?"
SIDE = 4  # tiny tower: 32 px images, 8 px patches -> 4 x 4 patch grid
STRATEGIES = {
    "llava": {},
    "tg_llava": dict(text_encoder_config=dict(CLIP_TEXT), strategy_config=dict(TINY_TG)),
    "ta_llava": dict(strategy_config={"num_prefix_tokens": 4, "period": 2}),
}


def build(strategy: str, seed: int = 0) -> tuple[VLMForConditionalGeneration, VLMProcessor]:
    tok = build_word_tokenizer()
    llm = {**TINY_LLMS["llama"], "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
           "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "num_hidden_layers": 3}
    config = VLMConfig(text_config=llm, vision_config=tiny_clip_vision_spec(), strategy=strategy,
                       image_token_id=tok.convert_tokens_to_ids("<image>"), **STRATEGIES[strategy])
    torch.manual_seed(seed)
    model = VLMForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large weights: peaked attention, answers that depend on the input
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(("vision_tower.", "text_encoder.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    text_tok = build_word_tokenizer(auto_bos=True) if model.text_encoder is not None else None
    return model, VLMProcessor.for_model(model, tok, text_tokenizer=text_tok, template="qwen2")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """strategy -> folder of the saved model + processor; "image" -> a non-square PNG."""
    root = tmp_path_factory.mktemp("visualize")
    out = {}
    for strategy in STRATEGIES:
        model, processor = build(strategy)
        out[strategy] = root / strategy
        model.save_pretrained(out[strategy])
        processor.save_pretrained(out[strategy])
    rng = np.random.default_rng(0)
    out["image"] = root / "image.png"
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(out["image"])
    return out


def loaded(saved, strategy):
    model = VLMForConditionalGeneration.from_pretrained(saved[strategy]).eval()
    return model, VLMProcessor.from_pretrained(saved[strategy])


# ---- the command line writes PNGs of the expected size ---------------------------------------------
def expected_size(panels: int) -> tuple[int, int]:
    return round(panels * vz.PANEL_INCHES[0] * vz.DPI), round(vz.PANEL_INCHES[1] * vz.DPI)


@pytest.mark.parametrize("strategy", ["llava", "tg_llava"])
def test_cli_writes_a_png_per_model_and_side_by_side(saved, tmp_path, strategy, capsys):
    single = tmp_path / f"{strategy}.png"
    common = ["--image", str(saved["image"]), "--question", QUESTION, "--max-new-tokens", "3"]
    assert vz.main(["--model", str(saved[strategy]), *common, "--out", str(single)]) == 0
    assert f"Wrote {single}" in capsys.readouterr().out
    with Image.open(single) as im:
        assert im.format == "PNG" and im.size == expected_size(1) == (400, 460)
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # an image, not a blank

    pair = tmp_path / f"{strategy}_vs_llava.png"
    assert vz.main(["--model", str(saved[strategy]), "--compare", str(saved["llava"]), *common, "--out", str(pair)]) == 0
    with Image.open(pair) as im:
        assert im.size == expected_size(2)
        assert abs(im.size[0] - 2 * expected_size(1)[0]) <= 2 and im.size[1] == expected_size(1)[1]

    missing = tmp_path / "no_model"
    with pytest.raises(SystemExit):
        vz.main(["--model", str(saved[strategy]), "--compare", str(missing), *common, "--out", str(pair)])
    assert f"argument --compare: {missing}: no such folder" in capsys.readouterr().err


# ---- the weights are the attention from the answer to the image tokens -----------------------------
@pytest.mark.parametrize("strategy", ["llava", "tg_llava"])
def test_token_weights_equal_an_independent_sum_of_attentions(saved, strategy):
    model, processor = loaded(saved, strategy)
    image = Image.open(saved["image"]).convert("RGB")
    assert model.language_model.config._attn_implementation == "sdpa"
    got = {rows: vz.answer_attention(model, processor, image, QUESTION, max_new_tokens=3, rows=rows)
           for rows in vz.QUERY_ROWS}
    assert model.language_model.config._attn_implementation == "sdpa"  # restored after the attention pass

    # Independently: the processor's prompt, greedy generation, one eager forward over prompt + answer.
    batch = processor([{"role": "user", "content": "<image>\n" + QUESTION}], images=image, add_generation_prompt=True)
    p = batch["input_ids"].shape[1]
    with torch.no_grad():
        new = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                             eos_token_id=processor.tokenizer.eos_token_id)[0, p:]
    eos = (new == processor.tokenizer.eos_token_id).nonzero()
    answer = new[: int(eos[0]) if len(eos) else len(new)]
    assert len(answer) >= 2, "the test needs a multi-token answer to tell the row conventions apart"
    ids = torch.cat([batch["input_ids"][0], answer])
    assert torch.equal(got["predicting"].input_ids, ids) and got["predicting"].prompt_length == p
    assert got["predicting"].answer == processor.decode(answer, skip_special_tokens=True).strip()

    n = len(answer)
    inputs = dict(batch, input_ids=ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    if "instruction_mask" in batch:
        inputs["instruction_mask"] = torch.cat([batch["instruction_mask"], torch.zeros(1, n, dtype=torch.bool)], dim=1)
    model.language_model.set_attn_implementation("eager")
    with torch.no_grad():
        att = torch.stack(model(**inputs, output_attentions=True).attentions)[:, 0]  # (L, H, T, T)
    model.language_model.set_attn_implementation("sdpa")
    image_cols = [i for i, t in enumerate(ids.tolist()) if t == model.config.image_token_id]
    assert len(image_cols) == model.strategy.num_visual_tokens
    for rows, first in (("predicting", p - 1), ("answer", p)):
        expected = att[:, :, first : first + n][..., image_cols].sum(dim=(0, 1, 2))  # (T_v,)
        torch.testing.assert_close(got[rows].token_weights, expected, rtol=1e-5, atol=1e-6)
        assert got[rows].total_mass == att.shape[0] * att.shape[1] * n
        assert 0 < got[rows].image_share <= 1
        grid = got[rows].grids[0]
        torch.testing.assert_close(got[rows].maps[0], expected[:NUM_PATCHES].reshape(SIDE, SIDE))
        assert (grid.rows, grid.cols) == (SIDE, SIDE)
    # The two conventions differ, so a test of one would catch a mix-up with the other.
    assert not torch.allclose(got["predicting"].token_weights, got["answer"].token_weights, rtol=1e-3)


def test_a_high_res_image_feeds_the_crops_of_tg_llava_only(saved, tmp_path):
    image = Image.open(saved["image"]).convert("RGB")
    other = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8))  # 2x, other pixels
    for strategy, changes in (("tg_llava", True), ("llava", False)):
        model, processor = loaded(saved, strategy)
        plain = vz.answer_attention(model, processor, image, QUESTION, max_new_tokens=3)
        hr = vz.answer_attention(model, processor, image, QUESTION, max_new_tokens=3, high_res_image=other)
        same = torch.equal(plain.token_weights, hr.token_weights)
        assert same != changes, strategy  # only a strategy with crops reads the high-res picture
    other.save(tmp_path / "hr.png")
    out = tmp_path / "tg.png"
    assert vz.main(["--model", str(saved["tg_llava"]), "--image", str(saved["image"]), "--high-res-image",
                    str(tmp_path / "hr.png"), "--question", QUESTION, "--max-new-tokens", "3", "--out", str(out)]) == 0
    assert out.is_file()
    with pytest.raises(SystemExit):
        vz.main(["--model", str(saved["tg_llava"]), "--image", str(saved["image"]), "--high-res-image",
                 str(tmp_path / "missing.png"), "--question", QUESTION])


def test_heat_map_lands_where_the_token_is():
    """A hot top-right cell on a 48 x 32 image padded to a 48 x 48 view (8 px above and below)."""
    processor = type("P", (), {"pad_to_square": True})()
    view = vz.tower_view((48, 32), processor)
    assert view == (0, -8, 48)
    cell = torch.zeros(SIDE, SIDE)
    cell[0, SIDE - 1] = 1.0
    heat = vz.heat_on_image(cell, (48, 32), view)
    assert heat.shape == (32, 48) and not heat.isnan().any()
    y, x = divmod(int(heat.argmax()), 48)
    assert x >= 36 and y < 4  # the cell covers x 36..47 and y -8..3
    assert heat[16:, :24].max() < 0.05  # nothing in the bottom-left
    processor.pad_to_square = False  # centre crop: the 32 x 32 middle; outside it is not drawn
    heat = vz.heat_on_image(cell, (48, 32), vz.tower_view((48, 32), processor))
    assert heat[:, :8].isnan().all() and heat[:, 40:].isnan().all() and not heat[:, 8:40].isnan().any()


# ---- TA-LLaVA: a clear message, no map --------------------------------------------------------------
def test_ta_llava_gets_a_clear_message_and_a_non_zero_exit(saved, tmp_path, capsys):
    out = tmp_path / "ta.png"
    code = vz.main(["--model", str(saved["ta_llava"]), "--image", str(saved["image"]), "--question", QUESTION,
                    "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and not out.exists()
    assert "Strategy 'ta_llava' produces tokens that do not map to image positions" in err
    assert "nothing to draw" in err and "Traceback" not in err

    model, processor = loaded(saved, "ta_llava")
    with pytest.raises(ValueError, match="do not map to image positions"):
        vz.answer_attention(model, processor, Image.open(saved["image"]), QUESTION)
    # A comparison with a drawable model fails the same way, naming the folder.
    code = vz.main(["--model", str(saved["llava"]), str(saved["ta_llava"]), "--image", str(saved["image"]),
                    "--question", QUESTION, "--max-new-tokens", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and not out.exists() and f"{saved['ta_llava']}: Strategy 'ta_llava'" in err


# ---- grid declarations ------------------------------------------------------------------------------
def test_grid_declarations():
    llava = tiny_model("llava").strategy
    assert llava.visual_token_grids == (TokenGrid(0, SIDE, SIDE, "patches"),)
    assert sum(g.size for g in llava.visual_token_grids) == llava.num_visual_tokens == NUM_PATCHES

    tg = tiny_model("tg_llava", text_encoder_config=dict(CLIP_TEXT), strategy_config=dict(TINY_TG)).strategy
    assert tg.num_visual_tokens == NUM_PATCHES + LATENTS
    (grid,) = tg.visual_token_grids
    assert (grid.start, grid.stop, grid.rows, grid.cols) == (0, NUM_PATCHES, SIDE, SIDE)  # base tokens, not the latents

    igva = tiny_model("igva", strategy_config={"use_allocator": False, "num_groups": 3}).strategy
    assert igva.visual_token_grids == (TokenGrid(0, SIDE, SIDE, "patches"),)
    assert tiny_model("dense_connector").strategy.visual_token_grids == (TokenGrid(0, SIDE, SIDE, "patches"),)
    ta = VLMForConditionalGeneration(VLMConfig(
        text_config=dict(TINY_LLMS["llama"]), vision_config=tiny_clip_vision_spec(), image_token_id=127,
        strategy="ta_llava", strategy_config={"num_prefix_tokens": 4})).strategy
    assert ta.visual_token_grids == ()


@pytest.mark.parametrize("pool, pooled", [(2, (SIDE, SIDE // 2)), (4, (SIDE, 1)), (8, (2, 1)), (3, None)])
def test_dense_connector_sti_grids(pool, pooled):
    """1 x pool strips (pool divides the row), bands of whole rows (8 = 2 rows), none when windows wrap (3)."""
    strategy = tiny_model("dense_connector", strategy_config={"mode": "sti", "sti_layers": [1, 2], "sti_pool": pool}).strategy
    grids = strategy.visual_token_grids
    assert grids[0] == TokenGrid(0, SIDE, SIDE, "patches")
    if pooled is None:
        assert len(grids) == 1
        return
    per_layer = NUM_PATCHES // pool
    assert [(g.start, g.rows, g.cols) for g in grids[1:]] == [(NUM_PATCHES, *pooled), (NUM_PATCHES + per_layer, *pooled)]
    assert grids[-1].stop == strategy.num_visual_tokens
    # The pooled token at (r, c) really averages the patches under that cell (raster order, as the pooling runs).
    patches = torch.arange(NUM_PATCHES, dtype=torch.float).reshape(SIDE, SIDE)
    pooled_ids = torch.nn.functional.avg_pool1d(patches.reshape(1, 1, -1), pool, pool).reshape(-1)
    cell_h, cell_w = SIDE // pooled[0], SIDE // pooled[1]
    cells = patches.reshape(pooled[0], cell_h, pooled[1], cell_w).mean(dim=(1, 3))
    torch.testing.assert_close(pooled_ids.reshape(pooled), cells)
