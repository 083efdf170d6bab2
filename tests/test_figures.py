"""Tests for gradflow.figures and the committed figures/: the data were made from the committed
config (recomputed here), the STAR Fig. 2 claims stated as numbers on that data, and the
figure registry (configs, builders, reproduce) including its bad input."""
import json

import jax
import numpy as np
import pytest

import gradflow
from gradflow import cells, figures, plot
from gradflow.results import make_result

FIG = figures.FIGURES_DIR
MAIN = ("rnn", "lstm", "star", "gru")
LOSSES = ("last", "all")


@pytest.fixture(scope="module")
def fig2():
    return gradflow.load(FIG / "star_fig2.npz")


def relative(grid, loss, cell):
    """``P[l, t] / P[L-1, T-1]``: each entry over the top layer's last-step value."""
    v = grid[f"values/{loss}/{cell}"].astype(float)
    return v / v[-1, -1]


# --- the committed files ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["star_fig2", "star_fig2_extra"])
def test_committed_data_were_made_from_the_committed_config(name):
    config = json.loads((FIG / f"{name}.json").read_text())
    data = gradflow.load(FIG / f"{name}.npz")
    assert (FIG / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data.kind == "gradient_grid"
    for key, value in config.items():
        assert data.config[key] == value, key
    L, T = config["layers"], config["steps"]
    for cell in config["cells"]:
        for loss in config["losses"]:
            m = data.config["maps"][f"{loss}/{cell}"]
            assert (m["cell"], m["loss"], m["wrt"], m["layers"], m["steps"], m["hidden_size"],
                    m["batch"], m["seed"], m["dtype"]) == (
                cell, loss, config["wrt"], L, T, config["hidden"], config["batch"],
                config["seed"], config["dtype"])
            assert data[f"values/{loss}/{cell}"].shape == (L, T)
    assert data.total_nonfinite == 0


def test_star_fig2_uses_the_spec_setting(fig2):
    """SPEC section 4 item 1: vRNN, LSTM, STAR (+ GRU), 10 x 10, H = 128, orthogonal init with
    zero biases, inputs N(0, 1), losses last and all, wrt params."""
    c = fig2.config
    assert c["cells"][:3] == ["rnn", "lstm", "star"] and "gru" in c["cells"]
    assert (c["layers"], c["steps"], c["hidden"], c["init"], c["wrt"], c["losses"],
            c["input_scale"]) == (10, 10, 128, "orthogonal", "params", ["last", "all"], 1.0)
    for cell in MAIN:
        prob = figures.cell_problem(cell, layers=2, steps=1, hidden=8, init=c["init"])
        biases = [np.asarray(g["b"]) for layer in prob.params["layers"] for g in layer.values()]
        assert all(np.all(b == 0) for b in biases), cell
        W = np.asarray(prob.params["layers"][1][next(iter(prob.params["layers"][1]))]["W"])
        np.testing.assert_allclose(W.T @ W, np.eye(8), atol=1e-5)  # orthogonal blocks


def test_recomputing_a_map_from_the_recorded_config_gives_the_committed_numbers(fig2):
    """STAR under the sequence loss, recomputed from star_fig2.json (this test runs with x64
    enabled; the committed data came from the CLI in 32-bit mode)."""
    config = json.loads((FIG / "star_fig2.json").read_text())
    keys = ("wrt", "layers", "steps", "hidden", "batch", "seed", "readout_seed", "init",
            "dtype", "input_scale")
    again = figures.gradient_grid(["star"], ["all"], **{k: config[k] for k in keys})
    np.testing.assert_allclose(again["values/all/star"], fig2["values/all/star"], rtol=1e-5)
    assert jax.config.jax_enable_x64  # the precision pin was undone


# --- the claims of the STAR paper's Figure 2, as numbers on the committed data -----------------
# Measured (seed 0, star_fig2.npz), r = P / P[top, last]:
#   loss   cell  r[0,0]  mean log10 r  median r (layers <= L-4)  min r     share of r in [0.1, 10]
#   last   rnn   1.13    -0.28         0.76                      2.7e-2    0.96
#   last   lstm  0.089   -1.46         0.028                     5.7e-4    0.15
#   last   star  1.22    -0.89         0.28                      2.2e-4    0.69
#   last   gru   1.16    -0.83         0.27                      2.2e-3    0.69
#   all    rnn   3.17    +0.04         1.38                      8.6e-2    0.99
#   all    lstm  0.143   -1.23         0.039                     5.7e-4    0.32
#   all    star  2.56    -0.44         0.47                      1.4e-2    0.90
#   all    gru   1.92    -0.55         0.38                      7.8e-3    0.83


def _mean_log(grid, loss, cell):
    return float(np.mean(np.log10(relative(grid, loss, cell))))


def test_vrnn_is_amplified_toward_low_layers_and_early_steps(fig2):
    for loss in LOSSES:
        r = relative(fig2, loss, "rnn")
        assert r[0, 0] > 1.0  # bottom layer, first step above the top layer's last step
        # the most amplified (least attenuated) of the four cells on the whole map
        assert all(_mean_log(fig2, loss, "rnn") > _mean_log(fig2, loss, c) + 0.3
                   for c in MAIN if c != "rnn")
    # Under the sequence loss most of the map is amplified, for no other cell.
    assert np.mean(relative(fig2, "all", "rnn") > 1.0) > 0.5
    assert all(np.mean(relative(fig2, "all", c) > 1.0) < 0.1 for c in MAIN if c != "rnn")
    # The paper's reading of an order-of-magnitude amplification (r[0, 0] > 10) did NOT
    # reproduce in this setting: r[0, 0] = 1.13 (loss last) and 3.17 (loss all); see README.


def test_lstm_collapses_below_the_top_layers(fig2):
    L = fig2.config["layers"]
    for loss in LOSSES:
        r = relative(fig2, loss, "lstm")
        below = np.median(r[:L - 3])
        # More than an order of magnitude down below the top three layers, and three orders at
        # the bottom layer's last step.
        assert below < 0.1
        assert r.min() < 1e-3
        # the most attenuated cell: 5x below every other cell's median there
        assert all(below < np.median(relative(fig2, loss, c)[:L - 3]) / 5
                   for c in MAIN if c != "lstm")
    # The stricter reading "median below 1e-2 of the top-last value" did NOT reproduce:
    # 0.028 (loss last) and 0.039 (loss all); seeds 1 and 2 give 0.027-0.055; see README.


def test_star_stays_within_an_order_of_magnitude_over_most_of_the_map(fig2):
    def within(loss, cell):
        r = relative(fig2, loss, cell)
        return np.mean((r >= 0.1) & (r <= 10.0))

    assert within("all", "star") >= 0.8
    # Under the final-output loss the claim holds only for a majority, not for >= 80% (0.69):
    # the top layer's early steps fall 3.7 decades (temporal attenuation); see README.
    assert within("last", "star") > 0.5
    assert within("last", "star") > 3 * within("last", "lstm")
    assert within("all", "star") > 2 * within("all", "lstm")


# --- the registry and reproduce -----------------------------------------------------------------


def test_a_new_figure_kind_is_one_register_call_and_one_json(tmp_path, monkeypatch):
    def compute(config):
        values = np.arange(1.0, 1.0 + config["n"] * 2).reshape(config["n"], 2)
        return make_result("gradient_map", {"values": values}, {"cell": "none", **config})

    def draw(config, data):
        return plot.heatmap(data)

    monkeypatch.setitem(figures.BUILDERS, "ramp", figures.Builder(compute, draw))
    (tmp_path / "ramp.json").write_text(json.dumps({"figure": "ramp", "n": 3}))
    (tmp_path / "notes.json").write_text(json.dumps({"not": "a figure"}))
    assert list(figures.configs(tmp_path)) == ["ramp"]
    lines = []
    written = figures.reproduce(config_dir=tmp_path, log=lines.append)
    assert written == [str(tmp_path / "ramp.npz"), str(tmp_path / "ramp.png")]
    assert lines == [f"wrote {p}" for p in written]
    np.testing.assert_array_equal(gradflow.load(tmp_path / "ramp.npz").values,
                                  [[1, 2], [3, 4], [5, 6]])


def test_cell_problem_passes_options_to_the_cell_and_sizes_time_gates():
    def options(prob):
        return dict(prob.stack.cell.options)

    prob = figures.cell_problem("g_lstm", layers=1, steps=7, hidden=4, init="glorot")
    assert (options(prob)["steps"], options(prob)["init"]) == (7, "glorot")  # cell's steps = T
    mu = np.asarray(prob.params["layers"][0]["time"]["mu"])
    assert 0.0 <= mu.min() and mu.max() < 7.0  # mu ~ U[0, T)
    prob = figures.cell_problem("g_lstm", layers=1, steps=7, hidden=4, options={"steps": 20})
    assert options(prob)["steps"] == 20  # an explicit option wins
    prob = figures.cell_problem("refined_lstm", layers=1, steps=2, hidden=4, input_size=3)
    assert prob.stack.input_projection  # refined cells need D == H: projected automatically


@pytest.mark.parametrize("kwargs, message", [
    (dict(cells=["nope"]), "valid: " + ", ".join(cells.names())),
    (dict(cells=[]), "cells is empty"),
    (dict(cells=["rnn", "rnn"]), "cells repeats rnn"),
    (dict(cells=["rnn"], losses=["bogus"]), "valid: last, all"),
    (dict(cells=["rnn"], wrt="bogus"), "valid: hidden, cell, params"),
    (dict(cells=["rnn"], dtype="float16"), "valid: float32, float64"),
    (dict(cells=["rnn"], cell_options={"lstm": {}}), "not in the grid: lstm"),
])
def test_gradient_grid_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        figures.gradient_grid(**kwargs)


def test_reproduce_and_panel_bad_input(tmp_path, fig2):
    with pytest.raises(ValueError, match="unknown figure 'nope'; valid: .*star_fig2, "):
        figures.reproduce("nope")
    with pytest.raises(ValueError, match="does not exist"):
        figures.reproduce(out_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        figures.configs(tmp_path / "missing")
    with pytest.raises(ValueError, match="no figure configs"):
        figures.reproduce(config_dir=tmp_path)
    (tmp_path / "odd.json").write_text(json.dumps({"figure": "odd"}))
    with pytest.raises(ValueError, match="unknown figure kind 'odd'; known: .*gradient_grid"):
        figures.configs(tmp_path)
    (tmp_path / "odd.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read figure config"):
        figures.configs(tmp_path)
    with pytest.raises(ValueError, match="no map for loss 'all' and cell 'mgu'"):
        figures.panel(fig2, "all", "mgu")


def _synthetic_grid(maps):
    """A gradient_grid Result from ``{(loss, cell): (L, T) array}``, as gradient_grid lays it out."""
    losses = list(dict.fromkeys(k[0] for k in maps))
    cells_ = list(dict.fromkeys(k[1] for k in maps))
    arrays, configs = {}, {}
    for (loss, cell), v in maps.items():
        arrays[f"values/{loss}/{cell}"] = v
        arrays[f"loss_value/{loss}/{cell}"] = np.float64(1.0)
        configs[f"{loss}/{cell}"] = {"cell": cell, "loss": loss, "wrt": "params"}
    return make_result("gradient_grid", arrays,
                       {"cells": cells_, "losses": losses, "maps": configs}, warn=False)


def test_draw_grid_normalises_each_panel_and_leaves_an_all_zero_map_empty():
    a = 10.0 ** np.arange(6.0).reshape(2, 3)
    grid = _synthetic_grid({("last", "x"): a, ("last", "y"): np.zeros((2, 3)),
                            ("all", "x"): 2 * a, ("all", "y"): a[::-1].copy()})
    fig = figures.draw_grid(grid, normalize=True)
    panels = fig.axes[:4]  # row-major: (last, x), (last, y), (all, x), (all, y)
    np.testing.assert_allclose(np.ma.getdata(panels[0].images[0].get_array()), a / a[-1, -1])
    np.testing.assert_allclose(np.ma.getdata(panels[2].images[0].get_array()), a / a[-1, -1])
    np.testing.assert_allclose(np.ma.getdata(panels[3].images[0].get_array()),
                               a[::-1] / a[0, -1])
    assert not panels[1].images and "all 6 entries are 0" in panels[1].texts[0].get_text()
    assert panels[1].get_title() == "y"
    fig = figures.draw_grid(grid, normalize=False)  # raw values: every panel drawn
    assert all(ax.images for ax in fig.axes[:4])
