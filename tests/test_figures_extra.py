"""The committed figures of SPEC section 4 items 2 and 3 (at init): their data were made from
their configs, and the claims they illustrate hold, as numbers, on the committed data:

* vertical_gain: the closed-form vertical RMS gains at orthogonal init, zero biases, small
  inputs (LSTM sigma(0)^2 = 0.25, GRU and STAR sigma(0) = 0.5, tanh RNN 1) at every depth up
  to 64, and the GRU's temporal gain against its own closed form from the weights.
* ur_lstm_gates_init: Gu et al.'s initial forget-gate distributions (LSTM concentrated at
  1/2, UGI spread over [0, 1]).
"""
import numpy as np
import pytest

import gradflow
from gradflow import experiments, reproduce
from gradflow.problem import cell_problem

FIG = reproduce.FIGURES_DIR


@pytest.fixture(scope="module")
def gains():
    return gradflow.load(FIG / "vertical_gain.npz")


@pytest.fixture(scope="module")
def sat():
    return gradflow.load(FIG / "ur_lstm_gates_init.npz")


@pytest.mark.parametrize("name,kind", [("vertical_gain", "vertical_gain"),
                                       ("ur_lstm_gates_init", "gate_saturation")])
def test_committed_data_match_their_config(name, kind):
    config = reproduce.load_config(name)
    data = gradflow.load(FIG / f"{name}.npz")
    assert (FIG / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert config["figure"] == kind and data.kind == kind
    for key, value in config.items():
        assert data.config[key] == value, key
    assert data.total_nonfinite == 0
    assert name in reproduce.configs()


def test_vertical_gain_setting_reaches_64_layers(gains):
    c = gains.config
    assert c["layers"] == 64 and c["init"] == "orthogonal" and c["input_scale"] <= 0.01
    for cell in ("lstm", "star"):
        assert gains[f"vertical_rms/{cell}"].shape == (64, c["steps"])


def test_recomputed_vertical_gains_equal_the_committed_ones(gains):
    c = gains.config
    again = experiments.vertical_gain(["star"], layers=8, steps=c["steps"], hidden=c["hidden"],
                                  batch=c["batch"], seed=c["seed"], init=c["init"],
                                  dtype=c["dtype"], input_scale=c["input_scale"])
    # the first 8 layers of a 64-layer stack are an 8-layer stack (same keys, same inputs)
    np.testing.assert_allclose(again["vertical_rms/star"], gains["vertical_rms/star"][:8],
                               rtol=1e-5)


@pytest.mark.parametrize("cell,closed", [("lstm", 0.25), ("gru", 0.5), ("star", 0.5)])
def test_vertical_gain_equals_the_closed_form_at_every_depth(gains, cell, closed):
    v = gains[f"vertical_rms/{cell}"]
    assert np.all(np.abs(v / closed - 1) < 0.02), (cell, v.min(), v.max())
    assert gains.config["closed_form"][cell] == closed


def test_tanh_rnn_gain_is_one_only_while_its_state_is_small(gains):
    v = gains["vertical_rms/rnn"].mean(axis=1)
    assert np.all(np.abs(v[:4] - 1) < 0.02)
    # Deeper, the states add up over steps and layers (gain 1 in both directions) and tanh
    # saturates: the small-input closed form no longer applies there.
    assert v[-8:].mean() < 0.98


def test_gru_temporal_gain_matches_its_closed_form(gains):
    r"""At h ~ 0 with gates at 1/2: dh_t/dh_{t-1} = z I + (1-z) r U_n = I/2 + U_n/4, so
    rms^2 = (H/4 + H/16 + tr(U_n)/4) / H, computed here from the weights."""
    c = gains.config
    prob = cell_problem("gru", layers=c["layers"], steps=1, hidden=c["hidden"],
                                seed=c["seed"], init=c["init"], dtype=c["dtype"])
    H = c["hidden"]
    traces = np.array([np.trace(np.asarray(p["n"]["U"])) for p in prob.params["layers"]])
    expected = np.sqrt(0.25 + 1 / 16 + traces / (4 * H))
    measured = gains["temporal_rms/gru"].mean(axis=1)
    np.testing.assert_allclose(measured, expected, rtol=0.02)


def test_stats_panel_round_trip_and_bad_label(sat):
    lstm = experiments.stats_panel(sat, "LSTM")
    assert lstm.kind == "gate_stats" and lstm.config["cell"] == "lstm"
    with pytest.raises(ValueError, match="valid: LSTM, LSTM\\+UGI, UR-LSTM"):
        experiments.stats_panel(sat, "GRU")


def test_histograms_count_every_activation(sat):
    c = sat.config
    n = c["layers"] * c["batch"] * c["steps"] * c["hidden"]
    for label, gate in (("LSTM", "f"), ("LSTM+UGI", "f"), ("UR-LSTM", "g")):
        p = experiments.stats_panel(sat, label)
        assert p[f"hist/{gate}"].sum() + p[f"outside/{gate}"].sum() == n


def test_lstm_forget_gate_starts_at_one_half_and_ugi_spreads_it(sat):
    lstm = experiments.stats_panel(sat, "LSTM")
    ugi = experiments.stats_panel(sat, "LSTM+UGI")
    # zero biases, symmetric inputs: f centred at sigma(0) = 1/2, almost never saturated
    assert abs(float(lstm["mean/f/pooled"]) - 0.5) < 0.02
    assert float(lstm["saturated/f/pooled"]) < 0.01
    # UGI: sigma(b_f) ~ U[1/H, 1 - 1/H]: f covers [0, 1]; an order of magnitude more saturated
    assert float(ugi["saturated/f/pooled"]) > 10 * max(float(lstm["saturated/f/pooled"]), 1e-3)
    hist = ugi["hist/f/pooled"] / ugi["hist/f/pooled"].sum()
    assert hist.min() > 0.2 / len(hist)  # every tenth of [0, 1] populated
    half = len(hist) // 2
    # LSTM: most mass in the two middle bins; UGI: far less
    lh = lstm["hist/f/pooled"] / lstm["hist/f/pooled"].sum()
    assert lh[half - 1:half + 1].sum() > 0.4 and hist[half - 1:half + 1].sum() < 0.2


def test_ugi_forget_biases_are_uniform_in_sigmoid_space():
    """The init behind the figure: sigmoid(b_f) against U[1/H, 1 - 1/H] (Kolmogorov distance)."""
    H = 64
    prob = cell_problem("lstm", layers=2, steps=1, hidden=H, init="ugi")
    for layer in prob.params["layers"]:
        u = np.sort(1 / (1 + np.exp(-np.asarray(layer["f"]["b"], float))))
        cdf = (u - 1 / H) / (1 - 2 / H)
        ks = np.max(np.abs(cdf - (np.arange(1, H + 1) - 0.5) / H))
        assert u.min() >= 1 / H - 1e-6 and u.max() <= 1 - 1 / H + 1e-6
        assert ks < 1.63 / np.sqrt(H)  # the 1% critical value
