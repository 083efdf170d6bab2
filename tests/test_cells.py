"""Cells against independent references.

* Flax: ``lstm``, ``gru`` and ``mgu(variant="flax")`` equal ``flax.linen`` ``LSTMCell``,
  ``GRUCell`` and ``MGUCell`` on ported weights (both directions of the name mapping), with
  non-zero biases, over several steps.
* NumPy: every cell and its main variants equal a NumPy transcription of SPEC section 1,
  written here from the SPEC's equations (no package function is called for the reference).
* Finite differences: ``jax.test_util.check_grads`` on every cell's step in float64.
* Errors: unknown names, options and choices raise one ValueError naming the valid ones.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from gradflow import cells

# ---------------------------------------------------------------------------------------------
# Cases: (name, options); every registered cell appears, with its main variants.

CASES = [
    ("rnn", {}),
    ("rnn", {"nonlinearity": "relu"}),
    ("indrnn", {}),
    ("lstm", {}),
    ("lstm", {"forget_bias": 1.0}),
    ("gru", {}),
    ("gru", {"reset": "before"}),
    ("mgu", {}),
    ("mgu", {"variant": "flax"}),
    ("star", {}),
    ("star", {"variant": "official"}),
    ("ur_lstm", {}),
    ("ur_gru", {}),
    ("ur_gru", {"reset": "after"}),
    ("ur_lstm", {"tie_refine_bias": True}),
    ("star", {"variant": "bn", "bn_stats": "population"}),
    ("refined_lstm", {}),
    ("refined_lstm", {"mode": "add"}),
    ("refined_gru", {}),
    ("refined_gru", {"mode": "add"}),
    ("refined_mgu", {}),
    ("refined_mgu", {"mode": "add"}),
    ("g_lstm", {}),
    ("phased_lstm", {}),
    ("on_lstm", {}),
    ("on_lstm", {"chunk_size": 2}),
    # Gu et al.'s primary gate O (cumax forget gate) and master gates without it (-M)
    ("lstm", {"ordered": True}),
    ("lstm", {"ordered": True, "aux": "refine", "tied": True}),
    ("lstm", {"aux": "master", "ordered": False, "chunk_size": 2}),
]
IDS = [n + "".join(f"-{k}={v}" for k, v in o.items()) for n, o in CASES]

B, H, D = 2, 4, 3
F64 = jnp.float64


def test_every_registered_cell_is_covered():
    assert {n for n, _ in CASES} == set(cells.names())


def sizes(cell):
    """Refined cells need in == H; the others read a different input size."""
    return (H, H) if cell.square else (D, H)


def random_params(cell, seed, input_size, hidden, dtype=F64, scale=0.5):
    """Random params in the cell's layout (shapes from ``cell.init``), every entry
    ``N(0.1, scale^2)``, so no bias is zero. Drawn with NumPy: a random point of parameter
    space, not the init distribution (that is tests/test_init.py's business).

    Time-gate params are drawn so that a few steps exercise every branch of the gate.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: cell.init(k, input_size, hidden, dtype), jax.random.key(0))
    p = jax.tree_util.tree_map(
        lambda a: jnp.asarray(scale * rng.standard_normal(a.shape) + 0.1, dtype), shapes)
    if "time" in p:
        u = lambda lo, hi: jnp.asarray(rng.uniform(lo, hi, hidden), dtype)  # noqa: E731
        if "mu" in p["time"]:
            p["time"] = {"mu": u(0.0, 4.0), "sigma": u(0.7, 2.5)}
        else:
            tau = u(2.0, 5.0)
            p["time"] = {"tau": tau, "s": u(0.0, 1.0) * tau, "r_on": u(0.3, 0.9)}
    return p


def random_state(cell, seed, batch, hidden, dtype=F64):
    rng = np.random.default_rng(seed)
    return {n: jnp.asarray(0.5 * rng.standard_normal((batch, hidden)), dtype)
            for n in cell.state_names}


# ---------------------------------------------------------------------------------------------
# NumPy reference: SPEC section 1, transcribed independently.


def _sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def _cumax(a, chunks):
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    y = np.cumsum(e / e.sum(axis=-1, keepdims=True), axis=-1)
    return np.repeat(y, chunks, axis=-1)


def _refine(f, r):
    """Gu et al.: g = r (1 - (1 - f)^2) + (1 - r) f^2."""
    return r * (1 - (1 - f) ** 2) + (1 - r) * f ** 2


def reference_step(name, opts, p, state, x, t):
    """One step of SPEC section 1 in NumPy: ``(new_state, h, gates)``; p, state, x are NumPy."""
    h = state["h"]

    def pre(g):  # W_g x + U_g h + b_g (UR-LSTM's tied refine bias: b_r = -b_f)
        return x @ p[g]["W"] + h @ p[g]["U"] + (p[g]["b"] if "b" in p[g] else -p["f"]["b"])

    mode = opts.get("mode", "mul")
    default_refined = {"refined_lstm": ("i", "o"), "refined_gru": ("z", "r"),
                       "refined_mgu": ("f",)}.get(name, ())
    rset = tuple(opts.get("refined", default_refined))

    def ref(g, v):  # Cheng et al.'s refined gate on the gates named in rset
        if g not in rset:
            return v
        return v * x if mode == "mul" else v + x

    if name == "rnn":
        a = pre("h")
        hn = np.maximum(a, 0.0) if opts.get("nonlinearity") == "relu" else np.tanh(a)
        return {"h": hn}, hn, {}
    if name == "indrnn":
        q = p["h"]
        hn = np.maximum(x @ q["W"] + q["u"] * h + q["b"], 0.0)
        return {"h": hn}, hn, {}
    # Gu et al.'s O: the forget gate through cumax; -M: master gates through a sigmoid
    forget = ((lambda a: _cumax(a, 1)) if opts.get("ordered") and opts.get("aux") != "master"
              else _sig)
    masters = ((lambda a, n: np.repeat(_sig(a), n, axis=-1)) if opts.get("ordered") is False
               else _cumax)
    if name == "lstm" and opts.get("aux") == "refine":  # tied, as ur_lstm
        name = "ur_lstm"
    if name in ("lstm", "refined_lstm", "g_lstm", "phased_lstm", "on_lstm"):
        c = state["c"]
        i = ref("i", _sig(pre("i")))
        f = ref("f", forget(pre("f") + opts.get("forget_bias", 0.0)))
        g = np.tanh(pre("g"))
        o = ref("o", _sig(pre("o")))
        gates = {"i": i, "f": f, "o": o, "g": g}  # g: the candidate (kind tanh)
        if name == "on_lstm" or opts.get("aux") == "master":
            chunks = opts.get("chunk_size", 1)
            fm = masters(pre("f_master"), chunks)
            im = 1.0 - masters(pre("i_master"), chunks)
            w = fm * im
            c_new = (f * w + (fm - w)) * c + (i * w + (im - w)) * g
            gates.update(f_master=fm, i_master=im)
        else:
            c_new = f * c + i * g
        h_new = o * np.tanh(c_new)
        if name == "g_lstm":
            mu, sd = p["time"]["mu"], p["time"]["sigma"]
            k = np.exp(-((t - mu) ** 2) / (2 * sd ** 2))
        elif name == "phased_lstm":
            tau, s, r_on = p["time"]["tau"], p["time"]["s"], p["time"]["r_on"]
            phi = np.mod(t - s, tau) / tau
            k = np.where(phi < r_on / 2, 2 * phi / r_on,
                         np.where(phi < r_on, 2 - 2 * phi / r_on, 1e-3 * phi))
        else:
            return {"c": c_new, "h": h_new}, h_new, gates
        k = np.broadcast_to(k, h.shape)
        c_new = k * c_new + (1 - k) * c
        h_new = k * h_new + (1 - k) * h
        return {"c": c_new, "h": h_new}, h_new, {**gates, "k": k}
    if name == "ur_lstm":
        c = state["c"]
        f, r, o = forget(pre("f")), _sig(pre("r")), _sig(pre("o"))
        g = _refine(f, r)
        u = np.tanh(pre("u"))
        c_new = g * c + (1 - g) * u
        h_new = o * np.tanh(c_new)
        return {"c": c_new, "h": h_new}, h_new, {"f": f, "r": r, "g": g, "o": o, "u": u}
    if name in ("gru", "refined_gru", "ur_gru"):
        r = ref("r", _sig(pre("r")))
        if opts.get("reset", "before" if name == "ur_gru" else "after") == "after":
            n = np.tanh(x @ p["n"]["W"] + p["n"]["b"] + r * (h @ p["n"]["U"] + p["n"]["b_hn"]))
        else:
            n = np.tanh(x @ p["n"]["W"] + (r * h) @ p["n"]["U"] + p["n"]["b"])
        if name == "ur_gru":
            f, rho = _sig(pre("f")), _sig(pre("refine"))
            g = _refine(f, rho)
            h_new = g * h + (1 - g) * n
            return {"h": h_new}, h_new, {"r": r, "f": f, "refine": rho, "g": g, "n": n}
        z = ref("z", _sig(pre("z")))
        h_new = (1 - z) * n + z * h
        return {"h": h_new}, h_new, {"r": r, "z": z, "n": n}
    if name in ("mgu", "refined_mgu"):
        f = ref("f", _sig(pre("f")))
        if opts.get("variant", "zhou") == "zhou":
            n = np.tanh(x @ p["n"]["W"] + (f * h) @ p["n"]["U"] + p["n"]["b"])
            h_new = (1 - f) * h + f * n
        else:  # flax's MGUCell
            n = np.tanh(x @ p["n"]["W"] + p["n"]["b"] + f * (h @ p["n"]["U"] + p["n"]["b_hn"]))
            h_new = (1 - f) * n + f * h
        return {"h": h_new}, h_new, {"f": f, "n": n}
    if name == "star" and opts.get("variant") == "bn":  # population statistics: 0 and 1
        bn = lambda v, q: q["scale"] * v / np.sqrt(1.0 + 1e-3) + q["offset"]  # noqa: E731
        a = (bn(x @ p["k"]["W"], p["bn"]["kx"]) + bn(h @ p["k"]["U"], p["bn"]["kh"])
             + p["k"]["b"])
        z = np.tanh(bn(x @ p["z"]["W"], p["bn"]["z"]) + p["z"]["b"])
        k = _sig(a)
        h_new = np.tanh(k * h + (1 - _sig(a - 1)) * z)
        return {"h": h_new}, h_new, {"k": k, "z": z}
    if name == "star":
        z = np.tanh(x @ p["z"]["W"] + p["z"]["b"])
        a = pre("k")
        k = _sig(a)
        if opts.get("variant", "paper") == "official":
            h_new = np.tanh(k * h + (1 - _sig(a - 1)) * z)
        else:
            h_new = np.tanh((1 - k) * h + k * z)
        return {"h": h_new}, h_new, {"k": k, "z": z}
    raise AssertionError(f"no reference for {name}")


def to_np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_step_matches_numpy_reference(name, opts, x64):
    cell = cells.get(name, **opts)
    n_in, n_h = sizes(cell)
    params = random_params(cell, 11, n_in, n_h)
    state = random_state(cell, 12, B, n_h)
    xs = jnp.asarray(np.random.default_rng(13).standard_normal((5, B, n_in)), F64)
    p_np, s_np = to_np(params), to_np(state)
    step = cell.step
    ks_seen = []
    for t in range(xs.shape[0]):
        state, h, gates = step(params, state, xs[t], t)
        s_np, h_np, g_np = reference_step(name, opts, p_np, s_np, np.asarray(xs[t]), t)
        assert h.shape == (B, n_h) and h.dtype == F64
        assert set(state) == set(cell.state_names)
        np.testing.assert_allclose(h, h_np, atol=1e-6, rtol=0)
        for k in cell.state_names:
            assert state[k].shape == (B, n_h)
            np.testing.assert_allclose(state[k], s_np[k], atol=1e-6, rtol=0)
        assert set(gates) == set(cell.gate_names)  # (jit returns dicts key-sorted)
        assert set(g_np) == set(cell.gate_names)
        for g in cell.gate_names:
            assert gates[g].shape == (B, n_h)
            np.testing.assert_allclose(gates[g], g_np[g], atol=1e-6, rtol=0)
        if "k" in g_np:
            ks_seen.append(g_np["k"])
    # the state actually moved (a cell that ignored its inputs would not pass)
    assert not np.allclose(h_np, 0.0)
    if name == "phased_lstm":  # every branch of the time gate was exercised
        k = np.stack(ks_seen)
        assert (k < 0.01).any() and ((k > 0.05) & (k < 0.999)).any()


def test_state_names_and_gates_match_spec(x64):
    expect_gates = {
        "rnn": (), "indrnn": (), "lstm": ("i", "f", "o", "g"), "gru": ("r", "z", "n"),
        "mgu": ("f", "n"), "star": ("k", "z"), "ur_lstm": ("f", "r", "g", "o", "u"),
        "ur_gru": ("r", "f", "refine", "g", "n"), "refined_lstm": ("i", "f", "o", "g"),
        "refined_gru": ("r", "z", "n"), "refined_mgu": ("f", "n"),
        "g_lstm": ("i", "f", "o", "g", "k"), "phased_lstm": ("i", "f", "o", "g", "k"),
        "on_lstm": ("i", "f", "f_master", "i_master", "o", "g"),
    }
    lstm_like = {"lstm", "ur_lstm", "refined_lstm", "g_lstm", "phased_lstm", "on_lstm"}
    for name in cells.names():
        cell = cells.get(name)
        assert set(cell.gate_names) == set(expect_gates[name]), name
        assert cell.state_names == (("c", "h") if name in lstm_like else ("h",)), name
        assert cell.square == name.startswith("refined_")
        s = cell.initial_state((3, 2), 5, F64)
        assert set(s) == set(cell.state_names)
        assert all(v.shape == (3, 2, 5) and v.dtype == F64 and not v.any() for v in s.values())


def test_step_accepts_extra_leading_axes(x64):
    """``x: (*batch, in)``: two batch axes give the same numbers as one flattened axis."""
    cell = cells.get("lstm")
    p = random_params(cell, 1, D, H)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 2, D)), F64)
    s = random_state(cell, 3, 6, H)
    step = jax.jit(cell.step)
    _, h_flat, _ = step(p, s, x.reshape(6, D), 0)
    _, h, _ = step(p, {k: v.reshape(3, 2, H) for k, v in s.items()}, x, 0)
    np.testing.assert_allclose(h.reshape(6, H), h_flat, atol=1e-12)


def test_param_layout_per_gate(x64):
    """SPEC: params[gate] = {"W": (in, H), "U": (H, H), "b": (H,)} (plus documented extras)."""
    extras = {("gru", "n"): {"b_hn"}, ("refined_gru", "n"): {"b_hn"}}
    for name in cells.names():
        cell = cells.get(name)
        n_in, n_h = sizes(cell)
        p = jax.eval_shape(lambda k: cell.init(k, n_in, n_h, F64), jax.random.key(0))
        for gate, q in p.items():
            if gate == "time":
                assert all(v.shape == (n_h,) for v in q.values())
                continue
            if name == "indrnn":
                assert set(q) == {"W", "u", "b"} and q["u"].shape == (n_h,)
            elif (name, gate) == ("star", "z"):
                assert set(q) == {"W", "b"}
            else:
                assert set(q) == {"W", "U", "b"} | extras.get((name, gate), set()), (name, gate)
                assert q["U"].shape == (n_h, n_h)
            assert q["W"].shape == (n_in, n_h) and q["b"].shape == (n_h,)
        assert cell.param_count(n_in, n_h) == sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(p))


# ---------------------------------------------------------------------------------------------
# Flax equivalence


# our (gate, key) -> flax (submodule, param), for each ported cell
FLAX_NAMES = {
    "lstm": {**{(g, "W"): ("i" + g, "kernel") for g in "ifgo"},
             **{(g, "U"): ("h" + g, "kernel") for g in "ifgo"},
             **{(g, "b"): ("h" + g, "bias") for g in "ifgo"}},
    "gru": {("r", "W"): ("ir", "kernel"), ("r", "b"): ("ir", "bias"), ("r", "U"): ("hr", "kernel"),
            ("z", "W"): ("iz", "kernel"), ("z", "b"): ("iz", "bias"), ("z", "U"): ("hz", "kernel"),
            ("n", "W"): ("in", "kernel"), ("n", "b"): ("in", "bias"), ("n", "U"): ("hn", "kernel"),
            ("n", "b_hn"): ("hn", "bias")},
    "mgu": {("f", "W"): ("if", "kernel"), ("f", "b"): ("if", "bias"), ("f", "U"): ("hf", "kernel"),
            ("n", "W"): ("in", "kernel"), ("n", "b"): ("in", "bias"), ("n", "U"): ("hn", "kernel"),
            ("n", "b_hn"): ("hn", "bias")},
}
FLAX_CELLS = {"lstm": (nn.LSTMCell, {}), "gru": (nn.GRUCell, {}),
              "mgu": (nn.MGUCell, {"variant": "flax"})}


def flax_to_ours(name, fp):
    out = {}
    for (g, k), (m, q) in FLAX_NAMES[name].items():
        out.setdefault(g, {})[k] = fp[m][q]
    return out


def ours_to_flax(name, p):
    out = {}
    for (g, k), (m, q) in FLAX_NAMES[name].items():
        out.setdefault(m, {})[q] = p[g][k]
    return out


def _flax_run(module, fparams, carry, xs):
    hs = []
    for t in range(xs.shape[0]):
        carry, h = module.apply({"params": fparams}, carry, xs[t])
        hs.append(h)
    return carry, jnp.stack(hs)


def _ours_run(cell, p, state, xs):
    hs = []
    for t in range(xs.shape[0]):
        state, h, _ = cell.step(p, state, xs[t], t)
        hs.append(h)
    return state, jnp.stack(hs)


@pytest.mark.parametrize("name", ["lstm", "gru", "mgu"])
@pytest.mark.parametrize("direction", ["flax_to_ours", "ours_to_flax"])
def test_flax_equivalence(name, direction):
    f32 = jnp.float32
    module_cls, opts = FLAX_CELLS[name]
    module = module_cls(features=H, param_dtype=f32)
    cell = cells.get(name, **opts)
    rng = np.random.default_rng(7)
    xs = jnp.asarray(rng.standard_normal((4, B, D)), f32)
    lstm = name == "lstm"
    c0 = jnp.asarray(0.5 * rng.standard_normal((2, B, H)), f32)
    fcarry = (c0[0], c0[1]) if lstm else c0[1]  # flax's LSTM carry is (c, h)
    ours_state = {"c": c0[0], "h": c0[1]} if lstm else {"h": c0[1]}
    fshapes = jax.eval_shape(module.init, jax.random.key(0), fcarry, xs[0])["params"]
    # the mapping is a bijection onto both parameter sets
    assert {(m, q) for m, v in fshapes.items() for q in v} == set(FLAX_NAMES[name].values())
    ours_tree = jax.tree_util.tree_structure(
        jax.eval_shape(lambda k: cell.init(k, D, H, f32), jax.random.key(0)))
    if direction == "flax_to_ours":
        fparams = jax.tree_util.tree_map(
            lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), f32), fshapes)
        p = flax_to_ours(name, fparams)
        assert jax.tree_util.tree_structure(p) == ours_tree
    else:
        p = random_params(cell, 8, D, H, f32)
        fparams = ours_to_flax(name, p)
        assert jax.tree_util.tree_map(jnp.shape, fparams) == jax.tree_util.tree_map(
            jnp.shape, fshapes)
    # all biases non-zero
    for q in p.values():
        for k, v in q.items():
            if k.startswith("b"):
                assert (jnp.abs(v) > 1e-4).all()
    fcarry, fh = _flax_run(module, fparams, fcarry, xs)
    state, h = _ours_run(cell, p, ours_state, xs)
    np.testing.assert_allclose(h, fh, atol=1e-5, rtol=0)
    if lstm:
        np.testing.assert_allclose(state["c"], fcarry[0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(state["h"], fcarry[1], atol=1e-5, rtol=0)
    else:
        np.testing.assert_allclose(state["h"], fcarry, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Finite differences


# every case but plain on_lstm (on_lstm chunks=2 runs the same master gates, and cumsum's
# gradient is slow to compile)
GRAD_CASES = [c for c in CASES if c != ("on_lstm", {})]


@pytest.mark.parametrize("name,opts", GRAD_CASES, ids=[i for c, i in zip(CASES, IDS)
                                                       if c in GRAD_CASES])
def test_step_grads_finite_differences(name, opts, x64):
    cell = cells.get(name, **opts)
    n_in, n_h = sizes(cell)
    params = random_params(cell, 5, n_in, n_h)
    state = random_state(cell, 6, B, n_h)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((B, n_in)), F64)
    step = lambda p, s, x: cell.step(p, s, x, 2)  # noqa: E731  (eager: primitives shared)
    check_grads(step, (params, state, x), order=1, modes=["rev"])


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_cell_lists_valid_names():
    with pytest.raises(ValueError, match="valid cells: .*lstm.*star"):
        cells.get("lstn")
    with pytest.raises(ValueError, match="valid cells"):
        cells.get(3)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match="valid options: .*forget_bias"):
        cells.get("lstm", forget_biass=1.0)
    with pytest.raises(ValueError, match="valid options: init"):
        cells.get("rnn", reset="after")
    with pytest.raises(ValueError, match="options cannot be given"):
        cells.get(cells.get("gru"), reset="before")


@pytest.mark.parametrize("name,opts,got", [
    ("lstm", {"mode": "add"}, "mode='add' shapes refined gates and this cell has none"),
    ("gru", {"mode": "add"}, "mode='add' shapes refined gates"),
    ("lstm", {"t_max": 64}, "t_max=64 sets chrono initialisation's range and "
                            "init='orthogonal' has no chrono bias"),
    ("mgu", {"t_max": 5.0, "init": "ugi"}, "init='ugi' has no chrono bias"),
    ("star", {"t_max": 50}, "t_max=50 sets chrono initialisation's range and "
                            "init='orthogonal' has no chrono bias"),
    ("star", {"variant": "bn", "init": "glorot", "t_max": 50}, "init='glorot' has no chrono"),
    ("star", {"bn_scale": 0.5}, "bn_scale and bn_stats shape BN-STAR's batch normalisation, "
                                "which variant='paper' does not have; give variant='bn'"),
    ("star", {"variant": "official", "bn_stats": "population"}, "variant='official' does not"),
])
def test_an_option_the_cell_would_not_read_is_refused(name, opts, got):
    """Options that change nothing in this configuration (a CLI --option mode=add on a plain
    LSTM gave bit-identical maps) are refused, naming what would make them count."""
    with pytest.raises(ValueError, match=re.escape(got)):
        cells.get(name, **opts)
    cells.get("lstm", t_max=64, init="glorot+chrono")  # where they are read: fine
    cells.get("star", t_max=50, init="chrono")
    cells.get("star", variant="official", t_max=50)  # (chrono by default)
    cells.get("star", variant="bn", bn_scale=0.5, bn_stats="population", t_max=50)
    cells.get("lstm", refined=("i",), mode="add")


@pytest.mark.parametrize("name,opts,got", [
    ("lstm", {"forget_bias": "abc"}, "forget_bias='abc' of cell 'lstm' takes a number "
                                     r"\(float\), got str"),
    ("lstm", {"forget_bias": True}, r"takes a number \(float\), got bool"),
    ("indrnn", {"u_max": [1.0]}, r"u_max=\[1.0\] of cell 'indrnn' takes a number"),
    ("g_lstm", {"steps": None}, r"steps=None of cell 'g_lstm' takes a number \(int\)"),
    ("lstm", {"forget_bias": float("inf")}, "forget_bias=inf of cell 'lstm' must be a finite "
                                            "number"),
    ("lstm", {"t_max": np.float32("nan")}, "t_max=nan of cell 'lstm' must be a finite number"),
    ("g_lstm", {"steps": 2.5}, "steps=2.5 of cell 'g_lstm' takes an integer, got 2.5"),
])
def test_a_number_option_given_something_else_is_named(name, opts, got):
    """An option typed float or int given a string (a CLI ``--option forget_bias=abc``), a
    bool, a list or None (where None is not allowed): one ValueError naming it (was Python's
    "could not convert string to float: 'abc'" from inside the factory)."""
    with pytest.raises(ValueError, match=got):
        cells.get(name, **opts)
    ok = {"forget_bias": jnp.float32(2.0), "u_max": np.float64(0.5), "steps": 10.0,
          "t_max": 50}
    k = next(iter(opts))
    extra = {"init": "chrono"} if k == "t_max" else {}  # (t_max is chrono's: unused else)
    assert float(dict(cells.get(name, **{k: ok[k]}, **extra).options)[k]) == float(ok[k])
    assert dict(cells.get("phased_lstm", shift_max=None).options)["shift_max"] is None
    # an integral float for an int option is that int (a CLI's steps=10.0): the same cell
    assert cells.get("g_lstm", steps=10.0) is cells.get("g_lstm", steps=10)


def test_a_range_option_takes_two_increasing_finite_numbers():
    """phased_lstm's log_tau: 'abc', 1 or three numbers failed inside the factory with
    Python's or JAX's words, and (3, 1) was accepted (every tau e^3, JAX clamping the range)."""
    assert dict(cells.get("phased_lstm", log_tau=[1, 5]).options)["log_tau"] == (1.0, 5.0)
    assert cells.get("phased_lstm", log_tau=[1, 3]) is cells.get("phased_lstm")
    for bad in ("abc", 1, (1, 2, 3), (1.0, float("nan")), (True, 2)):
        with pytest.raises(ValueError, match=rf"log_tau={re.escape(repr(bad))} of cell "
                                             r"'phased_lstm' takes two finite numbers"):
            cells.get("phased_lstm", log_tau=bad)
    with pytest.raises(ValueError, match=r"log_tau=\(3.0, 1.0\) .* with low < high"):
        cells.get("phased_lstm", log_tau=(3, 1))


def test_a_bool_option_takes_true_or_false_only():
    """``--option tied=False`` reached the factory as the string 'False', which is true: a
    tied LSTM under a header saying tied=False. Bools and the words true/false (any case) are
    read as bools; anything else is refused, naming the option."""
    for text, want in (("False", False), ("false", False), ("TRUE", True), (np.bool_(True),
                                                                           True)):
        cell = cells.get("lstm", tied=text)
        assert dict(cell.options)["tied"] is want
        assert cell is cells.get("lstm", tied=want)  # the same cell as the bool gives
    assert dict(cells.get("phased_lstm", test_time="False").options)["test_time"] is False
    for bad in ("maybe", "", 1, 0, None):
        with pytest.raises(ValueError, match=rf"option tied={re.escape(repr(bad))} of cell "
                                             r"'lstm' takes true or false, got "):
            cells.get("lstm", tied=bad)
    untied, tied = (cells.get("lstm", tied=v) for v in (False, True))
    n = {k: sum(a.size for a in jax.tree_util.tree_leaves(
        c.init(jax.random.key(0), 4, 8, jnp.float32))) for k, c in (("u", untied), ("t", tied))}
    assert n["t"] < n["u"]  # tying the gates' weights: fewer parameters


@pytest.mark.parametrize("name,opts,valid", [
    ("gru", {"reset": "middle"}, "'after', 'before'"),
    ("rnn", {"nonlinearity": "sigmoid"}, "'tanh', 'relu'"),
    ("mgu", {"variant": "cho"}, "'zhou', 'flax'"),
    ("star", {"variant": "tf"}, "'paper', 'official'"),
    ("lstm", {"aux": "ur"}, "None, 'refine', 'master'"),
    ("lstm", {"mode": "mult"}, "'mul', 'add'"),
    ("refined_gru", {"mode": "x"}, "'mul', 'add'"),
    ("refined_lstm", {"refined": ("g",)}, "'f', 'o', 'i'"),
    ("refined_mgu", {"refined": ("n",)}, "'f'"),
])
def test_invalid_choice_names_valid_values(name, opts, valid):
    with pytest.raises(ValueError, match="choose from " + valid.replace("(", r"\(")):
        cells.get(name, **opts)


def test_invalid_option_combinations():
    with pytest.raises(ValueError, match="tied"):
        cells.get("lstm", tied=True, aux="master")
    with pytest.raises(ValueError, match="chunk_size"):
        cells.get("lstm", chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        cells.get("on_lstm", chunk_size=0)
    with pytest.raises(ValueError, match="divisible"):
        cells.get("on_lstm", chunk_size=3).init(jax.random.key(0), 4, 4)
    for shift in ("forget_bias", "forget_bias_init"):
        with pytest.raises(ValueError, match=f"{shift} shifts the forget gate's sigmoid; "
                                             "ordered=True gives it the cumax activation"):
            cells.get("lstm", ordered=True, **{shift: 1.0})
    with pytest.raises(ValueError, match="ordered=False picks sigmoid master gates and needs "
                                         "aux='master'"):
        cells.get("lstm", ordered=False)
    with pytest.raises(ValueError, match=r"choose from 'o', 'i'"):  # f is no sigmoid to refine
        cells.get("lstm", ordered=True, refined=("f",))
    with pytest.raises(ValueError, match="forget-type gate"):
        cells.get("rnn", init="chrono")
    with pytest.raises(ValueError, match="forget-type gate"):
        cells.get("indrnn", init="ugi")


@pytest.mark.parametrize("name", ["refined_lstm", "refined_gru", "refined_mgu"])
def test_refined_cell_needs_square_input(name):
    cell = cells.get(name)
    with pytest.raises(ValueError, match="input_size == hidden_size"):
        cell.init(jax.random.key(0), 3, 4)
    jax.eval_shape(lambda k: cell.init(k, 4, 4), jax.random.key(0))  # square is fine


def test_cell_is_hashable_static_config():
    a, b = cells.get("lstm", forget_bias=1.0), cells.get("lstm", forget_bias=1.0)
    assert a == b and hash(a) == hash(b) and a != cells.get("lstm")
    assert cells.get(a.name, **dict(a.options)) == a
    assert a.config["cell"] == "lstm" and a.config["forget_bias"] == 1.0


# ---------------------------------------------------------------------------------------------
# Identity: the jit cache must never mix two cells up (issue 11's regression)


def _user_cell(act):
    def init(key, n_in, hidden, dtype):
        k1, k2 = jax.random.split(key)
        return {"W": jax.random.normal(k1, (n_in, hidden), dtype) / np.sqrt(n_in),
                "U": jax.random.normal(k2, (hidden, hidden), dtype) / np.sqrt(hidden)}

    def recur(p, state, x, t):
        h = act(x @ p["W"] + state["h"] @ p["U"])
        return {"h": h}, h, {}

    return cells.Cell(name="user", init_fn=init, recur_fn=recur)


def test_user_cells_with_one_name_never_share_a_compiled_map():
    import gradflow

    tanh_cell, sin_cell = _user_cell(jnp.tanh), _user_cell(jnp.sin)
    assert tanh_cell != sin_cell and hash(tanh_cell) != hash(sin_cell)
    maps = []
    for cell in (tanh_cell, sin_cell):
        stack = gradflow.Stack(cell, 3, 4, 8)
        params = stack.init(jax.random.key(0))
        xs = jax.random.normal(jax.random.key(1), (2, 5, 4))
        maps.append(gradflow.gradient_map(stack, params, xs).values)
        # each equals its own brute-force total derivative (perturbation gradients, Python loop)
        def loop_loss(eps, cell=cell, stack=stack, params=params, xs=xs):
            hs = []
            x = xs
            for l, p in enumerate(params["layers"]):
                h = jnp.zeros((2, 8))
                out = []
                for t in range(5):
                    _, h, _ = cell.step(p, {"h": h}, x[:, t], t)
                    h = h + eps[l, :, t]
                    out.append(h)
                x = jnp.stack(out, axis=1)
                hs.append(x)
            from gradflow.jacobian import readout_loss
            return readout_loss("last", 8, 5, 2)(hs[-1])

        g = jax.grad(loop_loss)(jnp.zeros((3, 2, 5, 8)))
        np.testing.assert_allclose(maps[-1], np.linalg.norm(g, axis=-1).mean(1), rtol=1e-5)
    assert not np.allclose(maps[0], maps[1])


def test_registered_cell_built_twice_is_one_cell_and_compiles_once():
    import gradflow

    a, b = cells.get("lstm"), cells.get("lstm", init="orthogonal")
    assert a is b
    from gradflow.jacobian import _state_map_local as _state_map

    xs = jnp.ones((2, 3, 4))
    before = None
    for cell in (a, b, cells.get("lstm")):
        stack = gradflow.Stack(cell, 2, 4, 4)
        gradflow.gradient_map(stack, stack.init(jax.random.key(0)), xs)
        size = _state_map._cache_size()
        assert before is None or size == before
        before = size


def test_bn_star_batch_statistics_match_numpy(x64):
    """BN-STAR in training mode: each step normalised by its batch's mean and variance."""
    cell = cells.get("star", variant="bn")
    p = to_np(random_params(cell, 0, 5, 6))
    x, h = np.random.default_rng(1).normal(size=(7, 5)), np.random.default_rng(2).normal(size=(7, 6))

    def bn(v, q):
        m, var = v.mean(0), v.var(0)
        return q["scale"] * (v - m) / np.sqrt(var + 1e-3) + q["offset"]

    a = bn(x @ p["k"]["W"], p["bn"]["kx"]) + bn(h @ p["k"]["U"], p["bn"]["kh"]) + p["k"]["b"]
    z = np.tanh(bn(x @ p["z"]["W"], p["bn"]["z"]) + p["z"]["b"])
    want = np.tanh(_sig(a) * h + (1 - _sig(a - 1)) * z)
    _, got, _ = cell.step(p, {"h": jnp.asarray(h)}, jnp.asarray(x), 0)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    fresh = cell.init(jax.random.key(0), 5, 6)
    np.testing.assert_allclose(fresh["bn"]["kx"]["scale"], 0.1)  # scale initialised to 0.1
    with pytest.raises(ValueError, match="bn_stats='population'"):
        cell.step(p, {"h": jnp.asarray(h[0])}, jnp.asarray(x[0]), 0)


def test_cumax_stays_in_the_unit_interval():
    """ON-LSTM's cumax (and the ordered forget gate) is 1 at the last unit in exact arithmetic;
    the rounded sum of a softmax gave 1 + ulp there, counted "outside [0, 1]" by the gate
    statistics. The clip at 1 moves only such entries."""
    from gradflow.cells.mechanisms import cumax

    a = jnp.asarray(np.random.default_rng(0).normal(0, 3, (4000, 16)), jnp.float32)
    raw = jnp.cumsum(jax.nn.softmax(a, axis=-1), axis=-1)
    assert bool(jnp.any(raw > 1))  # the rounding the clip is for happens here
    y = cumax(a)
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    np.testing.assert_allclose(y, raw, rtol=0, atol=2 * np.finfo(np.float32).eps)
    np.testing.assert_array_equal(y[raw <= 1], raw[raw <= 1])


def test_tied_refine_bias_equals_untied_at_ugi_init():
    tied, untied = cells.get("ur_lstm", tie_refine_bias=True), cells.get("ur_lstm")
    pt, pu = tied.init(jax.random.key(0), 3, 8), untied.init(jax.random.key(0), 3, 8)
    assert "b" not in pt["r"]
    np.testing.assert_allclose(pu["r"]["b"], -pu["f"]["b"])
    x, s0 = jnp.ones((2, 3)), untied.initial_state((2,), 8)
    np.testing.assert_allclose(tied.step(pt, s0, x)[1], untied.step(pu, s0, x)[1], rtol=1e-6)
    with pytest.raises(ValueError, match="needs aux='refine'"):
        cells.get("lstm", tie_refine_bias=True)


@pytest.mark.parametrize("name,opts", [(n, {}) for n in cells.names()] + [
    ("star", {"variant": "official"}), ("star", {"variant": "bn", "bn_stats": "population"}),
    ("lstm", {"init": "glorot+chrono", "t_max": 64}), ("phased_lstm", {"log_tau": [1, 5]}),
    ("lstm", {"tied": "true"})])
def test_a_cell_rebuilt_from_its_recorded_options_is_the_same_cell(name, opts):
    """Saved results and runs record a cell's resolved options (STAR's t_max=100.0 under its
    orthogonal init): building the cell again from them must pass every option check (a
    check of options the cell would not read refused STAR's own, and --params of a trained
    STAR with it) and give the very same cell (a STAR stack loaded from a run was != the
    original, its maps compiled again)."""
    cell = cells.get(name, **opts)
    again = cells.get(name, **dict(cell.options))
    assert dict(again.options) == dict(cell.options)
    assert again is cell


@pytest.mark.parametrize("make, match", [
    (lambda: cells.phased_lstm(r_on=2.0), r"option r_on=2.0 of cell 'phased_lstm' is the open "
                                          r"phase's share of each period, in \(0, 1\]"),
    (lambda: cells.phased_lstm(r_on=0.0), "option r_on=0.0"),
    (lambda: cells.phased_lstm(alpha=-1.0), "option alpha=-1.0 .* leak, in \\[0, 1\\)"),
    (lambda: cells.phased_lstm(shift_max=-5.0), "option shift_max=-5.0"),
    (lambda: cells.indrnn(u_max=-1.0), r"option u_max=-1.0 of cell 'indrnn' .* U\[0, u_max\]"),
])
def test_option_ranges_are_checked(make, match):
    """Values outside an option's meaning (an open phase longer than the period, negative
    recurrent weights under ``u ~ U[0, u_max]``) were built and measured silently."""
    with pytest.raises(ValueError, match=match):
        make()
    assert cells.indrnn(u_max=0.0).name == "indrnn"  # u = 0: a feed-forward ablation
