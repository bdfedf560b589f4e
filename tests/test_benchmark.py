"""scripts/benchmark.py: FLOPs counted at reference scale, the tiny-scale timings' plumbing, and the
comparison with transformers' Llava on identical weights. (Speeds themselves are never asserted.)
That every strategy's reference configs build on meta and count a prefill: tests/test_conformance.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conformance import reference_model
from vlmzoo_lab import benchmark as bench


def _script_main():
    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("benchmark_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def reference_rows():
    """The reference configs' rows, on the meta models the conformance suite builds (once a session)."""
    files = bench.reference_config_files(["llava", "ta_llava"])
    return {row["config"]: row for row in (bench.reference_costs(f, model=reference_model(f)) for f in files)}


def test_reference_llava_flops_match_a_plain_count(reference_rows):
    row = reference_rows["llava/reference.yaml"]
    flops = row["prefill_flops"]
    # A plain FLOP-counter pass over LLaVA-1.5-7B (576 image + 40 text tokens): ~8.7 TFLOPs,
    # ~0.38 tower (0.366 here: the last tower layer is skipped), ~0.02 connector, ~8.3 LLM + head.
    assert flops["total"] == pytest.approx(8.7e12, rel=0.05)
    assert flops["vision_tower"] == pytest.approx(0.38e12, rel=0.05)
    assert flops["strategy"] == pytest.approx(0.024e12, rel=0.05)
    assert flops["language_model"] == pytest.approx(8.3e12, rel=0.05)
    assert row["visual_tokens"] == 576 and row["parameters"]["llm"] == 6_738_423_808


def test_reference_ta_llava_on_the_same_llm_is_a_fraction_of_llava(reference_rows):
    llava = reference_rows["llava/reference.yaml"]
    ta = reference_rows["ta_llava/reference_vicuna.yaml"]
    assert ta["llm"] == llava["llm"] and ta["visual_tokens"] == 32
    assert 0.15 < ta["prefill_flops"]["total"] / llava["prefill_flops"]["total"] < 0.25
    assert reference_rows["ta_llava/reference.yaml"]["llm"] == "gemma2"


def test_llava_and_transformers_llava_agree_before_they_are_timed():
    from vlmzoo_lab.llava_vs_transformers import llava_vs_transformers

    result = llava_vs_transformers(repeats=1, batch=2)
    assert result["max_abs_logit_difference"] < 1e-5
    for who in ("ours", "transformers"):
        assert all(result["timings"][who][k] > 0 for k in ("train_step", "prefill", "generate"))
    ratios = result["ratio_transformers_over_ours"]
    assert ratios["train_step"] == pytest.approx(
        result["timings"]["transformers"]["train_step"] / result["timings"]["ours"]["train_step"]
    )


def test_report_writes_json_and_markdown_with_the_measured_numbers(tmp_path, capsys):
    main = _script_main()
    assert main(["--parts", "tiny", "--archs", "llava", "tg_llava", "--repeats", "1", "--batch", "2",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "benchmark.json").read_text())
    markdown = (tmp_path / "benchmark.md").read_text()
    assert set(result["tiny"]) == {"llava", "tg_llava"}
    tg = result["tiny"]["tg_llava"]
    assert tg["visual_tokens"] == 16 + 8  # tiny-world patches + the tiny config's DP latents
    assert tg["cache_speedup"] == pytest.approx(tg["generate_no_cache"] / tg["generate"])
    assert tg["batch_tokens_per_s"] == pytest.approx(2 * bench.NEW_TOKENS / tg["generate_batch"])
    assert tg["peak_memory_mib"] > 0
    row = next(line for line in markdown.splitlines() if line.startswith("| `tg_llava`"))
    assert f"{1000 * tg['train_step']:.1f}" in row and f"{tg['cache_speedup_batch']:.1f}x" in row


def test_an_unknown_strategy_is_a_usage_error_naming_the_available_ones(tmp_path, capsys):
    main = _script_main()
    with pytest.raises(SystemExit):
        main(["--parts", "reference", "--archs", "llava", "nope", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--archs nope" in err and "available: " in err and "tg_llava" in err
    assert not (tmp_path / "benchmark.json").exists()  # nothing measured for a partial list


def test_a_strategy_without_reference_configs_is_skipped_in_one_line(tmp_path, capsys):
    """Every registered strategy is benchmarked; one that ships no reference*.yaml is skipped at
    reference scale, saying so, and still measured at tiny scale (its config dataclass's defaults)."""
    from vlmzoo import get_strategy_class, register_strategy
    from vlmzoo.registry import STRATEGIES

    class Unshipped(get_strategy_class("llava")):
        pass

    register_strategy("unshipped_llava")(Unshipped)
    try:
        main = _script_main()
        assert main(["--parts", "reference", "tiny", "--archs", "llava", "unshipped_llava", "--repeats", "1",
                     "--batch", "2", "--out", str(tmp_path)]) == 0
    finally:
        STRATEGIES.unregister("unshipped_llava")
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if "skipping" in line] == [
        "reference scale: skipping unshipped_llava (it ships no reference*.yaml)"]
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert [row["config"] for row in result["reference"]] == ["llava/reference.yaml"]
    assert set(result["tiny"]) == {"llava", "unshipped_llava"}
    assert result["tiny"]["unshipped_llava"]["visual_tokens"] == result["tiny"]["llava"]["visual_tokens"]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from vlmzoo_lab.tinyworld import small_test_config

    cache = tmp_path_factory.mktemp("throughput_world")
    return [f"tiny_world.cache_dir={cache}", f"tiny_world.config={json.dumps(small_test_config().to_dict())}"]


def test_training_part_reports_both_trainers_samples_per_second_and_their_ratio(small_world, tmp_path, capsys):
    main = _script_main()
    assert main(["--parts", "training", "--training-overrides", *small_world, "training.stages.1.batch_size=4",
                 "--training-steps", "2", "--training-warmup", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "benchmark.json").read_text())["training"]
    markdown = (tmp_path / "benchmark.md").read_text()
    ours, theirs = result["vlmzoo"], result["transformers"]
    # the same function and the same trainable parameters on both sides
    assert result["max_abs_logit_difference"] < 1e-5 and result["loss_difference"] < 1e-5
    assert result["trainable_parameters"]["vlmzoo"] == result["trainable_parameters"]["transformers"] > 0
    assert result["trainable_parameters"]["vlmzoo"] < result["parameters"]  # the tower is frozen
    assert result["stage"] == "stage2_instruct" and result["batch_size"] == 4
    assert ours["timed_steps"] == theirs["timed_steps"] == 2  # 2 rounds x 1 step after each round's warm-up
    for side in (ours, theirs):
        assert side["samples_per_s"] == pytest.approx(4 / side["step_s"])
        assert side["step_s"] == pytest.approx(sum(side["split_s"].values()))
        assert side["split_s"]["forward_backward"] > 0 and side["split_s"]["optimizer"] > 0
    assert result["ratio"] == pytest.approx(ours["samples_per_s"] / theirs["samples_per_s"])
    # the warm cache served every image of the timed steps: no tower pass on the vlmzoo side
    cache = result["feature_cache"]
    assert cache["images"] > 0 and cache["misses"] == 0 and cache["hits"] > 0
    assert theirs["split_s"]["image_features"] > 0
    assert f"**{ours['samples_per_s']:.0f}**" in markdown and f"**{theirs['samples_per_s']:.0f}**" in markdown
    assert f"**{result['ratio']:.2f}x**" in markdown


def test_only_a_llava_model_has_a_transformers_twin():
    from tiny import tiny_model

    from vlmzoo_lab.llava_throughput import transformers_twin

    with pytest.raises(ValueError, match="connector_depth=1 has no twin"):
        transformers_twin(tiny_model("llava", strategy_config={"connector_depth": 1}))
