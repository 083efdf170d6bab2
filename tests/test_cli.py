"""Tests for the gradflow CLI: what it writes equals an independent computation of the same
numbers, the printed summary equals NumPy on the written data, and bad input gets one line on
stderr and exit status 2 with no traceback (in-process, plus the installed script once)."""
import argparse
import errno
import hashlib
import json
import os
import re
import subprocess
import shutil
import sys
import tempfile
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


@pytest.fixture(autouse=True)
def _no_progress_lines(monkeypatch):
    """No progress lines on stderr: they are printed where a request is estimated to take over
    ``cli.PROGRESS_AFTER`` seconds, from this machine's measured speed, so a loaded machine
    added one to a refusal's one line (tests/test_edges_hypothesis.py tests them)."""
    monkeypatch.setattr(cli, "PROGRESS_AFTER", float("inf"))


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


def test_matmul_precision_option_reaches_the_stack_and_the_name(capsys):
    """``--matmul-precision default``: recorded in the result's config, in the default file
    name, and on this CPU the same map as float32's; a bad value is a usage error."""
    maps = []
    for value, stem in (("highest", "heatmap_lstm_L2_T3_H8_B2"),
                        ("default", "heatmap_lstm_L2_T3_H8_B2_mm-default")):
        rc, out, err = run(capsys, "heatmap", "--cell", "lstm", *SMALL,
                           "--matmul-precision", value)
        assert rc == 0, err
        npz = _written(out, "data:")
        assert npz == Path(f"gradflow-out/{stem}.npz")
        res = gradflow.load(npz)
        assert res.config["matmul_precision"] == value
        maps.append(res.values)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(*maps)
    rc, _, err = run(capsys, "heatmap", "--cell", "lstm", "--matmul-precision", "tf32")
    assert rc == 2 and "highest" in err and "Traceback" not in err


def test_heatmap_writes_figure_and_data_at_the_default_place_and_the_summary_is_the_datas(capsys):
    rc, out, err = run(capsys, "heatmap", "--cell", "lstm", *SMALL)
    assert rc == 0, err
    png, npz = _written(out, "figure:"), _written(out, "data:")
    # the default name carries the settings that differ from the defaults (--steps 3 ...)
    assert png == Path("gradflow-out/heatmap_lstm_L2_T3_H8_B2.png")
    assert npz == png.with_suffix(".npz")
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

    # The printed factors are the data's: layer 0 over the top layer at the last step and
    # time-averaged, and the top layer's first step over its last.
    v = res.values.astype(float)
    line = next(l for l in out.splitlines() if l.strip().startswith("layer   0"))
    at_last, mean = (float(part.split(" x", 1)[1].split()[0]) for part in line.split("|"))
    np.testing.assert_allclose(at_last, v[0, -1] / v[-1, -1], rtol=5e-3)  # 3 digits printed
    np.testing.assert_allclose(mean, v[0].mean() / v[-1].mean(), rtol=5e-3)
    first_last = out.split("back along the top layer:")[1].split("first/last x")[1].split()[0]
    np.testing.assert_allclose(float(first_last), v[-1, 0] / v[-1, -1], rtol=5e-3)
    assert "non-finite entries: 0 of 6" in out


def test_heatmap_of_the_memory_summarises_the_steps_it_reaches(capsys):
    """A map wrt c is 0 at the last step by construction (h_{T-1} is formed before c_{T-1}
    leaves the cell): not underflow, and 'over time' compares with the step before."""
    rc, out, err = run(capsys, "heatmap", "--cell", "lstm", "--wrt", "cell", *SMALL)
    assert rc == 0, err
    res = gradflow.load(_written(out, "data:"))
    v = res.values.astype(float)
    assert (v[:, -1] == 0).all() and (v[:, :-1] > 0).all() and res.underflow == {"values": 0}
    assert "underflow entries: 0 of 6" in out
    assert "from where the loss enters: layer 1, t 1 (top layer, the last step c reaches it" in out
    first_last = out.split("back along the top layer:")[1].split("first/last x")[1].split()[0]
    np.testing.assert_allclose(float(first_last), v[-1, 0] / v[-1, -2], rtol=5e-3)


def test_reproduce_list_shows_the_only_figures_named(capsys):
    rc, out, err = run(capsys, "reproduce", "--list", "--only", "atlas_star_fig2,star_fig2")
    assert rc == 0, err
    lines = out.splitlines()
    assert [l.split(":")[0] for l in lines] == ["atlas_star_fig2", "star_fig2"]
    assert lines[0].startswith("atlas_star_fig2: atlas  [")  # no empty "()"
    assert lines[1].startswith("star_fig2: gradient_grid (rnn, lstm, star, gru)  [")


def test_compare_and_atlas_in_float64_from_a_32_bit_process(capsys, tmp_path):
    """``compare --dtype float64`` and an atlas grid of ``"dtype": "float64"`` run in 64-bit
    JAX without the caller enabling it (they were refused: "needs 64-bit JAX"), and leave the
    process's mode as it was."""
    assert not jax.config.jax_enable_x64
    rc, _, err = run(capsys, "compare", "--cells", "gru,star", "--layers", "2", "--steps", "3",
                     "--hidden", "4", "--batch", "2", "--dtype", "float64", "--out",
                     tmp_path / "c.png")
    assert rc == 0, err
    assert gradflow.load(tmp_path / "c.npz").config["dtype"] == "float64"
    grid = {"cells": ["lstm"], "sizes": [[2, 3]], "hidden": [4], "batch": 2, "seeds": [0],
            "inits": ["orthogonal"], "input_scales": [1], "losses": ["last"],
            "wrts": ["hidden"], "dtype": "float64"}
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    (tmp_path / "atlas").mkdir()
    rc, _, err = run(capsys, "atlas", "--grid", tmp_path / "grid.json", "--out",
                     tmp_path / "atlas")
    assert rc == 0, err
    assert not jax.config.jax_enable_x64
    # a cache that is a file is the user's to fix, before anything is measured
    (tmp_path / "taken.png").write_bytes(b"")
    rc, _, err = run(capsys, "atlas", "--grid", tmp_path / "grid.json", "--out",
                     tmp_path / "atlas", "--cache", tmp_path / "taken.png")
    assert rc == 2 and "is a file; the cache is a folder" in err and "Traceback" not in err


def test_heatmap_explicit_paths_formats_options_and_float64(capsys, tmp_path, x64):
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
    # mu ~ U[0, T) with T = 3 (the sequences'), not the cell's default 100: the length a
    # time gate is initialised over is named where it is not the sequences' (it said steps=3
    # here, and nothing for g_lstm:steps=100 measured on 3 steps)
    assert out.splitlines()[0].endswith("; options sigma_frac=0.2")
    rc, out, err = run(capsys, "heatmap", "--cell", "g_lstm:steps=100", *SMALL, "--no-data",
                       "--out", tmp_path / "g100.png")
    assert rc == 0 and out.splitlines()[0].endswith("; options steps=100"), out
    # one cell per layer: each layer's options (it printed none, or the bottom layer's as all's)
    for per_layer, subject in (("lstm,lstm:forget_bias=1.0", "lstm / lstm:forget_bias=1.0"),
                               ("lstm:forget_bias=1.0,lstm", "lstm:forget_bias=1.0 / lstm")):
        rc, out, err = run(capsys, "heatmap", "--cell", per_layer, *SMALL, "--no-data", "--out",
                           tmp_path / "per_layer.png")
        first = out.splitlines()[0]
        assert rc == 0 and first.startswith(f"gradflow heatmap: {subject}, 2 layers") and \
            "options" not in first, out


# --- compare, gates, cells, reproduce ---------------------------------------------------------


def test_compare_writes_the_grid_equal_to_per_cell_gradient_maps(capsys):
    rc, out, err = run(capsys, "compare", "--cells", "rnn,star", "--losses", "all",
                       *SMALL, "--seed", "3")
    assert rc == 0, err
    png, npz = _written(out, "figure:"), _written(out, "data:")
    assert png.name == "compare_rnn-star_L2_T3_H8_B2_s3_loss-all.png"
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


def test_compare_counts_underflow_in_its_table(capsys):
    """A map whose bottom layer vanished past float32 (saturated gates at input scale 1e6)
    shows its underflow count in compare's table, as heatmap's summary does."""
    from gradflow import experiments

    rc, out, err = run(capsys, "compare", "--cells", "rnn,lstm", "--losses", "last", *SMALL,
                       "--input-scale", "1e6")
    assert rc == 0, err
    grid = gradflow.load(_written(out, "data:"))
    assert "underflow" in out.splitlines()[1]
    for cell in ("rnn", "lstm"):
        line = next(l for l in out.splitlines() if l.split()[:2] == ["last", cell])
        assert int(line.split()[-1]) == experiments.panel(grid, "last", cell).total_underflow
    assert experiments.panel(grid, "last", "lstm").total_underflow > 0


def test_compare_says_its_cell_options_in_the_table_and_the_figure(capsys, monkeypatch):
    from gradflow import plot

    titles = []
    draw = plot.draw_grid
    monkeypatch.setattr(plot, "draw_grid", lambda grid, **k: titles.append(
        plot.settings(grid.config)) or draw(grid, **k))
    rc, out, err = run(capsys, "compare", "--cells", "lstm,ur_lstm", "--losses", "last",
                       *SMALL, "--option", "init=orthogonal")
    assert rc == 0, err
    assert "; options init=orthogonal; " in out.splitlines()[0]
    assert titles == ["L=2, T=3, H=8, seed 0, options init=orthogonal"]
    grid = gradflow.load(_written(out, "data:"))
    assert grid.config["maps"]["last/lstm"]["init"] == "orthogonal"


def test_compare_takes_one_width_per_layer(capsys):
    rc, out, err = run(capsys, "compare", "--cells", "rnn,lstm", "--losses", "last", "--wrt",
                       "hidden", "--layers", "3", "--steps", "3", "--hidden", "8,6,4",
                       "--batch", "2")
    assert rc == 0, err
    assert "H=8,6,4," in out.splitlines()[0]
    npz = _written(out, "data:")
    assert npz.name == "compare_rnn-lstm_L3_T3_H8-6-4_B2_loss-last_wrt-hidden.npz"
    with jax.enable_x64(False):
        prob = gradflow.problem("lstm", layers=3, steps=3, hidden=[8, 6, 4], batch=2)
        ref = gradflow.gradient_map(prob.stack, prob.params, prob.xs, wrt="hidden").values
    np.testing.assert_allclose(gradflow.load(npz)["values/last/lstm"], ref, rtol=1e-6)


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


def test_gates_records_the_chosen_gate_and_saves_every_gate(capsys):
    """``--gate f`` prints and draws f; the data file holds every gate (as --help says) and
    records the choice, so it reads as the command that made it."""
    rc, out, _ = run(capsys, "gates", "--help")
    assert rc == 0
    assert "holds every gate's statistics, with this choice as config['gate']" in " ".join(
        out.split())
    for extra, gate in ((["--gate", "f"], "f"), ([], None)):
        rc, out, err = run(capsys, "gates", "--cell", "lstm", *SMALL, *extra)
        assert rc == 0, err
        stats = gradflow.load(_written(out, "data:"))
        assert stats.config["gate"] == gate
        assert stats.config["gates"] == ["i", "f", "o", "g"]
        assert all(f"saturated/{g}/layer" in stats.arrays for g in "ifog")


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
    starts = {l.index(cells.get(l.split()[0]).equation) for l in out.splitlines()[1:]}
    assert len(starts) == 1  # one column of equations (on_lstm's six gates pushed its own)


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
    (["heatmap", "--bogus"], "gradflow heatmap: error: unrecognized arguments: --bogus"),
    (["heatmap", "--hiden", "3"], "gradflow heatmap: error: unrecognized arguments: --hiden 3; "
                                  "did you mean --hidden?"),
    (["gates", "--epsilon=0.1"], "unrecognized arguments: --epsilon=0.1; did you mean --eps?"),
    (["--bogus"], "gradflow: error: unrecognized arguments: --bogus"),
    (["heatmap", "--out", "missing-dir/x.png"], "gradflow heatmap: error: cannot write "
                                                "'missing-dir/x.png': "),
    (["heatmap", "--out", "a_file/x.png"], "a_file' is not a directory"),
    (["heatmap", "--out", "x.jpg"], ".png, .pdf, .svg"),
    (["heatmap", "--out", "noextension"], ".png, .pdf, .svg"),
    (["heatmap", "--out", "/proc/gradflow-test.png"], "cannot write"),
    (["heatmap", "--out", "noextension"], "(--out is the figure's file, e.g. DIR/name.png, or "
                                          "an existing folder)"),
    (["heatmap", "--out", "missing-dir/"], "missing-dir' does not exist"),
    (["heatmap", "--data", "x.csv"], "use .npz"),
    (["heatmap", "--data", "x.npz", "--no-data"], "cannot be used together"),
    (["heatmap", "--cell", "refined_lstm", *SMALL, "--input-size", "5",
      "--no-input-projection"], "needs its input size to equal hidden_size (8); the data has "
                                "5 features: leave out --no-input-projection"),
    (["heatmap", "--cell", "on_lstm", *SMALL, "--option", "chunk_size=3"], "not divisible"),
    (["heatmap", "--cell", "rnn", *SMALL, "--init", "chrono"], "no forget-type gate"),
    (["heatmap", "--cell", "rnn", *SMALL, "--wrt", "cell"], "memory state c"),
    (["heatmap", "--option", "novalue"], "expected key=value"),
    (["heatmap", "--cell", "lstm", *SMALL, "--option", "foo=1"], "valid options: init, forget_bias"),
    (["heatmap", "--cell", "star", *SMALL, "--option", "variant=nope"], "'paper', 'official'"),
    (["compare", "--cells", "rnn,nope"], VALID_CELLS),
    (["compare", "--cells", ""], "comma-separated list of cells"),
    (["compare", "--cells", "rnn,rnn"], "cells repeated: rnn"),
    (["compare", "--losses", "last,bogus"], "unknown loss 'bogus'; valid losses: last, all"),
    (["compare", "--cells", "rnn,nope"], "unknown cell 'nope'; valid cells: "),
    (["compare", "--cells", "lstm,lstm:bogus=1", *SMALL],
     "unknown option(s) 'bogus' for cell 'lstm'"),
    (["compare", "--cells", "lstm,lstmm:forget_bias=1", *SMALL],
     "unknown cell 'lstmm'; valid cells: "),
    (["compare", "--cells", "lstm:forget_bias,gru", *SMALL],
     "cell 'lstm:forget_bias': 'lstm' is a gradflow cell, not a module of yours "
     "(module:attribute); write its options as lstm:forget_bias=VALUE or --option "
     "forget_bias=VALUE"),
    (["heatmap", "--cell", "lstm:tied", *SMALL], "write its options as lstm:tied=VALUE"),
    (["heatmap", "--cell", "lstm:bogus=1", *SMALL], "unknown option(s) 'bogus' for cell 'lstm'"),
    (["heatmap", "--cell", "lstm:forget_bias=1.0", *SMALL, "--option", "forget_bias=2.0"],
     "--cell lstm:forget_bias=1.0 and --option forget_bias=2.0 disagree; give one"),
    (["gates", "--cell", "lstm:init=glorot", *SMALL, "--init", "torch"],
     "--cell lstm:init=glorot and --init torch disagree; give one"),
    (["heatmap", "--cell", "lstm", *SMALL, "--option", "tied=maybe"],
     "option tied='maybe' of cell 'lstm' takes true or false"),
    (["heatmap", "--cell", "phased_lstm", *SMALL, "--option", "log_tau=3,1"],
     "is the range (low, high) of log tau, with low < high"),
    (["heatmap", "--cell", "lstm", *SMALL, "--option", "forget_bias=abc"],
     "option forget_bias='abc' of cell 'lstm' takes a number"),
    (["heatmap", "--cell", "lstm", *SMALL, "--input-scale", "nan"],
     "argument --input-scale: must be a finite number, got 'nan'"),
    (["heatmap", "--cell", "lstm", *SMALL, "--input-scale", "x"],
     "argument --input-scale: must be a number, got 'x'"),
    (["heatmap", "--cell", "lstm", *SMALL, "--init", "torch", "--option", "init=glorot"],
     "--init torch and --option init=glorot disagree"),
    (["heatmap", "--cell", "lstm", *SMALL, "--option", "forget_bias=1", "--option",
      "forget_bias=2"], "--option forget_bias is given twice"),
    (["heatmap", "--cell", "lstm", *SMALL, "--option", "mode=add"],
     "mode='add' shapes refined gates and this cell has none"),
    (["heatmap", "--cell", "lstm", *SMALL, "--data", "ok.NPZ"],
     "unsupported data extension '.NPZ'"),
    (["train", "--task", "copy", "--task-option", "lag=3", "--seq-len", "7", "--steps", "2"],
     "the sequence length is 7 but lag=3 makes copy sequences of 24 steps"),
    (["atlas", "--cells", "rnn", "--seeds", "0", "0", "--out", "."], "seeds repeat"),
    # an --out it cannot write: said before measuring (it failed after, as a gradflow bug)
    (["atlas", "--cells", "rnn", "--out", "/sys", "--cache", "/tmp"],
     "cannot write '/sys/atlas"),
    (["atlas", "--claims", ",", "--out", "."], "--claims names no claim; valid: rnn_amp"),
    (["gates", "--cell", "lstm", *SMALL, "--input-scale", "1e39"],  # inf in float32
     "input_scale must be a finite number below 2.1e+37"),
    (["heatmap", "--cell", "lstm", *SMALL, "--input-scale", "1e39", "--dry-run"],
     "input_scale must be a finite number below 2.1e+37"),
    (["heatmap", "--cell", "lstm", *SMALL, "--option", "forget_bias=nan"],
     "option forget_bias=nan of cell 'lstm' must be a finite number"),
    (["heatmap", "--cell", "lstm", *SMALL, "--option", "forget_bias=1e400"],
     "option forget_bias=inf of cell 'lstm' must be a finite number"),
    (["compare", "--out", "fig.gif"], ".png, .pdf, .svg"),
    # a value beginning with "-" reaches the option's own check (argparse: "expected one
    # argument"), and an option after an option still lacks its value
    (["heatmap", "--max-memory", "-5G", "--dry-run"],
     "argument --max-memory: memory size must be a finite positive size, got '-5G'"),
    (["heatmap", "--max-memory", "inf", "--dry-run"], "a finite positive size, got 'inf'"),
    (["heatmap", "--checkpoint", "foo", "--dry-run"],
     "argument --checkpoint: must be auto or a positive chunk length, got 'foo'"),
    (["heatmap", "--layers", "--hidden", "3"], "argument --layers: expected one argument"),
    # widths past JAX's 32-bit indexing (an OverflowError inside a cell's init, even dry)
    (["heatmap", "--hidden", "3000000000", "--dry-run"], "widths go up to 16,777,216"),
    (["gates", "--bins", "100000000", "--dry-run"], "--bins: at most 10,000 bins"),
    (["cells", "--hidden", "3000000000"], "argument --hidden: 3000000000 is beyond any machine"),
    (["gates", "--cell", "rnn"], "cells with gates: "),
    (["gates", "--cell", "lstm", "--gate", "z"], "its gates: i, f, o"),
    (["gates", "--eps", "0.7"], "--eps: must be a number in (0, 0.5)"),
    (["cells", "--hidden", "0"], "--hidden: must be a positive integer"),
    (["reproduce", "--only", "nope"], "unknown figure 'nope'; valid: "),
    (["reproduce", "--out-dir", "missing-dir"], "does not exist"),
    (["reproduce", "--only", "star_fig2", "--out", ""], "argument --out-dir/--out: is empty"),
    (["heatmap", "--out", ""], "argument --out: is empty"),
    (["reproduce", "--figures", "missing-dir"], "does not exist"),
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "choose a command: heatmap, compare, gates, gains, cells, reproduce"),
]


@pytest.mark.parametrize("argv, expect", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_no_traceback(capsys, argv, expect):
    Path("a_file").write_text("a file where a folder is expected")
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gradflow") and ": error: " in lines[0]
    assert "Traceback" not in err
    assert expect in lines[0]
    assert not Path("gradflow-out").exists() or not any(Path("gradflow-out").iterdir())


def _entry_points(env):
    script = Path(sys.executable).parent / "gradflow"
    return (subprocess.run([str(script), "heatmap", "--cell", "nope"], capture_output=True,
                           text=True, timeout=120, env=env),
            subprocess.run([sys.executable, "-m", "gradflow", "--version"], capture_output=True,
                           text=True, timeout=120, env=env))


@pytest.mark.background(job=_entry_points)  # its work is fresh processes
def test_installed_script_and_module_entry_points(background):
    proc, version = background
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "unknown cell 'nope'; valid cells: " + VALID_CELLS in proc.stderr
    assert version.returncode == 0 and version.stdout.strip() == f"gradflow {gradflow.__version__}"


# --- the parser is light: --help without JAX or matplotlib --------------------------------------


def _help_child(env):
    code = (
        "import sys, gradflow.cli as c\n"
        "for cmd in ([], ['heatmap'], ['compare'], ['gates'], ['cells'], ['reproduce'], "
        "['train']):\n"
        "    assert c.main(cmd + ['--help']) == 0\n"
        "heavy = [m for m in ('jax', 'matplotlib', 'gradflow.cells', 'gradflow.stack') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.background(job=_help_child)  # its work is a fresh process
def test_help_imports_neither_jax_nor_matplotlib(background):
    proc = background
    assert proc.returncode == 0, proc.stderr
    assert "usage: gradflow train" in proc.stdout


def test_the_parsers_vocabularies_are_the_packages():
    import importlib

    from gradflow import jacobian, plot, stack, tasks

    # the module: ``gradflow.problem`` is the function once a test has called it
    problem = importlib.import_module("gradflow.problem")
    assert cli.LOSSES == tuple(jacobian.LOSSES) and cli.WRTS == tuple(jacobian.WRTS)
    assert cli.DTYPES == tuple(problem.DTYPES) and cli.FORMATS == tuple(plot.FORMATS)
    assert cli.TASKS == tasks.names()
    assert cli.NORMS == tuple(n for n in stack.NORMS if n is not None)


# --- default names, compare normalised, timescale distribution ----------------------------------


def test_default_names_carry_the_settings_so_other_runs_do_not_overwrite(capsys):
    base = ["heatmap", "--cell", "rnn", "--layers", "2", "--hidden", "4", "--batch", "2"]
    paths = []
    for extra in (["--steps", "3"], ["--steps", "4"], ["--steps", "3", "--init", "glorot"],
                  ["--steps", "3", "--seed", "1", "--residual", "--norm", "rms"]):
        rc, out, err = run(capsys, *base, *extra)
        assert rc == 0, err
        paths.append(_written(out, "figure:"))
    assert [p.name for p in paths] == [
        "heatmap_rnn_L2_T3_H4_B2.png", "heatmap_rnn_L2_T4_H4_B2.png",
        "heatmap_rnn_L2_T3_H4_B2_glorot.png", "heatmap_rnn_L2_T3_H4_B2_residual_rmsnorm_s1.png"]
    assert gradflow.load(paths[1].with_suffix(".npz")).values.shape == (2, 4)


def test_compare_is_normalised_by_default_and_absolute_on_request(capsys, monkeypatch):
    from gradflow import plot

    seen = []
    draw = plot.draw_grid
    monkeypatch.setattr(plot, "draw_grid", lambda grid, **kw: seen.append(kw) or draw(grid, **kw))
    for extra, normalize, label in (([], True, "relative to its top-last value"),
                                    (["--absolute"], False, "absolute values")):
        rc, out, err = run(capsys, "compare", "--cells", "rnn", "--losses", "last", *SMALL,
                           *extra)
        assert rc == 0, err
        assert seen.pop() == {"normalize": normalize} and label in out.splitlines()[0]
    assert sorted(p.name for p in Path("gradflow-out").glob("*.png")) == [
        "compare_rnn_L2_T3_H8_B2_loss-last.png", "compare_rnn_L2_T3_H8_B2_loss-last_absolute.png"]


def test_gates_prints_the_distribution_of_per_unit_timescales(capsys):
    """The quantiles over units of tau = 1 / (1 - mean_{b,t} f), from the forget gate's
    activations of a plain forward pass."""
    rc, out, err = run(capsys, "gates", "--cell", "lstm", "--layers", "2", "--steps", "6",
                       "--hidden", "16", "--batch", "3", "--init", "ugi", "--gate", "f")
    assert rc == 0, err
    with jax.enable_x64(False):
        prob = gradflow.problem("lstm", layers=2, steps=6, hidden=16, batch=3, init="ugi")
        f = np.asarray(prob.stack.apply(prob.params, prob.xs, gates=True).gates["f"], float)
    tau = 1.0 / (1.0 - f.mean(axis=(1, 2)))  # (L, H): per layer and unit
    line = next(l for l in out.splitlines() if "timescale per unit" in l)
    printed = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))
    expect = np.quantile(tau.ravel(), [0, 0.1, 0.5, 0.9, 1])
    for name, value in zip(("min", "10%", "median", "90%", "max"), expect):
        assert float(printed[name]) == pytest.approx(value, rel=5e-3), name
    # UGI spreads the timescales: the count per decade adds up to every unit
    decades = next(l for l in out.splitlines() if "units per decade" in l)
    counts = [int(p.rsplit(" ", 1)[1]) for p in decades.split(": ", 1)[1].split(", ")]
    assert sum(counts) == tau.size and tau.max() > 10 * tau.min()


# --- a user's cell by import path, residual and normalised stacks -------------------------------

USER_MODULE = '''
import jax, jax.numpy as jnp
from gradflow.cells import Cell

def _init(key, input_size, hidden_size, dtype):
    k1, k2 = jax.random.split(key)
    return {"W": jax.random.normal(k1, (input_size, hidden_size), dtype) / input_size ** 0.5,
            "U": jax.nn.initializers.orthogonal()(k2, (hidden_size, hidden_size), dtype)}

def sin_rnn(gain=1.0):
    """h' = sin(gain * (x W + h U)): a cell gradflow does not ship."""
    def recur(params, state, x, t):
        h = jnp.sin(gain * (x @ params["W"] + state["h"] @ params["U"]))
        return {"h": h}, h, {}
    return Cell(name="sin_rnn", init_fn=_init, recur_fn=recur, options=(("gain", gain),))

def mixing_rnn():
    """h' = tanh(x W + (h - its batch mean) U): a cell that couples the examples."""
    def recur(params, state, x, t):
        h = jnp.tanh(x @ params["W"] + (state["h"] - state["h"].mean(0)) @ params["U"])
        return {"h": h}, h, {}
    return Cell(name="mixing_rnn", init_fn=_init, recur_fn=recur, couples_batch=True)

def from_file():
    """A cell whose init reads pretrained weights that are not there."""
    import numpy as np

    def init(key, input_size, hidden_size, dtype):
        return dict(np.load("pretrained.npz"))
    return Cell(name="from_file", init_fn=init, recur_fn=sin_rnn().recur_fn)

def readout_inside():
    """A step that returns a readout of h, not h: the adapter refuses it."""
    from gradflow.cells import from_function
    return from_function(lambda p, h, x: (jnp.tanh(x @ p["W"] + h @ p["U"]),
                                          2.0 * jnp.tanh(x @ p["W"] + h @ p["U"])), _init)

def bad_shapes():
    """An init whose matmul JAX refuses (a TypeError in the user's own line)."""
    def init(key, input_size, hidden_size, dtype):
        return {"W": jnp.zeros((input_size, hidden_size)) @ jnp.zeros((hidden_size + 1, 3)),
                "U": jnp.zeros((hidden_size, hidden_size))}
    return Cell(name="bad_shapes", init_fn=init, recur_fn=sin_rnn().recur_fn)

def own_check():
    """A step that raises the user's own ValueError."""
    from gradflow.cells import from_function

    def step(p, h, x):
        raise ValueError("my own check failed")
    return from_function(step, _init)

def f64_constant():
    """A tanh cell adding a float64 constant: fine at float64, a float32 carry's promotion
    (refused) at float32 with 64-bit JAX on."""
    from gradflow.cells import from_function

    def step(p, h, x):
        h = jnp.tanh(x @ p["W"] + h @ p["U"] + jnp.asarray(0.1, jnp.float64))
        return h, h
    return from_function(step, _init)

def as_lstm(forget_bias=0.5):
    """A shipped cell at another setting, under its own name."""
    from gradflow import cells
    return cells.get("lstm", forget_bias=forget_bias)

READY = sin_rnn(0.5)
NOT_A_CELL = 42
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_cells_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_compare_takes_a_cell_at_another_setting_beside_it(capsys):
    """``--cells lstm,lstm:forget_bias=1.0``: the atlas's syntax; ``--option`` applies to
    every named cell, the option written in wins for its cell."""
    rc, out, err = run(capsys, "compare", "--cells", "lstm,lstm:forget_bias=1.0", "--losses",
                       "last", "--wrt", "hidden", "--option", "forget_bias=0.5", *SMALL)
    assert rc == 0, err
    grid = gradflow.load(_written(out, "data:"))
    assert grid.config["cells"] == ["lstm", "lstm:forget_bias=1.0"]
    # what --option set, per column (it said "options forget_bias=0.5", as for every cell)
    assert grid.config["cell_options"] == {"lstm": {"forget_bias": 0.5},
                                           "lstm:forget_bias=1.0": {}}
    assert "options lstm: forget_bias=0.5;" in out
    assert next(l for l in out.splitlines() if l.split()[:2] == ["last", "lstm:forget_bias=1.0"])
    with jax.enable_x64(False):
        for fb, label in ((0.5, "lstm"), (1.0, "lstm:forget_bias=1.0")):
            prob = gradflow.problem(gradflow.cells.get("lstm", forget_bias=fb), layers=2,
                                    steps=3, hidden=8, batch=2)
            ref = gradflow.gradient_map(prob.stack, prob.params, prob.xs, loss="last",
                                        wrt="hidden")
            np.testing.assert_allclose(grid[f"values/last/{label}"], ref.values, rtol=1e-6)


def test_compare_takes_a_cell_with_several_options():
    """``lstm:aux=refine,tied=True`` (Gu et al.'s -R) was split at its comma into a cell named
    'tied=True'; a piece key=value after a cell with options is that cell's next option."""
    from gradflow.cli import cell_list

    assert cell_list("lstm,lstm:ordered=True,aux=refine,tied=True,gru") == [
        "lstm", "lstm:ordered=True,aux=refine,tied=True", "gru"]
    assert cell_list("lstm:aux=refine,tied=True") == ["lstm:aux=refine,tied=True"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown cell 'aux=refine'"):
        cell_list("aux=refine,lstm")


def test_heatmap_and_gates_take_a_cell_written_with_its_options(capsys, tmp_path):
    """``--cell lstm:forget_bias=1.0`` (compare's and the atlas's syntax) is the cell
    ``--cell lstm --option forget_bias=1.0`` builds, in every one-cell command."""
    for command in ("heatmap", "gates"):
        written, spelled = tmp_path / f"{command}_spec.png", tmp_path / f"{command}_opt.png"
        rc, out, err = run(capsys, command, "--cell", "lstm:forget_bias=1.0", *SMALL, "--out",
                           str(written))
        assert rc == 0, err
        rc, out, err = run(capsys, command, "--cell", "lstm", "--option", "forget_bias=1.0",
                           *SMALL, "--out", str(spelled))
        assert rc == 0, err
        a, b = gradflow.load(written.with_suffix(".npz")), gradflow.load(
            spelled.with_suffix(".npz"))
        assert a.config["forget_bias"] == 1.0 and set(a.arrays) == set(b.arrays)
        for key in b.arrays:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_compare_takes_stacks_of_different_cells(capsys, user_module):
    """``compare --cells 'gru,gru*2/star'``: a column written one cell per layer (joined by
    ``/``, its commas separating the columns) is that stack's map, ``--option`` applied to each
    layer; heatmap's ``--cell`` reads the same ``/``; the edges name the column."""
    rc, out, err = run(capsys, "compare", "--cells", "gru,gru*2/star", "--losses", "last",
                       "--wrt", "hidden", "--layers", 3, "--steps", 3, "--hidden", 6,
                       "--batch", 2, "--option", "init=glorot")
    assert rc == 0, err
    grid = gradflow.load(_written(out, "data:"))
    assert grid.config["cells"] == ["gru", "gru*2/star"]
    assert out.startswith("gradflow compare: gru, gru*2/star; 3 layers x 3 steps")
    assert next(l for l in out.splitlines() if l.split()[:2] == ["last", "gru*2/star"])
    with jax.enable_x64(False):
        prob = gradflow.problem([gradflow.cells.get(c, init="glorot")
                                 for c in ("gru", "gru", "star")],
                                layers=3, steps=3, hidden=6, batch=2)
        want = gradflow.gradient_map(prob.stack, prob.params, prob.xs, wrt="hidden")
    np.testing.assert_array_equal(grid["values/last/gru*2/star"], want.values)
    rc, out, err = run(capsys, "heatmap", "--cell", "gru/gru/star", "--init", "glorot",
                       "--layers", 3, "--steps", 3, "--hidden", 6, "--batch", 2, "--wrt",
                       "hidden", "--out", "h.png")
    assert rc == 0, err
    np.testing.assert_array_equal(gradflow.load("h.npz").values, want.values)
    for given, message in (
            ("gru,gru/star", "--cells: gru/star names 2 cells for --layers 3"),
            ("gru,gru/stir/gru", "'gru/stir/gru': expected registered cells joined by /"),
            ("gru,lstm*2/star", "--cells lstm[*]2/star: every layer's cell must carry the same "
                                "states"),
            (f"gru,gru*2/{user_module}:sin_rnn", r"a cell of your own \(module:factory\) is "
                                                 "given alone")):
        rc, out, err = run(capsys, "compare", "--cells", given, "--layers", 3)
        assert rc == 2 and re.search(message, err), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_gains_are_local_gains_and_its_table_their_means(capsys, tmp_path, user_module):
    """``gradflow gains``: the data is ``local_gains`` of the same problem, bit for bit; each
    table row holds that layer's means over the steps (top layer first), the summary their
    geometric means; a stack of different cells works; overflow warns and is counted; a cell
    that couples the examples and a request too large are one line, exit 2."""
    rc, out, err = run(capsys, "gains", "--cell", "gru,star,gru", "--layers", 3, "--steps", 4,
                       "--hidden", 6, "--batch", 2, "--out", tmp_path / "g.png")
    assert rc == 0, err
    assert out.startswith("gradflow gains: gru / star / gru, 3 layers x 4 steps, H=6, B=2")
    got = gradflow.load(tmp_path / "g.npz")
    with jax.enable_x64(False):
        prob = gradflow.problem([gradflow.cells.get(c) for c in ("gru", "star", "gru")],
                                layers=3, steps=4, hidden=6, batch=2)
        want = gradflow.local_gains(prob.stack, prob.params, prob.xs)
    assert set(got.arrays) == set(want.arrays) and len(want.arrays) == 6
    for key in want.arrays:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    lines = out.splitlines()
    assert lines[1].split() == ["layer", "vertical", "rms", "/", "spectral", "temporal", "rms",
                                "/", "spectral", "state", "rms", "/", "spectral"]
    for row, layer in zip(lines[2:5], (2, 1, 0)):
        printed = [float(x) for x in row.split()[1:] if x != "/"]
        assert int(row.split()[0]) == layer
        means = [want[f"{k}_{st}"][layer].mean() for k in ("vertical", "temporal", "state")
                 for st in ("rms", "spectral")]
        np.testing.assert_allclose(printed, means, rtol=5e-3)  # printed to 3 digits
    # the summary: geometric means of the rms rows, up the stack from layer 1, in time over all
    rms = {k: want[f"{k}_rms"].mean(axis=1) for k in ("vertical", "temporal", "state")}
    assert lines[5].startswith("  up the stack: x") and lines[6].startswith("  back in time: x")
    printed = [float(x) for line in lines[5:7] for x in re.findall(r"x([\d.]+)", line)]
    np.testing.assert_allclose(printed, [np.exp(np.log(rms["vertical"][1:]).mean()),
                                           np.exp(np.log(rms["temporal"]).mean()),
                                           np.exp(np.log(rms["state"]).mean())], rtol=5e-3)
    # --no-spectral: the rms gains alone (local_gains(spectral=False)), three columns
    rc, out, err = run(capsys, "gains", "--cell", "gru,star,gru", "--layers", 3, "--steps", 4,
                       "--hidden", 6, "--batch", 2, "--no-spectral", "--out", tmp_path / "r.png")
    assert rc == 0, err
    rms = gradflow.load(tmp_path / "r.npz")
    assert sorted(rms.arrays) == ["state_rms", "temporal_rms", "vertical_rms"]
    assert rms.config["spectral"] is False and got.config["spectral"] is True
    for key in rms.arrays:
        np.testing.assert_array_equal(rms[key], want[key], err_msg=key)
    lines = out.splitlines()
    assert lines[1].split() == ["layer", "vertical", "rms", "temporal", "rms", "state", "rms"]
    printed = [float(x) for x in lines[4].split()[1:]]  # layer 0
    np.testing.assert_allclose(printed, [want[f"{k}_rms"][0].mean() for k in
                                         ("vertical", "temporal", "state")], rtol=5e-3)
    # overflow is data: a warning, the gains of the finite steps, the non-finite ones counted
    rc, out, err = run(capsys, "gains", "--cell", "indrnn", "--option", "u_max=3", "--layers", 2,
                       "--steps", 120, "--hidden", 4, "--batch", 2, "--out", tmp_path / "o.png")
    assert rc == 0 and err.startswith("gradflow gains: warning: local_gains: the states are "
                                      "not finite"), err
    nonfinite = gradflow.load(tmp_path / "o.npz").total_nonfinite
    assert nonfinite > 0 and f"non-finite: {nonfinite} entries" in out.splitlines()
    for argv, message in (
            (("--cell", f"{user_module}:mixing_rnn"), "couples the examples of a batch"),
            (("--hidden", 512, "--batch", 10 ** 6),
             r"\(lstm, 2 layers x 32 steps, H=512, batch 1000000, float32, local gains\) needs "
             r"about .*; --batch \d+ fits")):
        rc, out, err = run(capsys, "gains", *argv, "--layers", 2)
        assert rc == 2 and re.search(message, err), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_compare_takes_a_users_cell_by_import_path(capsys, user_module):
    rc, out, err = run(capsys, "compare", "--cells", f"rnn,{user_module}:sin_rnn", "--losses",
                       "all", "--wrt", "hidden", *SMALL)
    assert rc == 0, err
    grid = gradflow.load(_written(out, "data:"))
    assert grid.config["cells"] == ["rnn", "sin_rnn"]
    assert next(l for l in out.splitlines() if l.split()[:2] == ["all", "sin_rnn"])
    with jax.enable_x64(False):
        prob = gradflow.problem(sys.modules[user_module].sin_rnn(), layers=2, steps=3, hidden=8,
                                batch=2)
        ref = gradflow.gradient_map(prob.stack, prob.params, prob.xs, loss="all", wrt="hidden")
    np.testing.assert_allclose(grid["values/all/sin_rnn"], ref.values, rtol=1e-6)
    # two cells of one name (READY is a sin_rnn too; a factory returning a shipped lstm):
    # labelled by their --cells text (they were refused, the README's "lstm,mycells:my_lstm"
    # among them), the same text twice refused in one line
    rc, out, err = run(capsys, "compare", "--cells",
                       f"{user_module}:sin_rnn,{user_module}:READY,lstm,{user_module}:as_lstm",
                       "--losses", "last", *SMALL)
    assert rc == 0, err
    maps = gradflow.load(_written(out, "data:")).config["maps"]
    assert sorted(maps) == sorted(f"last/{c}" for c in (
        f"{user_module}:sin_rnn", f"{user_module}:READY", "lstm", f"{user_module}:as_lstm"))
    assert maps[f"last/{user_module}:as_lstm"]["forget_bias"] == 0.5
    rc, out, err = run(capsys, "compare", "--cells",
                       f"{user_module}:READY,{user_module}:READY", *SMALL)
    assert rc == 2 and "cells repeated" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # by name in the default file name where it is a shipped cell's: it wrote over lstm's
    for c in ("lstm", f"{user_module}:as_lstm"):
        rc, out, err = run(capsys, "heatmap", "--cell", c, *SMALL)
        assert rc == 0, err
    names = sorted(p.name for p in Path("gradflow-out").glob("heatmap_*.npz"))
    assert names == ["heatmap_lstm_L2_T3_H8_B2.npz",
                     f"heatmap_{user_module}-as_lstm_L2_T3_H8_B2.npz"], names
    rc, out, err = run(capsys, "heatmap", "--cell", f"{user_module}:as_lstm", "--option",
                       "forget_bias=3", *SMALL, "--no-data")
    assert rc == 0 and out.splitlines()[0].endswith("; options forget_bias=3"), out  # (once, as
    # typed: not again as the shipped cell's 3.0)


def test_heatmap_of_a_users_cell_factory_by_import_path(capsys, user_module):
    rc, out, err = run(capsys, "heatmap", "--cell", f"{user_module}:sin_rnn", "--option",
                       "gain=0.7", *SMALL)
    assert rc == 0, err
    npz = _written(out, "data:")
    assert npz.name == "heatmap_sin_rnn_L2_T3_H8_B2_gain0.7.npz"
    res = gradflow.load(npz)
    assert res.config["cell"] == "sin_rnn" and res.config["gain"] == 0.7
    # how the command built the cell, to build it again
    assert res.config["factory"] == f"{user_module}:sin_rnn"
    assert res.config["factory_options"] == [["gain", 0.7]]
    # top-last entry from jax.grad of the readout on a Python loop of the user's step
    cell = sys.modules[user_module].sin_rnn(gain=0.7)
    with jax.enable_x64(False):
        prob = gradflow.problem(cell, layers=2, steps=3, hidden=8, batch=2)
        x = prob.xs
        for p in prob.params["layers"]:
            state, hs = cell.initial_state((2,), 8), []
            for t in range(3):
                state, h, _ = cell.step(p, state, x[:, t], t)
                hs.append(h)
            x = jnp.stack(hs, axis=1)
        g = jax.grad(readout_loss("last", 8, 3, 2, seed=0, dtype=jnp.float32))(x)
    expect = float(np.mean(np.linalg.norm(np.asarray(g)[:, -1], axis=-1)))
    np.testing.assert_allclose(res.values[-1, -1], expect, rtol=1e-5)
    # a Cell object (not a factory) by path
    rc, out, err = run(capsys, "heatmap", "--cell", f"{user_module}:READY", *SMALL, "--no-data")
    assert rc == 0, err and "sin_rnn" in out.splitlines()[0]


@pytest.mark.parametrize("spec, expect", [
    ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("{mod}:missing", "has no attribute 'missing'"),
    ("{mod}:NOT_A_CELL", "gave an object of type int, not a gradflow Cell"),
    ("{mod}:sin_rnn --option nope=1", "calling it raised TypeError"),
    ("{mod}:READY --option gain=2", "is a Cell, not a factory"),
])
def test_a_bad_cell_path_is_one_line_exit_2(capsys, user_module, spec, expect):
    spec, *extra = spec.format(mod=user_module).split()
    rc, out, err = run(capsys, "heatmap", "--cell", spec, *extra, *SMALL)
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert expect in err and "Traceback" not in err


def test_residual_and_norm_reach_the_stack(capsys):
    rc, out, err = run(capsys, "heatmap", "--cell", "lstm", *SMALL, "--residual", "--norm",
                       "layer")
    assert rc == 0, err
    res = gradflow.load(_written(out, "data:"))
    assert (res.config["residual"], res.config["norm"]) == (True, "layer")
    with jax.enable_x64(False):
        prob = gradflow.problem("lstm", layers=2, steps=3, hidden=8, batch=2,
                                stack_options={"residual": True, "norm": "layer"})
        assert "norm" in prob.params
        ref = gradflow.gradient_map(prob.stack, prob.params, prob.xs).values
        plain = gradflow.problem("lstm", layers=2, steps=3, hidden=8, batch=2)
        plain = gradflow.gradient_map(plain.stack, plain.params, plain.xs).values
    np.testing.assert_array_equal(res.values, ref)
    assert not np.allclose(res.values, plain)


# --- errors: internal errors apart from bad input, Ctrl-C, missing extras -----------------------


def test_a_bug_inside_gradflow_is_an_internal_error_not_bad_input(capsys, monkeypatch):
    from gradflow import jacobian

    def broken(*args, **kwargs):
        raise ValueError("boom")  # a ValueError, but not from a check of the user's input

    monkeypatch.setattr(jacobian, "gradient_map", broken)
    rc, out, err = run(capsys, "heatmap", *SMALL, "--no-data")
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "internal error: ValueError: boom" in err and "--debug" in err
    rc, out, err = run(capsys, "heatmap", *SMALL, "--no-data", "--debug")
    assert rc == 1 and "Traceback" in err and "ValueError: boom" in err
    rc, out, err = run(capsys, "heatmap", *SMALL, "--no-data", "--deb")  # (argparse's too)
    assert rc == 1 and "Traceback" in err and "ValueError: boom" in err


def test_edges_of_less_used_commands(capsys, tmp_path):
    """A dict as a gate list, a device count no machine needs, an atlas whose output name is a
    folder (found before the grid is measured, not after), and a redraw whose config is not
    its data's: one line each, exit 2."""
    rc, _, err = run(capsys, "heatmap", *SMALL, "--no-data", "--option", 'refined={"i": 1}')
    assert rc == 2 and "option refined={'i': 1} is not valid; give a gate name" in err
    rc, _, err = run(capsys, "--devices", "4000", "cells")
    assert rc == 2 and "4000 devices: at most" in err
    (tmp_path / "atlas.json").mkdir()
    rc, _, err = run(capsys, "atlas", "--cells", "rnn", "--hidden", "4", "--batch", "2",
                     "--sizes", "2x3", "--seeds", "0", "--out", tmp_path, "--no-progress")
    assert rc == 2 and "atlas.json': it is a directory" in err
    assert not (tmp_path / "atlas.npz").exists()
    import json

    from gradflow import reproduce

    config = json.loads((reproduce.CONFIG_DIR / "star_fig2.json").read_text())
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "star_fig2.json").write_text(json.dumps({**config, "hidden": 8}))
    rc, _, err = run(capsys, "reproduce", "--figures", tmp_path / "figs", "--redraw", "--only",
                     "star_fig2", "--out", tmp_path)
    assert rc == 2 and "its committed data was computed with other settings than its config " \
        "holds (hidden; hidden: the data's 128, the config's 8)" in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("where", ["--out", "--data", "pdf"])
def test_a_full_disk_is_the_machines_not_a_bug_in_gradflow(capsys, where):
    """An output the disk will not take is an unwritable path (one line, exit 2), not an
    internal error: the figure or the data written onto /dev/full (ENOSPC); a PDF too
    (matplotlib's PDF writer raised AttributeError closing the stream, its OSError inside)."""
    full = Path({"--out": "full.png", "--data": "full.npz", "pdf": "full.pdf"}[where])
    full.symlink_to("/dev/full")
    paths = {"--out": "ok.png", "--data": "ok.npz",
             "--out" if where == "pdf" else where: str(full)}
    rc, out, err = run(capsys, "heatmap", *SMALL, *[a for kv in paths.items() for a in kv])
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err == (f"gradflow heatmap: error: cannot write {str(full)!r}: "
                   f"{os.strerror(errno.ENOSPC)}\n")


def test_an_os_error_of_the_machine_is_not_a_bug_in_gradflow(capsys, monkeypatch):
    """An OSError of the environment that reaches the command line unwrapped (a quota, an
    I/O error) is one line and exit 2 too; other OSErrors stay internal errors."""
    from gradflow import plot

    def over_quota(fig, path, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(path))

    monkeypatch.setattr(plot, "save", over_quota)
    rc, out, err = run(capsys, "heatmap", *SMALL, "--no-data")
    assert rc == 2 and err == (f"gradflow heatmap: error: 'gradflow-out/heatmap_lstm_L2_T3_H8"
                               f"_B2.png': {os.strerror(errno.EDQUOT)}\n"), err

    def a_bug(fig, path, **kwargs):  # (a ValueError without an OSError behind it: a bug)
        raise ValueError(f"cannot write {str(path)!r}: boom")

    monkeypatch.setattr(plot, "save", a_bug)
    rc, out, err = run(capsys, "heatmap", *SMALL, "--no-data")
    assert rc == 1 and "internal error: ValueError: cannot write" in err, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("args", ["--help", "--version", "heatmap --help"])
def test_help_onto_a_full_disk_says_so(args):
    """argparse drops the OSError of writing its help or version: ``gradflow --help >
    /dev/full`` exited 0 with nothing written. Now one line and exit 2, as any output."""
    script = str(Path(sys.executable).parent / "gradflow")
    r = subprocess.run(["bash", "-c", f"'{script}' {args} > /dev/full"], stderr=subprocess.PIPE,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.endswith(f"error: {os.strerror(errno.ENOSPC)}\n"), \
        (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1


def test_a_program_started_with_stdout_closed_runs():
    """``gradflow cells >&-``: Python's sys.stdout is None; the reader-gone wrapper failed on
    it (an internal error, status 1)."""
    script = str(Path(sys.executable).parent / "gradflow")
    r = subprocess.run(["bash", "-c", f"exec '{script}' cells >&-"], stderr=subprocess.PIPE,
                       text=True, timeout=300)  # (no preexec_fn: a fork of a JAX process)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def _closed_stdout_child(env):
    """The gradflow program writing to a reader that goes away: ``train`` after its header
    line (mid-table), ``cells`` before its first line."""
    script = str(Path(sys.executable).parent / "gradflow")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, got = os.path.join(tmp, "run"), []
        for argv, lines in ((["train", "--task", "adding", "--seq-len", "4", "--layers", "1",
                              "--hidden", "4", "--batch", "4", "--eval-batch", "4", "--steps",
                              "2", "--record", "0,2", "--out", run_dir], 1), (["cells"], 0)):
            with tempfile.TemporaryFile("w+") as err:
                proc = subprocess.Popen([script, *argv], stdout=subprocess.PIPE, stderr=err,
                                        env=env)
                for _ in range(lines):
                    proc.stdout.readline()
                proc.stdout.close()
                rc = proc.wait(timeout=300)
                err.seek(0)
                got.append((rc, err.read()))
        return got, sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []


@pytest.mark.background(job=_closed_stdout_child)  # its work is fresh processes
def test_a_closed_stdout_stops_the_printing_not_the_files(background, capsys, monkeypatch):
    """``gradflow train ... | head -1``: the maps and figures are all written, the printing
    stops without a traceback, and the status is 141 (as a program ended by SIGPIPE; 1 is an
    internal error here); in-process, a BrokenPipeError the same."""
    (train_run, cells), files = background
    for rc, err in (train_run, cells):
        assert rc == cli.CLOSED_STDOUT == 141, err
        assert "Traceback" not in err and "Error" not in err and "error" not in err, err
    assert {"curve.npz", "curve.png", "map_step000000.npz", "map_step000002.npz",
            "maps.png", "state.npz"} <= set(files), files

    from gradflow import jacobian

    def closed(*args, **kwargs):
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    monkeypatch.setattr(jacobian, "gradient_map", closed)
    rc, out, err = run(capsys, "heatmap", *SMALL, "--no-data")
    assert rc == 141 and err == "", err


def test_ctrl_c_is_one_line_exit_130(capsys, monkeypatch):
    from gradflow import jacobian

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jacobian, "gradient_map", interrupted)
    rc, out, err = run(capsys, "heatmap", *SMALL, "--no-data")
    assert rc == 130 and err == "gradflow heatmap: interrupted\n"


def _interrupted_child(env):
    code = ("import os, signal, sys, threading\n"
            "from gradflow import cli\n"
            "sys.argv = ['gradflow', 'heatmap', '--cell', 'lstm', '--layers', '32', '--steps', "
            "'3000', '--hidden', '128', '--no-data', '--out', sys.argv[1]]\n"
            "threading.Timer(4.0, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
            "raise SystemExit(cli.main())\n")
    with tempfile.TemporaryDirectory() as tmp:
        return subprocess.run([sys.executable, "-c", code, os.path.join(tmp, "x.png")],
                              capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.background(job=_interrupted_child)  # its work is a fresh process
def test_ctrl_c_ends_the_program_at_once_with_130(background):
    """The gradflow program itself, interrupted while it compiles and runs a large map: one
    line and status 130 (a KeyboardInterrupt was swallowed in XLA's gc callback, or crashed
    the process at shutdown with XLA's threads running)."""
    proc = background
    assert proc.returncode == 130, proc.stderr[-500:]
    # (after progress lines; it names the command once parsed: "gradflow heatmap: ...")
    assert re.search(r"(^|\n)gradflow( heatmap)?: interrupted\n\Z", proc.stderr)
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("argv,message", [
    (["heatmap", "--cell", "gru", "--wrt", "cell"], "cell 'gru' has only h"),
    (["compare", "--cells", "lstm,gru", "--wrt", "cell"], "cell 'gru' has only h"),
    (["heatmap", "--cell", "gru", "--out", "x.txt"], "unsupported figure extension"),
    (["gates", "--cell", "lstm", "--data", "x.png"], "unsupported data extension"),
])
def test_a_dry_run_refuses_what_the_run_refuses_and_neither_leaves_a_folder(capsys, argv,
                                                                            message):
    for extra in (["--dry-run"], []):
        rc, out, err = run(capsys, *argv, *SMALL, *extra)
        assert rc == 2 and message in err and err.count("\n") == 1, (extra, err)
        assert out == "" and not Path("gradflow-out").exists()


def test_train_refuses_a_recorded_wrt_the_cell_lacks_before_training(capsys):
    rc, out, err = run(capsys, "train", "--cell", "gru", "--task", "adding", "--layers", "2",
                       "--hidden", "8", "--steps", "30", "--batch", "8", "--wrt", "cell",
                       "--record", "30", "--out", "run")
    assert rc == 2 and "cell 'gru' has only h" in err and out == ""
    assert not Path("run").exists()


def test_digits_without_scikit_learn_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    rc, out, err = run(capsys, "train", "--task", "digits", "--steps", "1", "--out", "d")
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert "pip install 'gradflow[digits]'" in err and "Traceback" not in err


def test_train_a_users_cell_and_measure_its_trained_params(capsys, user_module):
    """`train --cell module:factory` saves the run; `heatmap --params` needs the cell again
    (it cannot be rebuilt from its name) and then gives the map recorded at the last step."""
    rc, out, err = run(capsys, "train", "--cell", f"{user_module}:sin_rnn", "--option",
                       "gain=0.9", "--layers", "2", "--hidden", "4", "--seq-len", "4",
                       "--steps", "2", "--batch", "2", "--eval-batch", "4", "--record", "2",
                       "--record-batch", "3", "--out", "run")
    assert rc == 0, err
    assert f"gradflow heatmap --params run --cell {user_module}:sin_rnn\n" in out  # (it said
    # --params run alone, which is refused)
    rc, out, err = run(capsys, "heatmap", "--params", "run", "--batch", "3")
    assert rc == 2 and "'sin_rnn' is not a registered cell: give the factory that built it, " \
        f"--cell {user_module}:sin_rnn" in err
    recorded = gradflow.load("run/map_step000002.npz")
    assert recorded.config["factory"] == f"{user_module}:sin_rnn"  # how the run built it
    assert recorded.config["factory_options"] == [["gain", 0.9]]
    for options in (["--option", "gain=0.9"], []):  # not given: the run's (it measured the
        # factory's default gain 1.0 on the trained weights, without a word)
        rc, out, err = run(capsys, "heatmap", "--params", "run", "--batch", "3", "--cell",
                           f"{user_module}:sin_rnn", *options)
        assert rc == 0, err
        measured = gradflow.load(_written(out, "data:"))
        np.testing.assert_array_equal(measured.values, recorded.values)
        assert measured.config["factory_options"] == [["gain", 0.9]]
    # given otherwise: another network on the trained weights, refused (so is its resume)
    rc, out, err = run(capsys, "heatmap", "--params", "run", "--batch", "3", "--cell",
                       f"{user_module}:sin_rnn", "--option", "gain=0.5")
    assert rc == 2 and (f"the saved stack's cell was built by {user_module}:sin_rnn(gain=0.9), "
                        f"the cell given by {user_module}:sin_rnn(gain=0.5): give the cell it "
                        "was saved with") in err, err
    rc, out, err = run(capsys, "train", "--cell", f"{user_module}:sin_rnn", "--option",
                       "gain=0.5", "--layers", "2", "--hidden", "4", "--seq-len", "4",
                       "--steps", "3", "--batch", "2", "--eval-batch", "4", "--record", "2",
                       "--record-batch", "3", "--out", "run", "--resume")
    assert rc == 2 and "--cell, --option (factory_options: the run's [[\"gain\", 0.9]], now " \
        "[[\"gain\", 0.5]])" in err, err
    # another cell whose parameters fit is refused (it measured that cell without a word)
    rc, out, err = run(capsys, "heatmap", "--params", "run", "--batch", "3", "--cell",
                       f"{user_module}:mixing_rnn")
    assert rc == 2 and ("the saved stack's cell is 'sin_rnn', the given cell is 'mixing_rnn'"
                        in err), err
    # compare takes no --cell with --params: it names the command that measures such a run
    shutil.copytree("run", "run2")
    rc, out, err = run(capsys, "compare", "--params", "run,run2")
    assert rc == 2 and ("gradflow compare cannot rebuild it: gradflow heatmap --params "
                        f"run --cell {user_module}:sin_rnn measures it") in err, err


def test_an_error_in_a_users_cell_code_is_theirs(capsys, user_module):
    """The user's init failing (a file it reads is not there) and the adapter's check of the
    user's step (a readout inside the cell): one line, status 2; they were "internal error
    ... a bug in gradflow", status 1. A bug in gradflow stays one (the test above)."""
    rc, out, err = run(capsys, "heatmap", "--cell", f"{user_module}:from_file", *SMALL)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(r"gradflow heatmap: error: your cell's code raised FileNotFoundError: .*"
                     rf"pretrained.npz.* \({user_module}.py, line \d+, in init\)$", err), err
    for command in ("heatmap", "gains"):
        rc, out, err = run(capsys, command, "--cell", f"{user_module}:readout_inside", *SMALL)
        assert rc == 2 and "y must be the carry's output h" in err, err
    # an import's own frames (<frozen importlib._bootstrap>) are no file of theirs: a second
    # module of theirs that does not compile is named by Python's message alone
    (Path(sys.modules[user_module].__file__).parent / f"{user_module}_syntax.py").write_text(
        "def make(:\n")
    rc, out, err = run(capsys, "compare", "--cells", f"{user_module}:sin_rnn,"
                       f"{user_module}_syntax:make", *SMALL)
    assert rc == 2 and "SyntaxError" in err and "<frozen" not in err, err
    # a ValueError/TypeError of theirs, which gradflow's checks report as input: their line too
    # (it said JAX's or their message alone)
    for factory, said in (("bad_shapes", "dot_general requires contracting dimensions"),
                          ("own_check", "failed: my own check failed")):
        rc, out, err = run(capsys, "heatmap", "--cell", f"{user_module}:{factory}", *SMALL)
        assert rc == 2 and err.count("\n") == 1 and said in err, err
        assert re.search(rf"\({user_module}.py, line \d+, in (init|step)\)$", err), err
    # in a helper module of theirs beside it (only the module --cell names was theirs)
    folder = Path(sys.modules[user_module].__file__).parent
    (folder / f"{user_module}_helpers.py").write_text(
        "def init(key, input_size, hidden_size, dtype):\n    return {}['W']\n")
    (folder / f"{user_module}_uses.py").write_text(
        f"from {user_module}_helpers import init\nfrom {user_module} import sin_rnn\n"
        "from gradflow.cells import Cell\n\ndef cell():\n"
        "    return Cell(name='uses', init_fn=init, recur_fn=sin_rnn().recur_fn)\n")
    try:
        rc, out, err = run(capsys, "heatmap", "--cell", f"{user_module}_uses:cell", *SMALL)
    finally:
        for name in ("_helpers", "_uses"):
            sys.modules.pop(user_module + name, None)
    assert rc == 2 and (f"your cell's code raised KeyError: 'W' ({user_module}_helpers.py, "
                        "line 2, in init)") in err, err
    # gradflow's own module named as a user's is never counted as their code
    from gradflow import cli
    from gradflow.cells import lstm

    before = set(cli.USER_CODE)
    cli._add_user_code(lstm)
    assert cli.USER_CODE == before
    rc, out, err = run(capsys, "compare", "--cells", f"rnn,{user_module}:sin_rnn", "--losses",
                       "last", *SMALL)
    assert rc == 0, err
    maps = gradflow.load(_written(out, "data:")).config["maps"]
    assert maps["last/sin_rnn"]["factory"] == f"{user_module}:sin_rnn"
    assert "factory" not in maps["last/rnn"]


def test_heatmap_of_params_saved_with_save_params(capsys, tmp_path):
    """A params file (not a training run): the saved stack and weights, on the Gaussian inputs
    a fresh problem of that stack draws from --seed."""
    from gradflow import runs

    with jax.enable_x64(False):
        stack = gradflow.Stack("gru", layers=2, input_size=3, hidden_size=8, residual=True)
        params = jax.tree_util.tree_map(lambda a: 1.5 * a, stack.init(jax.random.key(7)))
        runs.save_params(tmp_path / "mine.npz", stack, params)
        xs = gradflow.problem("gru", layers=2, steps=3, hidden=8, batch=2, input_size=3, seed=4,
                              stack_options={"residual": True}).xs
        expect = gradflow.gradient_map(stack, params, xs).values
    rc, out, err = run(capsys, "heatmap", "--params", tmp_path / "mine.npz", "--steps", "3",
                       "--batch", "2", "--seed", "4")
    assert rc == 0, err
    npz = _written(out, "data:")
    assert npz.name == "heatmap_gru_L2_mine_T3_B2_s4.npz"
    np.testing.assert_array_equal(gradflow.load(npz).values, expect)
    # the weights measured, told apart from others saved under the file's name: their bytes
    # in the order of the tree's leaves
    leaves = jax.tree_util.tree_leaves(params)
    assert gradflow.load(npz).config["params_fingerprint"] == "sha256:" + hashlib.sha256(
        b"".join(np.asarray(a).tobytes() for a in leaves)).hexdigest()[:16]


def test_heatmap_of_a_saved_stack_with_a_cell_per_layer(capsys, tmp_path):
    """Its config holds the cells' options layer by layer (a list): the figure's title reads
    only a grid's options keyed by cell (it failed on the list)."""
    from gradflow import runs

    with jax.enable_x64(False):
        stack = gradflow.Stack([gradflow.cells.get("gru"), gradflow.cells.get("star")],
                               layers=2, input_size=3, hidden_size=8, norm="rms")
        params = stack.init(jax.random.key(0))
        runs.save_params(tmp_path / "mixed.npz", stack, params)
        xs = gradflow.problem(list(stack.cells), layers=2, steps=3, hidden=8, batch=2,
                              input_size=3, seed=0, stack_options={"norm": "rms"}).xs
        expect = gradflow.gradient_map(stack, params, xs).values
    rc, out, err = run(capsys, "heatmap", "--params", tmp_path / "mixed.npz", "--steps", "3",
                       "--batch", "2")
    assert rc == 0, err
    np.testing.assert_array_equal(gradflow.load(_written(out, "data:")).values, expect)


def test_a_ratio_near_one_prints_no_negative_zero_decades():
    assert cli._ratio(0.99, 1.0) == "x0.99 (+0.0 dec)"  # log10 = -0.004 rounds to 0.0
    assert cli._ratio(0.5, 1.0) == "x0.5 (-0.3 dec)" and cli._ratio(0.0, 1.0) == "n/a"


# --- the summaries' marginals from where the loss enters (NumPy loops over the map) ------------


def _loop_factor(path):
    """Geometric-mean factor per step along ``path`` (``path[0]`` the entry), by a plain loop
    over the step-to-step ratios (not the telescoped product the CLI forms)."""
    logs = [np.log(path[i + 1] / path[i]) for i in range(len(path) - 1)]
    return float(np.exp(sum(logs) / len(logs)))


def _after(out: str, label: str, word: str) -> float:
    """The number after ``word`` (e.g. ``"x"``) on the line holding ``label``."""
    line = next(l for l in out.splitlines() if label in l)
    return float(line.split(label, 1)[1].split(word, 1)[1].split()[0])


def test_heatmap_gives_the_marginals_from_where_the_loss_enters(capsys):
    """Down the last step's column (G[l, T-1] / G[L-1, T-1], factor per layer) and back along
    the top layer (G[L-1, t] / G[L-1, T-1], factor per step), against NumPy loops; the
    time-averaged column is labelled as such."""
    rc, out, err = run(capsys, "heatmap", "--cell", "lstm", "--layers", "5", "--steps", "4",
                       "--hidden", "8", "--batch", "2")
    assert rc == 0, err
    v = gradflow.load(_written(out, "data:")).values.astype(float)
    L, T = v.shape
    assert "from where the loss enters: layer 4, t 3 (top layer, last step)" in out
    np.testing.assert_allclose(_after(out, "down the last step (t 3):", "x"),
                               _loop_factor([v[l, T - 1] for l in range(L - 1, -1, -1)]),
                               rtol=5e-3)
    np.testing.assert_allclose(_after(out, "down the last step (t 3):", "bottom/top x"),
                               v[0, T - 1] / v[L - 1, T - 1], rtol=5e-3)
    np.testing.assert_allclose(_after(out, "back along the top layer:", "x"),
                               _loop_factor([v[L - 1, t] for t in range(T - 1, -1, -1)]),
                               rtol=5e-3)
    assert "time-averaged: includes the diagonal paths, not a per-layer gain" in out
    for l in range(L):
        line = next(x for x in out.splitlines() if x.strip().startswith(f"layer {l:>3}"))
        at_last, mean = (float(p.split(" x", 1)[1].split()[0]) for p in line.split("|"))
        np.testing.assert_allclose(at_last, v[l, T - 1] / v[L - 1, T - 1], rtol=5e-3)
        np.testing.assert_allclose(mean, np.mean(v[l]) / np.mean(v[L - 1]), rtol=5e-3)


def test_heatmap_marginals_of_a_16_layer_lstm_are_the_readmes(capsys):
    """README (CLI): x0.249 per layer down the last step, x0.646 per step back along the top
    layer, x0.507 for the time-averaged ratio of the layer below the top."""
    rc, out, err = run(capsys, "heatmap", "--cell", "lstm", "--layers", "16", "--steps", "16",
                       "--hidden", "32", "--batch", "8")
    assert rc == 0, err
    assert "down the last step (t 15): x0.249 per layer" in out
    assert "back along the top layer:  x0.646 per step" in out
    assert "| " in out and "x0.507 (-0.3 dec)" in out.split("layer  14", 1)[1].splitlines()[0]


def test_heatmap_marginals_under_the_sequence_loss_and_for_the_memory(capsys):
    """Loss all: the top row gets no per-step factor (the loss enters at every step); wrt c:
    the column is the last step c reaches (T-2), its factor from a NumPy loop."""
    rc, out, err = run(capsys, "heatmap", "--cell", "lstm", "--layers", "3", "--steps", "4",
                       "--hidden", "8", "--batch", "2", "--loss", "all", "--wrt", "cell")
    assert rc == 0, err
    v = gradflow.load(_written(out, "data:")).values.astype(float)
    assert (v[:, -1] == 0).all()
    assert "layer 2, t 2 (top layer, the last step c reaches it; c at t 3 is 0" in out
    assert "loss all also enters at every earlier step" in out
    row = next(l for l in out.splitlines() if "back along the top layer:" in l)
    assert "per step" not in row and "not a per-step decay" in row
    np.testing.assert_allclose(_after(out, "down step t 2:", "x"),
                               _loop_factor([v[l, 2] for l in (2, 1, 0)]), rtol=5e-3)
    np.testing.assert_allclose(_after(out, "back along the top layer:", "first/last x"),
                               v[2, 0] / v[2, 2], rtol=5e-3)


def test_map_summary_prints_zeros_and_non_finite_entries_as_data():
    G = np.array([[np.nan, 0.0, 0.0], [0.5, 0.0, 0.0], [0.3, 0.5, 1.0]])
    text = "\n".join(cli.map_summary(G))
    assert "down the last step (t 2): x0 per layer (layer 1: 0, underflow); bottom/top " \
           "x0 (-inf dec)" in text
    np.testing.assert_allclose(_after(text, "back along the top layer:", "x"),
                               _loop_factor([1.0, 0.5, 0.3]), rtol=5e-3)
    assert "non-finite entries: 1 of 9 (nan at (layer 0, t 0))" in text
    assert "underflow entries: 4 of 9" in text
    assert "no ratios" in "\n".join(cli.map_summary(np.full((2, 2), np.nan)))
    # an exploded entry: where it is, and the means and range said to be of the finite ones
    G = np.array([[np.inf, 2.0, 1e30], [1.0, 1.0, 1.0]])
    text = "\n".join(cli.map_summary(G))
    assert "non-finite entries: 1 of 6 (inf at (layer 0, t 0))" in text
    assert "mean over time of the finite entries" in text
    assert "range of the finite entries: max 1e+30 at (layer 0, t 2)" in text
    assert "mean over time (" in "\n".join(cli.map_summary(np.ones((2, 3))))


def test_compare_range_of_an_underflowed_map_reads_minus_inf(capsys):
    """refined_lstm's state underflows to exactly 0 below the top: its range is -inf, never
    "+0.0 .. +0.0"; lstm's range and per-layer factor equal NumPy loops over its map."""
    from gradflow import experiments

    rc, out, err = run(capsys, "compare", "--cells", "lstm,refined_lstm", "--losses", "last",
                       "--wrt", "hidden", "--layers", "16", "--steps", "3", "--hidden", "8",
                       "--batch", "2")
    assert rc == 0, err
    grid = gradflow.load(_written(out, "data:"))
    rows = {l.split()[1]: l for l in out.splitlines() if l.split()[:1] == ["last"]}
    r = experiments.panel(grid, "last", "refined_lstm").values.astype(float)
    assert (r[:-1] == 0).all()  # the underflow this test is about
    assert "-inf .. +0.0" in rows["refined_lstm"] and "x0 (-inf dec)" in rows["refined_lstm"]
    v = experiments.panel(grid, "last", "lstm").values.astype(float)
    logs = [np.log10(v[l, t] / v[-1, -1]) for l in range(v.shape[0]) for t in range(v.shape[1])]
    assert f"{round(min(logs), 1) + 0.0:+.1f} .. {round(max(logs), 1) + 0.0:+.1f}" in rows["lstm"]
    factor = float(rows["lstm"].split("dec)")[1].split()[0].lstrip("x"))
    np.testing.assert_allclose(factor, _loop_factor(v[::-1, -1]), rtol=5e-3)


def test_gates_and_heatmap_of_trained_params_say_trained_in_header_and_title(capsys,
                                                                            monkeypatch):
    from gradflow import plot

    titles = []
    save = plot.save
    monkeypatch.setattr(plot, "save", lambda fig, path: titles.append(
        (fig._suptitle.get_text() if fig._suptitle else "") + "|" + fig.axes[0].get_title())
        or save(fig, path))
    rc, out, err = run(capsys, "train", "--task", "adding", "--seq-len", "4", "--cell", "lstm",
                       "--layers", "2", "--hidden", "4", "--steps", "2", "--batch", "2",
                       "--eval-batch", "4", "--record", "2", "--record-batch", "2",
                       "--out", "run")
    assert rc == 0, err
    Path("figs").mkdir()
    for command in ("gates", "heatmap"):
        titles.clear()
        rc, out, err = run(capsys, command, "--params", "run", "--out", "figs")
        assert rc == 0, err
        assert "trained (step 2 of run)" in out.splitlines()[0]
        assert "init orthogonal" not in out.splitlines()[0]
        assert any("trained (step 2 of run)" in t and "init " not in t for t in titles), titles
        assert _written(out, "figure:").parent == Path("figs")


def test_out_names_an_existing_folder_for_the_default_file_name(capsys):
    Path("figs").mkdir()
    rc, out, err = run(capsys, "heatmap", "--cell", "lstm", *SMALL, "--out", "figs")
    assert rc == 0, err
    assert _written(out, "figure:") == Path("figs/heatmap_lstm_L2_T3_H8_B2.png")
    assert _written(out, "data:") == Path("figs/heatmap_lstm_L2_T3_H8_B2.npz")


def test_heatmap_and_gates_of_one_cell_per_layer(capsys, tmp_path, user_module):
    """``--cell gru,star,gru`` (one cell per layer, as ``--hidden 8,6,6`` one width per layer)
    measures the stack of those cells: the API's numbers, the title's cells bottom up, the
    layers without a gate shown as ``-`` and not counted as non-finite."""
    rc, out, err = run(capsys, "heatmap", "--cell", "gru,star,gru", "--layers", 3, "--steps", 4,
                       "--hidden", 6, "--batch", 2, "--out", tmp_path / "map.png")
    assert rc == 0, err
    assert out.startswith("gradflow heatmap: gru / star / gru, 3 layers x 4 steps, H=6, B=2, "
                          "seed 0, init orthogonal,")
    got = gradflow.load(tmp_path / "map.npz")
    assert got.config["cell"] == ["gru", "star", "gru"]
    with jax.enable_x64(False):
        prob = gradflow.problem([gradflow.cells.get(c) for c in ("gru", "star", "gru")],
                                layers=3, steps=4, hidden=6, batch=2)
        want = gradflow.gradient_map(prob.stack, prob.params, prob.xs)
    np.testing.assert_array_equal(got.values, want.values)
    # one cell N times is that cell's stack (*1 too)
    for spec, n in (("star*3", 3), ("star*1", 1)):
        rc, out, err = run(capsys, "heatmap", "--cell", spec, "--layers", n, "--steps", 4,
                           "--hidden", 6, "--batch", 2, "--out", tmp_path / f"{n}.png")
        layers = f"{n} layer{'s' * (n > 1)} x"  # ("1 layer x")
        assert rc == 0 and out.startswith(f"gradflow heatmap: star, {layers}"), err
    rc, out, err = run(capsys, "gates", "--cell", "lstm,lstm,ur_lstm", "--layers", 3,
                       "--steps", 4, "--hidden", 6, "--batch", 2, "--out",
                       tmp_path / "gates.png")
    assert rc == 0, err
    assert out.startswith("gradflow gates: lstm x2 / ur_lstm, 3 layers")
    lines = out.splitlines()
    at = next(i for i, l in enumerate(lines) if l.strip().startswith("gate r "))  # UR-LSTM's
    assert re.fullmatch(r" +saturated per layer \(bottom..top\): - - \d\.\d{3}", lines[at + 1])
    stats = gradflow.load(tmp_path / "gates.npz")
    assert stats.config["gate_layers"]["r"] == [2] and stats.total_nonfinite == 0
    assert "non-finite entries" not in err
    # the edges: one line each, exit 2
    for argv, message in (
            (("heatmap", "--cell", "gru,star", "--layers", 3),
             "--cell names 2 cells for --layers 3: give one cell, or one per layer"),
            (("heatmap", "--cell", "gru,stir", "--layers", 2), "unknown cell 'stir'"),
            (("heatmap", "--cell", "lstm,gru", "--layers", 2),
             "every layer's cell must carry the same states"),
            (("heatmap", "--cell", f"gru,{user_module}:sin_rnn", "--layers", 2),
             r"a cell of your own \(module:factory\) is given alone"),
            (("gates", "--cell", "rnn,rnn", "--layers", 2), "--cell 'rnn,rnn' reports no gates"),
            (("train", "--cell", "gru,lstm", "--layers", 2),
             "every layer's cell must carry the same states")):
        rc, out, err = run(capsys, *argv)
        assert rc == 2 and re.search(message, err), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --- --inputs: the user's own sequences ---------------------------------------------------------


def test_inputs_replace_the_gaussian_sequences(capsys, tmp_path):
    """``heatmap --inputs xs.npz`` (the array named xs beside another) on a fresh stack: the
    map of that stack on those sequences, bit for bit; ``--batch 3`` takes the first 3, and
    the summary and the saved config name the file; ``gates`` reads them too."""
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(5, 7, 3)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", xs=xs, labels=np.arange(5))
    with jax.enable_x64(False):
        prob = gradflow.problem("gru", layers=2, steps=7, hidden=8, batch=5, input_size=3,
                                seed=2)
        expect = {B: gradflow.gradient_map(prob.stack, prob.params, xs[:B]).values
                  for B in (5, 3)}
        gates = gradflow.gates.saturation(prob.stack, prob.params, xs)
    for B, extra in ((5, []), (3, ["--batch", "3"])):
        rc, out, err = run(capsys, "heatmap", "--cell", "gru", "--layers", "2", "--hidden", "8",
                           "--seed", "2", "--inputs", tmp_path / "mine.npz", *extra, "--out",
                           tmp_path / f"h{B}.png")
        assert rc == 0, err
        assert f"2 layers x 7 steps, H=8, B={B}, seed 2, init orthogonal, inputs from " in out
        res = gradflow.load(tmp_path / f"h{B}.npz")
        np.testing.assert_array_equal(res.values, expect[B])
        assert res.config["inputs_from"] == str(tmp_path / "mine.npz")
        # the sequences measured, told apart from another array saved under the name
        assert res.config["inputs_fingerprint"] == (
            "sha256:" + hashlib.sha256(xs[:B].tobytes()).hexdigest()[:16])
        assert "input_scale" not in res.config and res.config["batch"] == B
    rc, out, err = run(capsys, "gates", "--cell", "gru", "--layers", "2", "--hidden", "8",
                       "--seed", "2", "--inputs", tmp_path / "mine.npz", "--out",
                       tmp_path / "g.png")
    assert rc == 0, err
    saved = gradflow.load(tmp_path / "g.npz")
    np.testing.assert_array_equal(saved.arrays["mean/z"], gates.arrays["mean/z"])


def test_inputs_with_trained_params(capsys, tmp_path):
    """A params file measured on your sequences (a PyTorch state dict here): ``heatmap`` and
    ``gains`` equal ``gradient_map`` and ``local_gains`` of the loaded stack on them."""
    from gradflow import runs

    with jax.enable_x64(False):
        stack = gradflow.Stack("lstm", layers=3, input_size=4, hidden_size=6)
        params = stack.init(jax.random.key(1))
        runs.save_params(tmp_path / "p.npz", stack, params)
        xs = np.random.default_rng(1).normal(size=(4, 9, 4))
        np.save(tmp_path / "xs.npy", xs)
        expect = gradflow.gradient_map(stack, params, xs.astype(np.float32)).values
        gains = gradflow.local_gains(stack, params, xs.astype(np.float32))
    rc, out, err = run(capsys, "heatmap", "--params", tmp_path / "p.npz", "--inputs",
                       tmp_path / "xs.npy", "--out", tmp_path / "h.png")
    assert rc == 0, err
    assert "3 layers x 9 steps, H=6, B=4, seed 0, params from" in out
    np.testing.assert_array_equal(gradflow.load(tmp_path / "h.npz").values, expect)
    rc, out, err = run(capsys, "gains", "--params", tmp_path / "p.npz", "--inputs",
                       tmp_path / "xs.npy", "--out", tmp_path / "g.png")
    assert rc == 0, err
    saved = gradflow.load(tmp_path / "g.npz")
    for k in ("vertical_rms", "temporal_rms", "state_rms"):
        np.testing.assert_array_equal(saved.arrays[k], gains.arrays[k])
    np.save(tmp_path / "wide.npy", np.ones((2, 3, 5)))
    rc, _, err = run(capsys, "heatmap", "--params", tmp_path / "p.npz", "--inputs",
                     tmp_path / "wide.npy")
    assert rc == 2 and "the sequences have 5 features; the stack of" in err and "reads 4" in err


def _zip_text(path):
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.txt", "hello")


@pytest.mark.parametrize("write,extra,message", [
    (lambda p: np.savez(p, a=np.ones((2, 3, 4)), b=np.ones(2)), [],
     "holds several arrays (a, b); name the sequences xs"),
    (lambda p: np.save(p, np.ones((3, 4))), [], "shape (3, 4); the sequences are (batch, steps, "
                                                "features): add a batch axis"),
    (lambda p: np.save(p, np.full((2, 3, 4), np.nan)), [], "holds 24 NaN or infinite entries"),
    (lambda p: np.save(p, np.ones((2, 3, 4), bool)), [], "inputs must be real numbers (a float "
                                                         "or integer dtype), got dtype bool"),
    (lambda p: np.save(p, np.ones((0, 3, 4))), [], "inputs need at least one example, one step "
                                                   "and one feature, got (0, 3, 4)"),
    (lambda p: np.save(p, np.ones((2, 3, 0))), [], "got (2, 3, 0)"),
    (lambda p: p.write_bytes(b"junk"), [], "cannot read"),
    # not a NumPy file, or an array of objects: what --inputs reads, not NumPy's pickle advice
    (lambda p: p.write_text("1 2 3\n4 5 6\n"), [],
     "cannot read '{path}': it is not a NumPy file; give a .npy of shape (batch, steps, "
     "features) (np.save), or a .npz holding one such array (np.savez)"),
    (lambda p: np.save(p, np.array([1, "a"], dtype=object), allow_pickle=True), [],
     "'{path}' holds Python objects (dtype object), not numbers; give a .npy of shape"),
    # archives (np.load reads the zip's magic, whatever the name): damaged, truncated, not .npy
    (lambda p: p.write_bytes(b"PK\x03\x04junk"), [], "BadZipFile"),
    (lambda p: (np.savez(p, xs=np.ones((2, 3, 4))),
                p.write_bytes(p.with_name("xs.npy.npz").read_bytes()[:300])), [],
     "cannot read"),
    (lambda p: _zip_text(p), [], "holds 'a.txt', which is not a NumPy array"),
    (lambda p: np.save(p, np.ones((2, 3, 4))), ["--steps", "3"],
     "--steps cannot be used with --inputs"),
    (lambda p: np.save(p, np.ones((2, 3, 4))), ["--input-scale", "2"],
     "--input-scale cannot be used with --inputs"),
    (lambda p: np.save(p, np.ones((2, 3, 4))), ["--batch", "3"],
     "--batch 3 is more than the 2 sequences in"),
])
def test_inputs_refused_in_one_line(capsys, tmp_path, write, extra, message):
    path = tmp_path / "xs.npy"
    write(path)
    path = path if path.exists() else tmp_path / "xs.npy.npz"  # np.savez adds .npz
    rc, out, err = run(capsys, "heatmap", "--layers", "2", "--hidden", "4", "--inputs", path,
                       *extra)
    assert rc == 2 and message.format(path=path) in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert "allow_pickle" not in err


def test_compare_trained_stacks_on_your_sequences(capsys, tmp_path):
    """``compare --params a.npz,b.npz --inputs xs.npy``: a params file and a PyTorch GRU's state
    dict side by side on the same sequences, each column the API's map there, bit for bit;
    fresh cells and the task loss refuse --inputs."""
    from gradflow import runs

    rng = np.random.default_rng(3)
    torch_gru = {"weight_ih_l0": rng.normal(size=(18, 4)) / 2,
                 "weight_hh_l0": rng.normal(size=(18, 6)) / 2,
                 "weight_ih_l1": rng.normal(size=(18, 6)) / 2,
                 "weight_hh_l1": rng.normal(size=(18, 6)) / 2}
    np.savez(tmp_path / "gru.npz", **{k: v.astype(np.float32) for k, v in torch_gru.items()})
    xs = rng.normal(size=(5, 6, 4)).astype(np.float32)
    np.save(tmp_path / "xs.npy", xs)
    with jax.enable_x64(False):
        star = gradflow.Stack("star", layers=2, input_size=4, hidden_size=6)
        p_star = star.init(jax.random.key(0))
        runs.save_params(tmp_path / "star.npz", star, p_star)
        stacks = {"star": (star, p_star), "gru": gradflow.from_torch(
            {k: v.astype(np.float32) for k, v in torch_gru.items()})}
        expect = {k: gradflow.gradient_map(s, p, xs[:4], loss="all", wrt="hidden").values
                  for k, (s, p) in stacks.items()}
    rc, out, err = run(capsys, "compare", "--params", f"{tmp_path / 'star.npz'},"
                       f"{tmp_path / 'gru.npz'}", "--inputs", tmp_path / "xs.npy", "--batch", "4",
                       "--losses", "all", "--wrt", "hidden", "--out", tmp_path / "c.png")
    assert rc == 0, err
    grid = gradflow.load(tmp_path / "c.npz")
    for k, v in expect.items():
        np.testing.assert_array_equal(grid.arrays[f"values/all/{k}"], v)
        assert grid.config["maps"][f"all/{k}"]["inputs_from"] == str(tmp_path / "xs.npy")
    rc, _, err = run(capsys, "compare", "--inputs", tmp_path / "xs.npy")
    assert rc == 2 and "--inputs measures trained --params on your sequences" in err
    rc, _, err = run(capsys, "compare", "--params", tmp_path / "star.npz", "--inputs",
                     tmp_path / "xs.npy", "--losses", "task")
    assert rc == 2 and "--losses task reads training runs' own targets" in err


def test_time_major_inputs(capsys, tmp_path):
    """``--time-major``: a (steps, batch, features) array, as PyTorch's RNNs take it by default,
    gives the map of its (batch, steps, features) transpose; alone it is refused."""
    xs = np.random.default_rng(5).normal(size=(4, 6, 3)).astype(np.float32)  # (B, T, D)
    np.save(tmp_path / "bt.npy", xs)
    np.save(tmp_path / "tb.npy", xs.swapaxes(0, 1))
    common = ["--cell", "gru", "--layers", "2", "--hidden", "5"]
    assert cli.main(["heatmap", *common, "--inputs", str(tmp_path / "bt.npy"), "--out",
                     str(tmp_path / "bt.png")]) == 0
    assert cli.main(["heatmap", *common, "--inputs", str(tmp_path / "tb.npy"), "--time-major",
                     "--out", str(tmp_path / "tb.png")]) == 0
    a, b = gradflow.load(tmp_path / "bt.npz"), gradflow.load(tmp_path / "tb.npz")
    assert a.values.shape == (2, 6) and a.config["batch"] == 4
    np.testing.assert_array_equal(a.values, b.values)
    # the layout is recorded, shown and in the default name (a square array read both ways
    # gave two results with one config and one file name)
    assert b.config["inputs_time_major"] is True and "inputs_time_major" not in a.config
    capsys.readouterr()
    np.save("sq.npy", xs[:, :4])  # (4, 4, 3): either layout fits
    for extra in ([], ["--time-major"]):
        assert cli.main(["gates", *common, "--inputs", "sq.npy", *extra]) == 0
    out = capsys.readouterr().out
    assert "inputs from sq.npy (time-major), " in out
    names = sorted(p.name for p in Path("gradflow-out").glob("*.npz"))
    assert names == ["gates_gru_L2_T4_H5_B4_D3_in-sq.npz", "gates_gru_L2_T4_H5_B4_D3_in-sq_tm.npz"]
    capsys.readouterr()
    assert cli.main(["heatmap", *common, "--time-major"]) == 2
    assert "--time-major says how the --inputs array is laid out" in capsys.readouterr().err


def _decade_counts(out: str) -> int:
    """The units counted on the ``units per decade`` line of one gate's summary."""
    line = next(l for l in out.splitlines() if "units per decade:" in l)
    return sum(int(part.split()[-1]) for part in line.split(":", 1)[1].split(","))


def test_gates_count_the_units_that_exist_and_have_the_gate(capsys, tmp_path):
    """The timescale summary pools the units a stack has: not the padding of narrower
    layers (timescale 0 there), nor a gate's absent layers in a stack of different cells
    (counted as infinite before), and refined gates' timescales below 1 in their own bin."""
    small = ["--layers", "2", "--steps", "4", "--batch", "2", "--no-data"]
    rc, out, err = run(capsys, "gates", *small, "--hidden", "6,4", "--gate", "f", "--out",
                       tmp_path / "a.png")
    assert rc == 0, err
    assert _decade_counts(out) == 10
    rc, out, err = run(capsys, "gates", *small, "--hidden", "5", "--cell", "gru,star",
                       "--gate", "k", "--out", tmp_path / "b.png")
    assert rc == 0, err
    assert _decade_counts(out) == 5 and "inf" not in out.split("units per decade:")[1]
    rc, out, err = run(capsys, "gates", *small, "--hidden", "8", "--cell", "refined_gru",
                       "--gate", "z", "--input-scale", "3", "--out", tmp_path / "c.png")
    assert rc == 0, err
    low = re.search(r"min ([0-9.e+-]+)", out).group(1)
    assert _decade_counts(out) == 16
    assert (float(low) < 1) == ("below 1 " in out)
    # a tanh gate's values are counted outside its own range, [-1, 1] (NaN ones here)
    rc, out, err = run(capsys, "gates", "--cell", "refined_gru", "--layers", "3", "--steps",
                       "30", "--hidden", "16", "--batch", "4", "--input-scale", "30",
                       "--no-data", "--out", tmp_path / "d.png")
    assert rc == 0, err
    tanh_gate = out.split("gate n ")[1]
    assert "(tanh)" in tanh_gate and "outside [-1, 1]: 0 below -1, 0 above 1, " in tanh_gate


def test_heatmap_normalizes_a_memory_map_where_the_loss_enters(capsys, tmp_path):
    """``--wrt cell --normalize``: c's last step is 0 by construction, so the map is drawn
    relative to the step before (it printed "not normalised" and drew absolute values)."""
    small = ["--cell", "lstm", "--layers", "2", "--steps", "4", "--hidden", "4", "--batch", "2",
             "--normalize"]
    rc, out, err = run(capsys, "heatmap", *small, "--wrt", "cell", "--out", tmp_path / "c.png")
    assert rc == 0 and "not normalised" not in out + err, out + err
    saved = gradflow.load(tmp_path / "c.npz")
    assert saved.values[-1, -1] == 0 and saved.values[-1, -2] > 0


def test_prefix_picks_one_module_of_a_torch_state_dict(capsys, tmp_path):
    """A seq2seq model's state dict (an encoder LSTM and a decoder GRU) could not be measured
    from the command line: the message said prefix=, an API argument. --prefix picks one
    (its map is that module's), and is recorded; it is refused where it picks nothing."""
    rng = np.random.default_rng(4)
    w = lambda *shape: (rng.normal(size=shape) / 2).astype(np.float32)  # noqa: E731
    model = {"enc.lstm.weight_ih_l0": w(24, 4), "enc.lstm.weight_hh_l0": w(24, 6),
             "dec.weight_ih_l0": w(18, 4), "dec.weight_hh_l0": w(18, 6),
             "dec.weight_ih_l1": w(18, 6), "dec.weight_hh_l1": w(18, 6)}
    np.savez(tmp_path / "seq2seq.npz", **model)
    np.savez(tmp_path / "dec.npz", **{k[4:]: v for k, v in model.items() if k[:4] == "dec."})
    args = ["--steps", "3", "--batch", "2"]
    rc, out, err = run(capsys, "heatmap", "--params", tmp_path / "seq2seq.npz", *args)
    assert rc == 2 and "'dec.': pass prefix= one of them (on the command line --prefix)" in err
    maps = {}
    for name, extra in (("one", ["--params", tmp_path / "dec.npz"]),
                        ("picked", ["--params", tmp_path / "seq2seq.npz", "--prefix", "dec"])):
        rc, out, err = run(capsys, "heatmap", *extra, *args, "--out", tmp_path / f"{name}.png")
        assert rc == 0, err
        maps[name] = gradflow.load(tmp_path / f"{name}.npz")
    np.testing.assert_array_equal(maps["picked"].values, maps["one"].values)
    assert maps["picked"].config["prefix"] == "dec" and maps["picked"].config["layers"] == 2
    rc, out, err = run(capsys, "gates", "--params", tmp_path / "seq2seq.npz", "--prefix",
                       "enc.lstm", *args, "--out", tmp_path / "g.png")
    assert rc == 0 and "'f'" not in err, err
    np.savez(tmp_path / "later.npz", **{k: v * 0.5 for k, v in model.items()})  # a checkpoint
    rc, out, err = run(capsys, "compare", "--params", f"{tmp_path / 'seq2seq.npz'},"
                       f"{tmp_path / 'later.npz'}", "--prefix", "dec", "--wrt", "hidden",
                       "--losses", "last", *args, "--absolute", "--out", tmp_path / "cmp.png")
    assert rc == 0, err
    side = gradflow.load(tmp_path / "cmp.npz")
    np.testing.assert_array_equal(side["values/last/seq2seq"], maps["picked"].values)
    assert side.config["maps"]["last/later"]["prefix"] == "dec"
    for extra, msg in ((["--prefix", "dec"], "--prefix picks a module of a PyTorch state dict "
                                             "given with --params"),
                       (["--params", tmp_path / "dec.npz", "--prefix", "enc"],
                        "no recurrent weights under prefix='enc'"),
                       (["--params", tmp_path / "ours.npz", "--prefix", "dec"],
                        "prefix='dec' picks one module of a PyTorch state dict; ")):
        if not (tmp_path / "ours.npz").exists():
            stack = gradflow.Stack("gru", 1, 4, 6)
            gradflow.runs.save_params(tmp_path / "ours.npz", stack, stack.init(jax.random.key(0)))
        rc, out, err = run(capsys, "heatmap", *extra, *args)
        assert rc == 2 and msg in err, err


def test_summary_says_which_means_leave_out_non_finite_entries():
    """A layer whose largest gradients overflowed has a time-mean of the rest, which reads as
    the smallest: its line says how many entries it leaves out, and a note says what they are
    (and that float64 holds them); a factor of 100 prints as x100, not x100."""
    from gradflow.cli import map_summary

    values = np.array([[np.inf, np.nan, 1e4, 1e2], [1e5, 1e3, 1e2, 1.0]], np.float32)
    text = "\n".join(map_summary(values))
    assert "layer   0 (bottom)" in text and "(2 of 4 not finite, left out)" in text
    assert "inf where the gradient overflowed, its largest; NaN where the forward pass did; " \
        "--dtype float64 holds numbers up to 1.8e308" in text
    assert "x100 per layer" in text and "x100." not in text
    clean = "\n".join(map_summary(np.array([[1e2, 1e1], [1.0, 1.0]], np.float32)))
    assert "left out" not in clean and "float64" not in clean


def test_a_label_printed_is_a_cell_typed(capsys, tmp_path):
    """The header wrote ``options refined=('i', 'f')`` and titles ``lstm:refined=i+f``, which
    ``--cell`` refused: both write ``refined=i+f`` now, and ``--cell`` reads it."""
    rc, out, err = run(capsys, "heatmap", "--cell", "lstm", "--option", "refined=i,f", *SMALL,
                       "--no-data", "--out", tmp_path / "a.png")
    assert rc == 0 and "; options refined=i+f" in out.splitlines()[0], err
    rc, again, err = run(capsys, "heatmap", "--cell", "lstm:refined=i+f", *SMALL, "--no-data",
                         "--out", tmp_path / "b.png")
    assert rc == 0 and again.replace("b.png", "a.png") == out, err


def test_an_abbreviation_of_two_spellings_of_one_option_is_that_option():
    """``reproduce --ou DIR`` was "ambiguous option: --ou could match --out-dir, --out", two
    spellings of one option; abbreviations of two options stay ambiguous."""
    parser = cli.build_parser()
    assert parser.parse_args(["reproduce", "--ou", "d"]).out_dir == "d"
    with pytest.raises(cli.UsageError, match="ambiguous option: --s could match --steps, --seed"):
        parser.parse_args(["heatmap", "--s", "3"])


def test_a_name_longer_than_the_file_system_takes(capsys, tmp_path):
    """A 300-character --out was an internal error (ENAMETOOLONG from Path.is_dir); a default
    name made of many cells' options was too, though the dry run said it fits. The one is
    refused in one line, the other shortened to 245 characters ending in a digest of the
    whole, so that other settings still get other names."""
    rc, out, err = run(capsys, "heatmap", *SMALL, "--out", tmp_path / ("a" * 300 + ".png"))
    assert rc == 2 and err.endswith(f"{os.strerror(errno.ENAMETOOLONG)}\n") and \
        err.count("\n") == 1, err
    cells = ",".join(f"lstm:forget_bias={b}.0000000000001,tied=True,"  # (4 compiles, not 13)
                     f"forget_bias_init=0.{b}00000000001" for b in range(1, 5))
    rc, out, err = run(capsys, "compare", "--cells", cells, *SMALL, "--losses", "last",
                       "--out", tmp_path)
    assert rc == 0, err
    figure = Path(_written(out, "figure"))
    assert len(figure.stem) == 245 and figure.stem.startswith("compare_lstm-forget_bias=1.0")
    assert figure.with_suffix(".npz").is_file()
    other = cells.replace("init=0.400", "init=0.500")  # its own name
    stems = [cli.default_stem(cli.build_parser().parse_args(["compare", "--cells", c]),
                              "compare", c) for c in (cells, other)]
    assert stems[0][:234] == stems[1][:234] and stems[0] != stems[1]
    assert [len(s) for s in stems] == [245, 245]


def test_a_cell_with_a_colon_and_no_options(capsys):
    """``--cell lstm:`` was told "expected module:attribute, e.g. mycells:my_lstm"."""
    rc, out, err = run(capsys, "heatmap", "--cell", "lstm:", *SMALL)
    assert rc == 2 and "--cell 'lstm:': no option after the colon; write 'lstm' or " \
        "'lstm:option=value'" in err, err


def test_headers_name_the_input_scale_and_init(capsys, tmp_path):
    """heatmap's (and gates', gains') one-line header left out --input-scale, compare's also
    --init: two different problems read the same."""
    rc, out, err = run(capsys, "heatmap", *SMALL, "--input-scale", "0.1", "--no-data", "--out",
                       tmp_path / "a.png")
    assert rc == 0 and out.splitlines()[0].endswith(
        ", init orthogonal, input scale 0.1, float32"), out
    rc, out, err = run(capsys, "compare", "--cells", "lstm,gru", *SMALL, "--init", "glorot",
                       "--input-scale", "0.1", "--no-data", "--out", tmp_path / "b.png")
    assert rc == 0 and ", seed 0, init glorot, input scale 0.1, float32, wrt params" in \
        out.splitlines()[0], out


def test_a_stack_as_titles_write_it_is_typed_back(capsys, tmp_path):
    """``lstm:forget_bias=1.0,tied=True / ur_lstm`` (a title's, a summary's) was refused as
    the unknown cell ' ur_lstm', and ``gru x2 / star`` was not read."""
    assert cli.layer_cells("lstm:forget_bias=1.0,tied=True / ur_lstm") == [
        "lstm:forget_bias=1.0,tied=True", "ur_lstm"]
    assert cli.layer_cells("gru x2 / star") == cli.layer_cells("gru*2,star") == [
        "gru", "gru", "star"]
    assert cli.layer_cells("lstm x3 ") == ["lstm"] * 3
    assert cli.layer_cells("lstm:forget_bias=1.0 x2") == ["lstm:forget_bias=1.0"] * 2
    assert cli.layer_cells("mymod:factory x2") == ["mymod:factory x2"]  # a user's name
    rc, out, err = run(capsys, "heatmap", "--cell", "gru x1 / star", *SMALL, "--no-data",
                       "--out", tmp_path / "a.png")
    assert rc == 0 and out.startswith("gradflow heatmap: gru / star, 2 layers"), (out, err)


def test_a_user_cell_is_checked_at_the_runs_dtype(capsys, user_module, tmp_path):
    """``--dtype float64`` with a user's step holding a float64 constant was refused ("turns a
    float32 carry into float64"): the stack's shapes were checked at float32."""
    rc, out, err = run(capsys, "heatmap", "--cell", f"{user_module}:f64_constant", "--dtype",
                       "float64", *SMALL, "--no-data", "--out", tmp_path / "a.png")
    assert rc == 0 and ", float64" in out.splitlines()[0], err


def test_init_given_to_a_factory_without_it_says_where_it_went(capsys, user_module):
    """``--init glorot`` with a user's factory: "calling it raised TypeError: ... unexpected
    keyword argument 'init'", without a word of where the init came from."""
    rc, out, err = run(capsys, "heatmap", "--cell", f"{user_module}:sin_rnn", "--init",
                       "glorot", *SMALL)
    assert rc == 2 and "unexpected keyword argument 'init' (--init is passed to a factory as " \
        "init=: accept it, or leave --init out)" in err, err


def test_a_factory_written_with_options_like_a_shipped_cell(capsys, user_module):
    """``--cell mymod:factory:gain=0.5`` was "unknown cell 'mymod'"."""
    rc, out, err = run(capsys, "heatmap", "--cell", f"{user_module}:sin_rnn:gain=0.5", *SMALL)
    assert rc == 2 and f"takes its options as --option KEY=VALUE (e.g. --cell {user_module}:" \
        "sin_rnn --option gain=0.5)" in err, err
