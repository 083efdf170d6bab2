"""Initialisation schemes (cell option ``init=``) against their definitions (SPEC section 1).

orthogonal: every ``W_g``/``U_g`` block (semi-)orthogonal on its own, biases zero; glorot:
``U(-a, a)``, ``a = sqrt(6 / (in + out))``; torch: ``U(-1/sqrt(H), 1/sqrt(H))`` for weights and
biases; chrono: ``b_f = log U[1, T_max - 1]``, ``b_i = -b_f``; ugi: ``sigmoid(b_f) in
[1/H, 1 - 1/H]``, ``b_r = -b_f``; ``forget_bias_init``; combinations; determinism.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import Stack, cells

F64 = jnp.float64
KEY = jax.random.key(0)
# few distinct shapes: every new shape compiles the initialisers' primitives again
SMALL_IN, SMALL_H = 4, 6
BIG_IN, BIG_H = 16, 32


def init(cell, input_size, hidden, key=KEY):
    """``cell.init`` eagerly (its primitives compile once and are shared by every cell; a jitted
    init would compile the QR decompositions again for each cell): in float64 in tests that
    enable it (``x64``, where the check needs its precision), else in float32 as users get."""
    return cell.init(key, input_size, hidden, F64 if jax.config.jax_enable_x64 else jnp.float32)


def blocks(params):
    """Every 2-D weight block: ``{(gate, "W"|"U"): array}``."""
    return {(g, k): np.asarray(v) for g, q in params.items() if g != "time"
            for k, v in q.items() if k in ("W", "U")}


def biases(params):
    return {(g, k): np.asarray(v) for g, q in params.items() if g != "time"
            for k, v in q.items() if k.startswith("b")}


def assert_orthogonal(w):
    """``W^T W = I`` for ``W: (n, m)`` with ``n >= m``, else ``W W^T = I``."""
    n, m = w.shape
    gram = w.T @ w if n >= m else w @ w.T
    np.testing.assert_allclose(gram, np.eye(min(n, m)), atol=1e-10)


def is_orthogonal(w):
    n, m = w.shape
    gram = w.T @ w if n >= m else w @ w.T
    return np.allclose(gram, np.eye(min(n, m)), atol=1e-6)


# biases a cell's default init sets (all others must be zero)
SCHEME_BIASES = {"ur_lstm": {("f", "b"), ("r", "b")}, "ur_gru": {("f", "b"), ("refine", "b")},
                 "star:official": {("k", "b")}}


@pytest.mark.parametrize("name,opts", [(n, {}) for n in cells.names()]
                         + [("star", {"variant": "official"}), ("on_lstm", {"chunk_size": 2}),
                            ("lstm", {"init": "orthogonal"})],
                         ids=list(cells.names()) + ["star-official", "on_lstm-chunks2",
                                                    "lstm-in>H"])
def test_default_orthogonal_per_block_zero_biases_deterministic(name, opts, x64):
    cell = cells.get(name, **opts)
    H = SMALL_H
    n_in = H if cell.square else (9 if opts.get("init") else SMALL_IN)  # in < H and in > H
    p = init(cell, n_in, H)
    w = blocks(p)
    assert w, name
    for (g, k), v in w.items():
        assert_orthogonal(v)
    # per gate separately: no two blocks equal, and the fused matrix of all W blocks is not
    # orthogonal as a whole (a fused init would make it so, not each block)
    vals = list(w.values())
    assert all(not np.allclose(a, b) for i, a in enumerate(vals) for b in vals[i + 1:]
               if a.shape == b.shape)
    ws = [v for (g, k), v in w.items() if k == "W" and v.shape[1] == H]
    if len(ws) > 1 and n_in < H:
        assert not is_orthogonal(np.concatenate(ws, axis=1))
    key = name + (":" + opts["variant"] if "variant" in opts else "")
    for gk, b in biases(p).items():
        if gk in SCHEME_BIASES.get(key, ()):
            assert np.abs(b).min() > 0, (name, gk)
        else:
            assert not b.any(), (name, gk)
    # determinism: same key -> identical; another key -> every weight block differs
    same = init(cell, n_in, H)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p),
                                                    jax.tree_util.tree_leaves(same)))
    other = blocks(init(cell, n_in, H, jax.random.key(1)))
    assert all(not np.allclose(w[k], other[k]) for k in w)


def test_glorot_bounds():
    H, n_in = BIG_H, BIG_IN
    p = init(cells.get("gru", init="glorot"), n_in, H)
    for (g, k), v in blocks(p).items():
        a = math.sqrt(6.0 / (v.shape[0] + v.shape[1]))
        assert np.abs(v).max() <= a and np.abs(v).max() > 0.9 * a, (g, k)
        assert abs(v.var() / (a * a / 3.0) - 1.0) < 0.2, (g, k)  # uniform on [-a, a]
        assert not is_orthogonal(v)
    assert not any(b.any() for b in biases(p).values())


def test_torch_bounds():
    H, n_in = BIG_H, BIG_IN
    a = 1.0 / math.sqrt(H)
    p = init(cells.get("gru", init="torch"), n_in, H)
    leaves = {**blocks(p), **biases(p)}
    assert ("n", "b_hn") in leaves
    for gk, v in leaves.items():
        assert np.abs(v).max() <= a and np.abs(v).max() > 0.8 * a, gk
        assert np.abs(v).min() > 0, gk  # biases are random too
    allw = np.concatenate([v.ravel() for v in leaves.values()])
    assert abs(allw.var() / (a * a / 3.0) - 1.0) < 0.1


def test_chrono_lstm(x64):
    H, t_max = BIG_H, 50.0
    p = init(cells.get("lstm", init="chrono", t_max=t_max), BIG_IN, H)
    bf, bi = np.asarray(p["f"]["b"]), np.asarray(p["i"]["b"])
    assert bf.min() >= 0.0 and bf.max() <= math.log(t_max - 1)
    u = np.exp(bf)  # U[1, T_max - 1]
    assert u.max() > 0.8 * (t_max - 1) and u.min() < 1 + 0.2 * (t_max - 2)
    np.testing.assert_array_equal(bi, -bf)
    assert not p["g"]["b"].any() and not p["o"]["b"].any()
    for v in blocks(p).values():
        assert_orthogonal(v)


@pytest.mark.parametrize("name,opts,gate,sign", [
    ("gru", {}, "z", 1),                        # z keeps h_{t-1}
    ("mgu", {}, "f", -1),                       # Zhou's f admits the candidate: 1 - f keeps
    ("mgu", {"variant": "flax"}, "f", 1),
    ("star", {}, "k", -1),                      # paper: 1 - k keeps
    ("star", {"variant": "official"}, "k", 1),  # official: sigma(a) keeps
    ("ur_gru", {}, "f", 1),
])
def test_chrono_on_the_retention_gate(name, opts, gate, sign):
    """The fraction of the state kept at zero pre-activation is sigmoid(sign * b) with
    ``sign * b = log U[1, T_max - 1]``."""
    p = init(cells.get(name, init="chrono", **opts), BIG_IN, BIG_H)
    b = sign * np.asarray(p[gate]["b"])
    t_max = 784.0 if opts.get("variant") == "official" else 100.0
    assert b.min() >= 0.0 and b.max() <= math.log(t_max - 1) and b.max() > math.log(t_max / 4)


def test_star_official_defaults_to_chrono_784():
    cell = cells.get("star", variant="official")
    assert dict(cell.options)["init"] == "chrono" and dict(cell.options)["t_max"] == 784.0
    p = init(cell, BIG_IN, BIG_H)
    b = np.asarray(p["k"]["b"])
    assert b.min() >= 0.0 and b.max() <= math.log(783.0) and b.max() > math.log(100.0)
    assert not p["z"]["b"].any()
    # an explicit init overrides the default
    q = init(cells.get("star", variant="official", init="orthogonal"), SMALL_IN, SMALL_H)
    assert not q["k"]["b"].any()


@pytest.mark.parametrize("name,init_opt,refine_gate", [
    ("lstm", "ugi", None), ("ur_lstm", "ugi", "r"), ("ur_gru", "ugi", "refine"),
    ("ur_lstm", "glorot+ugi", "r"), ("ur_gru", "torch+ugi", "refine"),
])
def test_ugi(name, init_opt, refine_gate):
    H = BIG_H
    p = init(cells.get(name, init=init_opt), BIG_IN, H)
    f = 1.0 / (1.0 + np.exp(-np.asarray(p["f"]["b"])))
    assert f.min() >= 1.0 / H - 1e-12 and f.max() <= 1.0 - 1.0 / H + 1e-12
    assert f.min() < 0.2 and f.max() > 0.8  # spread over the interval
    if refine_gate:
        np.testing.assert_array_equal(p[refine_gate]["b"], -p["f"]["b"])
    if name == "lstm":
        assert not p["i"]["b"].any()  # UGI sets only the forget (and refine) bias
    if init_opt.startswith("glorot"):
        for v in blocks(p).values():
            assert np.abs(v).max() <= math.sqrt(6.0 / sum(v.shape)) and not is_orthogonal(v)
    if init_opt.startswith("torch"):
        assert np.abs(p["r"]["b"]).min() > 0 and np.abs(p["r"]["b"]).max() <= 1 / math.sqrt(H)


@pytest.mark.parametrize("name", ["ur_lstm", "ur_gru"])
def test_ugi_at_the_smallest_widths(name):
    """H = 2: both gates at 1/2 (b_f = 0). H = 1: the interval [1, 0] is empty, a ValueError
    (the bias was +inf, a forget gate stuck at 1, measured with only a warning)."""
    p = init(cells.get(name), BIG_IN, 2)
    np.testing.assert_array_equal(np.asarray(p["f"]["b"]), 0.0)
    with pytest.raises(ValueError, match=r"UGI .* needs a hidden size of 2 or more .* got 1"):
        init(cells.get(name), BIG_IN, 1)


@pytest.mark.parametrize("init_opt", ["glorot+chrono", "chrono+torch"])
def test_weight_and_bias_scheme_combined(init_opt):
    H, t_max = BIG_H, 20.0
    p = init(cells.get("lstm", init=init_opt, t_max=t_max), BIG_IN, H)
    bf = np.asarray(p["f"]["b"])
    assert bf.min() >= 0 and bf.max() <= math.log(t_max - 1)
    np.testing.assert_array_equal(p["i"]["b"], -bf)
    for v in blocks(p).values():
        assert not is_orthogonal(v)
        bound = (math.sqrt(6.0 / sum(v.shape)) if init_opt.startswith("glorot")
                 else 1.0 / math.sqrt(H))
        assert np.abs(v).max() <= bound
    if "torch" in init_opt:
        assert np.abs(p["o"]["b"]).min() > 0
    else:
        assert not p["o"]["b"].any()


@pytest.mark.parametrize("name,opts,gate,expect", [
    ("lstm", {}, "f", 1.5), ("lstm", {"init": "chrono"}, "f", 1.5), ("gru", {}, "z", 1.5),
    ("star", {}, "k", -1.5), ("ur_lstm", {}, "f", 1.5), ("g_lstm", {}, "f", 1.5),
])
def test_forget_bias_init(name, opts, gate, expect):
    """``forget_bias_init=v`` sets the retention bias to v (negated where ``1 - gate`` keeps)."""
    p = init(cells.get(name, forget_bias_init=1.5, **opts), SMALL_IN, SMALL_H)
    np.testing.assert_array_equal(p[gate]["b"], np.full(SMALL_H, expect))


def test_forget_bias_option_is_not_a_parameter():
    p = init(cells.get("lstm", forget_bias=1.0), SMALL_IN, SMALL_H)
    assert not p["f"]["b"].any()


def test_time_gate_inits(x64):
    H = BIG_H
    g = init(cells.get("g_lstm", steps=40, sigma_frac=0.25), BIG_IN, H)["time"]
    assert np.asarray(g["mu"]).min() >= 0 and np.asarray(g["mu"]).max() < 40
    assert np.asarray(g["mu"]).max() > 30
    np.testing.assert_allclose(g["sigma"], np.full(H, 10.0))
    ph = init(cells.get("phased_lstm", log_tau=(1.0, 5.0), shift_max=None), BIG_IN, H)["time"]
    tau, s = np.asarray(ph["tau"]), np.asarray(ph["s"])
    assert tau.min() >= math.e - 1e-12 and tau.max() <= math.exp(5) + 1e-9
    assert (s >= 0).all() and (s < tau).all()
    np.testing.assert_array_equal(ph["r_on"], np.full(H, 0.05))
    # the default: the authors' experiment script, tau = exp(U[1, 3]), s ~ U[0, 100)
    ph = init(cells.get("phased_lstm"), BIG_IN, H)["time"]
    tau, s = np.asarray(ph["tau"]), np.asarray(ph["s"])
    assert tau.min() >= math.e - 1e-12 and tau.max() <= math.exp(3) + 1e-9
    assert (s >= 0).all() and (s < 100).all() and s.max() > 50
    u = np.asarray(init(cells.get("indrnn", u_max=0.5), BIG_IN, H)["h"]["u"])
    assert u.min() >= 0 and u.max() <= 0.5 and u.max() > 0.4


def test_stack_init(x64):
    stack = Stack("lstm", 3, SMALL_IN, SMALL_H, input_projection=True)
    p = stack.init(KEY, F64)
    assert_orthogonal(np.asarray(p["input"]["W"]))
    assert not p["input"]["b"].any()
    # each layer its own key
    assert not np.allclose(p["layers"][0]["i"]["U"], p["layers"][1]["i"]["U"])
    q = stack.init(KEY, F64)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p),
                                                    jax.tree_util.tree_leaves(q)))


@pytest.mark.parametrize("bad,err,match", [
    ("xavier", ValueError, "orthogonal, glorot, torch, chrono, ugi"),
    ("glorot+torch", ValueError, "joined by"),
    ("chrono+ugi", ValueError, "joined by"),
    ("", ValueError, "unknown init"),
    (3, TypeError, "init must be a string"),
])
def test_bad_init(bad, err, match, x64):
    """Raised by cells.get (or, for the LSTM family, at the latest by init) for every cell."""
    for name in cells.names():
        with pytest.raises(err, match=match):
            cells.get(name, init=bad).init(KEY, SMALL_H, SMALL_H, F64)


def test_chrono_needs_t_max_above_2():
    with pytest.raises(ValueError, match="t_max > 2"):
        cells.get("lstm", init="chrono", t_max=2.0).init(KEY, SMALL_IN, SMALL_H, jnp.float32)
