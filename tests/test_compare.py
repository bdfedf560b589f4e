"""scripts/compare.py (vlmzoo_lab.study): a reduced study end to end on a seconds-scale tiny world, then
the same study again, which must reuse every finished run."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

ARCHS = ("llava", "igva")


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from vlmzoo_lab.tinyworld import small_test_config

    base = small_test_config()
    world = small_test_config(clip=dataclasses.replace(base.clip, vision_layers=4))  # igva's 4 layer groups
    cache = tmp_path_factory.mktemp("compare_world")
    return [f"tiny_world.cache_dir={cache}", f"tiny_world.config={json.dumps(world.to_dict())}"]


def _study_args(small_world, out: Path) -> list[str]:
    args = ["--archs", *ARCHS, "--seeds", "1", "--out", str(out), "--max-eval", "12", "--latency-prompts", "2",
            *small_world, "eval.batch_size=16", "training.logging_steps=1"]
    for i in (0, 1):
        args += [f"training.stages.{i}.max_steps=2", f"training.stages.{i}.batch_size=4",
                 f"training.stages.{i}.save_steps=2"]
    return args


def _stage_mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for p in sorted((out / "runs").glob("*/*/final/*")) + sorted((out / "runs").glob("*/eval/*"))}


def test_compare_study_end_to_end_and_reuse(small_world, tmp_path, capsys):
    from PIL import Image

    from vlmzoo_lab.study import main

    out = tmp_path / "study"
    assert main(_study_args(small_world, out)) == 0
    printed = capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert "| llava |" in table and "| igva |" in table and "| llava |" in printed

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["kind"], r["arch"]) for r in rows] == [
        ("run", "llava"), ("run", "igva"),
        ("mean", "llava"), ("std", "llava"), ("mean", "igva"), ("std", "igva"),
    ]
    for arch in ARCHS:
        run = next(r for r in rows if r["kind"] == "run" and r["arch"] == arch)
        mean = next(r for r in rows if r["kind"] == "mean" and r["arch"] == arch)
        run_dir = out / "runs" / f"{arch}-s0"
        assert Path(run["run_dir"]) == run_dir and run["reused"] == "0"
        metrics = json.loads((run_dir / "eval" / "eval_metrics.json").read_text())
        assert int(run["n_eval"]) == metrics["n"] == 12
        assert float(run["accuracy"]) == pytest.approx(metrics["accuracy"])
        assert float(run["blind_accuracy"]) == pytest.approx(metrics["blind"]["accuracy"])
        for qtype, entry in metrics["per_type"].items():
            assert float(run[f"acc_{qtype}"]) == pytest.approx(entry["accuracy"])
            assert float(mean[f"acc_{qtype}"]) == pytest.approx(entry["accuracy"])  # one seed: mean = run
        line = next(l for l in table.splitlines() if l.startswith(f"| {arch} |"))
        assert f"{100 * metrics['accuracy']:.1f} ± 0.0" in line

        stages = [json.loads(p.read_text()) for p in sorted(run_dir.glob("*/final/stage_complete.json"))]
        assert len(stages) == 2
        last = stages[-1]["parameters"]
        assert int(run["params_total"]) == sum(g["total"] for g in last.values())
        assert int(run["params_trainable"]) == sum(g["trainable"] for g in last.values())
        assert 0 < int(run["params_strategy"]) < int(run["params_total"])
        assert float(run["train_time_s"]) == pytest.approx(sum(s["runtime_s"] for s in stages), abs=0.02)
        assert int(run["visual_tokens"]) == 16 and float(run["latency_ms"]) > 0
        assert all((run_dir / s["stage"] / "final" / "trainer_state.json").is_file() for s in stages)

    # claims.csv: the shipped claims' columns; with one eval type (colour) and one seed, no claim of
    # configs/claims.yaml has a row (shade is not evaluated; a weight spread needs two types)
    from vlmzoo_lab.study_claims import COLUMNS

    with open(out / "claims.csv") as f:
        assert next(csv.reader(f)) == COLUMNS and f.read() == ""

    for name in ("accuracy.png", "loss.png", "layer_weights.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width >= 300 and im.height >= 200

    # IGVA's layer weights per question type: the table holds each run's measured means
    extras = json.loads((out / "runs" / "igva-s0" / "study_measurements.json").read_text())["extras"]
    assert list(extras) == ["layer_weights"] and extras["layer_weights"]["component"] == "w"
    weights = extras["layer_weights"]["by_type"]
    llava_meas = json.loads((out / "runs" / "llava-s0" / "study_measurements.json").read_text())
    assert llava_meas["extras"] == {}  # llava declares none: no panel, no rows
    assert set(weights) >= {"all"} and sum(weights["all"]["mean"]) == pytest.approx(1.0, abs=1e-4)
    igva_row = next(r for r in rows if r["kind"] == "run" and r["arch"] == "igva")
    assert igva_row["layer_weights"] == ";".join(f"{w:.4f}" for w in weights["all"]["mean"])
    for qtype, entry in weights.items():
        line = f"| igva | {qtype} | " + " | ".join(f"{w:.3f}" for w in entry["mean"]) + " |"
        assert line in table
    assert "| llava | " not in table.split("## Layer weights")[1]

    before = _stage_mtimes(out)
    assert main(_study_args(small_world, out)) == 0
    assert _stage_mtimes(out) == before  # no stage trained, nothing evaluated again
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert all(r["reused"] == "1" for r in rows)


def test_unequal_budgets_are_refused(tmp_path):
    """Strategies trained for different step counts cannot be compared in one table."""
    from vlmzoo_lab.study import check_budgets

    a = {"stages": [{"data": "s1.json", "max_steps": 2}], "eval": {"data": "e.json"}}
    b = {"stages": [{"data": "s1.json", "max_steps": 3}], "eval": {"data": "e.json"}}
    check_budgets({"llava": a, "igva": dict(a)}, {"llava": Path("x"), "igva": Path("y")})
    with pytest.raises(ValueError, match=r"stages\.0\.max_steps"):
        check_budgets({"llava": a, "igva": b}, {"llava": Path("x.yaml"), "igva": Path("y.yaml")})


def test_presets_name_existing_configs_and_variants_get_their_own_runs(tmp_path):
    from vlmzoo_lab.study import StudySpec, config_path, load_presets, preset_archs, run_dir

    presets = load_presets()
    assert {"main", "tg_llava_ablation", "ta_llava_ablation", "igva_ablation"} <= set(presets)
    for name in presets:
        for entry in preset_archs(name):
            path = config_path(StudySpec(), entry)
            assert path.is_file(), (name, entry)
    spec = StudySpec(out=tmp_path)
    assert config_path(spec, "tg_llava:tiny_fom_only").name == "tiny_fom_only.yaml"
    assert run_dir(spec, "tg_llava:tiny_fom_only", 1).name == "tg_llava@tiny_fom_only-s1"
    with pytest.raises(KeyError, match="Presets: .*main"):
        preset_archs("nope")
    with pytest.raises(FileNotFoundError, match="tiny_fom_only"):
        config_path(spec, "llava:tiny_fom_only")


def test_default_archs_are_the_registered_strategies(tmp_path):
    from vlmzoo import available_strategies
    from vlmzoo_lab.study import default_archs

    assert default_archs("tiny") == available_strategies()  # a strategy without tiny.yaml runs the tiny base
    assert {"llava", "tg_llava", "ta_llava", "igva"} <= set(default_archs("reference_siglip")) | set(
        default_archs("reference")) and "reference_siglip" not in default_archs("reference")
    assert default_archs("reference_siglip") == ["tg_llava"]
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "small.yaml").write_text("{}")
    assert default_archs("small", tmp_path) == ["llava"]


def test_parallel_study_trains_every_run_in_worker_processes(small_world, tmp_path, capsys):
    """``--jobs 2``: two runs train at once in their own processes; the table then holds each run's
    own eval numbers and the latency measured afterwards in the main process."""
    from vlmzoo_lab.study import main

    out = tmp_path / "study"
    args = _study_args(small_world, out)
    args[args.index("--archs") + 1: args.index("--seeds")] = ["llava"]
    args[args.index("--seeds") + 1] = "2"
    assert main([*args, "--jobs", "2"]) == 0
    assert "2 runs (0 reused)" in capsys.readouterr().out
    rows = [r for r in csv.DictReader(open(out / "results.csv")) if r["kind"] == "run"]
    assert [(r["arch"], r["seed"]) for r in rows] == [("llava", "0"), ("llava", "1")]
    for row in rows:
        run_dir = Path(row["run_dir"])
        metrics = json.loads((run_dir / "eval" / "eval_metrics.json").read_text())
        assert float(row["accuracy"]) == pytest.approx(metrics["accuracy"]) and int(row["n_eval"]) == 12
        assert len(list(run_dir.glob("*/final/stage_complete.json"))) == 2
        assert float(row["latency_ms"]) > 0 and float(row["train_time_s"]) > 0
    seeds = [yaml.safe_load((Path(r["run_dir"]) / "resolved_config.yaml").read_text())["seed"] for r in rows]
    assert seeds == [0, 1]


def test_jobs_must_be_positive(tmp_path, capsys):
    from vlmzoo_lab.study import main

    with pytest.raises(SystemExit):
        main(["--archs", "llava", "--jobs", "0", "--out", str(tmp_path)])
    assert "--jobs must be >= 1" in capsys.readouterr().err
