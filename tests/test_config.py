"""Run configs: ``_base_`` inheritance, deep merge, list patches, dotted overrides, unknown-key
errors, the command-line parsers of both scripts, and the shipped config files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import pytest
import yaml

from vlmzoo.build import build_on_meta
from vlmzoo.config import (
    CONFIGS_DIR,
    RunConfig,
    config_hash,
    load_config_tree,
    load_run_config,
    prepare_run_files,
    run_config_from_dict,
    strategy_run_config,
    strategy_run_config_path,
)
from vlmzoo.config_tree import deep_merge, load_yaml_tree, parse_override
from vlmzoo.registry import register_strategy
from vlmzoo.utils import ConfigKeyError, build_dataclass

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


STAGES = [
    {"name": "one", "data": "a.json", "lr": 1.0e-3, "batch_size": 4, "train": ["strategy"]},
    {"name": "two", "data": "b.json", "lr": 2.0e-5, "batch_size": 2, "train": ["strategy", "llm"], "group_lr": {"strategy": 1.0e-4}},
]


@pytest.fixture
def chain(tmp_path):
    """base.yaml <- mid/mid.yaml (+ extra.yaml) <- child.yaml."""
    write(tmp_path / "base.yaml", {
        "model": {"strategy": "llava", "strategy_config": {"vision_layer": -2, "connector_depth": 2}, "llm": "base-llm",
                  "vision_tower": "base-tower"},
        "data": {"images": "imgs", "max_length": 64},
        "training": {"logging_steps": 5, "report_to": ["tensorboard"], "stages": STAGES},
        "seed": 1,
    })
    write(tmp_path / "mid" / "extra.yaml", {"data": {"num_workers": 3}, "seed": 2})
    write(tmp_path / "mid" / "mid.yaml", {
        "_base_": ["../base.yaml", "extra.yaml"],  # relative to this file; later bases win
        "model": {"strategy_config": {"vision_layer": -1}},
        "training": {"report_to": ["wandb"]},
    })
    return write(tmp_path / "child.yaml", "\n".join([
        "_base_: mid/mid.yaml",
        "model:",
        "  llm: child-llm",
        "training:",
        "  stages:",
        "    1: {lr: 5e-4, group_lr: {llm: 1e-5}}",  # patch item 1 only; YAML 1.1 would read 5e-4 as a string
        "eval:",
        "  max_new_tokens: 8",
    ]))


# ---- files, merging, overrides -------------------------------------------------------------------
def test_base_inheritance_and_deep_merge(chain):
    tree = load_yaml_tree(chain)
    assert "_base_" not in tree
    # Nested mappings merge key by key through the whole chain.
    assert tree["model"] == {"strategy": "llava", "strategy_config": {"vision_layer": -1, "connector_depth": 2},
                             "llm": "child-llm", "vision_tower": "base-tower"}
    assert tree["data"] == {"images": "imgs", "max_length": 64, "num_workers": 3}
    assert tree["seed"] == 2  # the second base beats the first
    assert tree["training"]["report_to"] == ["wandb"]  # lists are replaced, not concatenated
    assert tree["training"]["logging_steps"] == 5
    # List patching by integer keys: only item 1, and only the named fields of it.
    assert tree["training"]["stages"][0] == STAGES[0]
    assert tree["training"]["stages"][1] == {**STAGES[1], "lr": 5e-4, "group_lr": {"strategy": 1e-4, "llm": 1e-5}}
    assert isinstance(tree["training"]["stages"][1]["lr"], float)

    cfg = load_run_config(chain, resolve_vars=False)
    assert cfg.training.stages[1].lr == 5e-4 and cfg.training.stages[0].lr == 1e-3
    assert cfg.eval.max_new_tokens == 8 and cfg.data.num_workers == 3
    assert cfg.output.name == f"{chain.parent.name}-child"


def test_deep_merge_does_not_modify_inputs_and_rejects_bad_patches():
    base = {"a": {"b": 1, "c": [1, 2, 3]}, "l": [{"x": 1}, {"x": 2}]}
    update = {"a": {"c": {-1: 30}}, "l": {0: {"y": 5}}}
    merged = deep_merge(base, update)
    assert merged == {"a": {"b": 1, "c": [1, 2, 30]}, "l": [{"x": 1, "y": 5}, {"x": 2}]}
    assert base == {"a": {"b": 1, "c": [1, 2, 3]}, "l": [{"x": 1}, {"x": 2}]}
    with pytest.raises(IndexError, match=r"item 5 patched.*2 items"):
        deep_merge(base, {"l": {5: {"x": 0}}})


def test_base_cycle_and_missing_base(tmp_path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": ["a.yaml"]})
    with pytest.raises(ValueError, match="cycle"):
        load_yaml_tree(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", {"_base_": ["nope.yaml"]})
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_yaml_tree(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    "text, parts, value",
    [
        ("training.stages.0.lr=1e-3", ["training", "stages", "0", "lr"], 1e-3),
        ("model.strategy_config.vision_layer=-3", ["model", "strategy_config", "vision_layer"], -3),
        ("training.report_to=[wandb, tensorboard]", ["training", "report_to"], ["wandb", "tensorboard"]),
        ("eval.data=null", ["eval", "data"], None),
        ("training.bf16=true", ["training", "bf16"], True),
        ("output.name=my run", ["output", "name"], "my run"),
        ("training.stages.1.group_lr={llm: 2.5e-5}", ["training", "stages", "1", "group_lr"], {"llm": 2.5e-5}),
        ("seed=", ["seed"], ""),
    ],
)
def test_parse_override(text, parts, value):
    got_parts, got_value = parse_override(text)
    assert got_parts == parts
    assert got_value == value and type(got_value) is type(value)


def test_dotted_overrides_apply(chain):
    cfg = load_run_config(chain, [
        "training.stages.0.lr=3e-3", "training.stages.-1.batch_size=7", "model.strategy_config.connector_depth=3",
        "training.report_to=[]", "eval.data=null", "training.stages.1.train=[llm]", "output.dir=/tmp/x",
    ], resolve_vars=False)
    assert cfg.training.stages[0].lr == 3e-3 and cfg.training.stages[1].batch_size == 7
    assert cfg.model.strategy_config == {"vision_layer": -1, "connector_depth": 3}
    assert cfg.training.report_to == [] and cfg.eval.data is None
    assert cfg.training.stages[1].train == ["llm"] and cfg.output.dir == "/tmp/x"
    # Overrides without a file build on the defaults; a missing section is created.
    cfg = load_run_config(None, ["model.strategy=llava", "eval.batch_size=3"], resolve_vars=False)
    assert cfg.eval.batch_size == 3 and cfg.training.stages == [] and cfg.output.name == "run"


@pytest.mark.parametrize(
    "override, error, match",
    [
        ("training.stages.5.lr=1", ConfigKeyError, r"'training\.stages\.5' is out of range \(the list has 2 items\)"),
        ("training.stages.first.lr=1", ConfigKeyError, r"'training\.stages\.first' indexes a list"),
        ("seed.x=1", ConfigKeyError, r"'seed' is a value, not a section"),
        ("training.stages.0.lr", ValueError, r"dotted\.key=value"),
        ("training..lr=1", ValueError, "empty key segment"),
        ("training.stages.0.lr=fast", TypeError, r"config\.training\.stages\.0\.lr must be a number"),
        ("training.bf16=1", TypeError, r"config\.training\.bf16 must be true or false"),
        ("training.stages.0.batch_size=2.5", TypeError, r"batch_size must be an integer"),
        ("training.stages=5", TypeError, r"config\.training\.stages must be a list"),
        # strategy fields are typed by the strategy's config dataclass, checked when the config loads
        ("model.strategy_config.connector_depth=abc", TypeError, r"strategy_config\[llava\]\.connector_depth must be an integer, got 'abc'"),
        ("training.stages.1.strategy_config={vision_layer: [2]}", TypeError,
         r"training\.stages\.1\.strategy_config: strategy_config\[llava\]\.vision_layer must be an integer"),
    ],
)
def test_bad_overrides(chain, override, error, match):
    with pytest.raises(error, match=match):
        load_run_config(chain, [override], resolve_vars=False)


@pytest.mark.parametrize(
    "override, key, where, near",
    [
        ("modle.llm=x", "modle", "config", "model"),
        ("training.logging_step=3", "logging_step", r"config\.training", "logging_steps"),
        ("training.stages.1.max_step=3", "max_step", r"config\.training\.stages\.1", "max_steps"),
        ("training.stages.0.grup_lr={llm: 1.0}", "grup_lr", r"config\.training\.stages\.0", "group_lr"),
        ("eval.batchsize=3", "batchsize", r"config\.eval", "batch_size"),
        ("tiny_world.cache=/x", "cache", r"config\.tiny_world", "cache_dir"),
        ("model.strategy_config.vison_layer=-3", "vison_layer", r"strategy_config\[llava\]", "vision_layer"),
    ],
)
def test_unknown_keys_name_the_nearest_valid_key(chain, override, key, where, near):
    with pytest.raises(ConfigKeyError, match=rf"Unknown key '{key}' in {where}\. Did you mean '{near}'"):
        load_run_config(chain, [override], resolve_vars=False)


def test_unknown_key_in_a_file_and_in_a_stage(tmp_path, chain):
    bad = write(tmp_path / "bad.yaml", {"_base_": ["child.yaml"], "training": {"stages": {0: {"epoch": 2}}}})
    with pytest.raises(ConfigKeyError, match=r"Unknown key 'epoch' in config\.training\.stages\.0\. Did you mean 'epochs'"):
        load_run_config(bad, resolve_vars=False)
    with pytest.raises(ConfigKeyError, match=r"Unknown key 'sed' in config\. Did you mean 'seed'"):
        run_config_from_dict({"sed": 1})


def test_validation_beyond_the_schema(chain):
    with pytest.raises(ValueError, match="stage names must be unique; repeated: one"):
        load_run_config(chain, ["training.stages.1.name=one"], resolve_vars=False)
    with pytest.raises(ValueError, match=r"training\.stages\.0 \('one'\): set epochs > 0 or max_steps > 0"):
        load_run_config(chain, ["training.stages.0.epochs=0"], resolve_vars=False)
    with pytest.raises(KeyError, match=r"Unknown strategy 'lava'\. Registered strategies: .*llava"):
        load_run_config(chain, ["model.strategy=lava"], resolve_vars=False)
    no_strategy = load_run_config(chain, ["model.strategy=null"], resolve_vars=False)  # fine for scripts/eval.py
    with pytest.raises(ValueError, match=r"model\.strategy is not set .*Registered strategies: .*llava"):
        build_on_meta(no_strategy)


def test_output_dir_follows_the_config_hash(chain):
    a = load_run_config(chain, resolve_vars=False)
    b = load_run_config(chain, resolve_vars=False)
    c = load_run_config(chain, ["training.stages.0.lr=3e-3"], resolve_vars=False)
    assert a.output.dir == b.output.dir and a.output.dir != c.output.dir
    assert Path(a.output.dir).name.startswith(f"{a.output.name}-")
    # output.dir itself does not enter the hash, output.name does
    tree = load_config_tree(chain)
    here, there = {**tree, "output": {"name": "x", "dir": "/here"}}, {**tree, "output": {"name": "x", "dir": "/there"}}
    assert config_hash(here) == config_hash(there) != config_hash({**tree, "output": {"name": "y", "dir": "/here"}})


def test_variables(tmp_path):
    path = write(tmp_path / "v.yaml", {"model": {"strategy": "llava"},
                                       "training": {"deepspeed": "${configs_dir}/deepspeed/zero2.json"}})
    assert load_run_config(path).training.deepspeed == str(CONFIGS_DIR / "deepspeed" / "zero2.json")
    assert load_run_config(path, resolve_vars=False).training.deepspeed == "${configs_dir}/deepspeed/zero2.json"
    with pytest.raises(ConfigKeyError, match=r"Unknown variable \$\{nope\}"):
        load_run_config(path, ["eval.data=${nope}/x"])


# ---- command lines -------------------------------------------------------------------------------
def test_arch_lookup_names_what_exists():
    assert strategy_run_config_path("llava") == CONFIGS_DIR / "llava" / "tiny.yaml"
    assert strategy_run_config_path("llava", "reference") == CONFIGS_DIR / "llava" / "reference.yaml"
    with pytest.raises(FileNotFoundError, match=r"No strategy 'lava'.*Did you mean 'llava'\?.*Registered strategies: .*llava"):
        strategy_run_config_path("lava")
    with pytest.raises(FileNotFoundError, match=r"No 'huge' config for strategy 'llava'; available: reference, tiny"):
        strategy_run_config_path("llava", "huge")
    with pytest.raises(FileNotFoundError, match=r"No strategy 'base'"):
        strategy_run_config_path("base", "reference")


def test_a_registered_strategy_without_a_config_folder_gets_the_tiny_base(tmp_path):
    """--arch NAME of a strategy with no configs/NAME/: the shared tiny base, model.strategy=NAME and
    the config dataclass's defaults; reference configs come from the strategy's own config_dir."""
    from vlmzoo.config import TINY_BASE, strategy_run_config, strategy_config_files
    from vlmzoo.registry import STRATEGIES, get_strategy_class

    class NoFolder(get_strategy_class("llava")):
        config_dir = None

    register_strategy("no_folder_llava")(NoFolder)
    try:
        path, first = strategy_run_config("no_folder_llava")
        assert path == CONFIGS_DIR / TINY_BASE
        cfg = load_run_config(path, first, resolve_vars=False)
        assert cfg.model.strategy == "no_folder_llava" and cfg.model.strategy_config == {}
        assert cfg.output.name == "no_folder_llava-tiny"
        assert [s.name for s in cfg.training.stages] == ["stage1_align", "stage2_instruct"]
        with pytest.raises(FileNotFoundError, match=r"No 'reference' config for strategy 'no_folder_llava'; available: tiny"):
            strategy_run_config("no_folder_llava", "reference")
        assert strategy_config_files("no_folder_llava", "reference*.yaml") == []

        (tmp_path / "reference.yaml").write_text(
            f"_base_: [{CONFIGS_DIR / 'llava' / 'reference.yaml'}]\nmodel: {{strategy: no_folder_llava}}\n")
        NoFolder.config_dir = tmp_path
        assert strategy_config_files("no_folder_llava", "reference*.yaml") == [tmp_path / "reference.yaml"]
        assert strategy_run_config("no_folder_llava", "reference") == (tmp_path / "reference.yaml", ())
        assert load_run_config(tmp_path / "reference.yaml").model.strategy == "no_folder_llava"
        NoFolder.config_dir = tmp_path / "missing"
        with pytest.raises(FileNotFoundError, match="declares config_dir .*missing"):
            strategy_config_files("no_folder_llava")
    finally:
        STRATEGIES.unregister("no_folder_llava")


def test_train_cli_config_file_and_overrides(chain, capsys):
    from vlmzoo.training.cli import main

    # overrides before and after the flags (argparse's plain parse_args rejects the second group)
    assert main(["--config", str(chain), "training.stages.0.lr=7e-3", "--output-dir", "/tmp/somewhere", "eval.batch_size=5",
                 "--print-config"]) == 0
    # (transformers prints "[INFO] Running in WANDB offline mode" on import when WANDB_MODE=offline)
    out = capsys.readouterr().out
    printed = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith("[INFO] ")))
    cfg = run_config_from_dict(printed)
    assert cfg.training.stages[0].lr == 7e-3 and cfg.training.stages[1].lr == 5e-4
    assert cfg.eval.batch_size == 5 and cfg.output.dir == "/tmp/somewhere"
    assert cfg.model.llm == "child-llm"

    with pytest.raises(FileNotFoundError, match="Did you mean 'llava'"):
        main(["--arch", "lava", "--print-config"])
    with pytest.raises(SystemExit):
        main(["--print-config"])  # neither --arch nor --config
    with pytest.raises(SystemExit):
        main(["--arch", "llava", "--config", str(chain)])  # mutually exclusive
    capsys.readouterr()
    with pytest.raises(ConfigKeyError, match="Did you mean 'max_steps'"):
        main(["--config", str(chain), "training.stages.0.max_step=3", "--print-config"])


def test_eval_cli_config_file_and_overrides(chain, tmp_path, monkeypatch, capsys):
    import vlmzoo.evaluation as evaluation

    calls = []

    def fake_evaluate_run(cfg, model_dir, out_dir):
        calls.append((cfg, model_dir, out_dir))
        return {"per_type": {}, "n": 0, "accuracy": 0.0, "macro_accuracy": 0.0}

    monkeypatch.setattr(evaluation, "evaluate_run", fake_evaluate_run)
    with pytest.raises(SystemExit):  # no such model folder: a usage error before any config is read
        evaluation.main(["--model", str(tmp_path / "m"), "--config", str(chain)])
    assert not calls and f"argument --model: {tmp_path / 'm'}: no such folder" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    assert evaluation.main(["--model", str(tmp_path / "m"), "eval.batch_size=3", "--config", str(chain),
                            "eval.max_samples=10", "--data", "q.json", "--images", "img"]) == 0
    (cfg, model_dir, out_dir), = calls
    assert isinstance(cfg, RunConfig)
    assert cfg.eval.batch_size == 3 and cfg.eval.max_samples == 10 and cfg.eval.max_new_tokens == 8
    assert cfg.eval.data == "q.json" and cfg.eval.images == "img"
    assert cfg.eval_train_data() == "b.json"  # the config's last stage
    assert model_dir == str(tmp_path / "m") and Path(out_dir) == tmp_path / "m" / "eval"
    with pytest.raises(SystemExit):
        evaluation.main(["--model", "m", "--arch", "llava"])  # the eval script takes --config only


# ---- the shipped configs -------------------------------------------------------------------------
def test_reference_config_loads():
    cfg = load_run_config(REPO / "configs" / "llava" / "reference.yaml", resolve_vars=False)
    assert cfg.model.strategy == "llava"
    assert cfg.model.strategy_config == {"vision_layer": -2, "connector_depth": 2, "connector_act": "gelu"}
    assert cfg.model.vision_tower == "openai/clip-vit-large-patch14-336" and cfg.model.llm == "lmsys/vicuna-7b-v1.5"
    assert cfg.model.vision_config["image_size"] == 336 and cfg.model.text_config["hidden_size"] == 4096
    assert [s.name for s in cfg.training.stages] == ["stage1_pretrain", "stage2_finetune"]
    s1, s2 = cfg.training.stages
    assert (s1.lr, s1.batch_size, s1.train, s1.template) == (1e-3, 32, ["strategy"], "plain")
    assert (s2.lr, s2.batch_size, s2.train, s2.template) == (2e-5, 16, ["strategy", "llm"], "vicuna_v1")
    assert cfg.training.bf16 and cfg.training.gradient_checkpointing and cfg.model.dtype == "bfloat16"
    assert cfg.training.deepspeed == "${configs_dir}/deepspeed/zero2.json"
    assert cfg.output.name == "llava-reference"
    # ${configs_dir} is the only variable: resolving builds nothing and points at real files.
    cfg = load_run_config(REPO / "configs" / "llava" / "reference.yaml")
    assert Path(cfg.training.deepspeed) == CONFIGS_DIR / "deepspeed" / "zero2.json"
    assert Path(cfg.training.stages[1].deepspeed) == CONFIGS_DIR / "deepspeed" / "zero3.json"
    for path in (cfg.training.deepspeed, cfg.training.stages[1].deepspeed):
        assert json.loads(Path(path).read_text())["zero_optimization"]["stage"] in (2, 3)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from vlmzoo_lab.tinyworld import small_test_config

    cache = tmp_path_factory.mktemp("tiny_world_cache")
    small = small_test_config()
    overrides = [f"tiny_world.cache_dir={cache}", f"tiny_world.config={json.dumps(small.to_dict())}"]
    cfg = load_run_config(REPO / "configs" / "llava" / "tiny.yaml", overrides)
    built_by_resolving = (cache / "tiny_world").exists()
    prepare_run_files(cfg)
    return {"cache": cache, "small": small, "overrides": overrides, "cfg": cfg, "built_by_resolving": built_by_resolving}


def test_tiny_config_resolves_tiny_world_variables(small_world):
    from vlmzoo_lab.tinyworld import TinyWorldPaths

    cfg, small, cache = small_world["cfg"], small_world["small"], small_world["cache"]
    root = cache / "tiny_world" / small.config_hash()  # the override's fields made this world
    assert not small_world["built_by_resolving"]  # resolving the variables only names the folder...
    assert root.is_dir() and Path(cfg.variables["tiny_world"].root) == root  # ...prepare_run_files built it
    paths = TinyWorldPaths.at(root)
    assert paths.manifest()["config"]["n_train_images"] == small.n_train_images == 64
    assert cfg.model.vision_tower == str(paths.clip_dir) and cfg.model.llm == str(paths.llm_dir)
    assert cfg.model.tokenizer == str(paths.tokenizer_dir) and cfg.data.images == str(paths.images_dir)
    assert [s.data for s in cfg.training.stages] == [str(paths.stage1_json), str(paths.stage2_json)]
    assert cfg.eval.data == str(paths.eval_json)
    for path in (cfg.model.vision_tower, cfg.model.llm, cfg.data.images, cfg.eval.data, *[s.data for s in cfg.training.stages]):
        assert Path(path).exists(), path
    assert cfg.model.strategy == "llava" and cfg.model.strategy_config["vision_layer"] == -2
    assert cfg.training.stages[0].group_lr == {"strategy": 2e-3}
    assert cfg.output.name == "llava-tiny"
    # The same command line resolves to the same run folder (so a re-run resumes).
    again = load_run_config(REPO / "configs" / "llava" / "tiny.yaml", small_world["overrides"])
    assert again.output.dir == cfg.output.dir and again.to_dict() == cfg.to_dict()


def test_tiny_config_without_resolving_builds_nothing(tmp_path, small_world):
    cfg = load_run_config(REPO / "configs" / "llava" / "tiny.yaml", [f"tiny_world.cache_dir={tmp_path}"], resolve_vars=False)
    assert cfg.model.vision_tower == "${tiny_world.clip_dir}"
    assert cfg.training.stages[1].data == "${tiny_world.stage2_json}"
    assert list(tmp_path.iterdir()) == []
    # An unknown field of the tiny world names the nearest one (the cached world is reused).
    with pytest.raises(ConfigKeyError, match=r"Unknown key 'clip_dirr' in \$\{tiny_world\.\*\}\. Did you mean 'clip_dir'"):
        load_run_config(REPO / "configs" / "llava" / "tiny.yaml", [*small_world["overrides"], "model.vision_tower=${tiny_world.clip_dirr}"])


@dataclasses.dataclass
class _Inner:
    rgb: tuple[int, int, int] = (0, 0, 0)


@dataclasses.dataclass
class _Outer:
    names: tuple[str, ...] = ()
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    scale: float | None = None
    mode: Literal["dci", "sti"] = "dci"
    flag: Literal[1, True] = 1


def test_build_dataclass_types_nested_fields_and_names_the_bad_one():
    built = build_dataclass(_Outer, {"names": ["a", "b"], "inner": {"rgb": [1, 2.0, 3]}, "scale": 2}, "x")
    assert built == _Outer(names=("a", "b"), inner=_Inner(rgb=(1, 2, 3)), scale=2.0)
    assert isinstance(built.scale, float) and isinstance(built.inner.rgb[1], int)
    with pytest.raises(TypeError, match=r"x\.inner\.rgb must have 3 items"):
        build_dataclass(_Outer, {"inner": {"rgb": [1, 2]}}, "x")
    with pytest.raises(TypeError, match=r"x\.names\.1 must be a string, got 3"):
        build_dataclass(_Outer, {"names": ["a", 3]}, "x")
    with pytest.raises(TypeError, match=r"x\.scale must be a number, got 'big'"):
        build_dataclass(_Outer, {"scale": "big"}, "x")
    with pytest.raises(ConfigKeyError, match=r"Unknown key 'rbg' in x\.inner\. Did you mean 'rgb'"):
        build_dataclass(_Outer, {"inner": {"rbg": [1, 2, 3]}}, "x")
    assert build_dataclass(_Outer, {"mode": "sti", "flag": True}, "x").mode == "sti"
    with pytest.raises(ValueError, match=r"x\.mode must be one of 'dci', 'sti', got 'cat'"):
        build_dataclass(_Outer, {"mode": "cat"}, "x")
    with pytest.raises(ValueError, match=r"x\.flag must be one of 1, True, got 1\.0"):  # equal is not enough
        build_dataclass(_Outer, {"flag": 1.0}, "x")


@pytest.mark.parametrize("strategy, key, value, choices", [
    ("igva", "concat_order", "last", "'base_first', 'fused_first'"),
    ("dense_connector", "mode", "cat", "'dci', 'sti'"),
    ("tg_llava", "fom_source", "boxes", "'text', 'oracle'"),
    ("ta_llava", "order", "mixed", "'text_first', 'vision_first'"),
])
def test_a_strategy_choice_is_checked_when_the_config_loads(strategy, key, value, choices):
    path, first = strategy_run_config(strategy)
    with pytest.raises(ValueError, match=rf"strategy_config\[{strategy}\]\.{key} must be one of {choices}, got '{value}'"):
        load_run_config(path, [*first, f"model.strategy_config.{key}={value}"])


# ---- value ranges, one-line errors ---------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key, rule",
    [
        ("training.stages.0.lr=-1e-3", r"training\.stages\.0\.lr", "> 0"),
        ("training.stages.1.lr=0", r"training\.stages\.1\.lr", "> 0"),
        ("training.stages.1.group_lr.llm=-1e-5", r"training\.stages\.1\.group_lr\.llm", "> 0"),
        ("training.stages.0.batch_size=0", r"training\.stages\.0\.batch_size", ">= 1"),
        ("training.stages.1.grad_accum=0", r"training\.stages\.1\.grad_accum", ">= 1"),
        ("training.stages.0.save_steps=0", r"training\.stages\.0\.save_steps", ">= 1 or null"),
        ("training.stages.0.max_steps=0", r"training\.stages\.0\.max_steps", ">= 1, or -1"),
        ("training.stages.0.warmup=-0.1", r"training\.stages\.0\.warmup", ">= 0"),
        ("eval.batch_size=0", r"eval\.batch_size", ">= 1"),
        ("eval.max_new_tokens=0", r"eval\.max_new_tokens", ">= 1"),
        ("data.max_length=0", r"data\.max_length", ">= 1 or null"),
        ("training.logging_steps=0", r"training\.logging_steps", ">= 1"),
        ("training.save_total_limit=0", r"training\.save_total_limit", ">= 1 or null"),
        ("seed=-1", "seed", r"in \[0, 2\*\*32\)"),
        ("data.check_images=maybe", r"data\.check_images", "one of decode, exists, none"),
        ("training.on_config_change=ignore", r"training\.on_config_change", "one of error, retrain"),
    ],
)
def test_value_ranges_are_checked_when_the_config_loads(chain, override, key, rule):
    with pytest.raises(ValueError, match=rf"^{key}: must be {rule}"):
        load_run_config(chain, [override], resolve_vars=False)


def test_in_range_edge_values_load(chain):
    cfg = load_run_config(chain, ["training.stages.0.save_steps=null", "training.stages.0.batch_size=1",
                                  "training.stages.0.warmup=0", "seed=0", "training.stages.0.max_steps=-1"],
                          resolve_vars=False)
    assert cfg.training.stages[0].save_steps is None and cfg.training.stages[0].batch_size == 1


def test_malformed_yaml_override_names_its_key(chain):
    with pytest.raises(ValueError, match=r"^Override training\.stages\.0\.lr: the value '\[1e-3' is not valid YAML"):
        load_run_config(chain, ["training.stages.0.lr=[1e-3"], resolve_vars=False)


def test_scripts_print_one_line_errors_and_debug_keeps_the_traceback(chain, capsys):
    from vlmzoo.training.cli import main
    from vlmzoo.utils import cli_entry

    assert cli_entry(main, ["--config", str(chain), "training.stages.1.batch_size=0", "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: training.stages.1.batch_size: must be >= 1, got 0. (run with --debug for the traceback)"]
    with pytest.raises(ValueError, match=r"training\.stages\.1\.batch_size"):
        cli_entry(main, ["--config", str(chain), "training.stages.1.batch_size=0", "--print-config", "--debug"])
    assert cli_entry(main, ["--config", str(chain), "training.stages.0.max_step=3"]) == 2
    assert "Did you mean 'max_steps'" in capsys.readouterr().err


def test_train_script_error_is_one_line_in_a_subprocess(chain):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}  # this tree's vlmzoo
    proc = subprocess.run([sys.executable, "scripts/train.py", "--config", str(chain), "training.stages.0.lr=-1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert lines == ["error: training.stages.0.lr: must be > 0, got -1.0. (run with --debug for the traceback)"]


# ---- a run's identity ----------------------------------------------------------------------------
def test_identity_ignores_resumable_keys_and_names_tiny_world_paths_by_hash(chain):
    from vlmzoo.config import diff_configs, identity_hash, stage_identity, training_identity

    base = load_run_config(chain, resolve_vars=False).to_dict()

    def variant(**patch) -> dict:
        tree = json.loads(json.dumps(base))
        for dotted, value in patch.items():
            node = tree
            *parents, last = dotted.split("__")
            for p in parents:
                node = node[int(p)] if isinstance(node, list) else node[p]
            node[last] = value
        return tree

    same = variant(eval__batch_size=1, training__logging_steps=99, data__num_workers=7, output__dir="/else",
                   training__on_config_change="retrain", training__resume=False)
    assert training_identity(same) == training_identity(base)
    changed = variant(training__stages__1__lr=0.5)
    assert diff_configs(training_identity(base), training_identity(changed)) == ["training.stages.1.lr"]
    # stage 0's identity does not see stage 1; stage 1's sees both
    assert identity_hash(stage_identity(changed, 0)) == identity_hash(stage_identity(base, 0))
    assert identity_hash(stage_identity(changed, 1)) != identity_hash(stage_identity(base, 1))
    assert identity_hash(stage_identity(variant(training__stages__0__save_steps=7), 1)) == identity_hash(stage_identity(base, 1))

    # The same world in another cache folder: the same identity; another world: another.
    def world(cache: str, name: str) -> dict:
        root = f"{cache}/tiny_world/{name}"
        tree = variant(model__llm=f"{root}/llm", data__images=f"{root}/data/images")
        return {**tree, "tiny_world": {"cache_dir": cache, "config": {}, "root": root}}

    assert training_identity(world("/a", "abc123")) == training_identity(world("/b/c", "abc123"))
    assert training_identity(world("/a", "abc123"))["model"]["llm"] == "tiny_world:abc123/llm"
    assert diff_configs(training_identity(world("/a", "abc123")), training_identity(world("/a", "def456"))) == [
        "data.images", "model.llm"]
