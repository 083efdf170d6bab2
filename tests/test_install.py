"""The README's install commands: two, in a virtual environment, and the ones CI runs.

On a Python whose system packages pip may not touch (PEP 668, Debian and Ubuntu), ``pip
install`` only works inside a virtual environment, so every ``pip`` of the README's first
code block must come after the venv is created and activated, in the same command (each
command may run in a fresh shell, as ``.ci/run`` runs them). ``.ci/run --print`` must print
exactly these commands; the ``gradflow`` command of the first one is run here in-process.
(Checked by hand on Debian 12's /usr/bin/python3 3.11.2, an externally managed Python: the
first command installs and writes the map, the second installs the test extras.)
"""
import os
import re
import shlex
import subprocess
from pathlib import Path

from gradflow import cli

ROOT = Path(__file__).resolve().parents[1]


def install_commands() -> list[str]:
    """The lines of README.md's first ``bash`` code block."""
    m = re.search(r"^```bash\n(.*?)^```$", (ROOT / "README.md").read_text(), re.S | re.M)
    assert m, "README.md has no bash code block"
    return [line for line in m.group(1).splitlines() if line.strip()]


def test_two_commands_that_install_only_inside_a_venv():
    first, second = install_commands()  # exactly two
    for command in (first, second):
        steps = [s.strip() for s in command.split("&&")]
        active = [i for i, s in enumerate(steps) if s == ". .venv/bin/activate"]
        pips = [i for i, s in enumerate(steps) if re.search(r"\bpip\b", s)]
        assert active and pips and min(pips) > active[0], command
        assert all(re.fullmatch(r"python -m pip install -e (\.|\"\.\[dev\]\")", steps[i])
                   for i in pips), command
    assert first.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert first.endswith("gradflow heatmap --cell lstm --layers 16")
    assert second.endswith('python -m pip install -e ".[dev]" && python -m pytest -q')


def test_ci_runs_exactly_the_readme_commands():
    out = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True,
                         text=True, check=True, timeout=60)
    assert out.stdout.splitlines() == install_commands()
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_the_readme_heatmap_command_runs(tmp_path, monkeypatch, capsys):
    command = install_commands()[0].split("&&")[-1].strip()
    argv = shlex.split(command)
    assert argv[0] == "gradflow"
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv[1:]) == 0
    out = capsys.readouterr().out
    assert "non-finite entries: 0 of" in out and "underflow entries: 0 of" in out
    assert sorted(p.suffix for p in (tmp_path / "gradflow-out").iterdir()) == [".npz", ".png"]
