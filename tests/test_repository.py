"""Repository hygiene: docs, comments and configs never point outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# An absolute path into the machine that wrote the file, or a relative one that climbs out of the
# checkout to a sibling folder: neither exists for a reader of the repository.
OUTSIDE = re.compile(r"(?<![\w.])/work/|\.\./shared/|(?<![\w/])shared/(?:specs|notes)/")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [ROOT / line for line in out.splitlines()]
    return [f for f in files if f.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ""} and f.is_file()]


def test_no_file_cites_a_path_outside_the_repository():
    hits = []
    for path in _tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "paths outside the repository (name a paper or a repository instead):\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_is_for():
    assert OUTSIDE.search("Built from /work/shared/specs/methods.md, section 2.")
    assert OUTSIDE.search("see ../shared/notes/x.md")
    assert OUTSIDE.search("(`shared/notes/tiny_world_findings.md`)")
    assert not OUTSIDE.search("configs/base/tiny_world.yaml and docs/tiny_world.md")
