"""README's "A taste" code block runs as written on the default model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def taste_block() -> str:
    text = README.read_text()
    section = text[text.index("## A taste"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's 'A taste' section has no python code block"
    return match.group(1)


def test_the_taste_block_is_found():
    code = taste_block()
    assert "load_model" in code and "vector =" in code


@pytest.mark.slow
def test_readme_taste_runs_as_written(capsys):
    exec(compile(taste_block(), str(README), "exec"), {})  # noqa: S102 - the README's own code, as a user runs it
    out = capsys.readouterr().out
    assert "torch.Size([1," in out and "640])" in out, out
