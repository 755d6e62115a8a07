"""The README's Python examples and examples/*.py run as written, on the embedded test model."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def api_blocks() -> list[str]:
    """The fenced Python blocks of the README's section "The Python API", in order."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The Python API\n"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_every_command_has_its_python_example():
    """Each block names the commands it does (`# memedit locate ...`); together they name
    every command of the CLI, so the API section keeps up with the CLI section."""
    from memedit.cli import cli

    named = set(re.findall(r"# memedit ([a-z-]+)", "\n".join(api_blocks())))
    assert set(cli.commands) <= named, sorted(set(cli.commands) - named)


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch):
    """One namespace for all blocks, as a reader pasting them in order would have."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(api_blocks(), 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    assert (tmp_path / "sanitized" / "model_index.json").is_file()
    assert {"report.json", "table.txt"} <= {p.name for p in (tmp_path / "eval").iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")),
                         ids=lambda path: path.name)
def test_example_scripts_run(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "--out", str(tmp_path / "out")])
    runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "out" / "model_index.json").is_file()
