"""The generic import names (align, rewards, filters, pipelines) must resolve to this repo."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["align", "rewards", "filters", "pipelines"])
def test_package_resolves_inside_this_repo(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(REPO_ROOT), module.__file__


def test_distribution_provides_the_align_command():
    dist = importlib.metadata.distribution("moealign")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"align": "align.cli:main"}
    assert (REPO_ROOT / "pipelines" / "default.yaml").is_file()
