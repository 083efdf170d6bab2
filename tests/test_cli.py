"""Tests for the gradflow CLI: what it writes equals an independent computation of the same
numbers, the printed summary equals NumPy on the written data, and bad input gets one line on
stderr and exit status 2 with no traceback (in-process, plus the installed script once)."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import cells, cli
from gradflow.jacobian import readout_loss

SMALL = ["--layers", "2", "--steps", "3", "--hidden", "8", "--batch", "2"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder, so the default gradflow-out/ lands there."""
    monkeypatch.chdir(tmp_path)


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _written(out: str, label: str) -> Path:
    line = next(l for l in out.splitlines() if l.startswith(label))
    path = Path(line.split(":", 1)[1].strip())
    assert path.is_file()
    return path


def _summary_ratio(out: str, prefix: str) -> float:
    """The ``xR`` factor printed on the line starting with ``prefix``."""
    line = next(l for l in out.splitlines() if l.strip().startswith(prefix))
    return float(line.split(" x", 1)[1].split()[0])


# --- heatmap ------------------------------------------------------------------------------------


def test_heatmap_writes_figure_and_data_at_the_default_place_and_the_summary_is_the_datas(capsys):
    rc, out, err = run(capsys, "heatmap", "--cell", "lstm", *SMALL)
    assert rc == 0, err
    png, npz = _written(out, "figure:"), _written(out, "data:")
    assert png == Path("gradflow-out/heatmap_lstm_L2.png") and npz == png.with_suffix(".npz")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = gradflow.load(npz)
    c = res.config
    assert (c["cell"], c["layers"], c["steps"], c["hidden_size"], c["batch"], c["seed"],
            c["loss"], c["wrt"], c["dtype"]) == ("lstm", 2, 3, 8, 2, 0, "last", "hidden", "float32")

    # Independent check of one entry: the top layer's last output feeds the readout only, so
    # G[L-1, T-1] = mean_b ||dL/dh_{T-1}[b]||, from jax.grad of the readout loss on the outputs
    # of a plain forward pass (no perturbation machinery).
    with jax.enable_x64(False):
        prob = gradflow.problem("lstm", layers=2, steps=3, hidden=8, batch=2, seed=0)
        out_top = prob.stack.apply(prob.params, prob.xs).top
        g = jax.grad(readout_loss("last", 8, 3, 2, seed=0, dtype=jnp.float32))(out_top)
    expect = float(np.mean(np.linalg.norm(np.asarray(g)[:, -1], axis=-1)))
    np.testing.assert_allclose(res.values[-1, -1], expect, rtol=1e-5)

    # The printed factors are the data's: layer-0 mean over the top layer's, first over last.
    v = res.values.astype(float)
    np.testing.assert_allclose(_summary_ratio(out, "layer   0"), v[0].mean() / v[-1].mean(),
                               rtol=5e-3)  # printed to 3 significant digits
    np.testing.assert_allclose(_summary_ratio(out, "top layer"), v[-1, 0] / v[-1, -1],
                               rtol=5e-3)
    assert "non-finite entries: 0 of 6" in out


def test_heatmap_explicit_paths_formats_options_and_float64(capsys, tmp_path):
    rc, out, err = run(capsys, "heatmap", "--cell", "gru", *SMALL, "--wrt", "hidden", "--loss",
                       "all", "--init", "glorot", "--option", "forget_bias_init=1.5",
                       "--dtype", "float64", "--normalize", "--out", tmp_path / "g.svg",
                       "--data", tmp_path / "sub.npz")
    assert rc == 0, err
    assert (tmp_path / "g.svg").read_text().lstrip().startswith("<?xml")
    res = gradflow.load(tmp_path / "sub.npz")
    assert res.values.dtype == np.float64
    assert (res.config["init"], res.config["forget_bias_init"], res.config["wrt"],
            res.config["loss"]) == ("glorot", 1.5, "hidden", "all")
    # The option reached the parameters: GRU's update-gate bias z starts at 1.5.
    prob = gradflow.problem("gru", layers=2, steps=3, hidden=8, batch=2, dtype="float64",
                            init="glorot", forget_bias_init=1.5)
    np.testing.assert_array_equal(np.asarray(prob.params["layers"][0]["z"]["b"]), 1.5)
    assert not Path("gradflow-out").exists()


def test_heatmap_pdf_without_data_and_g_lstm_sized_from_the_sequence(capsys, tmp_path):
    rc, out, err = run(capsys, "heatmap", "--cell", "g_lstm", *SMALL, "--option",
                       "sigma_frac=0.2", "--out", tmp_path / "g.pdf", "--no-data")
    assert rc == 0, err
    assert (tmp_path / "g.pdf").read_bytes()[:5] == b"%PDF-"
    assert list(tmp_path.iterdir()) == [tmp_path / "g.pdf"] and "data:" not in out
    # mu ~ U[0, T) with T = 3 (the cell's default is 100), and the explicit option
    assert "; options sigma_frac=0.2, steps=3" in out.splitlines()[0]


# --- compare, gates, cells, reproduce ---------------------------------------------------------


def test_compare_writes_the_grid_equal_to_per_cell_gradient_maps(capsys):
    rc, out, err = run(capsys, "compare", "--cells", "rnn,star", "--losses", "all",
                       *SMALL, "--seed", "3")
    assert rc == 0, err
    png, npz = _written(out, "figure:"), _written(out, "data:")
    assert png.name == "compare_rnn-star_L2.png"
    grid = gradflow.load(npz)
    assert grid.config["cells"] == ["rnn", "star"] and grid.config["losses"] == ["all"]
    with jax.enable_x64(False):
        prob = gradflow.problem("star", layers=2, steps=3, hidden=8, batch=2, seed=3)
        ref = gradflow.gradient_map(prob.stack, prob.params, prob.xs, loss="all",
                                    wrt="params").values
    np.testing.assert_allclose(grid["values/all/star"], ref, rtol=1e-6)
    # The table's top-last column is the data's.
    line = next(l for l in out.splitlines() if l.split()[:2] == ["all", "star"])
    np.testing.assert_allclose(float(line.split()[2]), grid["values/all/star"][-1, -1],
                               rtol=5e-3)  # printed to 3 significant digits


def test_gates_summary_matches_an_independent_count_of_saturated_gates(capsys):
    rc, out, err = run(capsys, "gates", "--cell", "lstm", *SMALL, "--eps", "0.3",
                       "--init", "ugi", "--gate", "f")
    assert rc == 0, err
    stats = gradflow.load(_written(out, "data:"))
    assert stats.kind == "gate_stats"
    with jax.enable_x64(False):
        prob = gradflow.problem("lstm", layers=2, steps=3, hidden=8, batch=2, init="ugi")
        f = np.asarray(prob.stack.apply(prob.params, prob.xs, gates=True).gates["f"])
    frac = np.mean((f < 0.3) | (f > 0.7))
    line = next(l for l in out.splitlines() if l.strip().startswith("gate f"))
    assert float(line.split("saturated ")[1].split(",")[0]) == pytest.approx(frac, abs=1e-3)
    assert "gate i " not in out  # --gate f shows f only


def test_cells_lists_every_cell_with_closed_form_parameter_counts(capsys):
    rc, out, err = run(capsys, "cells", "--hidden", "16", "--input-size", "5")
    assert rc == 0, err
    rows = {l.split()[0]: l for l in out.splitlines()[1:]}
    assert set(rows) == set(cells.names())
    count = {n: int(rows[n].split()[1].replace(",", "")) for n in rows}
    D, H = 5, 16
    assert count["rnn"] == H * (D + H + 1)            # W, U, b
    assert count["lstm"] == 4 * H * (D + H + 1)       # i, f, g, o
    assert count["gru"] == 3 * H * (D + H + 1) + H    # r, z, n, plus b_hn
    assert count["star"] == H * (D + H + 1) + H * (D + 1)  # k; z has no U
    assert count["indrnn"] == H * (D + 2)             # W, u, b
    assert count["refined_lstm"] == 4 * H * (H + H + 1)    # refined cells read H features
    assert cells.get("star").equation in rows["star"]


def _tiny_config(tmp_path, name="tiny", **extra):
    config = {"figure": "gradient_grid", "title": "tiny", "cells": ["lstm", "rnn"],
              "losses": ["all"], "wrt": "hidden", "layers": 2, "steps": 3, "hidden": 8,
              "batch": 2, "seed": 1, "readout_seed": 2, "init": "orthogonal",
              "dtype": "float32", "input_scale": 0.5, "cell_options": {}, **extra}
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    return config


def test_reproduce_regenerates_figure_and_data_from_the_config(capsys, tmp_path):
    _tiny_config(tmp_path)
    (tmp_path / "out").mkdir()
    rc, out, err = run(capsys, "reproduce", "--figures", tmp_path, "--list")
    assert rc == 0 and out.startswith("tiny: gradient_grid (lstm, rnn)")
    rc, out, err = run(capsys, "reproduce", "--figures", tmp_path, "--out-dir", tmp_path / "out")
    assert rc == 0, err
    assert (tmp_path / "out/tiny.png").is_file()
    grid = gradflow.load(tmp_path / "out/tiny.npz")
    with jax.enable_x64(False):
        prob = gradflow.problem("rnn", layers=2, steps=3, hidden=8, batch=2, seed=1,
                                input_scale=0.5)
        ref = gradflow.gradient_map(prob.stack, prob.params, prob.xs, loss="all", wrt="hidden",
                                    readout_seed=2).values
    np.testing.assert_allclose(grid["values/all/rnn"], ref, rtol=1e-6)


def test_help_has_examples(capsys):
    rc, out, err = run(capsys, "--help")
    assert rc == 0 and "gradflow compare --cells rnn,lstm,star --layers 10 --steps 10" in out
    for command in ("heatmap", "compare", "gates", "cells", "reproduce"):
        rc, out, err = run(capsys, command, "--help")
        assert rc == 0 and "examples:" in out and f"gradflow {command}" in out


# --- bad input: one line, exit status 2, no traceback -------------------------------------------

VALID_CELLS = ", ".join(cells.names())

BAD = [
    (["heatmap", "--cell", "nope"], VALID_CELLS),
    (["heatmap", "--layers", "0"], "--layers: must be a positive integer"),
    (["heatmap", "--layers", "-3"], "--layers: must be a positive integer"),
    (["heatmap", "--layers", "abc"], "--layers: must be a positive integer"),
    (["heatmap", "--steps", "0"], "--steps: must be a positive integer"),
    (["heatmap", "--hidden", "2.5"], "--hidden: must be a positive integer"),
    (["heatmap", "--batch", "-1"], "--batch: must be a positive integer"),
    (["heatmap", "--seed", "-1"], "--seed: must be a non-negative integer"),
    (["heatmap", "--init", "bogus"], "orthogonal, glorot, torch, chrono, ugi"),
    (["heatmap", "--loss", "bogus"], "'last', 'all'"),
    (["heatmap", "--wrt", "bogus"], "'hidden', 'cell', 'params'"),
    (["heatmap", "--dtype", "float16"], "'float32', 'float64'"),
    (["heatmap", "--out", "missing-dir/x.png"], "does not exist"),
    (["heatmap", "--out", "x.jpg"], ".png, .pdf, .svg"),
    (["heatmap", "--out", "noextension"], ".png, .pdf, .svg"),
    (["heatmap", "--out", "/proc/gradflow-test.png"], "cannot write"),
    (["heatmap", "--out", "."], "unsupported figure extension"),
    (["heatmap", "--data", "x.csv"], "use .npz"),
    (["heatmap", "--data", "x.npz", "--no-data"], "cannot be used together"),
    (["heatmap", "--cell", "refined_lstm", *SMALL, "--input-size", "5",
      "--no-input-projection"], "needs its input size to equal hidden_size"),
    (["heatmap", "--cell", "on_lstm", *SMALL, "--option", "chunk_size=3"], "not divisible"),
    (["heatmap", "--cell", "rnn", *SMALL, "--init", "chrono"], "no forget-type gate"),
    (["heatmap", "--cell", "rnn", *SMALL, "--wrt", "cell"], "memory state c"),
    (["heatmap", "--option", "novalue"], "expected key=value"),
    (["heatmap", "--cell", "lstm", *SMALL, "--option", "foo=1"], "valid options: aux"),
    (["heatmap", "--cell", "star", *SMALL, "--option", "variant=nope"], "'paper', 'official'"),
    (["compare", "--cells", "rnn,nope"], VALID_CELLS),
    (["compare", "--cells", ""], "comma-separated list of cells"),
    (["compare", "--cells", "rnn,rnn"], "cells repeated: rnn"),
    (["compare", "--losses", "last,bogus"], "valid losses: last, all"),
    (["compare", "--out", "fig.gif"], ".png, .pdf, .svg"),
    (["gates", "--cell", "rnn"], "cells with gates: "),
    (["gates", "--cell", "lstm", "--gate", "z"], "its gates: i, f, o"),
    (["gates", "--eps", "0.7"], "--eps: must be a number in (0, 0.5)"),
    (["cells", "--hidden", "0"], "--hidden: must be a positive integer"),
    (["reproduce", "--only", "nope"], "unknown figure 'nope'; valid: "),
    (["reproduce", "--out-dir", "missing-dir"], "does not exist"),
    (["reproduce", "--figures", "missing-dir"], "does not exist"),
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "choose a command: heatmap, compare, gates, cells, reproduce"),
]


@pytest.mark.parametrize("argv, expect", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_no_traceback(capsys, argv, expect):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gradflow") and ": error: " in lines[0]
    assert "Traceback" not in err
    assert expect in lines[0]
    assert not Path("gradflow-out").exists() or not any(Path("gradflow-out").iterdir())


def test_installed_script_and_module_entry_points():
    script = Path(sys.executable).parent / "gradflow"
    proc = subprocess.run([str(script), "heatmap", "--cell", "nope"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "unknown cell 'nope'; valid cells: " + VALID_CELLS in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gradflow", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"gradflow {gradflow.__version__}"
