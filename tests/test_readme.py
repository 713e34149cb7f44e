"""The README's Python examples run as written, each saved to a file and run as a script, as a user would."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BLOCKS = re.findall(r"```python\n(.*?)```", (Path(__file__).parents[1] / "README.md").read_text(), re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", BLOCKS, ids=[b.splitlines()[-1][:40] for b in BLOCKS])
def test_readme_python_example_runs(code, tmp_path):
    # A script, not `python -c`: processes started by forkserver or spawn import a script again (`-c` has none to
    # import), so an example that starts them at import time fails only this way.
    (tmp_path / "example.py").write_text(code)
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _readme_commands() -> list[tuple[str, list[str]]]:
    """(command, its key=value words) of every `robodistill <command> ...` line in the README's shell blocks."""
    from robodistill.cli import ARGV_COMMANDS, COMMANDS

    found = []
    for block in re.findall(r"```bash\n(.*?)```", (Path(__file__).parents[1] / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = line.split("#")[0].split()
            while words and words[0] != "robodistill" and not words[0].endswith("/robodistill"):
                words = words[1:]  # e.g. `.venv/bin/robodistill`, `timeout 60 robodistill`
            if len(words) > 1 and words[1] in COMMANDS and words[1] not in ARGV_COMMANDS:
                optional = [w[1:].removesuffix("]") if w.startswith("[") else w for w in words[2:]]  # `[key=value]`
                found.append((words[1], [w for w in optional if "=" in w and not w.startswith("-")]))
    return found


def test_every_field_the_readme_sets_exists():
    """A renamed or removed field must not live on in the README's commands."""
    from robodistill.configs import check_overrides

    commands = _readme_commands()
    assert len(commands) >= 20
    for command, args in commands:
        check_overrides(command, args)
