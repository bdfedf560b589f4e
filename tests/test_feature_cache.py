"""The frozen-tower feature cache: same features as encoding, and no tower pass for seen images."""

from __future__ import annotations

import pytest
import torch

from tiny import tiny_model
from vlmzoo import StrategyNeeds
from vlmzoo.feature_cache import VisionFeatureCache


def _count_tower_images(model) -> list[int]:
    seen: list[int] = []
    model.vision_tower.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    return seen


def test_cached_features_equal_encoded_ones_and_skip_the_tower(pixels) -> None:
    model = tiny_model("llava", seed=1)
    needs = model.strategy.needs
    with torch.no_grad():
        plain = model.encode_images(pixels, needs)
        cache = VisionFeatureCache()
        seen = _count_tower_images(model)
        first = model.encode_images(pixels[:2], needs, cache=cache)
        mixed = model.encode_images(pixels, needs, cache=cache)  # 2 seen, the rest new
        again = model.encode_images(pixels.flip(0), needs, cache=cache)
    assert seen == [1] * pixels.shape[0]  # one pass per missed image; the last call never ran the tower
    assert (cache.hits, cache.misses) == (2 + pixels.shape[0], pixels.shape[0])
    for layer in needs.vision_layers:
        torch.testing.assert_close(first.layers[layer], plain.layers[layer][:2])
        torch.testing.assert_close(mixed.layers[layer], plain.layers[layer])
        torch.testing.assert_close(again.layers[layer], plain.layers[layer].flip(0))
        torch.testing.assert_close(mixed.cls[layer], plain.cls[layer])


def test_an_image_gets_the_same_features_whichever_images_miss_with_it(pixels) -> None:
    """Misses are encoded one image at a time: a resumed run, whose cache starts empty and misses
    other images together, gets bit-identical features."""
    model = tiny_model("llava", seed=1)
    needs = StrategyNeeds(vision_layers=(-2,), high_res_factor=2, high_res_layers=(-2,))
    hr = torch.nn.functional.interpolate(pixels, scale_factor=2.0)
    with torch.no_grad():
        together = model.encode_images(pixels, needs, hr, cache=VisionFeatureCache())
        for i in range(pixels.shape[0]):
            alone = model.encode_images(pixels[i : i + 1], needs, hr[i : i + 1], cache=VisionFeatureCache())
            assert torch.equal(alone.layers[-2][0], together.layers[-2][i])
            assert torch.equal(alone.high_res[-2][0], together.high_res[-2][i])


def test_a_changed_image_is_a_miss_and_high_res_is_cached_too(pixels) -> None:
    model = tiny_model("llava", seed=3)
    needs = StrategyNeeds(vision_layers=(-2, 1), high_res_factor=2, high_res_layers=(-2,))
    with torch.no_grad():
        plain = model.encode_images(pixels, needs)
        cache = VisionFeatureCache()
        model.encode_images(pixels, needs, cache=cache)
        changed = pixels.clone()
        changed[0, 0, 0, 0] += 1.0
        out = model.encode_images(changed, needs, cache=cache)
    assert cache.misses == pixels.shape[0] + 1
    torch.testing.assert_close(out.high_res[-2][1:], plain.high_res[-2][1:])
    assert not torch.equal(out.high_res[-2][0], plain.high_res[-2][0])
    torch.testing.assert_close(out.layers[1][1:], plain.layers[1][1:])


def test_file_keyed_images_are_served_from_the_cache_without_their_pixels(pixels) -> None:
    model = tiny_model("llava", seed=2)
    needs = StrategyNeeds(vision_layers=(-2,), high_res_factor=2, high_res_layers=(-2,))
    hr = torch.nn.functional.interpolate(pixels, scale_factor=2.0)
    keys = [f"img{i}.png|hr/img{i}.png" for i in range(pixels.shape[0])]
    with torch.no_grad():
        plain = model.encode_images(pixels, needs, hr)
        cache = VisionFeatureCache()
        model.encode_images(pixels, needs, hr, image_keys=keys, cache=cache)
        assert all(cache.contains(needs, k) for k in keys) and not cache.contains(needs, "other.png")
        assert not cache.contains(StrategyNeeds(vision_layers=(-1,)), keys[0])  # other layers: another entry
        seen = _count_tower_images(model)
        holes = torch.full_like(pixels, float("nan")), torch.full_like(hr, float("nan"))
        again = model.encode_images(*holes[:1], needs=needs, pixel_values_hr=holes[1], image_keys=keys, cache=cache)
        assert seen == []
        torch.testing.assert_close(again.layers[-2], plain.layers[-2])
        torch.testing.assert_close(again.high_res[-2], plain.high_res[-2])
        # a placeholder that is not in the cache is an error naming the image, never NaN features
        with pytest.raises(RuntimeError, match=r"not in the vision feature cache.*new\.png"):
            model.encode_images(holes[0][:1], needs, holes[1][:1], image_keys=["new.png"], cache=cache)
        with pytest.raises(ValueError, match="2 image_keys for 1 images"):
            model.encode_images(pixels[:1], needs, hr[:1], image_keys=keys[:2], cache=cache)


def test_cache_is_bypassed_when_the_tower_trains(pixels) -> None:
    model = tiny_model("llava", seed=4)
    model.config.freeze_vision_tower = False
    model.vision_tower.requires_grad_(True)
    cache = VisionFeatureCache()
    feats = model.encode_images(pixels, cache=cache)
    assert feats.layers[-2].requires_grad
    assert len(cache) == 0


def test_cache_stops_growing_at_its_byte_limit(pixels) -> None:
    model = tiny_model("llava", seed=5)
    cache = VisionFeatureCache(max_bytes=1)
    with torch.no_grad():
        a = model.encode_images(pixels, cache=cache)
        b = model.encode_images(pixels, cache=cache)
    assert len(cache) == 0 and cache.misses == 2 * pixels.shape[0]
    torch.testing.assert_close(a.layers[-2], b.layers[-2])


def test_instruction_cache_equals_the_text_encoder_and_skips_it_for_seen_instructions() -> None:
    from test_tg_llava import tg_model

    from vlmzoo.feature_cache import InstructionFeatureCache

    model = tg_model(seed=6)
    # Right-padded instructions of different lengths; rows 0 and 2 are the same instruction padded
    # to different widths (batches pad to their longest row).
    ids = torch.tensor([[98, 5, 6, 7, 99, 0], [98, 8, 9, 10, 11, 99], [98, 5, 6, 7, 99, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        plain = model.encode_instructions(ids, mask)
        cache = InstructionFeatureCache()
        calls: list[int] = []
        model.text_encoder.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
        first = model.encode_instructions(ids, mask, cache)
        again = model.encode_instructions(ids[[1, 0]], mask[[1, 0]], cache)
        narrower = model.encode_instructions(ids[[0], :5], mask[[0], :5], cache)
    assert calls == [1, 1]  # one pass per distinct instruction; later calls are all hits
    assert len(cache) == 2 and cache.misses == 2 and cache.hits == 1 + 2 + 1
    torch.testing.assert_close(first.pooled, plain.pooled)
    real = mask.bool()
    torch.testing.assert_close(first.tokens[real], plain.tokens[real])
    assert (first.tokens[~real] == 0).all() and torch.equal(first.mask, mask)
    torch.testing.assert_close(again.pooled, plain.pooled[[1, 0]])
    torch.testing.assert_close(narrower.tokens[0], plain.tokens[0, :5])


def test_forward_reads_caches_passed_in_and_keeps_none_itself(pixels) -> None:
    """forward(feature_caches=...) fills and reads the caller's caches on that call only: the
    logits equal a cache-less call's, and the model holds no cache between calls."""
    from tiny import prompt_ids

    from vlmzoo.feature_cache import FeatureCaches

    model = tiny_model("llava", seed=7)
    n = model.strategy.num_visual_tokens
    ids = torch.tensor([prompt_ids(n, [1, 5], [6, 7])] * 2)
    caches = FeatureCaches(vision=VisionFeatureCache())
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=pixels[:2]).logits
        seen = _count_tower_images(model)
        first = model(input_ids=ids, pixel_values=pixels[:2], feature_caches=caches).logits
        again = model(input_ids=ids, pixel_values=pixels[:2], feature_caches=caches).logits
        after = model(input_ids=ids, pixel_values=pixels[:2]).logits  # no cache: the tower runs again
    assert seen == [1, 1, 2] and (caches.vision.hits, caches.vision.misses) == (2, 2)
    # misses are encoded one image at a time, so a cached call equals the batched one up to
    # float summation order, and equals itself exactly on the hit
    torch.testing.assert_close(first, plain)
    assert torch.equal(again, first) and torch.equal(after, plain)
    assert not any(isinstance(v, (VisionFeatureCache, FeatureCaches)) for v in vars(model).values())
