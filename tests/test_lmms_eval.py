"""The lmms-eval plugin: found as ``--model vlmzoo`` through lmms-eval's entry-point registry, it
answers real ``Instance`` requests (``generate_until``, ``loglikelihood``) on saved tiny models.

Expectations are computed here from the model itself, one prompt at a time without padding:
``model.generate`` for answers, a forward pass + log-softmax for log-likelihoods.

lmms-eval is installed with ``--no-deps`` (``requirements-lmms-eval.txt``, ``make setup``); in CI
(``CI`` set) a missing install fails this file instead of skipping it.
"""

from __future__ import annotations

import copy
import os
import re
from importlib.metadata import EntryPoint, EntryPoints, entry_points
from pathlib import Path

import pytest
import torch

if os.environ.get("CI"):
    import lmms_eval.models  # noqa: F401
else:
    pytest.importorskip("lmms_eval.models")

from lmms_eval.api.instance import Instance  # noqa: E402
from PIL import Image  # noqa: E402

from test_templates import build_word_tokenizer  # noqa: E402
from test_tg_llava import CLIP_TEXT, TINY_TG  # noqa: E402
from tiny import TINY_LLMS, tiny_clip_vision_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK, SPLIT = "toy", "test"
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 240, 20)]
QUESTIONS = ["What is in the picture?", "What colour is it?", "Describe the image.", "Give a short caption."]


# ---- fixtures ------------------------------------------------------------------------------------
def _docs() -> list[dict]:
    """Docs of a fake task: one image each (non-square, so padding to square matters), then a doc
    with two images and one with none."""
    docs = [{"images": [Image.new("RGB", (40, 24), c)], "question": q} for c, q in zip(COLOURS, QUESTIONS)]
    docs.append({"images": [Image.new("RGB", (24, 40), COLOURS[0]), Image.new("RGB", (32, 32), COLOURS[2])],
                 "question": "Describe the image."})
    docs.append({"images": [], "question": "Hello there, how are you?"})
    return docs


def doc_to_visual(doc: dict) -> list:
    return doc["images"]


@pytest.fixture(scope="module", params=["llava", "tg_llava"])
def saved(request, tmp_path_factory):
    """A tiny model of the strategy saved with its processor (qwen2 template, word tokenizer).

    qwen2's assistant header ends with a newline, so an answer's tokens are those of its text: a
    greedy continuation can be written from generated ids. (Under vicuna_v1 this tokenizer's space
    token after "ASSISTANT:" is the answer's first token, which a random model never generates.)"""
    from vlmzoo import VLMConfig, VLMForConditionalGeneration
    from vlmzoo.processing import VLMProcessor

    tok = build_word_tokenizer(auto_bos=True)
    text_config = dict(TINY_LLMS["llama"], vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    extra = {}
    text_tok = None
    if request.param == "tg_llava":
        extra = dict(text_encoder_config=dict(CLIP_TEXT), strategy_config=dict(TINY_TG))
        text_tok = build_word_tokenizer(auto_bos=True)  # 85 ids < the tiny CLIP text tower's 100
    config = VLMConfig(text_config=text_config, vision_config=tiny_clip_vision_spec(), strategy=request.param,
                       image_token_id=tok.convert_tokens_to_ids("<image>"), **extra)
    torch.manual_seed(0)
    model = VLMForConditionalGeneration(config).eval()
    # A fresh tiny LLM answers everything alike; large random weights make answers input-dependent.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(("vision_tower.", "text_encoder.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    processor = VLMProcessor.for_model(model, tok, text_tokenizer=text_tok, template="qwen2")
    path = tmp_path_factory.mktemp(f"lmms_{request.param}")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, processor


def _declared_entry_point() -> EntryPoint:
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; vlmzoo supports 3.10)
    section = text.split('[project.entry-points."lmms_eval.models"]', 1)[1].split("\n[", 1)[0]
    value = re.search(r'^vlmzoo\s*=\s*"([^"]+)"', section, re.M).group(1)
    return EntryPoint(name="vlmzoo", value=value, group="lmms_eval.models")


@pytest.fixture(scope="module")
def plugin_class():
    """The class lmms-eval resolves for ``--model vlmzoo``.

    In CI (a fresh ``pip install -e .``) the installed entry point must be the one pyproject.toml
    declares. A developer venv installed before the entry point existed does not list it yet, so
    there lmms-eval's own entry-point loader is fed the declared one."""
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model, registry_v2

    declared = _declared_entry_point()
    installed = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "vlmzoo"]
    if os.environ.get("CI") or installed:
        assert [ep.value for ep in installed] == [declared.value]
    else:
        original = registry_v2.entry_points
        registry_v2.entry_points = lambda: EntryPoints([declared])
        try:
            MODEL_REGISTRY_V2.load_entrypoint_manifests(overwrite=True)
        finally:
            registry_v2.entry_points = original
    return get_model("vlmzoo")


def _lm(plugin_class, path, batch_size=2, dtype="float32"):
    # As lmms-eval's evaluator builds a model from --model_args and its own flags.
    lm = plugin_class.create_from_arg_string(f"pretrained={path},max_new_tokens=6,dtype={dtype}",
                                             {"batch_size": batch_size, "max_batch_size": None, "device": "cpu"})
    lm.task_dict = {TASK: {SPLIT: _docs()}}
    return lm


def _request(kind: str, args: tuple, doc_id: int) -> Instance:
    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def _gen(doc_id: int, **gen_kwargs) -> Instance:
    return _request("generate_until", (_docs()[doc_id]["question"], gen_kwargs, doc_to_visual, doc_id, TASK, SPLIT), doc_id)


# ---- expectations, from the model directly -------------------------------------------------------
def _prompt(processor, doc: dict) -> dict:
    content = "<image>\n" * len(doc["images"]) + doc["question"]
    return processor([{"role": "user", "content": content}], images=doc["images"], add_generation_prompt=True)


@torch.no_grad()
def _greedy_ids(model, processor, doc: dict, max_new_tokens: int) -> list[int]:
    batch = _prompt(processor, doc)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id)
    return out[0, batch["input_ids"].shape[1]:].tolist()


def _answer_ids(processor, doc: dict, answer: str) -> list[int]:
    """The tokens a training sample answering ``doc`` with ``answer`` holds after the generation
    prompt, its end of turn ('<|im_end|>', '\\n' under qwen2) left off."""
    question = [{"role": "user", "content": "<image>\n" * len(doc["images"]) + doc["question"]}]
    prompt = processor.encode(question, add_generation_prompt=True).input_ids
    sample = processor.encode(question + [{"role": "assistant", "content": answer}]).input_ids
    end = processor.tokenizer.convert_tokens_to_ids(["<|im_end|>", "\n"])
    assert sample[: len(prompt)] == prompt and sample[-2:] == end
    return sample[len(prompt):-2]


@torch.no_grad()
def _logprob(model, processor, doc: dict, continuation: str) -> tuple[float, list[int], list[int]]:
    """-> (sum log p of the continuation's tokens, its tokens, the model's arg-max at those positions)."""
    batch = _prompt(processor, doc)
    cont = _answer_ids(processor, doc, continuation.lstrip())
    ids = torch.cat([batch["input_ids"], torch.tensor([cont])], dim=1)
    inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "instruction_mask")}
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits[0].double()
    n = batch["input_ids"].shape[1]
    logp = torch.log_softmax(logits[n - 1 : n - 1 + len(cont)], dim=-1)
    total = sum(logp[i, t].item() for i, t in enumerate(cont))
    return total, cont, logp.argmax(-1).tolist()


# ---- tests ---------------------------------------------------------------------------------------
def test_registered_as_a_simple_lmms_model(plugin_class):
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model_manifest

    from vlmzoo.lmms_eval_plugin import VLMZooLMM

    assert plugin_class is VLMZooLMM and issubclass(plugin_class, lmms) and plugin_class.is_simple
    assert get_model_manifest("vlmzoo").simple_class_path == "vlmzoo.lmms_eval_plugin.VLMZooLMM"


def test_generate_until_equals_the_models_greedy_answers(plugin_class, saved):
    path, model, processor = saved
    lm = _lm(plugin_class, path, batch_size=4)  # batches of prompts of different lengths: left padding
    docs = _docs()
    answers = lm.generate_until([_gen(i, max_new_tokens=5, temperature=0) for i in range(len(docs))])
    expected = [processor.decode(_greedy_ids(model, processor, doc, 5)) for doc in docs]
    assert answers == expected
    # The comparison means something: answers are not empty and depend on the image and question.
    assert all(answers) and len(set(answers)) >= 4
    # Several images and none are both answered; a placeholder count that disagrees is an error naming the doc.
    bad = _request("generate_until", ("<image> What?", {}, doc_to_visual, 4, TASK, SPLIT), 4)
    with pytest.raises(ValueError, match=r"doc 4 of task 'toy' holds 1 '<image>'.*2 image"):
        lm.generate_until([bad])


def test_generate_until_stops_at_until_strings(plugin_class, saved):
    path, model, processor = saved
    lm = _lm(plugin_class, path)
    full_ids = _greedy_ids(model, processor, _docs()[0], 8)
    full = processor.decode(full_ids)
    # A stop string that first occurs after the start of the answer: the answer is cut before it.
    stop = next(s for s in (processor.decode([t]) for t in full_ids[1:]) if s.strip() and full.find(s) > 0)
    expected = full[: full.find(stop)]
    cut, untouched, default_budget = lm.generate_until([
        _gen(0, until=[stop, "never-generated"], max_new_tokens=8),
        _gen(0, until="never-generated", max_new_tokens=8),
        _gen(0, until=[]),
    ])
    assert cut == expected and len(cut) < len(full)
    assert untouched == full
    assert default_budget == processor.decode(_greedy_ids(model, processor, _docs()[0], 6))  # max_new_tokens=6 model arg


def test_loglikelihood_equals_log_softmax_of_the_logits(plugin_class, saved):
    path, model, processor = saved
    # Right-padded batches mixing lengths and image counts; in float64, since float32 sums of
    # differently padded batches differ by ~1e-5 with these large random weights.
    lm = _lm(plugin_class, path, batch_size=3, dtype="float64")
    model = copy.deepcopy(model).double()
    docs = _docs()
    tok = processor.tokenizer
    requests, expected = [], []
    for doc_id, doc in enumerate(docs):
        greedy_ids = _greedy_ids(model, processor, doc, 3)
        # The longest greedy prefix whose text tokenises back to it (the word tokenizer fuses words).
        greedy, greedy_text = next((greedy_ids[:k], text) for k in (3, 2, 1)
                                   if tok((text := tok.decode(greedy_ids[:k], skip_special_tokens=False)).lstrip(),
                                          add_special_tokens=False)["input_ids"] == greedy_ids[:k])
        first_word = next(w for w in ("cat", "dog", "mat") if tok.convert_tokens_to_ids(w) != greedy[0])
        for continuation, is_greedy in ((" " + greedy_text, True), (" " + first_word + " on", False)):
            total, cont, argmax = _logprob(model, processor, doc, continuation)
            # Preconditions: the greedy text tokenises back to the greedy tokens; the other one is not greedy.
            assert (cont == greedy) if is_greedy else (argmax[0] != cont[0])
            requests.append(_request("loglikelihood", (doc["question"], continuation, doc_to_visual, doc_id, TASK, SPLIT), doc_id))
            expected.append((total, is_greedy))
    # The task may give the target as doc_to_target(doc), and unconditional choices as (context, continuation).
    requests.append(_request("loglikelihood", (docs[1]["question"], lambda doc: " yes", doc_to_visual, 1, TASK, SPLIT), 1))
    expected.append((_logprob(model, processor, docs[1], " yes")[0], None))
    requests.append(_request("loglikelihood", ("", " yes"), 0))
    expected.append((_logprob(model, processor, {"images": [], "question": ""}, " yes")[0], None))

    results = lm.loglikelihood(requests)
    assert len(results) == len(expected)
    for (got, got_greedy), (want, want_greedy) in zip(results, expected):
        assert isinstance(got, float) and got == pytest.approx(want, abs=1e-5)
        if want_greedy is not None:
            assert got_greedy is want_greedy
    assert len({round(r[0], 3) for r in results}) >= len(results) - 2  # log-probs depend on the request


@pytest.mark.parametrize("template", ["qwen2", "vicuna_v1"])
def test_continuation_is_scored_as_the_template_encodes_answers(plugin_class, saved, template):
    """The scored tokens are those a training sample with this answer holds after the prompt (its
    end of turn left off): under vicuna_v1 they start with the space after "ASSISTANT:"."""
    path, _, processor = saved
    lm = _lm(plugin_class, path)
    lm._processor = processor.with_template(template)
    doc = _docs()[0]
    feature, (n_prompt, n_cont) = lm._scoring_feature((doc["question"], " A cat on a mat.", doc_to_visual, 0, TASK, SPLIT))
    question = [{"role": "user", "content": "<image>\n" + doc["question"]}]
    sample = lm._processor.encode(question + [{"role": "assistant", "content": "A cat on a mat."}]).input_ids
    n_end = {"qwen2": 2, "vicuna_v1": 1}[template]  # '<|im_end|>', '\n' / '</s>'
    assert feature["input_ids"] == sample[:-n_end] and n_prompt + n_cont == len(sample) - n_end
    lead = {"qwen2": [], "vicuna_v1": [" "]}[template]
    assert processor.tokenizer.decode(sample[n_prompt:n_prompt + n_cont]) == "".join(lead) + "A cat on a mat."


def test_bad_visuals_and_args_are_clear_errors(plugin_class, saved):
    path, _, _ = saved
    lm = _lm(plugin_class, path)
    video = _request("generate_until", ("What?", {}, lambda doc: ["clip.mp4"], 0, TASK, SPLIT), 0)
    with pytest.raises(TypeError, match=r"doc 0 of task 'toy' gave str"):
        lm.generate_until([video])
    with pytest.raises(TypeError, match="unknown model_args"):
        type(lm).create_from_arg_string(f"pretrained={path},temperature=0.2")
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([_gen(0)])
    missing = f"{path}_missing"  # a local path, not a hub repo id transformers would try to resolve
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: no such folder")):
        type(lm).create_from_arg_string(f"pretrained={missing}")


def test_importing_vlmzoo_does_not_import_lmms_eval():
    import subprocess
    import sys

    code = "import sys, vlmzoo, vlmzoo.evaluation, vlmzoo.processing; assert 'lmms_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
