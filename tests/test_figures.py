"""The committed STAR Fig. 2 figures in figures/: the data were made from the shipped config
(recomputed here), and the STAR Fig. 2 claims stated as numbers on that data. The registry and
reproduce are tested in test_reproduce.py, gradient_grid in test_experiments.py, draw_grid in
test_plot.py."""
import jax
import numpy as np
import pytest

import gradflow
from gradflow import experiments, reproduce
from gradflow.problem import cell_problem

FIG = reproduce.FIGURES_DIR
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
    config = reproduce.load_config(name)
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
        prob = cell_problem(cell, layers=2, steps=1, hidden=8, init=c["init"])
        biases = [np.asarray(g["b"]) for layer in prob.params["layers"] for g in layer.values()]
        assert all(np.all(b == 0) for b in biases), cell
        W = np.asarray(prob.params["layers"][1][next(iter(prob.params["layers"][1]))]["W"])
        np.testing.assert_allclose(W.T @ W, np.eye(8), atol=1e-5)  # orthogonal blocks


def test_recomputing_a_map_from_the_recorded_config_gives_the_committed_numbers(fig2, x64):
    """STAR under the sequence loss, recomputed from star_fig2.json (this test runs with x64
    enabled; the committed data came from the CLI in 32-bit mode)."""
    config = reproduce.load_config("star_fig2")
    keys = ("wrt", "layers", "steps", "hidden", "batch", "seed", "readout_seed", "init",
            "dtype", "input_scale")
    again = experiments.gradient_grid(["star"], ["all"], **{k: config[k] for k in keys})
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
    # 0.028 (loss last) and 0.039 (loss all); seeds 1 and 2 give 0.027-0.039 (0.027-0.055 with
    # readout_seed=seed); at input scale 0.01 it holds (0.0033-0.0044); see README.


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
