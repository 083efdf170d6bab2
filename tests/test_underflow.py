"""Underflow-safe reductions, and underflow said out loud.

Norms of tiny vectors are formed scaled by their largest entry (``gradflow.stack.safe_norm``,
``scaled_reduction``), so a float32 map has no false zeros where the true value is a normal
float32; entries that truly fall below the float32 range are counted (``Result.underflow``),
apart from the non-finite ones, and shown in the CLI summary and the heatmap title.

References are independent: NumPy float64 norms, and the float64 map of the same problem (the
same draws at every precision, see ``tests/test_precision.py``) computed with 64-bit JAX.
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import plot
from gradflow.cli import map_summary
from gradflow.results import NonFiniteWarning, Result, make_result, underflow_count

from gradflow.stack import safe_norm, scaled_reduction

P = importlib.import_module("gradflow.problem")
J = importlib.import_module("gradflow.jacobian")
TINY32 = float(np.finfo(np.float32).tiny)  # 1.18e-38, the smallest normal float32


def test_tiny_squares_underflow_in_float32():
    """The failure being guarded against: float32 squares of 1e-25 are 0."""
    g = np.full(8, 1e-25, np.float32)
    assert np.sqrt(np.sum(g * g)) == 0.0
    assert float(jnp.sqrt(jnp.sum(jnp.asarray(g) ** 2))) == 0.0
    assert float(safe_norm(jnp.asarray(g))) == pytest.approx(1e-25 * np.sqrt(8), rel=1e-6)


@pytest.mark.parametrize("scale", [1e-36, 1e-30, 1e-20, 1.0, 1e20, 1e30])
def test_safe_norm_against_float64_numpy(scale):
    x = np.random.default_rng(0).standard_normal((5, 7, 33)) * scale
    x32 = x.astype(np.float32)
    # XLA on CPU reads subnormal inputs (below 1.2e-38) as 0; so does the reference
    x64 = np.where(np.abs(x32) < TINY32, 0.0, x32.astype(np.float64))
    got = np.asarray(safe_norm(jnp.asarray(x32)))
    np.testing.assert_allclose(got, np.linalg.norm(x64, axis=-1), rtol=2e-6)
    np.testing.assert_allclose(np.asarray(safe_norm(jnp.asarray(x32), axis=1)),
                               np.linalg.norm(x64, axis=1), rtol=2e-6)


def test_safe_norm_zeros_and_nonfinite():
    g = jnp.array([[0.0, 0.0], [np.nan, 1.0], [np.inf, 1.0], [-np.inf, np.nan]], jnp.float32)
    out = np.asarray(safe_norm(g))
    assert out[0] == 0.0
    assert np.isnan(out[1]) and out[2] == np.inf and np.isnan(out[3])


def test_scaled_reduction_spectra_and_tuples():
    rng = np.random.default_rng(1)
    j = (rng.standard_normal((3, 4, 4)) * 1e-30).astype(np.float32)
    sv, fro = scaled_reduction(
        lambda u: (jnp.linalg.svd(u, compute_uv=False), jnp.sqrt(jnp.sum(u * u, axis=(-2, -1)))),
        jnp.asarray(j), (-2, -1))
    j64 = j.astype(np.float64)
    np.testing.assert_allclose(np.asarray(sv), np.linalg.svd(j64, compute_uv=False), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(fro), np.linalg.norm(j64, axis=(-2, -1)), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The deep, long stack of the issue, at a size that runs in seconds.

LT = dict(layers=16, steps=200, hidden=32, batch=4, seed=0)


@pytest.fixture(scope="module")
def lstm_maps():
    """LSTM 16 x 200 hidden maps: float32 (safe and naive norms) and float64, same draws."""
    with P.precision("float32"):
        prob = P.problem("lstm", **LT)
        res32 = gradflow.gradient_map(prob.stack, prob.params, prob.xs, loss="last")
        loss = J.readout_loss("last", LT["hidden"], LT["steps"], LT["batch"])
        _, g, _ = J.state_gradients(prob.stack, prob.params, prob.xs, loss)
        naive = np.asarray(jnp.mean(jnp.sqrt(jnp.sum(g["h"] * g["h"], axis=-1)), axis=1))
    with P.precision("float64"):
        prob = P.problem("lstm", **LT, dtype="float64")
        res64 = gradflow.gradient_map(prob.stack, prob.params, prob.xs, loss="last")
    return res32, naive, res64


def test_deep_lstm_map_has_no_false_zeros(lstm_maps):
    res32, naive, res64 = lstm_maps
    v32, v64 = res32.values, res64.values
    assert v32.dtype == np.float32 and v64.dtype == np.float64
    representable = v64 > TINY32
    # the naive sqrt(sum g^2) loses the deep part of this very map (the test can fail)
    assert np.sum((naive == 0) & representable) > 100
    assert np.sum((v32 == 0) & representable) == 0
    assert np.all(v32[representable] > 0)
    # and the values are right, not just non-zero: float32 against float64, entry by entry
    rel = np.abs(v32.astype(np.float64) - v64) / v64
    assert np.max(rel[representable]) < 1e-4  # measured: 5.4e-6 (634 naive zeros)
    # the map spans many decades (the deep part is what is measured)
    assert np.log10(v64.max() / v64.min()) > 20


def test_deep_lstm_underflow_counted_consistently(lstm_maps):
    res32, _, res64 = lstm_maps
    below = res32.values < TINY32
    assert res32.underflow == {"values": int(below.sum())}
    assert res64.underflow == {"values": 0}
    # whatever float32 could not hold is below its range in float64 too
    assert np.all(res64.values[below] < 2 * TINY32)


# ---------------------------------------------------------------------------------------------
# Jacobian maps and local gains of tiny Jacobians: an RNN whose layer inputs are scaled down.


def _tiny_rnn(dtype, scale):
    """3-layer tanh RNN whose upper layers read their input through ``scale * W``: the vertical
    Jacobians are ~scale, so the Jacobian of the top w.r.t. layer 0 is ~scale^2."""
    prob = P.problem("rnn", layers=3, steps=5, hidden=8, batch=2, seed=2, dtype=dtype)
    layers = [dict(p) for p in prob.params["layers"]]
    for l in (1, 2):
        layers[l]["h"] = {**layers[l]["h"], "W": layers[l]["h"]["W"] * scale}
    return prob.stack, {**prob.params, "layers": layers}, prob.xs


@pytest.mark.parametrize("kw", [dict(norm="rms"), dict(norm="spectral"),
                                dict(method="probe", probes=4)], ids=["rms", "spectral", "probe"])
def test_tiny_jacobian_maps_match_float64(kw):
    maps = {}
    for dt in ("float32", "float64"):
        with P.precision(dt):
            stack, params, xs = _tiny_rnn(dt, 1e-12)
            maps[dt] = gradflow.jacobian_map(stack, params, xs, **kw)
    v32, v64 = maps["float32"].values, maps["float64"].values
    reach = v64 > 0
    assert v64[0][reach[0]].max() < 1e-20  # squares of these underflow in float32
    np.testing.assert_allclose(v32[reach], v64[reach], rtol=1e-4)
    assert np.all(v32[~reach] == 0)  # positions after the target: zero by structure...
    assert maps["float32"].underflow == {"values": 0}  # ...and not counted as underflow
    if "probe" in kw.values():
        np.testing.assert_allclose(maps["float32"].stderr[reach], maps["float64"].stderr[reach],
                                   rtol=1e-3)


def test_tiny_local_gains_match_float64():
    gains = {}
    for dt in ("float32", "float64"):
        with P.precision(dt):
            gains[dt] = gradflow.local_gains(*_tiny_rnn(dt, 1e-25))
    for k in ("vertical_rms", "vertical_spectral"):
        v32, v64 = gains["float32"][k][1:], gains["float64"][k][1:]
        assert v64.max() < 1e-20
        np.testing.assert_allclose(v32, v64, rtol=1e-4)


def test_true_underflow_is_counted_not_hidden():
    """W scaled by 1e-30: the map at layer 0 is ~1e-60 (a float64 number, a float32 zero)."""
    maps = {}
    for dt in ("float32", "float64"):
        with P.precision(dt):
            stack, params, xs = _tiny_rnn(dt, 1e-30)
            maps[dt] = gradflow.gradient_map(stack, params, xs, loss="all")
    r32, r64 = maps["float32"], maps["float64"]
    assert np.all(r64.values > 0)
    expected = int(np.sum(r64.values < TINY32))
    assert expected >= 5  # layer 0 at least
    assert r32.underflow == {"values": expected}
    assert r32.total_nonfinite == 0 and r64.underflow == {"values": 0}
    assert f"{expected} underflow" in repr(r32)
    # the CLI summary and the heatmap title say so
    lines = map_summary(r32.values, underflow=r32.underflow["values"])
    assert f"underflow entries: {expected} of {r32.values.size} (below the float32" in lines[-1]
    assert "non-finite entries: 0 of" in lines[-2]
    assert map_summary(r32.values)[-1] == lines[-1]  # counted from the dtype when not given
    fig = plot.heatmap(r32)
    assert f"({expected} underflow)" in fig.axes[0].get_title()
    fig64 = plot.heatmap(r64)
    assert "underflow" not in fig64.axes[0].get_title()


def test_callable_loss_declares_no_expectation():
    with P.precision("float32"):
        stack, params, xs = _tiny_rnn("float32", 1e-30)
        res = gradflow.gradient_map(stack, params, xs, loss=lambda out: jnp.sum(out[:, 2]))
    assert res.underflow == {}


def test_result_underflow_round_trips_and_old_files_load(tmp_path):
    v = np.array([[1.0, 0.0], [1e-41, 2.0]], np.float32)
    res = make_result("gradient_map", {"values": v}, {"cell": "x"}, positive={"values": True})
    assert res.underflow == {"values": 2} and res.total_underflow == 2
    back = gradflow.load(res.save(tmp_path / "r.npz"))
    assert back.underflow == {"values": 2}
    masked = make_result("jacobian_map", {"values": v}, {},
                         positive={"values": np.array([[True, False], [True, True]])})
    assert masked.underflow == {"values": 1}
    assert Result("gradient_map", {}, {}, {}).underflow == {}  # built without the count
    assert underflow_count(np.array([1e-45, 1e-38, 1e-30], np.float32)) == 2
    with pytest.raises(TypeError, match="floating"):
        underflow_count(np.array([0, 1]))


def test_grids_and_their_panels_count_underflow():
    """The compare/figure path: a gradient grid and the panels taken out of it count underflow
    where their loss reaches (a memory c at the last step does not: its exact zeros are not
    counted)."""
    experiments = importlib.import_module("gradflow.experiments")
    grid = experiments.gradient_grid(["lstm"], ["last"], wrt="cell", layers=2, steps=3,
                                     hidden=4, batch=2)
    v = grid["values/last/lstm"]
    assert np.all(v[:, -1] == 0) and np.all(v[:, :-1] > 0)
    assert grid.underflow == {"values/last/lstm": 0}
    assert experiments.panel(grid, "last", "lstm").underflow == {"values": 0}
    zeros = make_result("gradient_grid", {"values/all/rnn": np.zeros((2, 3), np.float32),
                                          "loss_value/all/rnn": np.float32(1.0)},
                        {"cells": ["rnn"], "losses": ["all"], "wrt": "hidden",
                         "maps": {"all/rnn": {"loss": "all", "wrt": "hidden"}}})
    assert experiments.panel(zeros, "all", "rnn").underflow == {"values": 6}


@pytest.mark.parametrize("scale", [1e37, 1e38, 2e38])
def test_huge_norms_are_not_flushed_to_zero(scale):
    """The other end: scaling by 1/max|x| is subnormal above 1/tiny (8.5e37 in float32),
    which XLA's CPU flushes to 0, so an exploding gradient of 1e38 read 0 and was counted as
    underflow. The scaling is by powers of two now: exact, and never subnormal."""
    x = np.zeros((3, 8), np.float32)
    x[:, 0] = scale
    x[1, 3] = -scale / 4
    expect = np.linalg.norm(x.astype(np.float64), axis=-1)
    got = np.asarray(jax.jit(safe_norm)(jnp.asarray(x)))
    np.testing.assert_allclose(got, expect, rtol=1e-6)
    assert float(safe_norm(jnp.full(2, 3e38, jnp.float32))) == np.inf  # 4.2e38 overflows


def test_exploding_maps_near_the_float32_limit_against_a_closed_form():
    """A 4-layer RNN with ``W = U = 100 I``, zero biases and zero inputs runs at exactly 0,
    where ``tanh' = 1``: the loss ``sum(out[:, -1] @ c)`` reaches ``h^l_t`` along every
    monotone lattice path, ``dL/dh^l_t = C(d + k, d) 100^(d + k) c`` (``d = L-1-l`` layers
    down, ``k = T-1-t`` steps back). Entries between 8.5e37 and 3.4e38 are representable
    float32 and must read as such (they read 0, "underflow"), larger ones inf; the parameter
    map's mean over 2H^2 + H entries of a bias gradient ``B C 100^(d+k) c`` must not overflow
    in its sum (it read inf at 1.2e37)."""
    from math import comb

    L, T, H, B, g = 4, 20, 8, 2, 100.0
    stack = gradflow.Stack("rnn", layers=L, input_size=H, hidden_size=H)
    params = stack.init(jax.random.key(0))
    for lp in params["layers"]:
        lp["h"].update(U=g * jnp.eye(H), W=g * jnp.eye(H))
    xs = jnp.zeros((B, T, H))
    c = jnp.ones(H)
    paths = np.array([[comb(L - 1 - l + T - 1 - t, L - 1 - l) * g ** (L - 1 - l + T - 1 - t)
                       for t in range(T)] for l in range(L)])
    with pytest.warns(NonFiniteWarning):
        hidden = gradflow.gradient_map(stack, params, xs, wrt="hidden",
                                       loss=lambda out: jnp.sum(out[:, -1] @ c))
    expect = paths * np.sqrt(H)
    band = (expect > 1 / TINY32) & (expect < np.finfo(np.float32).max)
    assert band.sum() >= 1  # the entries this test is about
    fits = expect < np.finfo(np.float32).max
    np.testing.assert_allclose(np.asarray(hidden.values)[fits], expect[fits], rtol=1e-5)
    assert not np.isfinite(np.asarray(hidden.values)[~fits]).any()  # inf, or NaN (inf - inf)
    assert not hidden.underflow.get("values") and hidden.nonfinite["values"] == int((~fits).sum())
    with pytest.warns(NonFiniteWarning):
        p = gradflow.gradient_map(stack, params, xs, wrt="params",
                                  loss=lambda out: jnp.sum(out[:, -1] @ c))
    expect = B * H * paths / (2 * H * H + H)  # only b's gradient: x = h = 0
    entry_fits = B * paths < np.finfo(np.float32).max  # each entry representable
    assert (entry_fits & (B * H * paths > np.finfo(np.float32).max)).sum() >= 1
    np.testing.assert_allclose(np.asarray(p.values)[entry_fits], expect[entry_fits], rtol=1e-5)
