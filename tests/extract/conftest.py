"""Fixtures of the extract tests."""
from __future__ import annotations

import pathlib

import pytest


class _RunsCode:
    """Unpickling this object would write a marker file (stands for arbitrary code)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "code ran")


@pytest.fixture
def code_running_object(tmp_path) -> tuple[_RunsCode, pathlib.Path]:
    """(an object whose unpickling writes ``marker``, marker): put it in a checkpoint file to
    check that loading the file refuses it before it runs."""
    marker = tmp_path / "marker.txt"
    return _RunsCode(marker), marker
