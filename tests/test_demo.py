"""The web demo (vlmzoo_lab/demo.py, vlmzoo_lab/demo_app.py, scripts/demo.py), driven in a real headless browser.

Saved tiny models of two strategies (llava and igva, as in test_chat.py) are loaded from their
folders; every answer shown is checked against ``model.generate`` on the same conversation. The
browser test runs Debian's chromium through its chromedriver (selenium) and is skipped, with the
reason, only where that browser is not installed (CI installs it: .ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from test_chat import MAX_NEW, Q1, Q2, Reference, save_models_and_images
from vlmzoo.chat import GenerationSettings, ModelFolderError
from vlmzoo.config import RunConfig
from vlmzoo_lab.demo import DemoBackend, file_key, folder_examples, load_models, run_config_of, run_examples
from vlmzoo_lab.demo_app import main as demo_main
from vlmzoo_lab.demo_app import prepare

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_models_and_images(tmp_path_factory.mktemp("demo"), ("llava", "igva", "ta_llava"))


@pytest.fixture(scope="module")
def reference():
    return Reference()


@pytest.fixture(scope="module")
def backend(saved):
    return DemoBackend(load_models([saved["llava"], saved["igva"]]), GenerationSettings(max_new_tokens=MAX_NEW))


def answers(update) -> list[str]:
    """The last assistant message of each model's panel."""
    return [p.chat[-1]["content"] for p in update.panels]


# ---- the engine ---------------------------------------------------------------------------------------
def test_every_model_answers_side_by_side_streamed_and_equal_to_generate(backend, saved, reference):
    updates = list(backend.ask(None, str(saved["image"]), Q1))
    final = updates[-1]
    expected = [reference(saved[s], [Q1], saved["image"])[0] for s in ("llava", "igva")]
    assert answers(final) == expected and all(expected)
    assert final.status == "Answered by llava, igva."

    # Streamed: llava's answer grows through prefixes of the final text, one update per token, while
    # igva waits its turn; then igva's grows.
    llava_partials = [u.panels[0].chat[-1]["content"] for u in updates if "llava is answering" in u.status]
    assert len(set(llava_partials)) >= 3 and llava_partials[-1] == expected[0]
    assert all(expected[0].startswith(p) for p in llava_partials)
    assert all(b.startswith(a) for a, b in zip(llava_partials, llava_partials[1:]))
    (done,) = [u for u in updates if u.status == "llava answered."]
    assert done.panels[0].chat[-1]["content"] == expected[0] and done.panels[1].chat == []

    for i, panel in enumerate(final.panels):
        assert panel.chat[-2:] == [{"role": "user", "content": Q1}, {"role": "assistant", "content": expected[i]}]
        assert panel.stats.startswith("16 visual tokens - latency ") and f"{MAX_NEW} tokens" in panel.stats
        assert panel.heatmap is not None and panel.heatmap.size == (400, 460)  # vlmzoo_lab.visualize's panel
    # Extras: igva returns its layer weights (1, K); llava returns none.
    assert final.panels[0].extras is None and final.panels[0].extras_values == {}
    weights = final.panels[1].extras_values["layer_weights"]
    assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-5 and final.panels[1].extras is not None
    model, processor = backend.models[1].model, backend.models[1].processor
    batch = processor([{"role": "user", "content": f"<image>\n{Q1}"}], images=Image.open(saved["image"]).convert("RGB"),
                      add_generation_prompt=True)
    with torch.no_grad():
        direct = model(**batch, output_strategy_extras=True).strategy_extras["layer_weights"][0]
    torch.testing.assert_close(torch.tensor(weights), direct)


def test_the_page_gets_each_picture_once(backend, saved):
    from vlmzoo_lab.demo_app import page_values

    sent = [page_values(u) for u in backend.ask(None, str(saved["image"]), Q1)]
    n = len(backend.models)
    for i in range(n):  # outputs: state, status, n chats, n stats, n notes, n heat maps, n bar charts
        heat = [values[2 + 3 * n + i] for values in sent]
        pictures = [h for h in heat if h != {"__type__": "update"}]  # gr.skip() leaves the picture as it is
        assert len(pictures) == 2 and pictures[0] is None and pictures[1].size == (400, 460)  # cleared, then drawn
        streamed = {values[2 + i][-1]["content"] for values in sent if values[2 + i]}
        assert len(streamed) >= 3  # the conversation is sent on every token


def test_follow_ups_continue_each_models_own_conversation_and_a_new_image_starts_over(backend, saved, reference):
    state = list(backend.ask(None, str(saved["image"]), Q1))[-1].state
    final = list(backend.ask(state, str(saved["image"]), Q2))[-1]
    for i, strategy in enumerate(("llava", "igva")):
        first, second = reference(saved[strategy], [Q1, Q2], saved["image"])
        assert [m["content"] for m in final.panels[i].chat] == [Q1, first, Q2, second]
        assert final.state["conversations"][i][-1] == {"role": "assistant", "content": second}
    # The same picture uploaded again (another path, same bytes) continues; another picture starts over.
    copy = Path(tempfile.mkdtemp()) / "copy.png"
    shutil.copy(saved["image"], copy)
    assert len(list(backend.ask(final.state, str(copy), Q1))[-1].panels[0].chat) == 6
    fresh = list(backend.ask(final.state, str(saved["image2"]), Q1))[-1]
    assert answers(fresh) == [reference(saved[s], [Q1], saved["image2"])[0] for s in ("llava", "igva")]
    assert all(len(p.chat) == 2 for p in fresh.panels)


def test_a_follow_ups_map_is_its_attention_over_the_whole_conversation(saved):
    from vlmzoo.chat import ChatSession, load_model_folder, open_image
    from vlmzoo_lab.visualize import answer_tokens, attention_to_image

    model, processor = load_model_folder(saved["llava"])
    session = ChatSession(model, processor, GenerationSettings(max_new_tokens=MAX_NEW), image=open_image(saved["image"]))
    first = session.ask(Q1)
    follow_up = session.ask(Q2)
    answer = answer_tokens(follow_up.new_tokens, processor)
    got = attention_to_image(model, processor, follow_up.batch, answer, Q2)

    # Independently: one eager forward over the conversation's prompt + the follow-up's answer.
    prompt = follow_up.batch["input_ids"][0]
    assert len(prompt) > first.batch["input_ids"].shape[1] + first.num_tokens  # the first turn is in the prompt
    ids = torch.cat([prompt, answer])
    model.language_model.set_attn_implementation("eager")
    with torch.no_grad():
        att = torch.stack(model(input_ids=ids[None], pixel_values=follow_up.batch["pixel_values"],
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long), output_attentions=True).attentions)
    model.language_model.set_attn_implementation("sdpa")
    image_cols = [i for i, t in enumerate(ids.tolist()) if t == model.config.image_token_id]
    p, n = len(prompt), len(answer)
    expected = att[:, 0, :, p - 1 : p - 1 + n][..., image_cols].sum(dim=(0, 1, 2))  # (T_v,)
    torch.testing.assert_close(got.token_weights, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.input_ids, ids) and got.answer == follow_up.text


def test_text_only_questions_work_without_a_map(backend, saved, reference):
    final = list(backend.ask(None, None, Q1))[-1]
    assert answers(final) == [reference(saved[s], [Q1], None)[0] for s in ("llava", "igva")]
    assert all(p.heatmap is None and p.note == "No image: no attention map." for p in final.panels)


def test_bad_input_is_a_status_line_and_loses_nothing(backend, saved, tmp_path):
    state = list(backend.ask(None, str(saved["image"]), Q1))[-1].state
    snapshot = json.dumps(state["conversations"])
    cases = {"": "Type a question first.", "   ": "Type a question first."}
    for question, status in cases.items():
        (update,) = backend.ask(state, str(saved["image"]), question)
        assert update.status == status and update.state is state
    for path, reason in ((saved["bad_image"], "not a readable image"), (tmp_path / "gone.png", "no such file")):
        (update,) = backend.ask(state, str(path), Q2)
        assert update.status.startswith(f"Error: {path}: {reason}") and update.state is state
    assert json.dumps(state["conversations"]) == snapshot


def test_a_strategy_without_image_grids_answers_without_a_map(saved, reference):
    demo = DemoBackend(load_models([saved["ta_llava"]]), GenerationSettings(max_new_tokens=MAX_NEW))
    final = list(demo.ask(None, str(saved["image"]), Q1))[-1]
    assert answers(final) == reference(saved["ta_llava"], [Q1], saved["image"])
    panel = final.panels[0]
    assert panel.heatmap is None and "ta_llava's visual tokens do not map to image positions" in panel.note
    assert panel.stats.startswith("4 visual tokens - latency")


# ---- examples -----------------------------------------------------------------------------------------
def fake_run(root: Path, with_high_res: bool = True) -> Path:
    """A run folder as scripts/train.py leaves it: resolved_config.yaml naming eval data on disk; -> its model folder."""
    images, high_res = root / "data" / "images", root / "data" / "images_2x"
    images.mkdir(parents=True)
    high_res.mkdir()
    records = []
    for i, qtype in enumerate(["colour", "colour", "count", "count", "colour", "exist"]):
        name = f"{i:03d}.png"
        Image.fromarray(np.full((8, 8, 3), 20 * i, dtype=np.uint8)).save(images / name)
        if with_high_res:
            Image.fromarray(np.full((16, 16, 3), 20 * i, dtype=np.uint8)).save(high_res / name)
        records.append({"id": f"q{i}", "image": name, "question_type": qtype,
                        "conversations": [{"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": "a"}]})
    (root / "data" / "eval.json").write_text(json.dumps(records))
    cfg = RunConfig()
    cfg.data.images, cfg.data.high_res_images, cfg.eval.data = str(images), str(high_res), str(root / "data" / "eval.json")
    run = root / "run"
    (run / "stage2_instruct" / "final").mkdir(parents=True)
    (run / "resolved_config.yaml").write_text(cfg.to_yaml())
    return run / "stage2_instruct" / "final"


def test_examples_are_the_runs_evaluation_images(tmp_path):
    model_dir = fake_run(tmp_path)
    assert run_config_of(model_dir) == model_dir.parent.parent / "resolved_config.yaml"
    examples = run_examples(model_dir, limit=4)
    data = tmp_path / "data"
    # Question types in turn (colour, count, exist, then colour again), one example per image.
    assert [e.image.name for e in examples] == ["000.png", "002.png", "005.png", "001.png"]
    assert [e.question for e in examples] == ["Question 0?", "Question 2?", "Question 5?", "Question 1?"]
    assert all(e.high_res == data / "images_2x" / e.image.name for e in examples)

    assert run_examples(tmp_path / "elsewhere") == []  # not inside a run
    (data / "eval.json").unlink()
    assert run_examples(model_dir) == []  # the run's data is gone: no examples, no error


def test_an_uploaded_copy_of_an_example_gets_its_high_res_image(saved, tmp_path):
    model_dir = fake_run(tmp_path)
    demo = DemoBackend(load_models([saved["llava"]]), examples=run_examples(model_dir))
    example = demo.examples[1]
    copy = tmp_path / "upload.png"  # what the browser uploads: the same bytes, another path
    shutil.copy(example.image, copy)
    image, key, high_res = demo._image(str(copy))
    assert key == file_key(example.image) and high_res is not None and high_res.size == (16, 16)
    assert demo._image(str(saved["image"]))[2] is None  # not an example: no high-res image


def test_examples_folder_and_bad_command_lines(saved, tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name in ("b.png", "a.jpg", "notes.txt"):
        (folder / name).write_bytes(b"x")
    assert [e.image.name for e in folder_examples(folder)] == ["a.jpg", "b.png"]
    backend, args = prepare(["--models", str(saved["llava"]), str(saved["igva"]), "--examples", str(folder), "--port", "7000"])
    assert [m.strategy for m in backend.models] == ["llava", "igva"] and args.host == "127.0.0.1" and args.port == 7000
    assert [e.image.name for e in backend.examples] == ["a.jpg", "b.png"]

    # Bad input at start: one line on stderr, exit code 2, no server.
    capsys.readouterr()
    for argv, message in (
        (["--models", str(saved["llava"]), str(tmp_path)], f"error: {tmp_path}: not a saved vlmzoo model"),
        (["--models", str(saved["llava"]), "--examples", str(tmp_path / "none")], f"error: {tmp_path / 'none'}: no such folder"),
    ):
        assert demo_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1
    with pytest.raises(ModelFolderError):
        load_models([saved["llava"], tmp_path / "missing"])


# ---- in a real browser --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_WATCH: dict = {"on": False, "addresses": []}  # audit hooks cannot be removed: this one records only while "on"


def _record_connections(event: str, args: tuple) -> None:
    if _WATCH["on"] and event == "socket.connect":
        _WATCH["addresses"].append(args[1])


def chromium_driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1500,1100"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="Debian's chromium and chromium-driver are not installed (CI installs them: .ci/run)")
def test_in_a_real_browser_two_strategies_answer_the_uploaded_image(saved, reference, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must not look for drivers online
    assert os.environ.get("GRADIO_ANALYTICS_ENABLED") == "False"  # set by vlmzoo_lab.demo_app on import
    from vlmzoo_lab.demo_app import serve

    port = free_port()
    backend, args = prepare(["--models", str(saved["llava"]), str(saved["igva"]), "--max-new-tokens", str(MAX_NEW),
                             "--port", str(port)])
    sys.addaudithook(_record_connections)
    _WATCH.update(on=True, addresses=[])
    app = serve(backend, args.host, args.port, block=False)
    driver = chromium_driver(tmp_path / "profile")
    try:
        wait = WebDriverWait(driver, 180)
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(saved["image"]))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))

        def ask(question: str, turns: int, press_enter: bool = False) -> list[str]:
            box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
            box.clear()
            box.send_keys(question)
            if press_enter:
                box.send_keys(Keys.ENTER)
            else:
                driver.find_element(By.ID, "ask").click()

            def done(d) -> bool:
                bots = [d.find_elements(By.CSS_SELECTOR, f"#chat-{i} [data-testid='bot']") for i in range(2)]
                return all(len(b) == turns for b in bots) and d.find_element(By.ID, "status").text == "Answered by llava, igva."

            wait.until(done)
            return [driver.find_elements(By.CSS_SELECTOR, f"#chat-{i} [data-testid='bot']")[-1].get_attribute("textContent").strip()
                    for i in range(2)]

        first = ask(Q1, 1)
        expected = {s: reference(saved[s], [Q1, Q2], saved["image"]) for s in ("llava", "igva")}
        assert first == [expected["llava"][0], expected["igva"][0]]
        names = [driver.find_element(By.ID, f"name-{i}").text for i in range(2)]
        assert names[0].startswith("llava") and names[1].startswith("igva")
        for i in range(2):
            assert driver.find_element(By.ID, f"stats-{i}").text.startswith("16 visual tokens - latency ")
            heat = driver.find_element(By.CSS_SELECTOR, f"#heatmap-{i} img")
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heat) == 400
        assert driver.find_elements(By.CSS_SELECTOR, "#extras-1 img") and not driver.find_elements(By.CSS_SELECTOR, "#extras-0 img")
        driver.save_screenshot(str(tmp_path / "demo_first_answer.png"))

        assert ask(Q2, 2, press_enter=True) == [expected["llava"][1], expected["igva"][1]]  # follow-ups, per model
        shot = tmp_path / "demo.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        with Image.open(shot) as im:
            assert im.size[0] >= 1000 and len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 100

        driver.find_element(By.ID, "clear").click()  # "New conversation" empties every column
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-testid='bot']")
                   and d.find_element(By.ID, "status").text == "New conversation.")
        assert ask(Q1, 1) == first  # and the next question starts over

        # Offline: the page loaded and sent nothing but to this server, and the server connected nowhere else.
        urls = [json.loads(e["message"])["message"]["params"].get("request", {}).get("url", "")
                for e in driver.get_log("performance")]
        web = {urlparse(u).hostname for u in urls if u.startswith(("http:", "https:", "ws:", "wss:"))}
        assert web == {"127.0.0.1"}, web
    finally:
        driver.quit()
        app.close()
        _WATCH["on"] = False
    hosts = {addr[0] for addr in _WATCH["addresses"] if isinstance(addr, tuple)}
    assert hosts <= {"127.0.0.1", "::1", "localhost"}, hosts
