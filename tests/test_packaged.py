"""``${packaged.NAME}``: a variable provider declared in pyproject.toml whose values name the
converted folders without converting anything; an unknown name is an error listing the known ones."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_provider_is_declared_and_resolving_converts_nothing(tmp_path):
    from vlmzoo.packaged import PROVIDER, PackagedSection, packaged_dir

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["vlmzoo.config_variables"]
    assert declared["packaged"] == "vlmzoo.packaged:PROVIDER"
    values = PROVIDER.values(PackagedSection(cache_dir=str(tmp_path)))
    assert values == {"smollm2": str(tmp_path / "packaged" / "smollm2-135m-instruct")}
    assert not any(tmp_path.iterdir())  # nothing converted, nothing created
    with pytest.raises(Exception, match="smollm2"):
        packaged_dir("smollm3", tmp_path)
