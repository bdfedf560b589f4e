"""Safe tiny-world builds: resume after an interruption, shipped towers, damaged caches, two builders.

Every test builds :func:`small_test_config` worlds (seconds); the shipped-towers path is exercised
with towers "shipped" into a temporary folder from a world built here from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vlmzoo_lab.tinyworld as tw
from vlmzoo_lab.tinyworld import build_tiny_world, small_test_config
from vlmzoo_lab.tinyworld.files import ship

REPO = Path(__file__).resolve().parent.parent
CFG = small_test_config()


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> tw.TinyWorldPaths:
    """A world pretrained here, uninterrupted."""
    return build_tiny_world(tmp_path_factory.mktemp("scratch"), CFG, from_scratch=True, log=_quiet)


@pytest.fixture(scope="module")
def shipped_dir(scratch, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shipped")
    ship(scratch.root, folder)
    return folder


def _files(paths: tw.TinyWorldPaths) -> dict[str, str]:
    return paths.manifest()["files"]


def _forget(root: Path) -> None:
    tw._ANNOUNCED.discard(root)  # a new process would check the cached files again


def test_interrupted_build_resumes_after_the_towers_and_equals_an_uninterrupted_one(scratch, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tw, "pretrain_llm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_world(tmp_path, CFG, from_scratch=True, log=_quiet)
    root = tmp_path / "tiny_world" / CFG.config_hash()
    assert not root.exists() and (root.with_name(root.name + ".building") / "clip" / "model.safetensors").is_file()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the finished phase ran again")

    monkeypatch.undo()
    monkeypatch.setattr(tw, "pretrain_clip", must_not_run)
    monkeypatch.setattr(tw, "generate_world", must_not_run)
    lines: list[str] = []
    resumed = build_tiny_world(tmp_path, CFG, from_scratch=True, log=lines.append)
    assert any("resuming an interrupted build" in line for line in lines)
    # Bit-identical to the uninterrupted build: the rebuild is deterministic, resumed or not.
    assert _files(resumed) == _files(scratch) and len(_files(scratch)) > 100
    assert not root.with_name(root.name + ".building").exists()


def test_shipped_towers_replace_pretraining_and_give_the_same_world(scratch, shipped_dir, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("pretraining ran although the towers are shipped")

    monkeypatch.setattr(tw, "pretrain_clip", must_not_run)
    monkeypatch.setattr(tw, "pretrain_llm", must_not_run)
    world = build_tiny_world(tmp_path, CFG, shipped_dir=shipped_dir, log=_quiet)
    assert _files(world) == _files(scratch)
    record = world.manifest()
    assert record["weights_from"] == "shipped with the package"
    assert record["llm"] == scratch.manifest()["llm"]  # the pretraining metrics travel with the towers


def test_shipped_towers_serve_a_world_that_differs_only_in_data_no_tower_reads(scratch, shipped_dir, tmp_path,
                                                                               monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("pretraining ran although only the stage-1 captions differ")

    monkeypatch.setattr(tw, "pretrain_clip", must_not_run)
    monkeypatch.setattr(tw, "pretrain_llm", must_not_run)
    variant = dataclasses.replace(CFG, caption_details=not CFG.caption_details)
    world = build_tiny_world(tmp_path, variant, shipped_dir=shipped_dir, log=_quiet)
    assert world.root.name == variant.config_hash() != scratch.root.name
    assert world.manifest()["weights_from"] == "shipped with the package"
    assert _files(world)["clip/model.safetensors"] == _files(scratch)["clip/model.safetensors"]
    captions = json.loads(world.stage1_json.read_text())
    assert captions != json.loads(scratch.stage1_json.read_text())
    scenes = json.loads((world.data_dir / "scenes.json").read_text())["train"]
    for r in captions:  # every object's mark, or none
        objects = scenes[r["image"]]
        assert r["conversations"][1]["value"].count(" pattern") == (len(objects) if variant.caption_details else 0)


def test_damaged_shipped_towers_are_refused_by_name(shipped_dir, tmp_path):
    damaged = tmp_path / "shipped"
    import shutil

    shutil.copytree(shipped_dir, damaged)
    weights = next(damaged.glob("*/llm/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(RuntimeError, match=r"llm/model\.safetensors: content differs"):
        build_tiny_world(tmp_path / "cache", CFG, shipped_dir=damaged, log=_quiet)


@pytest.mark.parametrize("damage", ["edit a weight file", "delete an image"])
def test_a_damaged_cached_world_is_named_and_rebuilt(scratch, shipped_dir, tmp_path, damage):
    world = build_tiny_world(tmp_path, CFG, shipped_dir=shipped_dir, log=_quiet)
    if damage == "edit a weight file":
        victim = world.clip_dir / "model.safetensors"
        victim.write_bytes(victim.read_bytes()[:-4] + b"abcd")
    else:
        victim = next(world.images_dir.glob("train/*.png"))
        victim.unlink()
    _forget(world.root)
    lines: list[str] = []
    again = build_tiny_world(tmp_path, CFG, shipped_dir=shipped_dir, log=lines.append)
    assert any("damaged, rebuilding" in line and str(victim) in line for line in lines), lines
    assert _files(again) == _files(scratch) and victim.is_file()


def test_two_builders_at_once_build_one_world(scratch, shipped_dir, tmp_path):
    script = ("import sys, logging; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
              "from vlmzoo_lab.tinyworld import build_tiny_world, small_test_config\n"
              "build_tiny_world(sys.argv[1], small_test_config(), shipped_dir=sys.argv[2])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(shipped_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    logs = "\n".join(outs)
    assert logs.count("building the tiny world") == 1 and logs.count("using cached world") == 1, logs
    root = tmp_path / "tiny_world" / CFG.config_hash()
    assert json.loads((root / tw.MANIFEST).read_text())["files"] == _files(scratch)
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name, root.name + ".lock"]


@pytest.mark.parametrize("flags", [["--help"], ["--print-config"]])
def test_reading_a_config_builds_nothing(tmp_path, flags):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "VLMZOO_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "scripts/train.py", "--arch", "tg_llava", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "cache").exists()
    if flags == ["--print-config"]:
        root = tmp_path / "cache" / "tiny_world" / tw.TinyWorldConfig().config_hash()
        assert f"llm: {root / 'llm'}" in proc.stdout and f"root: {root}" in proc.stdout


@pytest.mark.slow
def test_the_default_worlds_data_still_fit_the_shipped_towers(tmp_path, monkeypatch):
    """The generator's JSON for the default config has the digest of the data the shipped towers were
    pretrained on (images are not rendered: they are a function of scenes.json), regions and all."""
    import vlmzoo_lab.tinyworld.generate as generate
    from vlmzoo_lab.tinyworld.files import SHIPPED_DIR, data_digest, shipped_world

    config = tw.TinyWorldConfig()
    shipped = shipped_world(config.towers_hash(), SHIPPED_DIR)
    assert shipped is not None, "the package ships the default world's towers"
    monkeypatch.setattr(generate, "render_all", lambda *args, **kwargs: None)
    generate.generate_world(config, str(tmp_path / "data"), keep_train_hires=False, log=_quiet)
    eval_records = json.loads((tmp_path / "data" / "eval.json").read_text())
    assert all("regions" in r["conversations"][0] for r in eval_records)
    assert data_digest(tmp_path) == json.loads((shipped / "world_build.json").read_text())["data_digest"]
