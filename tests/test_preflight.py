"""Everything a run reads is checked before its first step: bad data in stage 2 or in the eval file
fails before stage 1 trains, naming the file and the record; corrupt images are caught by one
decode pass that later runs do not repeat; image paths stay inside their folder; samples and eval
prompts longer than the LLM's positions are refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_training import make_toy_world, toy_config_dict
from vlmzoo.config import run_config_from_dict
from vlmzoo.data import LlavaDataError
from vlmzoo.data.checks import ImagePathError, check_image_files, resolve_image_path


@pytest.fixture(autouse=True)
def own_check_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMZOO_CACHE", str(tmp_path / "vlmzoo_cache"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_toy_world(tmp_path_factory.mktemp("toy_world"))
    root = Path(w["images"]).parent
    (root / "outside.png").write_bytes((Path(w["images"]) / "train" / "0000.png").read_bytes())
    (Path(w["images"]) / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    os.symlink(root / "outside.png", Path(w["images"]) / "link.png")
    return w


def records(world, name: str) -> list[dict]:
    return json.loads(Path(world[name]).read_text())


def one_bad(world, name: str, index: int, **fields) -> list[dict]:
    recs = records(world, name)
    recs[index] = {**recs[index], **fields}
    return recs


def image_turns(n: int) -> list[dict]:
    return [{"from": "human", "value": "<image>\n" * n + "what colour is the square ?"}, {"from": "gpt", "value": "red"}]


def _outside(world) -> str:
    return str(Path(world["images"]).parent / "outside.png")


# (what to write, what the error says) for a record of the stage-2 or eval file
BAD_DATA = {
    "missing image": (lambda w, f: one_bad(w, f, 5, image="train/9999.png"), r"image file not found: .*train/9999\.png"),
    "<image> count": (lambda w, f: one_bad(w, f, 5, conversations=image_turns(2)),
                      r"2 <image> placeholder\(s\) .* but 1 image\(s\)"),
    "corrupt image": (lambda w, f: one_bad(w, f, 5, image="corrupt.png"), r"cannot read image .*corrupt\.png: cannot decode"),
    "'..' path": (lambda w, f: one_bad(w, f, 5, image="../outside.png"), r"'\.\./outside\.png' climbs out of its image folder"),
    "absolute path": (lambda w, f: one_bad(w, f, 5, image=_outside(w)), r"is absolute; .*data\.allow_absolute_image_paths=true"),
    "symlink out": (lambda w, f: one_bad(w, f, 5, image="link.png"), r"'link\.png' resolves outside its image folder .* symlink"),
    "malformed JSON": (lambda w, f: json.dumps(records(w, f))[:-40], r"malformed JSON"),
}


def write_data(tmp_path, world, which: str, case: str) -> tuple[str, str]:
    make, reason = BAD_DATA[case]
    text = make(world, which)
    path = tmp_path / f"bad_{which}.json"
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return str(path), reason


def run_config(world, out: Path, **patch) -> dict:
    d = toy_config_dict(world, out, max_steps=2, save_steps=None)
    for key, value in patch.items():
        section, _, field = key.partition("__")
        if section == "stage2":
            d["training"]["stages"][1][field] = value
        else:
            d[section][field] = value
    return d


def assert_fails_before_training(d: dict, error, match: str) -> None:
    from vlmzoo.training import run_training

    out = Path(d["output"]["dir"])
    with pytest.raises(error, match=match):
        run_training(run_config_from_dict(d), evaluate=True)
    assert not (out / "align").exists(), "stage 1 trained before the bad data was found"


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_stage2_data_fails_before_stage1_trains(world, tmp_path, case):
    path, reason = write_data(tmp_path, world, "stage2", case)
    where = r"" if case == "malformed JSON" else r": record 'train-5' \(#5\):"
    assert_fails_before_training(run_config(world, tmp_path / "run", stage2__data=path), LlavaDataError,
                                 rf"bad_stage2\.json{where}.*{reason}")


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_eval_data_fails_before_stage1_trains(world, tmp_path, case):
    path, reason = write_data(tmp_path, world, "eval", case)
    where = r"" if case == "malformed JSON" else r": record 'eval-5' \(#5\):"
    assert_fails_before_training(run_config(world, tmp_path / "run", eval__data=path), LlavaDataError,
                                 rf"bad_eval\.json{where}.*{reason}")


@pytest.mark.parametrize("which, key", [("stage2", "stage2__data"), ("eval", "eval__data")])
def test_a_missing_data_file_fails_before_stage1_trains(world, tmp_path, which, key):
    missing = str(tmp_path / "nowhere.json")
    assert_fails_before_training(run_config(world, tmp_path / "run", **{key: missing}), LlavaDataError,
                                 r"nowhere\.json: file not found")


def test_an_eval_record_without_its_answer_fails_before_training(world, tmp_path):
    recs = records(world, "eval")
    recs[3]["conversations"] = recs[3]["conversations"][:1] + [{"from": "human", "value": "and ?"}]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(recs))
    assert_fails_before_training(run_config(world, tmp_path / "run", eval__data=str(path)), LlavaDataError,
                                 r"eval\.json: record 'eval-3' \(#3\): an eval record must end with the gold answer")


# ---- lengths against the LLM's positions (the toy LLM has 256) -----------------------------------
LONG = "what colour is the square ? " * 45  # ~270 words


def test_a_sample_longer_than_the_llm_positions_fails_before_training(world, tmp_path):
    recs = one_bad(world, "stage2", 7, conversations=[{"from": "human", "value": "<image>\n" + LONG},
                                                      {"from": "gpt", "value": "red"}])
    path = tmp_path / "long.json"
    path.write_text(json.dumps(recs))
    assert_fails_before_training(run_config(world, tmp_path / "run", stage2__data=str(path)), LlavaDataError,
                                 r"long\.json: record 'train-7' \(#7\): \d+ tokens .*more than the LLM's 256 positions")
    too_long = run_config(world, tmp_path / "run2", stage2__data=str(path))
    too_long["data"]["max_length"] = 300
    assert_fails_before_training(too_long, ValueError, r"data\.max_length: 300 is more than the LLM's 256 positions")
    # Truncating below the limit is what the message suggests, and it trains.
    from vlmzoo.training import run_training

    fine = run_config(world, tmp_path / "run3", stage2__data=str(path))
    fine["data"]["max_length"] = 200
    run_training(run_config_from_dict(fine), evaluate=False)


def test_an_eval_prompt_that_leaves_no_room_to_answer_fails_before_training(world, tmp_path):
    recs = one_bad(world, "eval", 2, conversations=[{"from": "human", "value": "<image>\n" + LONG[: len(LONG) * 8 // 10]},
                                                    {"from": "gpt", "value": "red"}])
    path = tmp_path / "eval_long.json"
    path.write_text(json.dumps(recs))
    assert_fails_before_training(run_config(world, tmp_path / "run", eval__data=str(path)), LlavaDataError,
                                 r"eval_long\.json: record 'eval-2' \(#2\): the prompt is \d+ tokens; "
                                 r"with eval\.max_new_tokens=3 it needs more than the LLM's 256 positions")


# ---- image paths ---------------------------------------------------------------------------------
def test_image_paths_stay_inside_their_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", folder / "out.png")
    os.symlink(folder / "sub" / "a.png", folder / "in.png")

    assert resolve_image_path(folder, "sub/a.png") == str(folder / "sub" / "a.png")
    assert resolve_image_path(folder, "sub/../sub/a.png") == str(folder / "sub/../sub/a.png")  # never leaves
    assert resolve_image_path(folder, "in.png") == str(folder / "in.png")  # a link that stays inside
    for rel, why in [("../secret.png", "climbs out"), ("sub/../../secret.png", "climbs out"),
                     ("../../../../etc/passwd", "climbs out"), (str(tmp_path / "secret.png"), "is absolute"),
                     ("out.png", "resolves outside")]:
        with pytest.raises(ImagePathError, match=why):
            resolve_image_path(folder, rel)
    # The opt-in: absolute paths and links out of the folder; '..' stays an error.
    assert resolve_image_path(folder, str(tmp_path / "secret.png"), allow_absolute=True) == str(tmp_path / "secret.png")
    assert resolve_image_path(folder, "out.png", allow_absolute=True) == str(folder / "out.png")
    with pytest.raises(ImagePathError, match="climbs out"):
        resolve_image_path(folder, "../secret.png", allow_absolute=True)


def test_the_opt_in_reads_absolute_and_linked_images(world, tmp_path):
    from vlmzoo.training.preflight import check_data

    recs = one_bad(world, "stage2", 5, image=_outside(world))
    recs[6]["image"] = "link.png"
    path = tmp_path / "abs.json"
    path.write_text(json.dumps(recs))
    d = run_config(world, tmp_path / "run", stage2__data=str(path))
    with pytest.raises(LlavaDataError, match="is absolute"):
        check_data(run_config_from_dict(d), [1], evaluate=False)
    d["data"]["allow_absolute_image_paths"] = True
    check_data(run_config_from_dict(d), [1], evaluate=False)


def test_eval_refuses_an_image_path_out_of_its_folder(world):
    from vlmzoo.evaluation import EvalRecord, record_images

    rec = EvalRecord(id="e1", messages=[{"role": "user", "content": "<image>\nq"}], images=["../outside.png"],
                     answer="a", question_type="all")
    with pytest.raises(ImagePathError, match=r"Eval record 'e1': image image path '\.\./outside\.png' climbs out"):
        record_images(rec, world["images"])


# ---- decoding once -------------------------------------------------------------------------------
def test_images_are_decoded_once_and_remembered(world, tmp_path, monkeypatch):
    import vlmzoo.data.checks as checks

    decoded: list[str] = []
    real = checks._decode_problem
    monkeypatch.setattr(checks, "_decode_problem", lambda path: decoded.append(path) or real(path))
    folder = tmp_path / "imgs"
    folder.mkdir()
    files = []
    for i in range(40):  # enough for the thread pool
        target = folder / f"{i}.png"
        target.write_bytes((Path(world["images"]) / "train" / f"{i:04d}.png").read_bytes())
        files.append(str(target))
    (folder / "bad.png").write_bytes(b"not a png")
    files.append(str(folder / "bad.png"))

    problems = check_image_files(files, str(folder))
    assert list(problems) == [str(folder / "bad.png")] and problems[str(folder / "bad.png")].startswith("cannot decode")
    assert sorted(decoded) == sorted(files)
    decoded.clear()
    assert list(check_image_files(files, str(folder))) == [str(folder / "bad.png")]
    assert decoded == [str(folder / "bad.png")]  # the good files were remembered; the bad one is tried again
    decoded.clear()
    os.utime(files[3], ns=(1, 1))  # a changed file is decoded again
    check_image_files(files, str(folder))
    assert sorted(decoded) == sorted([files[3], str(folder / "bad.png")])
    # exists-only: no decoding, a missing file still found
    decoded.clear()
    assert check_image_files([*files[:2], str(folder / "gone.png")], str(folder), decode=False) == {
        str(folder / "gone.png"): "file not found"}
    assert decoded == []
