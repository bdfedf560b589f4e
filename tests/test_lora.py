"""LoRA stages (peft): the adapter trains and the loss falls, only the adapter and the declared
groups change, an interrupted LoRA stage resumes to the same weights, a stage continues (or merges)
a previous stage's adapter, a run with an adapter evaluates, the merge gives a folder that loads
without peft with the same logits, and QLoRA without its GPU and bitsandbytes is a config error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft", reason="the lora extra (peft) is not installed")

from test_training import Interrupted, InterruptAfterSave, Recorder, make_toy_world, toy_config_dict  # noqa: E402
from vlmzoo.config import run_config_from_dict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def lora_config(world, out: Path, **stage) -> dict:
    """The toy run with stage 2 as LLaVA's LoRA recipe: the connector trains fully, the LLM gets
    an adapter; 10 steps, a checkpoint every 4, a linear schedule (a lost scheduler would show)."""
    d = toy_config_dict(world, out, max_steps=10, save_steps=4, scheduler="linear", **stage)
    d["training"].update(save_total_limit=2)
    d["training"]["stages"][1].update(train=["connector"], lr=1e-2, group_lr={}, lora=dict(LORA))
    return d


def run(d: dict, callbacks=None, evaluate: bool = False):
    from vlmzoo.training import run_training

    return run_training(run_config_from_dict(d), evaluate=evaluate, callbacks=callbacks)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "lora" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_toy_world(tmp_path_factory.mktemp("toy_world"))


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_reference") / "run"
    recorder = Recorder()
    result = run(lora_config(world, out), callbacks=[recorder], evaluate=True)
    return {"out": out, "rec": recorder, "result": result}


# ---- training --------------------------------------------------------------------------------------
def test_lora_stage_trains_the_adapter_and_the_connector_only_and_the_loss_falls(reference):
    out, rec = reference["out"], reference["rec"]
    begin, end = rec.begin["instruct"], rec.end["instruct"]
    adapter_names = [n for n in end if ".lora_" in n]
    assert adapter_names and all(n.startswith("language_model.") and n.split(".")[-4] in ("q_proj", "v_proj")
                                 for n in adapter_names if ".lora_" in n)
    changed = {n for n in end if not torch.equal(begin[n], end[n])}
    assert {n for n in changed if ".lora_B." in n} == {n for n in adapter_names if ".lora_B." in n}  # B starts at 0
    assert any(n.startswith("strategy.connector.") for n in changed)
    outside = sorted(n for n in changed if ".lora_" not in n and not n.startswith("strategy.connector."))
    assert not outside, f"frozen weights changed: {outside[:3]}"
    trainable = {n for n, g in rec.requires_grad["instruct"].items() if g}
    assert trainable == set(adapter_names) | {n for n in end if n.startswith("strategy.connector.")}
    groups = {g for g, _, _ in rec.opt_groups["instruct"]}
    assert groups == {"connector", "lora"}

    losses = [e["loss"] for e in rec.logs["instruct"] if "loss" in e]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < 0.97 * sum(losses[:3]) / 3, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 8, losses

    # The saved folder: plain weights under plain names (the LLM exactly stage 1's), the adapter apart.
    final = out / "instruct" / "final"
    base, stage1 = load_file(final / "model.safetensors"), load_file(out / "align" / "final" / "model.safetensors")
    assert base.keys() == stage1.keys()
    assert all(torch.equal(base[k], stage1[k]) for k in base if k.startswith("language_model."))
    keys = sorted(adapter(final))
    assert keys and not [k for k in keys if ".default" in k or "base_layer" in k]
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    done = json.loads((final / "stage_complete.json").read_text())
    assert done["trained_groups"] == ["connector", "lora"]
    assert done["parameters"]["lora"]["trainable"] == sum(v.numel() for v in adapter(final).values())


def test_a_run_with_an_adapter_evaluates_with_it(reference):
    from vlmzoo import VLMForConditionalGeneration
    from vlmzoo.lora import has_adapter

    final = reference["out"] / "instruct" / "final"
    metrics = reference["result"].eval_metrics
    assert metrics is not None and (reference["out"] / "eval" / "eval_metrics.json").is_file()
    with_adapter = VLMForConditionalGeneration.from_pretrained(final)
    without = VLMForConditionalGeneration.from_pretrained(final, load_adapter=False)
    assert has_adapter(with_adapter) and not has_adapter(without)
    assert not with_adapter.training
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        assert not torch.allclose(with_adapter(input_ids=ids).logits, without(input_ids=ids).logits)


def test_a_group_both_trained_and_adapted_is_an_error(world, tmp_path):
    d = lora_config(world, tmp_path / "run")
    d["training"]["stages"][1]["train"] = ["connector", "llm"]
    with pytest.raises(ValueError, match=r"llm is both in train .* and in lora.groups"):
        run(d)


def test_target_modules_matching_nothing_names_the_key_and_the_layers(world, tmp_path):
    d = lora_config(world, tmp_path / "run")
    d["training"]["stages"][1]["lora"]["target_modules"] = ["qkv"]
    with pytest.raises(ValueError, match=r"training.stages.1.lora.target_modules: .* matches no module .*q_proj"):
        run(d)


# ---- resume --------------------------------------------------------------------------------------
def assert_same_stage(out: Path, ref: Path, stage: str = "instruct") -> None:
    a, b = out / stage / "final", ref / stage / "final"
    for name in ("model.safetensors", "lora/adapter_model.safetensors"):
        ours, theirs = load_file(a / name), load_file(b / name)
        assert ours.keys() == theirs.keys()
        differ = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
        assert not differ, f"{name}: {differ[:3]}"
    assert json.loads((a / "lora" / "adapter_config.json").read_text()) == json.loads((b / "lora" / "adapter_config.json").read_text())
    da, db = (json.loads((x / "stage_complete.json").read_text()) for x in (a, b))
    assert da["global_step"] == db["global_step"] == 10 and da["train_loss"] == db["train_loss"]


def crash_before_final(monkeypatch):
    import vlmzoo.training.runner as runner

    original = runner.save_final

    def broken(trainer, final_dir, *args, **kwargs):
        if final_dir.parent.name == "instruct":
            raise Interrupted("deliberate crash before final/")
        return original(trainer, final_dir, *args, **kwargs)

    monkeypatch.setattr(runner, "save_final", broken)


@pytest.mark.parametrize("point", ["after checkpoint-8", "after the last checkpoint, before final/"])
def test_an_interrupted_lora_stage_resumes_to_identical_weights(world, reference, tmp_path, monkeypatch, point):
    out = tmp_path / "run"
    d = lora_config(world, out)
    with monkeypatch.context() as patch:
        callbacks = [InterruptAfterSave("instruct", 8)] if point == "after checkpoint-8" else None
        if callbacks is None:
            crash_before_final(patch)
        with pytest.raises(Interrupted):
            run(d, callbacks=callbacks)
    checkpoint = out / "instruct" / ("checkpoint-8" if callbacks else "checkpoint-10")
    assert sorted(adapter(checkpoint)) == sorted(adapter(reference["out"] / "instruct" / "final"))
    result = run(d)
    assert result.stages[1].metrics["resumed_from"].endswith(checkpoint.name)
    assert_same_stage(out, reference["out"])


# ---- a stage after a LoRA stage ------------------------------------------------------------------
def test_a_stage_with_the_same_lora_continues_the_adapter_and_one_without_merges_it(world, reference, tmp_path):
    from vlmzoo import VLMForConditionalGeneration

    out = tmp_path / "run"
    d = lora_config(world, out)
    stages = d["training"]["stages"]
    stages.append({**stages[1], "name": "more_lora", "max_steps": 3, "save_steps": None})
    stages.append({**stages[1], "name": "full", "max_steps": 2, "save_steps": None, "lora": None, "train": ["connector"]})
    recorder = Recorder()
    run(d, callbacks=[recorder])
    ref_final = reference["out"] / "instruct" / "final"
    assert_same_stage(out, reference["out"])
    # more_lora starts from instruct's adapter (not a fresh one: lora_B would be zero) and trains it on.
    start = recorder.begin["more_lora"]
    for key, value in adapter(ref_final).items():
        assert torch.equal(start[key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")], value)
    assert sorted(adapter(out / "more_lora" / "final")) == sorted(adapter(ref_final))
    assert not torch.equal(adapter(out / "more_lora" / "final")[sorted(adapter(ref_final))[1]],
                           adapter(ref_final)[sorted(adapter(ref_final))[1]])
    # full: the adapter merged in at its start; its folder is a plain model whose LLM is the merge.
    full = out / "full" / "final"
    assert not (full / "lora").exists()
    assert not any(".lora_" in n or "base_layer" in n for n in recorder.begin["full"])
    merged = VLMForConditionalGeneration.from_pretrained(out / "more_lora" / "final")
    from vlmzoo.lora import merge_adapter

    merge_adapter(merged)
    plain = load_file(full / "model.safetensors")
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(plain[q], merged.state_dict()[q], atol=1e-6)
    assert not torch.equal(plain[q], load_file(ref_final / "model.safetensors")[q])


# ---- merge and export ----------------------------------------------------------------------------
NO_PEFT = "import sys; sys.modules['peft'] = None\n"  # `import peft` raises ImportError


def test_merge_gives_a_folder_that_loads_without_peft_with_the_same_logits(reference, tmp_path):
    from vlmzoo import VLMForConditionalGeneration
    from vlmzoo.lora import has_adapter

    merged_dir = tmp_path / "merged"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_lora.py"), str(reference["out"]),
                           "--output", str(merged_dir)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert not (merged_dir / "lora").exists() and (merged_dir / "model.safetensors").is_file()

    torch.manual_seed(0)
    ids = torch.randint(3, 15, (2, 12))
    unmerged = VLMForConditionalGeneration.from_pretrained(reference["out"] / "instruct" / "final")
    assert has_adapter(unmerged)
    with torch.no_grad():
        expected = unmerged(input_ids=ids).logits
    inputs = tmp_path / "inputs.pt"
    torch.save({"ids": ids}, inputs)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_PEFT)
    script = (
        "import torch, sys\n"
        "try:\n    import peft\nexcept ImportError:\n    pass\nelse:\n    sys.exit('peft importable')\n"
        "from vlmzoo import VLMForConditionalGeneration\n"
        f"m = VLMForConditionalGeneration.from_pretrained({str(merged_dir)!r})\n"
        f"x = torch.load({str(inputs)!r})\n"
        "with torch.no_grad():\n    logits = m(input_ids=x['ids']).logits\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
        "assert 'peft' not in sys.modules or sys.modules['peft'] is None\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "logits.pt")
    assert (got - expected).abs().max().item() < 1e-5

    # The unmerged folder without peft: an error that says what to do, not a silent plain model.
    script = f"from vlmzoo import VLMForConditionalGeneration\nVLMForConditionalGeneration.from_pretrained({str(reference['out'] / 'instruct' / 'final')!r})\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "needs peft" in proc.stderr and "merge_lora.py" in proc.stderr


def test_merge_refuses_a_folder_without_an_adapter(reference, tmp_path):
    from vlmzoo.merge_lora import merge_folder

    with pytest.raises(ValueError, match="holds no LoRA adapter"):
        merge_folder(reference["out"] / "align" / "final", tmp_path / "out")


# ---- QLoRA and a missing peft: config-time errors ------------------------------------------------
def test_qlora_without_a_gpu_or_bitsandbytes_is_a_clear_config_error(world, tmp_path):
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("this machine can run QLoRA")
    d = lora_config(world, tmp_path / "run")
    d["training"]["stages"][1]["lora"]["quantize"] = "4bit"
    with pytest.raises(ValueError, match=r"training.stages.1.lora.quantize=4bit: .*needs .*(CUDA GPU|bitsandbytes)"):
        run_config_from_dict(d)
    assert not (tmp_path / "run").exists()


def test_lora_without_peft_is_a_config_error_naming_the_extra(world, tmp_path, monkeypatch):
    import vlmzoo.config as config  # where a stage's LoRA spec is checked

    monkeypatch.setattr(config, "peft_available", lambda: False)
    with pytest.raises(ValueError, match=r"training.stages.1.lora: LoRA needs the peft package.*\[lora\]"):
        run_config_from_dict(lora_config(world, tmp_path / "run"))


# ---- the study preset ----------------------------------------------------------------------------
def test_the_lora_preset_keeps_the_study_budget_and_its_strategies_train(tmp_path):
    """Every entry of the `lora` preset loads (on a small tiny world), trains and evaluates under the
    main study's budget; llava's and ta_llava's (adapters hooked on the decoder layers) train a few
    steps with the strategy fully trained and the LLM adapted."""
    from vlmzoo.config import load_run_config
    from vlmzoo_lab.study import StudySpec, check_budgets, config_path, preset_archs, run_budget
    from vlmzoo_lab.tinyworld import small_test_config
    from vlmzoo.training import run_training

    world = [f"tiny_world.cache_dir={tmp_path / 'cache'}", f"tiny_world.config={json.dumps(small_test_config().to_dict())}"]
    entries = preset_archs("lora")
    assert len(entries) == 6
    configs = {e: load_run_config(config_path(StudySpec(), e), world) for e in entries}
    plain = {e: load_run_config(config_path(StudySpec(), e.split(":")[0]), world) for e in entries}
    check_budgets({**{e: run_budget(c) for e, c in configs.items()}, **{f"{e}-main": run_budget(c) for e, c in plain.items()}},
                  {**{e: Path(e) for e in configs}, **{f"{e}-main": Path(e) for e in plain}})
    for entry, cfg in configs.items():
        stage = cfg.training.stages[1]
        assert stage.lora is not None and stage.train == ["strategy"], entry
    short = [f"training.stages.{i}.{k}={v}" for i in (0, 1) for k, v in (("max_steps", 2), ("batch_size", 4), ("save_steps", "null"))]
    for entry in ("llava:tiny_lora", "ta_llava:tiny_lora"):
        out = tmp_path / entry.replace(":", "@")
        cfg = load_run_config(config_path(StudySpec(), entry), [*world, *short, f"output.dir={out}"])
        run_training(cfg, evaluate=False)
        done = json.loads((out / "stage2_instruct" / "final" / "stage_complete.json").read_text())
        assert done["trained_groups"][-1] == "lora" and done["parameters"]["llm"]["trainable"] == 0, entry
        assert (out / "stage2_instruct" / "final" / "lora" / "adapter_model.safetensors").is_file()


def test_a_target_modules_string_other_than_all_linear_is_a_config_error(world, tmp_path):
    d = lora_config(world, tmp_path / "run")
    d["training"]["stages"][1]["lora"]["target_modules"] = "q_proj"
    with pytest.raises(ValueError, match=r"training.stages.1.lora.target_modules: 'q_proj'; use all-linear or a list"):
        run_config_from_dict(d)
