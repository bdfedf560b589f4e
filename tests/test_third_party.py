"""A strategy from another package, written from docs/adding_a_strategy.md alone (its one module and
its pyproject.toml, taken from the page's code blocks), installed with pip into a temporary folder
(the shared environment is untouched: the folder is only on the subprocesses' PYTHONPATH), then
trained with ``scripts/train.py --arch mean_pool`` on a seconds-scale tiny world with no config file,
and checked by the conformance suite, which finds it through its entry point like a built-in one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "adding_a_strategy.md"
NAME = "mean_pool"


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The doc's package, pip-installed into a temporary target; -> the environment that sees it."""
    root = tmp_path_factory.mktemp("third_party")
    package = root / "package"
    package.mkdir()
    module = doc_blocks("python")[0]
    assert f'@register_strategy("{NAME}")' in module
    (package / "mean_pool_strategy.py").write_text(module)
    (package / "pyproject.toml").write_text(doc_blocks("toml")[0])
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(package)], check=True, cwd=root)
    assert list(target.glob("vlmzoo_mean_pool-*.dist-info/entry_points.txt"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO)]), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_the_installed_strategy_is_registered_only_there(installed):
    from vlmzoo import available_strategies

    assert NAME not in available_strategies()  # this process: the package is not installed here
    code = "import vlmzoo; print(vlmzoo.available_strategies())"
    out = subprocess.run([sys.executable, "-c", code], env=installed, cwd=REPO, capture_output=True, text=True, check=True)
    assert f"'{NAME}'" in out.stdout and "'llava'" in out.stdout
    assert not (REPO / "configs" / NAME).exists()


def test_train_script_runs_it_on_the_tiny_world_with_no_config_file(installed, tmp_path):
    from vlmzoo_lab.tinyworld import small_test_config

    out = tmp_path / "run"
    args = [f"tiny_world.cache_dir={tmp_path / 'cache'}", f"tiny_world.config={json.dumps(small_test_config().to_dict())}",
            f"output.dir={out}", "eval.max_samples=8", "eval.batch_size=8"]
    for i in (0, 1):
        args += [f"training.stages.{i}.max_steps=2", f"training.stages.{i}.batch_size=4", f"training.stages.{i}.save_steps=2"]
    proc = subprocess.run([sys.executable, "scripts/train.py", "--arch", NAME, *args], env=installed, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import yaml

    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["model"]["strategy"] == NAME and resolved["model"]["strategy_config"] == {}
    assert resolved["output"]["name"] == f"{NAME}-tiny"
    assert [s["name"] for s in resolved["training"]["stages"]] == ["stage1_align", "stage2_instruct"]
    saved = json.loads((out / "stage2_instruct" / "final" / "config.json").read_text())
    assert saved["strategy"] == NAME and saved["strategy_config"] == {"num_tokens": 4, "vision_layer": -1}
    metrics = json.loads((out / "eval" / "eval_metrics.json").read_text())
    assert metrics["n"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0


def test_the_conformance_suite_covers_it(installed):
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_conformance.py", "-v", "-k", NAME,
                           "-p", "no:cacheprovider"], env=installed, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    passed = sorted(re.findall(rf"::(\w+)\[{NAME}\] PASSED", proc.stdout))
    assert passed == ["test_cached_generation_equals_cacheless_on_a_padded_mixed_batch",
                      "test_every_strategy_parameter_is_set_by_reset_parameters",
                      "test_gradients_reach_exactly_the_trained_groups",
                      "test_save_load_round_trip_is_exact"], proc.stdout[-2000:]
