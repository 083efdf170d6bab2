"""README's API examples run as written (the other sections' examples are run by the tests of
their modules: test_adapters, test_cost, test_training_figures, test_install)."""
import re
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
    monkeypatch.chdir(tmp_path)  # the example writes lstm.png and lstm.npz
    ns = {"__name__": "readme"}
    for code in blocks:
        exec(compile(code, str(README), "exec"), ns)
    assert ns["res"].values.shape == (2, 5) and np.all(ns["res"].values > 0)
    assert ns["same"].values.shape == (16, 32) and (tmp_path / "lstm.png").is_file()
    assert [c.name for c in ns["stack"].cells] == ["gru", "star"]
