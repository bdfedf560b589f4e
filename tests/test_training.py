"""Multi-stage training: module groups, per-group learning rates, checkpoints, resume, DDP, DeepSpeed, wandb.

Every run here uses a toy world written into ``tmp_path``: coloured squares on 32 px PNGs, a
word-level tokenizer, a random tiny CLIP tower and a random tiny Llama saved as "pretrained"
checkpoints, and LLaVA-format JSON files for two stages and an evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback

from vlmzoo.config import load_run_config, run_config_from_dict

REPO = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
IMAGE_SIZE = 32


# ---- the toy world (also used by test_eval.py) ---------------------------------------------------
def make_toy_world(root: Path, n_train: int = 48, n_eval: int = 16) -> dict[str, str]:
    """Write images, JSON files, tokenizer, tower and LLM under ``root``; -> their paths."""
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from vlmzoo.data.templates import VICUNA_SYSTEM

    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)

    def scene(split: str, i: int) -> tuple[str, str]:
        colour = names[i % len(names)]
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128))
        x, y = 4 + 12 * (i % 2), 4 + 12 * ((i // 2) % 2)
        img.paste(COLOURS[colour], (x, y, x + 12, y + 12))
        rel = f"{split}/{i:04d}.png"
        (images / split).mkdir(exist_ok=True)
        img.save(images / rel)
        return rel, colour

    stage1, stage2, evals = [], [], []
    for i in range(n_train):
        rel, colour = scene("train", i)
        stage1.append({"id": f"cap-{i}", "image": rel, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a {colour} square"}]})
        other = names[(i + 1) % len(names)]
        stage2.append({"id": f"train-{i}", "image": rel, "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the square ?"}, {"from": "gpt", "value": colour},
            {"from": "human", "value": f"is there a {other} square ?"}, {"from": "gpt", "value": "no"}]})
    for i in range(n_eval):
        rel, colour = scene("eval", i)
        if i % 2:
            q, a, qtype = "what colour is the square ?", colour, "colour"
        else:
            asked = colour if i % 4 == 0 else names[(i + 1) % len(names)]
            q, a, qtype = f"is there a {asked} square ?", "yes" if asked == colour else "no", "exist"
        evals.append({"id": f"eval-{i}", "image": rel, "question_type": qtype, "pope_split": "random",
                      "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    paths = {}
    for name, records in (("stage1", stage1), ("stage2", stage2), ("eval", evals)):
        paths[name] = str(root / f"{name}.json")
        Path(paths[name]).write_text(json.dumps(records))

    words = set()
    for text in [VICUNA_SYSTEM, "USER: ASSISTANT:", "what colour is the square ? is there a yes no"] + names:
        words.update(w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    paths["tokenizer"] = str(root / "tokenizer")
    tokenizer.save_pretrained(paths["tokenizer"])

    torch.manual_seed(0)
    paths["clip"] = str(root / "clip")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     patch_size=8, image_size=IMAGE_SIZE)).save_pretrained(paths["clip"])
    paths["llm"] = str(root / "llm")
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(vocab), pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2, max_position_embeddings=256)).save_pretrained(paths["llm"])
    paths["images"] = str(images)
    return paths


def toy_config_dict(world: dict[str, str], out: Path, **stage_overrides) -> dict:
    """A two-stage run config over the toy world (short stages, checkpoints every 2 steps)."""
    stage = dict(lr=3e-3, batch_size=8, max_steps=4, warmup=0.0, scheduler="constant", save_steps=2)
    stage.update(stage_overrides)
    return {
        "model": {"strategy": "llava", "vision_tower": world["clip"], "llm": world["llm"], "tokenizer": world["tokenizer"]},
        "data": {"images": world["images"]},
        "training": {
            "logging_steps": 1,
            "disable_tqdm": True,
            "stages": [
                {"name": "align", "data": world["stage1"], "template": "plain", "train": ["connector"], **stage},
                {"name": "instruct", "data": world["stage2"], "template": "vicuna_v1", "train": ["strategy", "llm"],
                 "group_lr": {"llm": 1e-3}, **stage},
            ],
        },
        "eval": {"data": world["eval"], "batch_size": 8, "max_new_tokens": 3},
        "output": {"dir": str(out), "name": "toy"},
        "seed": 0,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    return make_toy_world(tmp_path_factory.mktemp("toy_world"))


# ---- helpers -------------------------------------------------------------------------------------
# Parameter-name prefix of each module group of a llava model (written out here, not taken from
# vlmzoo.training.groups, so the tests check the group code instead of reusing it).
PREFIXES = {"vision_tower": "vision_tower.", "llm": "language_model.", "connector": "strategy.connector."}


def group_of(name: str) -> str:
    matches = [g for g, prefix in PREFIXES.items() if name.startswith(prefix)]
    assert len(matches) == 1, name
    return matches[0]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def stage_name(args) -> str:
    return Path(args.output_dir).name


class Recorder(TrainerCallback):
    """Per stage: weights and requires_grad at train begin / end, optimizer groups, training state
    at train begin and after step ``snapshot_step``, and every log entry."""

    def __init__(self, snapshot_step: int | None = None) -> None:
        self.snapshot_step = snapshot_step
        self.begin: dict[str, dict] = {}
        self.end: dict[str, dict] = {}
        self.requires_grad: dict[str, dict[str, bool]] = {}
        self.opt_groups: dict[str, list[tuple[str, float, list[str]]]] = {}
        self.begin_state: dict[str, dict] = {}
        self.at_step: dict[str, dict] = {}
        self.logs: dict[str, list[dict]] = {}

    @staticmethod
    def _state(state, model, optimizer, lr_scheduler) -> dict:
        return {
            "global_step": state.global_step,
            "weights": snapshot(model),
            "optimizer": {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
                          for k, v in optimizer.state_dict()["state"].items()},
            "lrs": [g["lr"] for g in optimizer.param_groups],
            "scheduler_last_epoch": lr_scheduler.state_dict()["last_epoch"],
        }

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        stage = stage_name(args)
        self.begin[stage] = snapshot(model)
        names = {id(p): n for n, p in model.named_parameters()}
        self.opt_groups[stage] = [(g["group_name"], g["lr"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]
        self.begin_state[stage] = self._state(state, model, optimizer, lr_scheduler)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step == self.snapshot_step:
            self.at_step[stage_name(args)] = self._state(state, model, optimizer, lr_scheduler)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.setdefault(stage_name(args), []).append({"step": state.global_step, **(logs or {})})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        stage = stage_name(args)
        self.end[stage] = snapshot(model)
        self.requires_grad[stage] = {n: p.requires_grad for n, p in model.named_parameters()}


class Interrupted(RuntimeError):
    pass


class InterruptAfterSave(TrainerCallback):
    """Simulates a crash: raises right after the checkpoint of ``step`` of ``stage`` is written."""

    def __init__(self, stage: str, step: int) -> None:
        self.stage, self.step = stage, step

    def on_save(self, args, state, control, **kwargs):
        if stage_name(args) == self.stage and state.global_step == self.step:
            raise Interrupted(f"deliberate interruption after step {self.step} of {self.stage}")


def step_losses(logs: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in logs if "loss" in e}


# The reference run: both stages, a linear schedule (so a lost scheduler state would show), eval.
REF_STAGE = dict(scheduler="linear")


@pytest.fixture(scope="module")
def reference_run(world, tmp_path_factory):
    from vlmzoo.training import run_training

    out = tmp_path_factory.mktemp("reference") / "run"
    cfg = run_config_from_dict(toy_config_dict(world, out, **REF_STAGE))
    recorder = Recorder(snapshot_step=2)
    result = run_training(cfg, callbacks=[recorder])
    return {"cfg": cfg, "result": result, "rec": recorder, "out": out}


# ---- a whole run ---------------------------------------------------------------------------------
def test_two_stage_run_saves_loadable_stages_config_and_counts(reference_run):
    from vlmzoo import VLMForConditionalGeneration
    from vlmzoo.processing import VLMProcessor

    out, result, rec, cfg = reference_run["out"], reference_run["result"], reference_run["rec"], reference_run["cfg"]
    assert [s.name for s in result.stages] == ["align", "instruct"]
    assert not any(s.skipped for s in result.stages)
    assert result.final_model_dir == out / "instruct" / "final"

    # The resolved config sits next to the stages and types back into the same config.
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert run_config_from_dict(resolved).to_dict() == cfg.to_dict()
    assert resolved["training"]["stages"][1]["group_lr"] == {"llm": 1e-3}

    expected_trained = {"align": {"connector"}, "instruct": {"connector", "llm"}}
    for stage in ("align", "instruct"):
        final = out / stage / "final"
        model = VLMForConditionalGeneration.from_pretrained(final)
        VLMProcessor.from_pretrained(final)
        # The saved weights are the ones training ended with.
        loaded = dict(model.named_parameters())
        for name, tensor in rec.end[stage].items():
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)

        done = json.loads((final / "stage_complete.json").read_text())
        assert done["global_step"] == 4 and done["stage"] == stage
        assert set(done["trained_groups"]) == expected_trained[stage]
        # Parameter counts per group = the model's actual requires_grad counts at the end of the stage.
        numel = {n: t.numel() for n, t in rec.end[stage].items()}
        actual = {g: {"trainable": 0, "total": 0} for g in PREFIXES}
        for name, trains in rec.requires_grad[stage].items():
            actual[group_of(name)]["total"] += numel[name]
            actual[group_of(name)]["trainable"] += numel[name] * trains
        assert done["parameters"] == actual
        for group, counts in actual.items():
            assert counts["total"] > 0
            assert (counts["trainable"] == counts["total"]) == (group in expected_trained[stage])
            assert (counts["trainable"] == 0) == (group not in expected_trained[stage])
        assert math.isclose(done["last_logged_loss"], step_losses(rec.logs[stage])[4])

    # The evaluation after training wrote its files (defaults: the last stage's data for the blind control).
    metrics = json.loads((out / "eval" / "eval_metrics.json").read_text())
    assert metrics["n"] == 16 and metrics["blind"]["source"] == os.path.abspath(cfg.training.stages[-1].data)
    assert len((out / "eval" / "predictions.jsonl").read_text().splitlines()) == 16


def test_frozen_groups_do_not_change_trained_groups_do(reference_run):
    rec = reference_run["rec"]
    trained = {"align": {"connector"}, "instruct": {"connector", "llm"}}
    for stage in ("align", "instruct"):
        changed = {g: [] for g in PREFIXES}
        for name, before in rec.begin[stage].items():
            after = rec.end[stage][name]
            if group_of(name) in trained[stage]:
                assert not torch.equal(before, after), f"{stage}: trained parameter {name} did not change"
            else:
                assert torch.equal(before, after), f"{stage}: frozen parameter {name} changed"
            changed[group_of(name)].append(not torch.equal(before, after))
        assert {g for g, flags in changed.items() if any(flags)} == trained[stage]
    # Stage 2 starts from stage 1's final weights.
    for name, tensor in rec.end["align"].items():
        assert torch.equal(rec.begin["instruct"][name], tensor), name


def test_per_group_learning_rates_in_the_run(reference_run):
    rec = reference_run["rec"]
    for stage, expected in (("align", {"connector": 3e-3}), ("instruct", {"connector": 3e-3, "llm": 1e-3})):
        lrs = {}
        for group, lr, names in rec.opt_groups[stage]:
            assert {group_of(n) for n in names} == {group}
            lrs.setdefault(group, set()).add(lr)
        assert lrs == {g: {lr} for g, lr in expected.items()}


def test_group_learning_rates_reach_the_optimizer(world, tmp_path):
    from vlmzoo.build import build_model_and_processor
    from vlmzoo.training import StagePlan, VLMTrainer
    from vlmzoo.training.runner import training_arguments

    cfg = run_config_from_dict(toy_config_dict(world, tmp_path / "run", weight_decay=0.1))
    stage = cfg.training.stages[1]  # trains [strategy, llm], lr 3e-3, group_lr {llm: 1e-3}
    model, _ = build_model_and_processor(cfg)
    plan = StagePlan.build(model, stage)
    plan.apply(model)
    trainer = VLMTrainer(model=model, args=training_arguments(cfg, stage), stage_plan=plan)
    optimizer = trainer.create_optimizer()

    names = {id(p): n for n, p in model.named_parameters()}
    in_optimizer = []
    for g in optimizer.param_groups:
        group_names = [names[id(p)] for p in g["params"]]
        in_optimizer += group_names
        assert {group_of(n) for n in group_names} == {g["group_name"]}
        assert g["lr"] == {"llm": 1e-3, "connector": 3e-3}[g["group_name"]]
        no_decay = {("bias" in n or "norm" in n) for n in group_names}
        assert no_decay == {g["weight_decay"] == 0.0}
        assert g["weight_decay"] in (0.0, 0.1)
    assert len(in_optimizer) == len(set(in_optimizer))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(in_optimizer) == trainable
    assert {group_of(n) for n in trainable} == {"connector", "llm"}
    assert {g["group_name"] for g in optimizer.param_groups if g["weight_decay"] == 0.1} == {"connector", "llm"}

    # The scheduler scales every group's rate together.
    trainer.create_scheduler(num_training_steps=4, optimizer=optimizer)
    assert trainer.lr_scheduler.get_last_lr() == [g["lr"] for g in optimizer.param_groups]

    # A sub-group entry beats the ``strategy`` alias, whatever the order.
    stage.group_lr = {"connector": 7e-3, "strategy": 5e-3, "llm": 2e-4}
    assert StagePlan.build(model, stage).lrs == {"connector": 7e-3, "llm": 2e-4}


def test_count_lines_logged_per_group(world, tmp_path, caplog):
    from vlmzoo.training import run_training

    d = toy_config_dict(world, tmp_path / "run", max_steps=1, save_steps=10)
    d["training"]["stages"] = d["training"]["stages"][1:]  # the [strategy, llm] stage only
    cfg = run_config_from_dict(d)
    with caplog.at_level(logging.INFO, logger="vlmzoo.training"):
        result = run_training(cfg, evaluate=False)
    done = result.stages[0].metrics["parameters"]
    lines = [r.getMessage() for r in caplog.records if r.name == "vlmzoo.training.runner"]
    for group, state in (("vision_tower", "frozen"), ("llm", "TRAINABLE"), ("connector", "TRAINABLE")):
        matching = [line for line in lines if line.startswith(f"[instruct] {group} ")]
        assert len(matching) == 1, (group, lines)
        counts = [int(x.replace(",", "")) for x in re.findall(r"([\d,]+) /\s+([\d,]+) params", matching[0])[0]]
        assert counts == [done[group]["trainable"], done[group]["total"]]
        assert state in matching[0]
    llm_line = next(line for line in lines if line.startswith("[instruct] llm "))
    assert "lr=0.001" in llm_line
    assert done["vision_tower"]["trainable"] == 0 and done["llm"]["trainable"] == done["llm"]["total"] > 0


def test_feature_cache_serves_every_stage_and_leaves_training_unchanged(world, tmp_path, reference_run, caplog):
    from safetensors.torch import load_file

    from vlmzoo.training import run_training

    d = toy_config_dict(world, tmp_path / "run", **REF_STAGE)
    d["training"]["cache_vision_features"] = True
    with caplog.at_level(logging.INFO, logger="vlmzoo.training"):
        result = run_training(run_config_from_dict(d), evaluate=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "vlmzoo.training.runner"]
    carried = [int(m) for line in lines for m in re.findall(r"^\[instruct\] frozen vision tower.* (\d+) images from earlier", line)]
    assert len(carried) == 1 and carried[0] > 0, lines  # stage 2 starts with stage 1's images
    saved = [int(m) for line in lines for m in re.findall(r"^\[instruct\] vision feature cache: .* (\d+) records served without", line)]
    assert len(saved) == 1 and saved[0] > 0, lines  # those records' image files were not read again
    ours = load_file(result.final_model_dir / "model.safetensors")
    ref = load_file(reference_run["result"].final_model_dir / "model.safetensors")
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_stage_that_trains_the_tower_does_not_use_the_cache(world, tmp_path, caplog):
    from vlmzoo.training import run_training

    d = toy_config_dict(world, tmp_path / "run", max_steps=1, save_steps=10)
    d["training"]["cache_vision_features"] = True
    d["training"]["stages"][1]["train"] = ["strategy", "vision_tower"]
    with caplog.at_level(logging.INFO, logger="vlmzoo.training"):
        run_training(run_config_from_dict(d), evaluate=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "vlmzoo.training.runner"]
    assert any(line.startswith("[align] frozen vision tower") for line in lines)
    assert not any(line.startswith("[instruct] frozen vision tower") for line in lines)


def test_init_from_starts_the_first_stage_from_a_saved_model(world, tmp_path, reference_run):
    from safetensors.torch import load_file

    from vlmzoo.training.runner import load_stage_start

    saved = reference_run["result"].final_model_dir
    d = toy_config_dict(world, tmp_path / "run")
    d["model"]["init_from"] = str(saved)
    cfg = run_config_from_dict(d)
    model, _ = load_stage_start(cfg, None, cfg.training.stages[0])
    ref = load_file(saved / "model.safetensors")
    ours = model.state_dict()
    assert ref.keys() == ours.keys()
    for key, value in ref.items():
        assert torch.equal(ours[key], value), key


# ---- resuming ------------------------------------------------------------------------------------
def test_resume_after_interruption_matches_uninterrupted_run(world, tmp_path, reference_run):
    from vlmzoo import VLMForConditionalGeneration
    from vlmzoo.training import run_training

    out = tmp_path / "run"
    cfg = run_config_from_dict(toy_config_dict(world, out, **REF_STAGE))
    with pytest.raises(Interrupted):
        run_training(cfg, evaluate=False, callbacks=[InterruptAfterSave("instruct", 2)])
    assert (out / "align" / "final" / "stage_complete.json").is_file()
    assert not (out / "instruct" / "final" / "stage_complete.json").exists()
    checkpoint = out / "instruct" / "checkpoint-2"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (checkpoint / name).is_file(), name

    rec = Recorder()
    result = run_training(cfg, evaluate=False, callbacks=[rec])
    assert [s.skipped for s in result.stages] == [True, False]
    assert "align" not in rec.begin  # the completed stage did not train again
    metrics = result.stages[1].metrics
    assert Path(metrics["resumed_from"]) == checkpoint and metrics["global_step"] == 4

    # The resumed stage starts exactly where the uninterrupted run was after step 2:
    # weights, optimizer moments, scheduler position and learning rates.
    ref = reference_run["rec"]
    want, got = ref.at_step["instruct"], rec.begin_state["instruct"]
    assert got["global_step"] == want["global_step"] == 2
    for name, tensor in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    assert got["optimizer"].keys() == want["optimizer"].keys() and want["optimizer"]
    for idx, state in want["optimizer"].items():
        for key, value in state.items():
            torch.testing.assert_close(got["optimizer"][idx][key], value, rtol=1e-6, atol=1e-9, msg=f"{idx}.{key}")
    assert got["scheduler_last_epoch"] == want["scheduler_last_epoch"] == 2
    assert got["lrs"] == pytest.approx(want["lrs"])
    assert got["lrs"] != ref.begin_state["instruct"]["lrs"]  # the linear schedule has moved on

    # ... and ends where it ended.
    want_losses, got_losses = step_losses(ref.logs["instruct"]), step_losses(rec.logs["instruct"])
    assert sorted(got_losses) == [3, 4]
    for step in (3, 4):
        assert got_losses[step] == pytest.approx(want_losses[step], rel=1e-5)
    ref_metrics = reference_run["result"].stages[1].metrics
    assert metrics["last_logged_loss"] == pytest.approx(ref_metrics["last_logged_loss"], rel=1e-5)
    resumed = dict(VLMForConditionalGeneration.from_pretrained(out / "instruct" / "final").named_parameters())
    for name, tensor in ref.end["instruct"].items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    # A third run finds every stage complete.
    again = run_training(cfg, evaluate=False)
    assert [s.skipped for s in again.stages] == [True, True]
    assert again.stages[1].metrics["global_step"] == 4


def test_resume_refuses_a_different_config(reference_run):
    from vlmzoo.training import run_training

    d = reference_run["cfg"].to_dict()
    d["training"]["stages"][1]["lr"] = 1e-2
    with pytest.raises(ValueError, match=r"training\.stages\.1\.lr"):
        run_training(run_config_from_dict(d), evaluate=False)


# ---- errors --------------------------------------------------------------------------------------
def test_unknown_stage_group_names_it(world, tmp_path):
    from vlmzoo.build import build_model_and_processor
    from vlmzoo.training import StagePlan, run_training
    from vlmzoo.utils import ConfigKeyError

    d = toy_config_dict(world, tmp_path / "run")
    d["training"]["stages"][0]["train"] = ["conector"]
    with pytest.raises(ConfigKeyError, match=r"'conector'.*training\.stages\.0\.train.*Did you mean 'connector'"):
        run_training(run_config_from_dict(d), evaluate=False)

    cfg = run_config_from_dict(toy_config_dict(world, tmp_path / "run2"))
    model, _ = build_model_and_processor(cfg)
    stage = cfg.training.stages[1]
    stage.group_lr = {"lm": 1e-4}
    with pytest.raises(ConfigKeyError, match=r"'lm'.*group_lr.*Did you mean 'llm'"):
        StagePlan.build(model, stage, where="training.stages.1")
    stage.group_lr, stage.train = {}, ["strategy", "text_encoder"]
    with pytest.raises(ConfigKeyError, match=r"'text_encoder'"):  # this model has no text encoder
        StagePlan.build(model, stage)


@pytest.mark.parametrize(
    "patch, key, near",
    [
        (lambda d: d["training"]["stages"][1].update(max_step=3), "max_step", "max_steps"),
        (lambda d: d["training"].update(loging_steps=3), "loging_steps", "logging_steps"),
        (lambda d: d.update(sed=1), "sed", "seed"),
        (lambda d: d["model"].update(strategy_config={"conector_depth": 3}), "conector_depth", "connector_depth"),
    ],
)
def test_unknown_config_key_names_it(world, tmp_path, patch, key, near):
    from vlmzoo.utils import ConfigKeyError

    d = toy_config_dict(world, tmp_path / "run")
    patch(d)
    with pytest.raises(ConfigKeyError, match=rf"Unknown key '{key}'.*Did you mean '{near}'"):
        run_config_from_dict(d)


# ---- distributed, DeepSpeed, wandb (subprocesses; slow) -------------------------------------------
def one_stage_yaml(world, tmp_path: Path, **overrides) -> tuple[Path, Path]:
    """A config file with the alignment stage only: 2 steps, a checkpoint at step 2."""
    out = tmp_path / "run"
    d = toy_config_dict(world, out, max_steps=2, save_steps=2)
    d["training"]["stages"] = d["training"]["stages"][:1]
    for key, value in overrides.items():
        d["training"][key] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    return path, out


def run_script(cmd: list[str], tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO), **env_extra)  # this tree's vlmzoo, whichever one is installed
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def assert_stage_done(out: Path, world_size: int) -> dict:
    from vlmzoo import VLMForConditionalGeneration

    done = json.loads((out / "align" / "final" / "stage_complete.json").read_text())
    assert done["global_step"] == 2
    VLMForConditionalGeneration.from_pretrained(out / "align" / "final")
    # 48 samples, batch 8 per process: an epoch is 6 / world_size steps.
    state = json.loads((out / "align" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(2 / (48 / (8 * world_size)), abs=1e-3)
    return done


@pytest.mark.slow
def test_torchrun_two_processes(world, tmp_path):
    config, out = one_stage_yaml(world, tmp_path)
    proc = run_script([*torchrun(2), "scripts/train.py", "--config", str(config), "--no-eval"], tmp_path)
    assert "stage align: 2 steps" in proc.stdout
    assert_stage_done(out, world_size=2)


@pytest.mark.slow
def test_deepspeed_zero2_two_processes(world, tmp_path):
    from safetensors.torch import load_file

    config, out = one_stage_yaml(world, tmp_path, deepspeed=str(REPO / "configs" / "deepspeed" / "zero2.json"))
    run_script([*torchrun(2), "scripts/train.py", "--config", str(config), "--no-eval"], tmp_path)
    assert_stage_done(out, world_size=2)
    # A DeepSpeed checkpoint with the optimizer state partitioned over both ranks (ZeRO).
    zero = out / "align" / "checkpoint-2" / "global_step2"
    assert sorted(p.name for p in zero.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    # The frozen LLM came through untouched.
    final = load_file(out / "align" / "final" / "model.safetensors")
    original = load_file(Path(world["llm"]) / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(final[f"language_model.{key}"], original[key])


@pytest.mark.slow
def test_wandb_offline_run_directory(world, tmp_path):
    config, out = one_stage_yaml(world, tmp_path)
    run_script(
        [sys.executable, "scripts/train.py", "--config", str(config), "--no-eval",
         "training.report_to=[wandb]", "training.wandb_project=vlmzoo-tests"],
        tmp_path, WANDB_MODE="offline", WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"), WANDB_DATA_DIR=str(tmp_path / "wandb_data"),
    )
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    (record,) = runs[0].glob("run-*.wandb")
    data = record.read_bytes()
    for needle in (b"vlmzoo-tests", b"toy/align", b"train/loss"):
        assert needle in data, needle
    assert json.loads((out / "align" / "final" / "stage_complete.json").read_text())["global_step"] == 2


def test_group_by_length_batches_similar_lengths(world, tmp_path):
    """training.group_by_length: the sampler groups samples by their stored token lengths."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from vlmzoo.build import build_model_and_processor
    from vlmzoo.data import LlavaJsonDataset
    from vlmzoo.training import StagePlan, VLMTrainer
    from vlmzoo.training.runner import training_arguments

    tree = toy_config_dict(world, tmp_path / "run", batch_size=4)
    tree["training"]["group_by_length"] = True
    cfg = run_config_from_dict(tree)
    stage = cfg.training.stages[1]
    model, processor = build_model_and_processor(cfg)
    processor = processor.with_template(stage.template)
    # Two lengths: alternate one-turn and two-turn records.
    records = json.loads(Path(stage.data).read_text())
    for i, rec in enumerate(records):
        if i % 2:
            rec["conversations"] = rec["conversations"][:2]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    dataset = LlavaJsonDataset(data, processor, world["images"])
    trainer = VLMTrainer(model=model, args=training_arguments(cfg, stage), train_dataset=dataset,
                         stage_plan=StagePlan.build(model, stage))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    order = list(sampler)
    assert sorted(order) == list(range(len(dataset)))
    lengths = dataset.lengths
    assert len(set(lengths)) == 2
    mixed = sum(len({lengths[i] for i in order[k:k + 4]}) > 1 for k in range(0, len(order), 4))
    # transformers sorts within 4 mega-batches of 12 here: at most one mixed batch in each, plus the
    # batch the longest sample is swapped into. A random order would mix ~11 of the 12 batches.
    assert mixed <= 5
