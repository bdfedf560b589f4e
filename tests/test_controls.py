"""The claims' controls on a seconds-scale tiny world: every control configuration trains a few
steps through scripts/compare.py, and the study's claims.csv holds, row by row, what the runs' own
eval files give."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

import architectures.crop_tokens  # noqa: F401  registers it even in a venv installed before it existed

REPO = Path(__file__).resolve().parent.parent
CONTROLS = ["llava", "resampler", "crop_tokens", "crop_tokens:tiny_marked", "llava:tiny_shade_layer", "tg_llava:tiny_fom_oracle"]
SEEDS = (0, 1)
# A claims file over the controls alone (the shipped one needs the methods' runs too): two claims with
# both controls (one the oracle mask's), one without a positive control, one whose method is not in
# the study, one whose negative control is not.
CLAIMS = """
claims:
  - claim: shade layer vs layer -2
    question_types: [shade, fine, colour]
    methods: ["llava:tiny_shade_layer"]
    negative_control: llava
    positive_control: crop_tokens
  - claim: oracle selection
    question_types: [position]
    methods: [resampler]
    negative_control: llava
    positive_control: "tg_llava:tiny_fom_oracle"
  - claim: resampler budget
    question_types: [position]
    methods: [resampler]
    negative_control: llava
    positive_control: null
    missing_positive_control: not built
  - claim: not in the study
    question_types: [colour]
    methods: [igva]
    negative_control: llava
    positive_control: crop_tokens
  - claim: negative not run
    question_types: [count]
    methods: [crop_tokens]
    negative_control: ta_llava
    positive_control: llava
"""


def test_shade_layer_config_reads_the_worlds_shade_layer():
    """configs/llava/tiny_shade_layer.yaml = llava's tiny.yaml reading hidden_states[clip.shade_layer]."""
    from vlmzoo.config import load_run_config
    from vlmzoo_lab.study import run_budget
    from vlmzoo_lab.tinyworld import TinyWorldConfig

    shade = load_run_config(REPO / "configs" / "llava" / "tiny_shade_layer.yaml", resolve_vars=False)
    llava = load_run_config(REPO / "configs" / "llava" / "tiny.yaml", resolve_vars=False)
    assert shade.model.strategy == "llava"
    assert shade.model.strategy_config["vision_layer"] == TinyWorldConfig().clip.shade_layer == 1
    assert llava.model.strategy_config["vision_layer"] == -2
    assert run_budget(shade) == run_budget(llava)  # the same recipe, only the layer differs


def test_oracle_config_is_fom_only_with_the_mask_from_the_regions():
    """configs/tg_llava/tiny_fom_oracle.yaml = tiny_fom_only.yaml with fom_source oracle and no text encoder."""
    from vlmzoo.config import load_run_config
    from vlmzoo_lab.study import run_budget

    oracle = load_run_config(REPO / "configs" / "tg_llava" / "tiny_fom_oracle.yaml", resolve_vars=False)
    fom = load_run_config(REPO / "configs" / "tg_llava" / "tiny_fom_only.yaml", resolve_vars=False)
    assert oracle.model.strategy_config == {**fom.model.strategy_config, "fom_source": "oracle"}
    assert oracle.model.text_encoder is None and fom.model.text_encoder is not None
    assert run_budget(oracle) == run_budget(fom)


def test_marked_crop_tokens_config_is_crop_tokens_with_the_object_marked():
    """configs/crop_tokens/tiny_marked.yaml = crop_tokens' tiny.yaml with mark_named_object on."""
    from vlmzoo.config import load_run_config
    from vlmzoo_lab.study import run_budget

    marked = load_run_config(REPO / "configs" / "crop_tokens" / "tiny_marked.yaml", resolve_vars=False)
    plain = load_run_config(REPO / "configs" / "crop_tokens" / "tiny.yaml", resolve_vars=False)
    assert marked.model.strategy_config == {**plain.model.strategy_config, "mark_named_object": True}
    assert run_budget(marked) == run_budget(plain)


@pytest.fixture(scope="module")
def controls_study(tmp_path_factory):
    """A reduced study of the controls, two seeds, two steps per stage, the whole eval."""
    from vlmzoo_lab.study import main
    from vlmzoo_lab.tinyworld import small_test_config

    base = small_test_config()
    world = small_test_config(clip=dataclasses.replace(base.clip, vision_layers=4))  # layer -2 != shade layer 1
    root = tmp_path_factory.mktemp("controls")
    claims = root / "claims.yaml"
    claims.write_text(CLAIMS)
    out = root / "study"
    args = ["--archs", *CONTROLS, "--seed-list", *map(str, SEEDS), "--out", str(out), "--latency-prompts", "0",
            "--claims", str(claims), f"tiny_world.cache_dir={root / 'cache'}",
            f"tiny_world.config={json.dumps(world.to_dict())}", "eval.batch_size=80", "training.logging_steps=1"]
    for i in (0, 1):
        args += [f"training.stages.{i}.max_steps=2", f"training.stages.{i}.batch_size=4", f"training.stages.{i}.save_steps=2"]
    assert main(args) == 0
    return out


def _run_dir(out: Path, entry: str, seed: int) -> Path:
    return out / "runs" / f"{entry.replace(':', '@')}-s{seed}"


@pytest.mark.slow
def test_every_control_trains_a_few_steps(controls_study):
    rows = {(r["arch"], r["seed"]): r for r in csv.DictReader(open(controls_study / "results.csv")) if r["kind"] == "run"}
    assert set(rows) == {(a, str(s)) for a in CONTROLS for s in SEEDS}
    for entry in CONTROLS:
        for seed in SEEDS:
            run = _run_dir(controls_study, entry, seed)
            for stage in ("stage1_align", "stage2_instruct"):
                done = json.loads((run / stage / "final" / "stage_complete.json").read_text())
                assert done["global_step"] == 2, (entry, seed, stage)
                losses = [e["loss"] for e in json.loads((run / stage / "final" / "trainer_state.json").read_text())["log_history"]
                          if "loss" in e]
                assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
            metrics = json.loads((run / "eval" / "eval_metrics.json").read_text())
            assert metrics["n"] == 72 and {"fine", "shade", "position", "colour"} <= set(metrics["per_type"])
    resolved = yaml.safe_load((_run_dir(controls_study, "llava:tiny_shade_layer", 0) / "resolved_config.yaml").read_text())
    assert resolved["model"]["strategy_config"]["vision_layer"] == 1
    tokens = {a: int(float(rows[(a, "0")]["visual_tokens"])) for a in CONTROLS}
    assert tokens == {"llava": 16, "resampler": 8, "crop_tokens": 16 + 64, "crop_tokens:tiny_marked": 16 + 64,
                      "llava:tiny_shade_layer": 16, "tg_llava:tiny_fom_oracle": 16}
    # The oracle's v starts at zero and gets gradient only through the regions' patch mask: the
    # world's regions reached the model in both stages (captions: [] -> no gradient, so stage 2's).
    from vlmzoo import VLMForConditionalGeneration

    for stage, trained in (("stage1_align", False), ("stage2_instruct", True)):
        model = VLMForConditionalGeneration.from_pretrained(
            _run_dir(controls_study, "tg_llava:tiny_fom_oracle", 0) / stage / "final")
        assert model.text_encoder is None and model.config.get_input_spec().query_regions
        assert bool(model.strategy.fom.v.abs().sum() > 0) == trained, stage
        marked = VLMForConditionalGeneration.from_pretrained(
            _run_dir(controls_study, "crop_tokens:tiny_marked", 0) / stage / "final")
        assert bool(marked.strategy.marker.v.abs().sum() > 0) == trained, stage


@pytest.mark.slow
def test_the_report_says_whether_each_control_finds_the_named_object(controls_study):
    """results.md's selection section: the random-object reference and each strategy's accuracy on
    the single-object types (fewest / most objects / all, mean over seeds), from the runs' own files."""
    from vlmzoo_lab.tinyworld.selection import run_rows

    section = (controls_study / "results.md").read_text().split("## Finding the named object", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    rows = {line.split(" | ")[0][2:]: line for line in lines[1:]}  # after the header
    assert set(rows) == {"*random-object reference*", *CONTROLS}
    per_seed = [run_rows(_run_dir(controls_study, "crop_tokens", s)) for s in SEEDS]
    overall = {r.question_type: r for r in per_seed[0] if r.objects == 0}
    assert set(overall) == {"position", "fine", "shade"}
    ref = f"{overall['fine'].random_object:.1f} |"
    assert rows["*random-object reference*"].split(" | ")[2].endswith(ref.rstrip(" |"))
    fine = statistics.fmean(r.accuracy for rows_ in per_seed for r in rows_ if (r.question_type, r.objects) == ("fine", 0))
    assert rows["crop_tokens"].split(" | ")[2].endswith(f"{fine:.1f}")


def _accuracies(out: Path, entry: str, qtype: str) -> list[float]:
    """The entry's accuracy on ``qtype`` per seed, in points, from its own eval file."""
    return [100 * json.loads((_run_dir(out, entry, s) / "eval" / "eval_metrics.json").read_text())["per_type"][qtype]["accuracy"]
            for s in SEEDS]


@pytest.mark.slow
def test_claims_csv_recomputed_from_the_runs_eval_files(controls_study):
    from vlmzoo_lab.study_claims import COLUMNS

    with open(controls_study / "claims.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    required = ["claim", "question_type", "method", "negative_control", "positive_control", "seeds", "method_mean",
                "method_std", "negative_mean", "negative_std", "positive_mean", "positive_std", "effect", "noise",
                "verdict", "seeds_for_3pt"]
    assert set(required) <= set(COLUMNS)
    assert [(r["claim"], r["question_type"], r["method"]) for r in rows] == [
        ("shade layer vs layer -2", "shade", "llava:tiny_shade_layer"),
        ("shade layer vs layer -2", "fine", "llava:tiny_shade_layer"),
        ("shade layer vs layer -2", "colour", "llava:tiny_shade_layer"),
        ("oracle selection", "position", "resampler"),
        ("resampler budget", "position", "resampler"),
        ("negative not run", "count", "crop_tokens"),
    ]  # igva was not run: no row
    z = 1.959964 + 0.841621
    for row in rows[:5]:
        qtype = row["question_type"]
        m, n = _accuracies(controls_study, row["method"], qtype), _accuracies(controls_study, "llava", qtype)
        assert row["seeds"] == "2"
        assert float(row["method_mean"]) == pytest.approx(statistics.fmean(m), abs=1e-3)
        assert float(row["method_std"]) == pytest.approx(statistics.stdev(m), abs=1e-3)
        assert float(row["negative_mean"]) == pytest.approx(statistics.fmean(n), abs=1e-3)
        assert float(row["negative_std"]) == pytest.approx(statistics.stdev(n), abs=1e-3)
        effect, noise = statistics.fmean(m) - statistics.fmean(n), max(statistics.stdev(m), statistics.stdev(n))
        assert float(row["effect"]) == pytest.approx(effect, abs=1e-3)
        assert float(row["noise"]) == pytest.approx(noise, abs=1e-3)
        assert int(row["seeds_for_3pt"]) == max(2, math.ceil(2 * z**2 * noise**2 / 9))
        rule = ("reproduces" if effect > 2 * noise and effect > 3 else "inconclusive" if effect > 0
                else "does not reproduce")
        if row["positive_control"]:
            p = _accuracies(controls_study, row["positive_control"], qtype)
            assert float(row["positive_mean"]) == pytest.approx(statistics.fmean(p), abs=1e-3)
            assert float(row["positive_std"]) == pytest.approx(statistics.stdev(p), abs=1e-3)
            gap = statistics.fmean(p) - statistics.fmean(n)
            assert float(row["control_gap"]) == pytest.approx(gap, abs=1e-3)
            assert row["verdict"] == (rule if gap >= 25 else "situation not learnable")
        else:
            assert row["positive_mean"] == row["positive_std"] == row["control_gap"] == ""
            assert row["verdict"] == "positive control missing"
        if row["verdict"] != rule:
            assert row["note"].endswith(f"effect rule alone: {rule}")
    last = rows[5]
    assert last["verdict"] == "negative control not run" and last["negative_mean"] == last["effect"] == ""
    assert float(last["method_mean"]) == pytest.approx(statistics.fmean(_accuracies(controls_study, "crop_tokens", "count")),
                                                       abs=1e-3)
    table = (controls_study / "results.md").read_text().split("## Claims", 1)[1]
    for row in rows:
        assert f"| {row['claim']} | {row['question_type']} | `{row['method']}` " in table
