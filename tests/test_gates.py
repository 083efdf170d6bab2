"""gradflow.gates: every statistic against a NumPy re-implementation from the stack's raw gate
activations, and the closed forms of SPEC section 3 (zero pre-activations, UGI timescales, the
UR gate's bounds, g-LSTM's Gaussian update fraction)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import cells, gates
from gradflow.problem import problem
from gradflow.results import NonFiniteWarning, Result, make_result
from gradflow.stack import Stack

L, T, H, B = 2, 6, 8, 3
EPS = 0.1

# name -> (cell, options, dtype, expected gate kinds, refine gate name of the effective gate)
PROBLEMS = {
    "lstm": ("lstm", {}, "float64",
             {"i": "sigmoid", "f": "sigmoid", "o": "sigmoid", "g": "tanh"}, None),
    "ur_lstm": ("ur_lstm", {}, "float64", {"f": "sigmoid", "r": "sigmoid", "g": "effective",
                                           "o": "sigmoid", "u": "tanh"}, "r"),
    "ur_gru": ("ur_gru", {}, "float64", {"r": "sigmoid", "f": "sigmoid", "refine": "sigmoid",
                                         "g": "effective", "n": "tanh"}, "refine"),
    "star32": ("star", {}, "float32", {"k": "sigmoid", "z": "tanh"}, None),  # float32 too
    "on_lstm": ("on_lstm", {}, "float64", {"i": "sigmoid", "f": "sigmoid", "f_master": "master",
                                           "i_master": "master", "o": "sigmoid", "g": "tanh"},
                None),
    # Gu et al.'s O (a cumax forget gate: no element-wise slope) with the refine gate, and
    # sigmoid master gates (-M)
    "lstm_OR": ("lstm", {"ordered": True, "aux": "refine", "tied": True}, "float64",
                {"f": "master", "r": "sigmoid", "g": "effective", "o": "sigmoid", "u": "tanh"},
                "r"),
    "lstm_-M": ("lstm", {"aux": "master", "ordered": False}, "float64",
                {"i": "sigmoid", "f": "sigmoid", "f_master": "sigmoid", "i_master": "sigmoid",
                 "o": "sigmoid", "g": "tanh"}, None),
    "refined_lstm": ("refined_lstm", {}, "float64",
                     {"i": "refined", "f": "sigmoid", "o": "refined", "g": "tanh"}, None),
    # 5 data features: the stack projects them to H, and the refined gates read the projection
    "refined_gru_add": ("refined_gru", {"mode": "add", "input_size": 5}, "float64",
                        {"r": "refined", "z": "refined", "n": "tanh"}, None),
}
_CACHE = {}


def get(name):
    """The named problem (built once): stack, params scaled by 2.5 so that gates spread over
    (0, 1) and saturate, inputs of scale 2 (refined gates leave [0, 1])."""
    if name not in _CACHE:
        cell, opts, dtype = PROBLEMS[name][:3]
        # float32 problems: the float64 numbers rounded (cheaper than a second warm-up)
        p = problem(cell, layers=L, steps=T, hidden=H, batch=B, seed=7, dtype="float64",
                    input_scale=2.0, **opts)
        params = jax.tree_util.tree_map(lambda a: (2.5 * a).astype(dtype), p.params)
        _CACHE[name] = (p.stack, params, p.xs.astype(dtype), {**p.config, "dtype": dtype})
    return _CACHE[name]


def raw(stack, params, xs):
    """Raw gates and hidden states as NumPy: from an un-jitted run of the stack in float64,
    from the jitted ``gates.activations`` (no states) in float32."""
    if xs.dtype == jnp.float32:
        return {g: np.asarray(v) for g, v in gates.activations(stack, params, xs).items()}, None
    with jax.disable_jit():
        out = stack.apply(params, xs, gates=True)
    return {g: np.asarray(v) for g, v in out.gates.items()}, np.asarray(out.h)


def sig(z):
    return np.exp(-np.logaddexp(0.0, -z))


def effective_gate(zf, zr):
    """Gu et al.'s g = r(1-(1-f)^2) + (1-r)f^2 as a function of the two pre-activations."""
    f, r = sig(zf), sig(zr)
    return r * (1 - (1 - f) ** 2) + (1 - r) * f ** 2


def np_preactivation(params, xs, h, gate, forget_bias=0.0):
    """z^l_t = x^l_t W + h^l_{t-1} U + b for every layer, written out with NumPy loops."""
    out = np.zeros_like(h)
    x0 = np_layer_inputs(params, xs, h)[0]
    for l, p in enumerate(params["layers"]):
        x = x0 if l == 0 else h[l - 1]
        W, U, b = (np.asarray(p[gate][k]) for k in ("W", "U", "b"))
        prev = np.zeros_like(h[l, :, 0])
        for t in range(h.shape[2]):
            out[l, :, t] = x[:, t] @ W + prev @ U + b + (forget_bias if gate == "f" else 0.0)
            prev = h[l, :, t]
    return out


def np_layer_inputs(params, xs, h):
    """(L, B, T, H): the data (projected to H if the stack has an input projection), then the
    outputs of the layer below."""
    x0 = np.asarray(xs)
    if "input" in params:
        x0 = x0 @ np.asarray(params["input"]["W"]) + np.asarray(params["input"]["b"])
    return np.concatenate([x0[None], h[:-1]])


def put(ref, stat, gate, x, ok, unit=False, f=lambda v: v):
    """The scheme's map / layer / pooled (/ unit) reductions of x: (L, B, T, H), through f,
    each the mean over the entries where ``ok`` (the gate is finite)."""
    def mean(axis=None):
        with np.errstate(invalid="ignore"):
            return np.where(ok, x, 0).sum(axis=axis) / ok.sum(axis=axis)
    ref[f"{stat}/{gate}"] = f(mean((1, 3)))
    ref[f"{stat}/{gate}/layer"] = f(mean((1, 2, 3)))
    ref[f"{stat}/{gate}/pooled"] = f(mean())
    if unit:
        ref[f"{stat}/{gate}/unit"] = f(mean((1, 2)))


def reference(name, stack, params, xs, eps, bins=20, thr=1e-3):
    """Every array of gates.saturation, computed from the raw activations with plain NumPy."""
    kinds, rname = PROBLEMS[name][3], PROBLEMS[name][4]
    acts, h = raw(stack, params, xs)
    assert set(acts) == set(kinds)
    retain = dict(stack.cell.retain)
    opts = dict(stack.cell.options)
    ref = {"bin_edges": np.linspace(0, 1, bins + 1)}
    slope = {}
    for g, a in acts.items():
        if kinds[g] == "sigmoid":
            slope[g] = a * (1 - a)
        elif kinds[g] == "tanh":  # a candidate: slope 1 - a^2, its own range [-1, 1]
            slope[g] = 1 - a * a
            ref[f"bin_edges/{g}"] = np.linspace(-1, 1, bins + 1)
        elif kinds[g] == "refined":
            s = sig(np_preactivation(params, xs, h, g, opts.get("forget_bias", 0.0)))
            x = np_layer_inputs(params, xs, h)
            rebuilt = s * x if opts["mode"] == "mul" else s + x
            np.testing.assert_allclose(rebuilt, a, rtol=1e-10, atol=1e-12)  # reference is right
            slope[g] = s * (1 - s) * (np.abs(x) if opts["mode"] == "mul" else 1.0)
    for g, a in acts.items():
        if kinds[g] == "effective":
            # central differences of g(z_f, z_r) = refine(sigma(z_f), sigma(z_r)) in the logits
            # (a cumax forget gate has no logit: only the refine gate's slope, f held fixed)
            f, zr = acts["f"], np.log(acts[rname] / (1 - acts[rname]))
            gr = lambda zr: sig(zr) * (1 - (1 - f) ** 2) + (1 - sig(zr)) * f ** 2  # noqa: E731
            np.testing.assert_allclose(gr(zr), a, rtol=1e-9, atol=1e-12)
            d = 1e-6
            ok = np.isfinite(a)
            if kinds["f"] == "sigmoid":
                zf, gf = np.log(f / (1 - f)), effective_gate
                put(ref, "slope", g, np.abs(gf(zf + d, zr) - gf(zf - d, zr)) / (2 * d), ok)
            put(ref, "slope_refine", g, np.abs(gr(zr + d) - gr(zr - d)) / (2 * d), ok)
    return reference_of(acts, kinds, retain, eps, bins, thr, ref, slope), acts


def reference_of(acts, kinds, retain, eps, bins=20, thr=1e-3, ref=None, slope=None):
    """The arrays of the gate statistics of activations ``acts`` ``{gate: (L, B, T, H)}`` by
    NumPy; ``ref``, ``slope``: arrays and slopes already formed (refined and effective gates).
    Slopes of sigmoid and tanh gates from the activations."""
    ref = {"bin_edges": np.linspace(0, 1, bins + 1)} if ref is None else ref
    slope = {} if slope is None else slope
    for g, a in acts.items():
        if kinds[g] == "sigmoid":
            slope.setdefault(g, a * (1 - a))
        elif kinds[g] == "tanh":
            slope.setdefault(g, 1 - a * a)
            ref[f"bin_edges/{g}"] = np.linspace(-1, 1, bins + 1)
    for g, a in acts.items():
        ok = np.isfinite(a)
        put(ref, "mean", g, a, ok, unit=True)
        lo, hi = (-1, 1) if kinds[g] == "tanh" else (0, 1)
        sat = np.abs(a) > 1 - eps if kinds[g] == "tanh" else (a < eps) | (a > 1 - eps)
        put(ref, "saturated", g, sat.astype(float), ok)
        if g in slope:
            put(ref, "slope", g, slope[g], ok)
        if g in retain:
            kept = a if retain[g] == 1 else 1 - a
            with np.errstate(divide="ignore"):  # (a gate at 1: an infinite timescale)
                put(ref, "timescale", g, kept, ok, unit=True, f=lambda m: 1 / (1 - m))
        if kinds[g] == "time":
            put(ref, "update_fraction", g, (a > thr).astype(float), ok, unit=True)
        bad = ~np.isfinite(a)
        ref[f"nonfinite/{g}"] = bad.sum(axis=(1, 3))
        ref[f"nonfinite/{g}/layer"] = bad.sum(axis=(1, 2, 3))
        ref[f"nonfinite/{g}/pooled"] = bad.sum()
        hist = np.stack([np.histogram(a[l][np.isfinite(a[l])], bins=bins, range=(lo, hi))[0]
                         for l in range(a.shape[0])])
        out = np.stack([[(a[l] < lo).sum(), (a[l] > hi).sum(), np.isnan(a[l]).sum()]
                        for l in range(a.shape[0])])
        ref[f"hist/{g}"], ref[f"hist/{g}/pooled"] = hist, hist.sum(0)
        ref[f"outside/{g}"], ref[f"outside/{g}/pooled"] = out, out.sum(0)
    return ref


def near_edges(a, bins=20, tol=1e-12, product=False, tanh=False):
    """Per layer: how many values of a: (L, ...) lie within tol of a bin edge. The eager run of
    the reference and the jitted one may round such values (e.g. cumax's last entry, 1 +- ulp)
    to either side, so only these may change bins. ``product``: the values are products
    (a refined gate g * x), which rounding cannot move across 0: the edge at 0 is safe.
    ``tanh``: the bins span [-1, 1], which a tanh never leaves: its two ends are safe (a
    saturated tanh is +-1 or one ulp inside, the same end bin either way)."""
    v = a.reshape(a.shape[0], -1)
    edges = np.linspace(-1, 1, bins + 1)[1:-1] if tanh else np.linspace(0, 1, bins + 1)
    d = np.abs(v[..., None] - edges)
    if product:
        d[..., 0] = np.where(v != 0, np.inf, d[..., 0])
    return (d.min(-1) < tol).sum(-1)


def assert_matches(res, ref, rtol, acts):
    assert set(res.arrays) == set(ref)
    for k, want in ref.items():
        got = res.arrays[k]
        assert got.shape == np.shape(want), k
        if k.startswith(("hist/", "outside/")):
            g = k.split("/")[1]
            near = near_edges(acts[g], tanh=f"bin_edges/{g}" in ref)
            slack = near.sum() if k.endswith("pooled") else near[:, None]
            assert np.all(np.abs(got - want) <= slack), (k, got, want)
        elif np.issubdtype(np.asarray(want).dtype, np.integer):
            np.testing.assert_array_equal(got, want, err_msg=k)
        elif k.startswith("timescale"):  # as 1 - mean kept: a cumax gate's last unit is 1 or
            tol = 100 * np.finfo(got.dtype).eps  # 1 - ulp, its timescale inf or 1/ulp
            with np.errstate(divide="ignore"):
                np.testing.assert_allclose(1 / got, 1 / want, rtol=max(rtol, tol), atol=tol,
                                           err_msg=k)
        else:
            # the atol covers roundoff near zero (cumax's last entry); finite differences of
            # the effective gate get 1e-6
            tol = 1e-6 if k.startswith("slope") else 100 * np.finfo(got.dtype).eps
            np.testing.assert_allclose(got, want, rtol=max(rtol, tol), atol=tol, err_msg=k)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_statistics_match_numpy_reference(name, x64):
    stack, params, xs, cfg = get(name)
    if PROBLEMS[name][3].get("f") == "master":  # a cumax forget gate's last unit is 1: kept
        with pytest.warns(NonFiniteWarning, match="timescale/f/unit"):  # forever, inf steps
            res = gates.saturation(stack, params, xs, EPS, meta=cfg)
    else:
        res = gates.saturation(stack, params, xs, EPS, meta=cfg)
    ref, acts = reference(name, stack, params, xs, EPS)
    assert res.kind == "gate_stats"
    assert gates.gate_kinds(stack.cell) == PROBLEMS[name][3]
    assert res.config["gates"] == list(PROBLEMS[name][3])
    assert res.config["gate_kinds"] == PROBLEMS[name][3]
    assert res.config["eps"] == EPS and res.config["seed"] == 7 and res.config["steps"] == T
    assert_matches(res, ref, 1e-5 if cfg["dtype"] == "float32" else 1e-10, acts)
    # only cumax's ends (1 +- ulp, 0 +- ulp) sit on bin edges (and an effective gate made of a
    # cumax forget gate); elsewhere counts are exact (a multiplicative refined gate g * x is
    # tiny where its input is: a product, safe at 0)
    mul = stack.cell.config.get("mode") == "mul"
    kinds = PROBLEMS[name][3]
    cumax = {g for g, k in kinds.items() if k == "master" or (k == "effective"
                                                               and kinds["f"] == "master")}
    assert sum(near_edges(a, product=mul and kinds[g] == "refined", tanh=kinds[g] == "tanh").sum()
               for g, a in acts.items() if g not in cumax) == 0
    if name == "refined_gru_add":
        assert stack.input_projection and xs.shape[-1] == 5
    # the inputs are spread enough that the comparisons are not vacuous
    pooled = [float(res[f"saturated/{g}/pooled"]) for g in acts]
    assert max(pooled) > 0.05
    for g in acts:
        assert res[f"hist/{g}"].sum() + res[f"outside/{g}"].sum() == L * B * T * H
    if name.startswith("refined"):
        assert sum(int(res[f"outside/{g}/pooled"][:2].sum()) for g in acts) > 0


def test_slopes_function_matches_elementwise_reference(x64):
    stack, params, xs, _ = get("ur_lstm")
    s = {k: np.asarray(v) for k, v in gates.slopes(stack, params, xs).items()}
    acts, _ = raw(stack, params, xs)
    f, r = acts["f"], acts["r"]
    np.testing.assert_allclose(s["f"], f * (1 - f), rtol=1e-12, atol=1e-15)
    # Gu et al.: dg/dz_f = 2[r(1-f) + (1-r)f] f(1-f), dg/dz_r = ((1-(1-f)^2) - f^2) r(1-r)
    np.testing.assert_allclose(s["g"], 2 * (r * (1 - f) + (1 - r) * f) * f * (1 - f), rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(s["g:refine"], ((1 - (1 - f) ** 2) - f ** 2) * r * (1 - r),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["lstm", "ur_lstm", "ur_gru", "star32", "on_lstm"])
def test_zero_preactivation_closed_forms(name, x64):
    stack, params, xs, _ = get(name)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    res = gates.saturation(stack, zero, xs, EPS)
    kinds = PROBLEMS[name][3]
    retain = dict(stack.cell.retain)
    for g, kind in kinds.items():
        if kind == "master":
            continue
        if kind == "tanh":  # tanh(0) = 0, slope 1, in the bin [0, 0.1) of [-1, 1]
            np.testing.assert_array_equal(res[f"mean/{g}"], 0.0)
            np.testing.assert_array_equal(res[f"saturated/{g}"], 0.0)
            np.testing.assert_array_equal(res[f"slope/{g}"], 1.0)
            counts = np.zeros(20, int)
            counts[10] = B * T * H
            np.testing.assert_array_equal(res[f"hist/{g}"], np.tile(counts, (L, 1)))
            continue
        # sigma(0) = 1/2 for every sigmoid gate; refine(1/2, 1/2) = 3/8 + 1/8 = 1/2
        np.testing.assert_array_equal(res[f"mean/{g}"], 0.5)
        np.testing.assert_array_equal(res[f"saturated/{g}"], 0.0)
        # sigma'(0) = 1/4; effective gate: 2[1/4 + 1/4] * 1/4 = 1/4 and 2 * 1/4 * 1/4 = 1/8
        np.testing.assert_array_equal(res[f"slope/{g}"], 0.25)
        if kind == "effective":
            np.testing.assert_array_equal(res[f"slope_refine/{g}"], 0.125)
        if g in retain:
            np.testing.assert_array_equal(res[f"timescale/{g}"], 2.0)  # 1/(1 - 1/2)
        counts = np.zeros(20, int)
        counts[10] = B * T * H  # 0.5 lies in the bin [0.5, 0.55)
        np.testing.assert_array_equal(res[f"hist/{g}"], np.tile(counts, (L, 1)))
    if name == "on_lstm":
        # cumax(0) = cumsum(softmax(0)) = (j + 1)/H; i_master = 1 - that
        up = (np.arange(H) + 1) / H
        np.testing.assert_allclose(res["mean/f_master/unit"], np.tile(up, (L, 1)), rtol=1e-14)
        np.testing.assert_allclose(res["mean/i_master/unit"], np.tile(1 - up, (L, 1)),
                                   atol=1e-14)
        # exactly one unit of H is beyond 1 - eps (f_master = 1) or below eps (i_master = 0)
        np.testing.assert_allclose(res["saturated/f_master"], 1 / H)
        np.testing.assert_allclose(res["saturated/i_master"], 1 / H)
        assert "slope/f_master" not in res.arrays


def test_ugi_timescales_spread_over_one_to_hidden(x64):
    Hu = 64
    stack = Stack("lstm", 1, 4, Hu, cell_options={"init": "ugi"})
    # zero weights, UGI forget bias (the function the cell's init applies): f = sigma(b_f) at
    # every step and example. (Built from shapes: a full init at a new size costs seconds.)
    shapes = jax.eval_shape(lambda: stack.init(jax.random.key(0), jnp.float64))
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    bf = cells.mechanisms.ugi_bias(jax.random.key(3), Hu, jnp.float64)
    params["layers"][0]["f"]["b"] = bf
    xs = np.random.default_rng(3).normal(size=(2, 3, 4))
    res = gates.saturation(stack, params, xs)
    bf = np.asarray(bf)
    want = 1 + np.exp(bf)  # 1 / (1 - sigma(b)) = 1 + e^b
    ts = res["timescale/f/unit"][0]
    np.testing.assert_allclose(ts, want, rtol=1e-12)
    assert ts.min() >= Hu / (Hu - 1) - 1e-9 and ts.max() <= Hu + 1e-9  # u in [1/H, 1 - 1/H]
    assert ts.max() / ts.min() > Hu / 4
    # the map is the timescale of the mean kept fraction
    np.testing.assert_allclose(res["timescale/f"], 1 / (1 - sig(bf).mean()), rtol=1e-12)
    # the cell's own init applies this scheme to b_f (checked on a small cell: no run needed)
    small = cells.get("lstm", init="ugi").init(jax.random.key(4), 8, 8, jnp.float64)
    u = sig(np.asarray(small["f"]["b"]))
    assert np.all((u >= 1 / 8 - 1e-12) & (u <= 7 / 8 + 1e-12)) and np.ptp(u) > 0.3


def test_ur_effective_gate_within_bounds(x64):
    stack, params, xs, _ = get("ur_lstm")
    acts, _ = raw(stack, params, xs)
    f, g = acts["f"], acts["g"]
    assert np.all(f ** 2 <= g + 1e-15) and np.all(g <= 1 - (1 - f) ** 2 + 1e-15)
    assert np.ptp(f) > 0.5  # the check covers gates far from 1/2
    res = gates.saturation(stack, params, xs)
    lo, hi = (f ** 2).mean(axis=(1, 3)), (1 - (1 - f) ** 2).mean(axis=(1, 3))
    assert np.all(lo <= res["mean/g"] + 1e-15) and np.all(res["mean/g"] <= hi + 1e-15)


def test_g_lstm_update_fraction_matches_gaussian_mass(x64):
    Tg, sigma = 48, 1.5
    mu = np.array([6.3, 12.7, 20.2, 27.6, 33.1, 40.4, 9.9, 36.8])
    stack = Stack("g_lstm", 1, H, len(mu), cell_options={"steps": Tg})
    params = stack.init(jax.random.key(2), jnp.float64)
    params["layers"][0]["time"] = {"mu": jnp.asarray(mu), "sigma": jnp.full(len(mu), sigma)}
    xs = np.random.default_rng(2).normal(size=(B, Tg, H))
    res = gates.saturation(stack, params, xs)
    # k_t > 1e-3  <=>  |t - mu| < sigma sqrt(2 ln 1000)
    w = sigma * math.sqrt(2 * math.log(1000))
    t = np.arange(Tg)[:, None]
    assert np.abs(np.abs(t - mu) - w).min() > 1e-3  # no step sits on the threshold
    count = (np.abs(t - mu) < w).sum(0)
    np.testing.assert_array_equal(res["update_fraction/k/unit"][0], count / Tg)
    np.testing.assert_allclose(res["update_fraction/k/pooled"], count.mean() / Tg, rtol=1e-12)
    # each neuron updates on only a few steps, about the continuous mass 2 w / T
    assert np.all(count <= 12)
    np.testing.assert_allclose(count / Tg, 2 * w / Tg, atol=1 / Tg)
    # openness: sum_t k_t = sigma sqrt(2 pi) up to the tails beyond [0, T) (mu >= 4 sigma inside)
    np.testing.assert_allclose(res["mean/k/unit"][0], sigma * math.sqrt(2 * math.pi) / Tg,
                               rtol=1e-3)
    np.testing.assert_allclose(res["update_fraction/k"][0],
                               (np.abs(t - mu) < w).mean(1), rtol=1e-12)  # per step
    assert gates.summary(res)["k"]["update_fraction"] == pytest.approx(count.mean() / Tg)


def test_time_gates_are_only_those_of_time_gated_cells():
    assert gates.gate_kinds(cells.get("g_lstm"))["k"] == "time"
    assert gates.gate_kinds(cells.get("phased_lstm"))["k"] == "time"
    assert gates.gate_kinds(cells.get("star"))["k"] == "sigmoid"  # star's k is a sigmoid gate
    assert gates.gate_kinds(cells.get("rnn")) == {}


def test_nonfinite_activations_are_counted_not_raised(x64):
    stack, params, xs, _ = get("lstm")
    bad = jax.tree_util.tree_map(lambda a: a, params)
    bad["layers"][0]["f"]["b"] = bad["layers"][0]["f"]["b"].at[0].set(jnp.nan)
    acts, _ = raw(stack, bad, xs)
    with pytest.warns(NonFiniteWarning):
        res = gates.saturation(stack, bad, xs, EPS)
    for g, a in acts.items():
        nan = np.isnan(a)
        np.testing.assert_array_equal(res[f"nonfinite/{g}"], nan.sum(axis=(1, 3)))
        np.testing.assert_array_equal(res[f"outside/{g}"][:, 2], nan.sum(axis=(1, 2, 3)))
        assert res[f"hist/{g}"].sum() + res[f"outside/{g}"].sum() == a.size
        # a NaN is left out: fractions and means are over the finite entries
        ok = ~nan
        sat = np.abs(a) > 1 - EPS if g == "g" else (a < EPS) | (a > 1 - EPS)  # g: tanh
        with np.errstate(invalid="ignore"):  # 0/0: a unit with no finite entry is NaN in both
            want = (sat & ok).sum(axis=(1, 3)) / ok.sum(axis=(1, 3))
        np.testing.assert_allclose(res[f"saturated/{g}"], want)
        assert np.isfinite(res[f"mean/{g}/pooled"]) and np.isfinite(res[f"saturated/{g}/pooled"])
    assert res["nonfinite/f/pooled"] > 0
    ref, _ = reference("lstm", stack, bad, xs, EPS)
    for k in ref:  # equal to the NumPy reference, NaN where it has NaN
        np.testing.assert_allclose(res[k], ref[k], rtol=1e-10, equal_nan=True, err_msg=k)


def test_inputs_that_are_not_finite_are_refused_as_by_the_maps(x64):
    stack, params, xs, _ = get("lstm")
    for bad in (jnp.nan, jnp.inf):
        with pytest.raises(ValueError, match="inputs contain NaN or inf"):
            gates.saturation(stack, params, xs.at[0, 1, 2].set(bad))
    with pytest.raises(ValueError, match="input_scale must be a finite number below"):
        problem("lstm", layers=2, steps=3, hidden=4, input_scale=1e39)


def test_a_stack_of_one_gate_layout_at_other_options_has_gate_statistics(x64):
    """An LSTM at forget bias 0 under one at 1 (or refined cells at two biases: the slope reads
    each layer's own pre-activation): statistics per layer as from the raw gates; a stack whose
    layers report other gates has each over the layers that report it."""
    from gradflow.stack import Stack

    lstm1 = cells.get("lstm", forget_bias=1.0)
    stack = Stack([cells.get("lstm"), lstm1], 2, 4, 6)
    params = stack.init(jax.random.key(0), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (3, 5, 4), jnp.float64)
    res = gates.saturation(stack, params, xs, EPS)
    f = np.asarray(gates.activations(stack, params, xs)["f"])
    np.testing.assert_allclose(res["saturated/f/layer"],
                               ((f < EPS) | (f > 1 - EPS)).mean(axis=(1, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(res["mean/f/layer"], f.mean(axis=(1, 2, 3)), rtol=1e-12)
    assert res["mean/f/layer"][1] > res["mean/f/layer"][0]  # the bias shows
    # refined cells: the slope from each layer's own pre-activation (its own forget bias)
    mixed = Stack([cells.get("refined_lstm"), cells.get("refined_lstm", forget_bias=2.0)],
                  2, 6, 6)
    p = mixed.init(jax.random.key(2), jnp.float64)
    x = jax.random.normal(jax.random.key(3), (3, 5, 6), jnp.float64)
    got = gates.slopes(mixed, p, x)["f"]
    inputs = mixed.layer_inputs(p, x, mixed.apply(p, x))  # [(B, T, in_l)]
    for l, c in enumerate(mixed.cells):  # each layer as a one-layer stack of its own cell
        alone = gates.slopes(Stack(c, 1, 6, 6), {"layers": [p["layers"][l]]}, inputs[l])
        np.testing.assert_allclose(got[l], alone["f"][0], rtol=1e-12)
    assert not np.allclose(got[0], got[1])
    # layers of other gates: each gate over the layers that report it (tests/test_widths.py)
    other = Stack([cells.get("lstm"), cells.get("ur_lstm")], 2, 4, 6)
    st = gates.saturation(other, other.init(jax.random.key(0), jnp.float64), xs)
    assert st.config["gate_layers"]["g@ur_lstm"] == [1] and st.config["gate_layers"]["f"] == [0, 1]


def test_save_load_roundtrip(tmp_path, x64):
    stack, params, xs, cfg = get("ur_gru")
    res = gates.saturation(stack, params, xs, meta=cfg)
    back = Result.load(res.save(tmp_path / "gates"))
    assert back.kind == res.kind and back.config == res.config and back.nonfinite == res.nonfinite
    assert set(back.arrays) == set(res.arrays)
    for k, v in res.arrays.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert gates.summary(back) == gates.summary(res)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_histogram_of_a_tanh_gate_is_over_minus_one_to_one_by_hand(dtype, x64):
    """4 bins over [-1, 1] (edges -1, -0.5, 0, 0.5, 1; the last bin closed), counted by hand:
    values on the edges go up, -1 and 1 are inside, -1.2/1.5/inf outside, NaN apart. The same
    values as a sigmoid gate are counted on [0, 1]: the negatives are below it."""
    a = jnp.asarray([[-1.0, -0.95, -0.5, -0.25, 0.0, 0.5, 0.75, 1.0, -1.2, 1.5, np.inf, np.nan]],
                    dtype)
    counts, outside = gates.histogram(a, 4, kind="tanh")
    assert counts.tolist() == [[2, 2, 1, 3]] and outside.tolist() == [[1, 2, 1]]
    counts, outside = gates.histogram(a, 4)
    assert counts.tolist() == [[1, 0, 1, 2]] and outside.tolist() == [[5, 2, 1]]
    np.testing.assert_array_equal(gates.bin_edges(4, "tanh"), [-1.0, -0.5, 0.0, 0.5, 1.0])
    assert gates.value_range("tanh") == (-1.0, 1.0)
    assert {gates.value_range(k) for k in gates.KINDS if k != "tanh"} == {(0.0, 1.0)}


def _np_lstm_gates(params, xs):
    """``f = sigma(x W_f + h U_f + b_f)`` and the candidate ``g = tanh(x W_g + h U_g + b_g)``
    of a plain LSTM (gradflow's parameter layout), every layer and step, by a NumPy loop in
    float64: ``(L, B, T, H)`` each."""
    sig_ = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    x = np.asarray(xs, np.float64)
    fs, gs = [], []
    for lp in params["layers"]:
        p = {k: {n: np.asarray(v, np.float64) for n, v in w.items()} for k, w in lp.items()}
        Bn, Tn = x.shape[:2]
        Hn = p["f"]["U"].shape[0]
        c, h, f_l, g_l, hs = np.zeros((Bn, Hn)), np.zeros((Bn, Hn)), [], [], []
        for t in range(Tn):
            z = {k: x[:, t] @ p[k]["W"] + h @ p[k]["U"] + p[k]["b"] for k in "ifgo"}
            f_l.append(sig_(z["f"]))
            g_l.append(np.tanh(z["g"]))
            c = sig_(z["f"]) * c + sig_(z["i"]) * np.tanh(z["g"])
            h = sig_(z["o"]) * np.tanh(c)
            hs.append(h)
        fs.append(np.stack(f_l, 1))
        gs.append(np.stack(g_l, 1))
        x = np.stack(hs, 1)
    return np.stack(fs), np.stack(gs)


def test_tanh_gate_histogram_spans_its_own_range(tmp_path, x64):
    """A user LSTM reporting its tanh candidate (kind "tanh", as the adapters detect it): its
    histogram is over [-1, 1] with edges ``bin_edges/g``, nothing counted outside; the sigmoid
    gate keeps the shared [0, 1] ``bin_edges``. Checked against a NumPy loop of the cell."""
    def step(p, carry, x):
        c, h = carry
        z = {k: x @ p[k]["W"] + h @ p[k]["U"] + p[k]["b"] for k in "ifgo"}
        c = jax.nn.sigmoid(z["f"]) * c + jax.nn.sigmoid(z["i"]) * jnp.tanh(z["g"])
        h = jax.nn.sigmoid(z["o"]) * jnp.tanh(c)
        return (c, h), h

    def report(p, carry, x):
        z = {k: x @ p[k]["W"] + carry[1] @ p[k]["U"] + p[k]["b"] for k in "fg"}
        return {"f": jax.nn.sigmoid(z["f"]), "g": jnp.tanh(z["g"])}

    cell = cells.from_function(step, lambda key, n_in, n_h, dt: cells.get("lstm").init(
        key, n_in, n_h, dt), hidden_size=H, state=2, gates=report)
    assert cell.kinds == {"f": "sigmoid", "g": "tanh"}
    stack = Stack(cell, L, H, H)
    params = jax.tree_util.tree_map(lambda a: 2.5 * a,
                                    stack.init(jax.random.key(3), jnp.float64))
    xs = 2.0 * jax.random.normal(jax.random.key(4), (B, T, H), jnp.float64)
    bins = 10
    res = gates.saturation(stack, params, xs, EPS, bins=bins)
    f, g = _np_lstm_gates(params, xs)
    assert (g < 0).mean() > 0.3 and (np.abs(g) > 1 - EPS).any()  # both tails are populated
    for name, a, (lo, hi) in (("f", f, (0.0, 1.0)), ("g", g, (-1.0, 1.0))):
        want = np.stack([np.histogram(a[l], bins=bins, range=(lo, hi))[0] for l in range(L)])
        np.testing.assert_array_equal(res[f"hist/{name}"], want, err_msg=name)
        np.testing.assert_array_equal(res[f"hist/{name}/pooled"], want.sum(0))
        np.testing.assert_array_equal(res[f"outside/{name}"], np.zeros((L, 3)))
        np.testing.assert_allclose(gates.hist_edges(res, name), np.linspace(lo, hi, bins + 1))
        assert res[f"hist/{name}"].sum() == L * B * T * H
    np.testing.assert_allclose(res["saturated/g"], (np.abs(g) > 1 - EPS).mean(axis=(1, 3)))
    np.testing.assert_array_equal(res["bin_edges"], np.linspace(0, 1, bins + 1))
    np.testing.assert_array_equal(res["bin_edges/g"], np.linspace(-1, 1, bins + 1))
    assert "bin_edges/f" not in res.arrays
    # saved and loaded; a file written before per-gate edges (no bin_edges/g) reads on [0, 1],
    # the range its histograms had
    back = Result.load(res.save(tmp_path / "tanh"))
    np.testing.assert_array_equal(gates.hist_edges(back, "g"), res["bin_edges/g"])
    old = Result.load(make_result("gate_stats", {k: v for k, v in res.arrays.items()
                                                 if k != "bin_edges/g"}, res.config
                                  ).save(tmp_path / "old"))
    np.testing.assert_array_equal(gates.hist_edges(old, "g"), np.linspace(0, 1, bins + 1))


@pytest.mark.parametrize("eps", [0.0, -0.1, 0.5, 0.7, float("nan")])
def test_eps_must_lie_in_open_interval(eps, x64):
    stack, params, xs, _ = get("lstm")
    with pytest.raises(ValueError, match="eps"):
        gates.saturation(stack, params, xs, eps)


def test_bad_arguments_raise_clear_errors(x64):
    stack, params, xs, _ = get("lstm")
    with pytest.raises(TypeError, match="eps"):
        gates.saturation(stack, params, xs, "0.1")
    with pytest.raises(ValueError, match="bins"):
        gates.saturation(stack, params, xs, bins=0)
    with pytest.raises(ValueError, match="bins=10001: at most 10,000"):
        gates.saturation(stack, params, xs, bins=gates.MAX_BINS + 1)
    with pytest.raises(ValueError, match="update_threshold"):
        gates.saturation(stack, params, xs, update_threshold=1.0)
    with pytest.raises(TypeError, match="Stack"):
        gates.saturation("lstm", params, xs)
    with pytest.raises(ValueError, match="shape"):
        gates.saturation(stack, params, xs[:, :, :3])
    with pytest.raises(TypeError, match="meta"):
        gates.saturation(stack, params, xs, meta=[1])
    with pytest.raises(ValueError, match="duplicate"):
        gates.compare(["lstm", ("lstm", "gru", {})])
    with pytest.raises(TypeError, match="entries"):
        gates.compare([3])
    with pytest.raises(ValueError, match="gate_stats"):
        gates.summary(Result("gradient_map", {}, {}, {}))


def test_cell_without_gates_says_so():
    p = problem("rnn", layers=L, steps=T, hidden=H, batch=B)
    with pytest.raises(ValueError, match="reports no gates.*gates="):
        gates.saturation(p.stack, p.params, p.xs)


def test_compare_runs_each_cell_on_the_same_problem(x64):
    grid = [("LSTM", "lstm", {}), ("UR", "ur_lstm", {})]
    size = dict(layers=L, steps=T, hidden=H, batch=B, seed=5, dtype="float64")
    out = gates.compare(grid, eps=EPS, **size)
    assert list(out) == ["LSTM", "UR"]
    for label, cell, opts in grid:
        p = problem(cell, **size, **opts)
        direct = gates.saturation(p.stack, p.params, p.xs, EPS)
        assert out[label].config["label"] == label and out[label].config["seed"] == 5
        assert out[label].config["cell"] == cell and out[label].config["eps"] == EPS
        assert set(out[label].arrays) == set(direct.arrays)
        for k, v in direct.arrays.items():
            np.testing.assert_array_equal(out[label][k], v, err_msg=k)
    # UGI (UR-LSTM's default) spreads the forget gates' timescales; zero biases keep them near 2
    assert np.ptp(out["UR"]["timescale/f/unit"]) > 2 * np.ptp(out["LSTM"]["timescale/f/unit"])


def test_gu_grid_entries_are_valid_cells():
    labels = [e[0] for e in gates.GU_GRID]
    assert len(set(labels)) == len(labels)
    kinds = {label: gates.gate_kinds(Stack(cell, 1, 4, 4, cell_options=opts).cell)
             for label, cell, opts in gates.GU_GRID}
    assert kinds["LSTM+R"]["g"] == kinds["UR-LSTM"]["g"] == "effective"
    assert kinds["ON-LSTM"]["f_master"] == "master"
    assert set(kinds["LSTM"].values()) == set(kinds["LSTM+UGI"].values()) == {"sigmoid", "tanh"}


def test_gu_ablation_grid_is_a_loop_over_options(x64):
    """Gu et al.'s primary x auxiliary grid as lstm options: nine distinct cells, the two the
    paper names as models equal to them (UR = ur_lstm, OM = on_lstm: same statistics on the
    same problem), and the O rows' forget (or master) gates cumax: rising across the units."""
    assert [e[0] for e in gates.GU_ABLATION] == ["--", "-R", "-M", "U-", "UR", "UM", "O-",
                                                 "OR", "OM"]
    size = dict(layers=1, steps=T, hidden=H, batch=B, seed=5, dtype="float64")
    with pytest.warns(NonFiniteWarning, match="timescale/f/unit"):  # the O rows' last unit
        out = gates.compare(gates.GU_ABLATION, **size)
    assert len({Stack(c, 1, 4, 4, cell_options=o).cell for _, c, o in gates.GU_ABLATION}) == 9
    named = gates.compare([("UR", "ur_lstm", {}), ("OM", "on_lstm", {})], **size)
    for label in named:
        assert set(out[label].arrays) == set(named[label].arrays)
        for k, v in named[label].arrays.items():
            np.testing.assert_array_equal(out[label][k], v, err_msg=f"{label} {k}")
    options = {label: o for label, _, o in gates.GU_ABLATION}
    for label, gate in (("O-", "f"), ("OR", "f"), ("OM", "f_master"), ("-M", "f_master")):
        p = problem("lstm", **size, **options[label])
        a = np.asarray(gates.activations(p.stack, p.params, p.xs)[gate])
        rising = bool(np.all(np.diff(a, axis=-1) >= -1e-15))
        assert rising == (label != "-M"), label  # cumax rises; -M's sigmoid master does not


def test_the_traceable_reductions_differentiate(x64):
    """gates.reductions under jax.grad/jvp (a saturation or slope penalty): finite differences
    agree (float64); it failed inside JAX on the integer rows' zero tangents."""
    from jax.test_util import check_grads

    pr = problem("lstm", layers=2, steps=4, hidden=8, batch=2, seed=0, dtype="float64")

    def f(params, xs):
        red, _ = gates.reductions(pr.stack, params, xs)
        return red[("mean", "f")][0], red[("slope", "i")][0], red[("timescale", "f")][1]

    check_grads(f, (pr.params, pr.xs), order=1, modes=["rev", "fwd"])


def test_one_saturation_margin_and_bin_count_by_default():
    """gates.EPS and BINS are every default: the API's, the atlas's (written again there, a
    module that loads without JAX) and the CLI's (its parser too)."""
    import inspect

    from gradflow import atlas, experiments
    from gradflow.cli import build_parser

    assert (atlas.GATE_EPS, atlas.GATE_BINS) == (gates.EPS, gates.BINS)
    for fn in (gates.saturation, gates.reductions, gates.compare,
               experiments.gate_saturation, experiments.training_runs):
        params = inspect.signature(fn).parameters
        assert (params["eps"].default, params["bins"].default) == (gates.EPS, gates.BINS), fn
    args = build_parser().parse_args(["gates"])
    assert (args.eps, args.bins) == (gates.EPS, gates.BINS)


def test_helpers_refuse_unknown_kinds_bins_and_signs():
    """The element-wise helpers read an unknown kind as a sigmoid, ``bin_edges(0)`` gave one
    edge and ``kept_fraction(a, 5)`` read 5 as -1: now one ValueError each; the readers of
    results name what they take."""
    from gradflow import views
    from gradflow.cells.base import KINDS
    assert views.GATE_KINDS == KINDS
    a = jnp.full((1, 3), 0.5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="bins must be a positive integer"):
            gates.bin_edges(bad)
    for call in (lambda: gates.is_saturated(a, 0.1, "x"), lambda: gates.histogram(a, 4, kind="x"),
                 lambda: gates.bin_edges(4, "x")):
        with pytest.raises(ValueError, match="unknown gate kind 'x'; valid: sigmoid, tanh"):
            call()
    with pytest.raises(ValueError, match="sign must be"):
        gates.kept_fraction(a, 5)
    np.testing.assert_allclose(gates.kept_fraction(a, -1), 0.5)
    with pytest.raises(TypeError, match="cell must be a gradflow Cell"):
        gates.gate_kinds(None)
    with pytest.raises(TypeError, match="gate_layout takes a gradflow.Stack or its cells"):
        gates.gate_layout("lstm")
    with pytest.raises(ValueError, match="summary needs a 'gate_stats' result"):
        gates.summary(None)
    with pytest.raises(ValueError, match="no histogram of gate 'zz'; the gates with one: f"):
        gates.hist_edges({"hist/f": np.ones((1, 4))}, "zz")


def test_compare_entries_say_what_they_must_be():
    with pytest.raises(TypeError, match="compare entries must be a list of cell names"):
        gates.parse_entries(None)
    with pytest.raises(TypeError, match=r"the options of entry 'L' must be a dict"):
        gates.parse_entries([("L", "lstm", [1])])
    assert gates.parse_entries(e for e in ["lstm"]) == [("lstm", "lstm", {})]


def test_float64_numpy_inputs_with_64_bit_jax_off_are_measured_in_float32():
    """What a user with NumPy's default float64 inputs and JAX's default 32-bit mode gets: the
    statistics of those inputs as JAX computes them (float32), without JAX's truncation
    warnings (the memory estimate asked for float64 parameters; the suite makes any
    truncation warning an error)."""
    st = Stack("lstm", 2, 3, 4)
    p = st.init(jax.random.PRNGKey(0))
    xs = np.random.default_rng(0).normal(size=(5, 2, 3))
    assert xs.dtype == np.float64 and not jax.config.jax_enable_x64
    got = gates.saturation(st, p, xs)
    want = gates.saturation(st, p, xs.astype(np.float32))
    for k, v in want.arrays.items():
        np.testing.assert_array_equal(got.arrays[k], v, err_msg=k)


def _fixed_gates(values, kind):
    """A model reporting one gate ``"a"`` of ``kind`` at fixed ``values`` (float32) at every
    example and step."""
    v = jnp.asarray(values, jnp.float32)

    def model(p, xs):
        B, T = xs.shape[:2]
        return {"a": jnp.broadcast_to(v * p, (1, B, T, v.size))}
    return model


@pytest.mark.parametrize("eps,values", [
    (1e-8, [1.0, 0.99999994, 2e-9, 0.5, 1e-8]),           # 1 - eps rounds to 1 in float32
    (0.2, [np.float32(0.8), np.float32(0.2), 0.5, 0.9]),  # fl32(0.8) > 0.8, fl32(0.2) > 0.2
    (0.1, [np.float32(0.9), np.float32(0.1), 0.5, 0.05]),  # fl32(0.9) < 0.9, fl32(0.1) > 0.1
])
def test_float32_gates_are_saturated_exactly_as_the_real_thresholds_say(eps, values):
    """``a < eps or a > 1 - eps`` in real numbers, for float32 gate values against thresholds
    a float32 cannot hold: gradflow's fractions equal float64 NumPy's on the same values."""
    a64 = np.asarray(np.asarray(values, np.float32), np.float64)
    want = ((a64 < eps) | (a64 > 1 - eps)).mean()
    got = gates.model_saturation(_fixed_gates(values, "sigmoid"), np.float32(1),
                                 np.zeros((1, 1, 1), np.float32), kinds={"a": "sigmoid"}, eps=eps)
    assert float(got.arrays["saturated/a/pooled"]) == pytest.approx(want, rel=1e-6)  # (of 1/5s)
    got = gates.model_saturation(_fixed_gates(values, "tanh"), np.float32(1),
                                 np.zeros((1, 1, 1), np.float32), kinds={"a": "tanh"}, eps=eps)
    want = (np.abs(a64) > 1 - eps).mean()
    assert float(got.arrays["saturated/a/pooled"]) == pytest.approx(want, rel=1e-6)


def test_a_time_gate_updates_exactly_above_the_real_threshold():
    values = [np.float32(1e-3), np.float32(2e-3), np.float32(0.3), 0.0]  # fl32(1e-3) > 1e-3
    a64 = np.asarray(np.asarray(values, np.float32), np.float64)
    for threshold in (1e-3, 0.3):  # fl32(0.3) > 0.3: 0.3 not above it
        got = gates.model_saturation(_fixed_gates(values, "time"), np.float32(1),
                                     np.zeros((1, 1, 1), np.float32), kinds={"a": "time"},
                                     update_threshold=threshold)
        want = (a64 > threshold).mean()
        assert float(got.arrays["update_fraction/a/pooled"]) == pytest.approx(want, rel=1e-6)


def test_a_gate_whose_values_leave_its_kinds_range_is_warned_about():
    """A user cell's tanh gate, its kind not given, read as a sigmoid off one probe step where
    its bias kept it positive: on inputs that take it below 0 the statistics warn, naming
    gate_kinds=; given the kind, no warning and the tanh reading."""
    H, D = 4, 3

    def candidate(p, h, x):
        return {"c": jnp.tanh(x @ p["W"] + h @ p["U"] + p["b"])}

    def step(p, h, x):
        h = 0.5 * h + 0.5 * candidate(p, h, x)["c"]
        return h, h

    def init(key, n_in, n_h, dtype):
        k1, k2 = jax.random.split(key)
        return {"W": 0.05 * jax.random.normal(k1, (n_in, n_h), dtype),
                "U": 0.05 * jax.random.normal(k2, (n_h, n_h), dtype),
                "b": jnp.full((n_h,), 2.5, dtype)}

    guessed = cells.from_function(step, init, hidden_size=H, gates=candidate)
    assert dict(guessed.gate_kinds) == {"c": "sigmoid"}
    st = Stack(guessed, 1, D, H)
    params = st.init(jax.random.PRNGKey(0))
    xs = 60 * jax.random.normal(jax.random.PRNGKey(1), (4, 6, D))
    a = np.asarray(gates.activations(st, params, xs)["c"])
    assert (a < 0).sum() > 0
    with pytest.warns(UserWarning, match=r"gate 'c' is of kind 'sigmoid', but \d+ of its values "
                                         r"lie outside .*gate_kinds=\{'c': 'tanh'\}"):
        gates.saturation(st, params, xs)
    told = Stack(cells.from_function(step, init, hidden_size=H, gates=candidate,
                                     gate_kinds={"c": "tanh"}), 1, D, H)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = gates.saturation(told, params, xs)
    want = (np.abs(a) > 1 - gates.EPS).mean()
    assert float(r.arrays["saturated/c/pooled"]) == pytest.approx(want, rel=1e-6)
