"""README's API examples run as written (the other sections' examples are run by the tests of
their modules: test_adapters, test_cost, test_training_figures, test_install); the CLI
section's commands parse (test_cli runs the commands themselves)."""
import re
import shlex
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(section: str) -> list[str]:
    text = README.read_text()
    m = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README has no section {section!r}"
    return re.findall(r"^```python\n(.*?)^```$", m.group(1), re.S | re.M)


def test_readme_api_examples_run(tmp_path, monkeypatch):
    blocks = _blocks("API")
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)  # the example writes lstm.png and lstm_map.npz
    ns = {"__name__": "readme"}
    for code in blocks:
        exec(compile(code, str(README), "exec"), ns)
    assert ns["res"].values.shape == (2, 5) and np.all(ns["res"].values > 0)
    assert ns["same"].values.shape == (16, 32) and (tmp_path / "lstm.png").is_file()
    assert [c.name for c in ns["stack"].cells] == ["gru", "star"]
    assert np.isnan(ns["st"]["mean/k"][0]).all() and np.isfinite(ns["st"]["mean/k"][1]).all()


def test_readme_cli_commands_parse():
    """Every command of the CLI section's bash block is one the parser accepts as written."""
    from gradflow import cli

    text = README.read_text()
    section = re.search(r"^## CLI\n(.*?)(?=^## |\Z)", text, re.S | re.M).group(1)
    block = re.search(r"^```bash\n(.*?)^```$", section, re.S | re.M).group(1)
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert len(commands) >= 8 and all(c[0] == "gradflow" for c in commands)
    parser = cli.build_parser()
    for argv in commands:
        args = parser.parse_args(argv[1:])
        assert args.command == argv[1], argv
