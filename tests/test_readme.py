"""README.md read start to end as a newcomer would: every command in it names a file and flags that exist, and the
short ones (no compiling, no training, no downloads, no placeholder paths) run as written."""
import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATH_FLAGS = {"--checkpoint", "--s3d", "--heads", "--draft_checkpoint", "--checkpoint_dir", "--gguf"}


def readme_commands() -> list[str]:
    blocks = re.findall(r"^```\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith((".venv/bin/python ", "make "))]


@functools.cache
def help_text(script: str) -> str:
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def is_short(argv: list[str]) -> bool:
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in PATH_FLAGS]
    return (argv[1] in ("generate.py", "examples/walkthrough.py") and "--compile" not in argv
            and "--interactive" not in argv and all((ROOT / p).exists() for p in paths))


def test_the_readme_has_commands():
    commands = readme_commands()
    assert len(commands) >= 15 and sum(is_short(shlex.split(c, comments=True)) for c in commands) >= 5


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command(command, default_checkpoint):
    argv = shlex.split(command, comments=True)
    if argv[0] == "make":
        assert re.search(rf"^{argv[1]}:", (ROOT / "Makefile").read_text(), re.M)
        return
    script = argv[1]
    assert (ROOT / script).is_file(), f"{script} does not exist"
    for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", help_text(script)), f"{script} has no {flag}"
    if is_short(argv):
        proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip()
