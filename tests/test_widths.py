"""Stacks whose layers have different hidden sizes (``Stack(..., hidden_size=[6, 4, 4])``).

Every measurement against a brute-force Python loop over layers and steps that calls each
layer's cell at its own width (no padding anywhere in the reference): states, gates and final
states (with and without input projection, residual, LayerNorm/RMSNorm), the hidden-state,
memory and parameter gradient maps (``jax.grad`` of the loop), the Jacobian maps (exact, probe,
spectral, spectra; ``jax.jacfwd`` of the loop) and local gains (``jax.jacfwd`` of one cell
step), gate statistics (NumPy over the real units only), cost estimates (closed forms and XLA),
float64 and float32; bad widths; the CLI (``--hidden 8,4,4``); the README example.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import Stack, checks, cli, cost, gates
from gradflow import jacobian as J
from gradflow.cells.base import normal

pytestmark = pytest.mark.child  # in-process work: the child lane runs it (tests/conftest.py)

F64 = jnp.float64
B, T = 2, 3


def case(cell, widths, D, *, seed=0, dtype=F64, **settings):
    stack = Stack(cell, len(widths), D, list(widths), **settings)
    params = stack.init(jax.random.key(seed), dtype)
    # non-zero biases and norm offsets, so nothing is trivially symmetric
    params = jax.tree_util.tree_map(
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(seed + 7), a.shape, a.dtype),
        params)
    xs = jax.random.normal(jax.random.key(seed + 1), (B, T, D), dtype)
    return stack, params, xs


def emit(stack, params, l, h, x):
    """What layer ``l`` sends up, written out: norm(h + x), residual where widths agree."""
    y = h + x if stack.residual and x.shape[-1] == h.shape[-1] else h
    if stack.norm is None:
        return y
    pn = params["norm"][l]
    if stack.norm == "layer":
        mu = y.mean(-1, keepdims=True)
        return (y - mu) / jnp.sqrt(((y - mu) ** 2).mean(-1, keepdims=True) + 1e-6) \
            * pn["scale"] + pn["bias"]
    return y / jnp.sqrt((y * y).mean(-1, keepdims=True) + 1e-6) * pn["scale"]


def loop(stack, params, xs, perturb=None, step_params=None, state0=None):
    """The stack as nested Python loops, layer ``l`` at width ``H_l`` throughout.

    perturb: ``{name: [(B, T, H_l) per layer]}`` added where states leave the cell;
    step_params: ``[[params of layer l at step t]]`` (default: the layer's own).
    Returns ``(states {k: [(B, T, H_l)]}, gates {g: [...]}, up [(B, T, H_l)], final)``.
    """
    perturb = perturb or {}
    x = xs @ params["input"]["W"] + params["input"]["b"] if stack.input_projection else xs
    states, gts, ups, final = {}, {}, [], {}
    for l, (cell, H) in enumerate(zip(stack.cells, stack.widths)):
        s = ({k: v[l, :, :H] for k, v in state0.items()} if state0 is not None
             else cell.initial_state((xs.shape[0],), H, xs.dtype))
        per_t = {}
        for t in range(xs.shape[1]):
            p = params["layers"][l] if step_params is None else step_params[l][t]
            s, _, g = cell.step(p, s, x[:, t], t)
            s = {k: v + perturb[k][l][:, t] if k in perturb else v for k, v in s.items()}
            for k, v in {**s, **{"gate:" + n: a for n, a in g.items()}}.items():
                per_t.setdefault(k, []).append(v)
            per_t.setdefault("up", []).append(emit(stack, params, l, s["h"], x[:, t]))
        for k, v in per_t.items():
            d = gts if k.startswith("gate:") else states
            d.setdefault(k.removeprefix("gate:"), []).append(jnp.stack(v, axis=1))
        up = states.pop("up")[-1]
        ups.append(up)
        for k in cell.state_names:
            final.setdefault(k, []).append(s[k])
        x = up
    return states, gts, ups, final


def assert_layout(padded, per_layer, widths, atol):
    """``padded: (L, ..., Hmax)`` holds ``per_layer[l]: (..., H_l)`` then exact zeros."""
    assert padded.shape[0] == len(widths) and padded.shape[-1] == max(widths)
    for l, H in enumerate(widths):
        np.testing.assert_allclose(padded[l, ..., :H], per_layer[l], atol=atol, rtol=0)
        assert not np.any(np.asarray(padded[l, ..., H:]))


CASES = [  # (cell, widths, D, settings)
    ("lstm", (6, 4, 4), 3, {}),
    ("lstm", (6, 4, 4), 3, {"input_projection": True}),
    ("gru", (3, 5), 2, {"checkpoint": 2}),
    ("lstm", (6, 4, 4), 6, {"residual": True, "norm": "layer"}),
    ("gru", (4, 4, 6, 6), 4, {"residual": True, "norm": "rms"}),
    (["lstm", gradflow.cells.get("lstm", forget_bias=1.0), "lstm"], (5, 3, 3), 2, {}),
]
IDS = ["lstm-644", "lstm-644-proj", "gru-35-ckpt", "lstm-res-ln", "gru-res-rms", "cells-mixed"]


def test_states_equal_loop(x64):
    """Every case at once (one compilation for the stacks, one for the loops)."""
    runs = []
    for i, (cell, widths, D, settings) in enumerate(CASES):
        stack, params, xs = case(cell, widths, D, seed=i, **settings)
        Hm, rng = max(widths), np.random.default_rng(i)
        # perturbations and initial states everywhere, padding included: it is ignored
        eps = {k: jnp.asarray(0.1 * rng.standard_normal((len(widths), B, T, Hm)))
               for k in stack.state_names}
        s0 = {k: jnp.asarray(0.3 * rng.standard_normal((len(widths), B, Hm)))
              for k in stack.state_names}
        runs.append((stack, (params, xs, eps, s0)))

    def cut(stack, eps):
        return {k: [v[l, ..., :H] for l, H in enumerate(stack.widths)] for k, v in eps.items()}

    outs, refs = jax.jit(lambda args: (
        [s.apply(p, x, perturb=e, state0=s0, gates=True) for (s, _), (p, x, e, s0) in
         zip(runs, args)],
        [loop(s, p, x, cut(s, e), state0=s0) for (s, _), (p, x, e, s0) in zip(runs, args)]))(
        [a for _, a in runs])
    for (stack, _), out, (ref_states, ref_gates, ref_up, ref_final) in zip(runs, outs, refs):
        widths = stack.widths
        for k in stack.state_names:
            assert_layout(out.states[k], ref_states[k], widths, 1e-12)
            assert_layout(out.final[k], ref_final[k], widths, 1e-12)
        for g in ref_gates:
            assert_layout(out.gates[g], ref_gates[g], widths, 1e-12)
        assert_layout(out.up, ref_up, widths, 1e-12)
        assert out.top.shape == (B, T, widths[-1]) and out.widths == tuple(widths)
        np.testing.assert_allclose(out.top, ref_up[-1], atol=1e-12, rtol=0)
        assert [stack.layer_in(l) for l in range(len(widths))] == (
            [widths[0] if stack.input_projection else stack.input_size] + list(widths[:-1]))
        res = stack.replace(residual=True)  # a skip only where a layer keeps the width
        assert [res.residual_at(l) for l in range(len(widths))] == [
            res.layer_in(l) == w for l, w in enumerate(widths)]
        assert stack.residual or not any(stack.residual_at(l) for l in range(len(widths)))
    stack, (params, xs, _, _) = runs[0]
    ins = stack.layer_inputs(params, xs, outs[0])  # each layer's input at its own width
    assert [a.shape[-1] for a in ins] == [3, 6, 4]
    np.testing.assert_array_equal(ins[1], outs[0].up[0])


def readout(stack, loss="last"):
    return J.readout_loss(loss, stack.widths[-1], T, B, 0, F64)


def test_gradient_maps_equal_grad_of_loop(x64):
    cell, widths, D, settings = CASES[0]
    losses = ("last", "all")
    stack, params, xs = case(cell, widths, D, **settings)
    names = stack.state_names

    @jax.jit
    def brute(params, xs):
        out = {}
        for loss in losses:
            fn = readout(stack, loss)
            zeros = [jnp.zeros((B, T, H)) for H in widths]
            for name in names:
                g = jax.grad(lambda e: fn(loop(stack, params, xs, {name: e})[2][-1]))(zeros)
                out[loss, name] = jnp.stack([jnp.linalg.norm(a, axis=-1).mean(0) for a in g])
            # per-step parameter copies: mean |dL/dtheta^l_(t)| over every entry of layer l
            steps = [[params["layers"][l]] * T for l in range(len(widths))]
            g = jax.grad(lambda sp: fn(loop(stack, params, xs, step_params=sp)[2][-1]))(steps)
            out[loss, "params"] = jnp.array([[jnp.mean(jnp.abs(jnp.concatenate(
                [jnp.ravel(a) for a in jax.tree_util.tree_leaves(g[l][t])]))) for t in range(T)]
                for l in range(len(widths))])
        return out

    ref = brute(params, xs)
    for loss in losses:
        for name in names + ("params",) if loss == "last" else ("h",):
            wrt = {"h": "hidden", "c": "cell"}.get(name, name)
            res = J.gradient_map(stack, params, xs, loss=loss, wrt=wrt)
            np.testing.assert_allclose(res["values"], ref[loss, name], rtol=1e-10, atol=1e-300)
            assert res.config["hidden_size"] == list(widths)


def brute_jacobians(stack, params, xs, target):
    """``[(B, H_t, T, H_l) per layer]``: per-example Jacobians of ``h^{L'}_{T'}`` w.r.t. every
    ``h^l_t``, from ``jacfwd`` of the loop."""
    tl, tt = target
    zeros = [jnp.zeros((B, T, H)) for H in stack.widths]
    jac = jax.jacfwd(lambda e: loop(stack, params, xs, {"h": e})[0]["h"][tl][:, tt])(zeros)
    return [jnp.einsum("bibtj->bitj", j) for j in jac]  # the diagonal in the batch


def test_jacobian_maps_equal_jacfwd_of_loop(x64):
    cell, widths, D, settings = CASES[3]  # residual + LayerNorm, widths (6, 4, 4)
    stack, params, xs = case(cell, widths, D, **settings)
    L = len(widths)
    targets = ((L - 1, T - 1), (0, T - 1))
    jacs = jax.jit(lambda p, x: [brute_jacobians(stack, p, x, tg) for tg in targets])(params, xs)
    for target, jac in zip(targets, jacs):
        per = [np.moveaxis(np.asarray(j), 2, 1) for j in jac]  # (B, T, H_t, H_l)
        rms = np.stack([np.linalg.norm(j, axis=(-2, -1)).mean(0) / np.sqrt(j.shape[-1])
                        for j in per])
        spec = np.stack([np.linalg.norm(j, ord=2, axis=(-2, -1)).mean(0) for j in per])
        exact = J.jacobian_map(stack, params, xs, target=target)
        np.testing.assert_allclose(exact["values"], rms, rtol=1e-10, atol=1e-300)
        sp = J.jacobian_map(stack, params, xs, target=target, norm="spectral",
                            spectra_at=[(0, 0), (L - 1, 1)])
        np.testing.assert_allclose(sp["values"], spec, rtol=1e-10, atol=1e-300)
        Ht = widths[target[0]]
        for i, (l, t) in enumerate([(0, 0), (L - 1, 1)]):
            sv = np.linalg.svd(per[l][:, t], compute_uv=False)  # (B, min(H_t, H_l))
            got = np.asarray(sp["spectra"][i])
            assert got.shape == (B, min(Ht, max(widths)))
            np.testing.assert_allclose(got[:, :sv.shape[1]], sv, rtol=1e-9, atol=1e-12)
            assert not np.any(got[:, sv.shape[1]:] > 1e-12)
        # probes: the same Gaussian cotangents through the brute-force Jacobians
        k = 5
        v = np.asarray(normal(jax.random.key(4), (k, B, Ht), F64))
        n = np.stack([np.linalg.norm(np.einsum("kbi,btij->kbtj", v, j), axis=-1) for j in per],
                     axis=1)  # (k, L, B, T)
        cols = np.array(widths, float)[:, None, None]
        est = np.sqrt(np.mean(n ** 2, 0) / cols).mean(1)
        probe = J.jacobian_map(stack, params, xs, target=target, method="probe", probes=k,
                               seed=4)
        np.testing.assert_allclose(probe["values"], est, rtol=1e-10, atol=1e-300)


def test_local_gains_equal_jacfwd(x64):
    cell, widths, D, settings = CASES[4]  # GRU (4, 4, 6, 6), residual + RMSNorm
    stack, params, xs = case(cell, widths, D, **settings)

    @jax.jit
    def brute(params, xs):
        states, _, ups, _ = loop(stack, params, xs)
        ins = [xs] + ups[:-1]
        out = []
        for l, (c, H) in enumerate(zip(stack.cells, widths)):
            p, row = params["layers"][l], []
            for t in range(T):
                def one(x, h, t=t):  # one example; vertical: through what the layer emits
                    jv = jax.jacfwd(lambda xx: emit(stack, params, l,
                                                    c.step(p, {"h": h}, xx, t)[1], xx))(x)
                    jt = jax.jacfwd(lambda hh: c.step(p, {"h": hh}, x, t)[1])(h)
                    return jnp.stack([jnp.linalg.norm(jv) / jnp.sqrt(jv.shape[1]),
                                      jnp.linalg.norm(jv, 2), jnp.linalg.norm(jt) / jnp.sqrt(H),
                                      jnp.linalg.norm(jt, 2)])
                h = states["h"][l][:, t - 1] if t > 0 else jnp.zeros((B, H))
                row.append(jax.vmap(one)(ins[l][:, t], h).mean(0))
            out.append(jnp.stack(row))
        return jnp.stack(out)  # (L, T, 4)

    ref = brute(params, xs)
    res = J.local_gains(stack, params, xs)
    for i, name in enumerate(("vertical_rms", "vertical_spectral", "temporal_rms",
                              "temporal_spectral")):
        np.testing.assert_allclose(res[name], ref[..., i], rtol=1e-10)


# Layers of different cells report different gates; a name two cells give to different gates
# is two gates, qualified by the cell (GRU's sigmoid update gate z, STAR's tanh candidate z).
MIXED = {
    ("gru", "star", "gru"): {"r": (0, 2), "z@gru": (0, 2), "n": (0, 2), "k": (1,),
                             "z@star": (1,)},
    ("lstm", "ur_lstm", "g_lstm"): {"i": (0, 2), "f": (0, 1, 2), "o": (0, 1, 2), "g@lstm": (0, 2),
                                    "r": (1,), "g@ur_lstm": (1,), "u": (1,), "k": (2,)},
    ("rnn", "gru", "gru"): {"r": (1, 2), "z": (1, 2), "n": (1, 2)},  # a layer with no gates
}


@pytest.mark.parametrize("cell,widths", [
    ("lstm", (6, 4, 4)), ("g_lstm", (3, 5)), (("gru", "star", "gru"), (5, 4, 4)),
    (("lstm", "ur_lstm", "g_lstm"), (4, 4, 4)), (("rnn", "gru", "gru"), (4, 4, 4))])
def test_gate_statistics_over_real_units_only(cell, widths, x64):
    """Each gate's statistics by NumPy over the real units of the layers that report it; NaN
    means, zero counts and no histogram entries in the layers that do not."""
    stack, params, xs = case(list(cell) if isinstance(cell, tuple) else cell, widths, 3)
    eps, bins = 0.05, 10
    st = gates.saturation(stack, params, xs, eps, bins=bins)
    _, g_ref, _, _ = loop(stack, params, xs)  # {name: [(B, T, H_l) of each layer with it]}
    L = len(widths)
    where = MIXED.get(cell, {g: tuple(range(L)) for g in stack.cells[0].gate_names})
    assert list(st.config["gates"]) == list(where) == list(stack.gate_names)
    if cell in MIXED:  # which layers report each gate
        assert st.config["gate_layers"] == {g: list(ls) for g, ls in where.items()}
    else:
        assert "gate_layers" not in st.config
    out = stack.apply(params, xs, gates=True).gates
    for g, ls in where.items():
        name = g.split("@")[0]
        c = stack.cells[ls[0]]
        kind, retain = c.kinds[name], dict(c.retain)
        assert st.config["gate_kinds"][g] == kind
        with_name = [l for l, cl in enumerate(stack.cells) if name in cl.gate_names]
        acts = {l: np.asarray(g_ref[name][with_name.index(l)]) for l in ls}  # (B, T, H_l)
        for l in range(L):  # the stack's own arrays: the layer's gate, or NaN without it
            if l in ls:
                np.testing.assert_allclose(out[g][l, ..., :widths[l]], acts[l], rtol=1e-12)
            else:
                assert np.isnan(out[g][l]).all()
        rows = {"mean": lambda a, l: a, "saturated": (lambda a, l: np.abs(a) > 1 - eps)
                if kind == "tanh" else (lambda a, l: (a < eps) | (a > 1 - eps))}
        if kind == "sigmoid":
            rows["slope"] = lambda a, l: a * (1 - a)
        if kind == "tanh":  # a candidate: slope 1 - a^2, histogram over [-1, 1]
            rows["slope"] = lambda a, l: 1 - a * a
        if kind == "effective":  # Gu et al.'s g = r(1-(1-f)^2) + (1-r) f^2, by hand
            f_r = lambda l: (np.asarray(g_ref["f"][l]), np.asarray(g_ref["r"][0]))  # noqa: E731
            rows["slope"] = lambda a, l: (np.abs(2 * (f_r(l)[1] * (1 - f_r(l)[0]) + (
                1 - f_r(l)[1]) * f_r(l)[0])) * f_r(l)[0] * (1 - f_r(l)[0]))
            rows["slope_refine"] = lambda a, l: (2 * f_r(l)[0] * (1 - f_r(l)[0])
                                                 * f_r(l)[1] * (1 - f_r(l)[1]))
        if name in retain:
            rows["timescale"] = ((lambda a, l: a) if retain[name] == 1
                                 else (lambda a, l: 1 - a))
        if kind == "time":
            rows["update_fraction"] = lambda a, l: a > gates.UPDATE_THRESHOLD
        for stat, f in rows.items():
            vals = {l: f(a, l) for l, a in acts.items()}
            nan_t, nan_h = np.full(T, np.nan), np.full(max(widths), np.nan)
            m = np.stack([vals[l].mean(axis=(0, 2)) if l in ls else nan_t for l in range(L)])
            layer = np.array([vals[l].mean() if l in ls else np.nan for l in range(L)])
            pooled = np.mean(np.concatenate([v.ravel() for v in vals.values()]))
            unit = [vals[l].mean(axis=(0, 1)) if l in ls else nan_h for l in range(L)]
            if stat == "timescale":  # of the mean kept fraction
                m, layer, pooled = 1 / (1 - m), 1 / (1 - layer), 1 / (1 - pooled)
                unit = [1 / (1 - u) for u in unit]
            np.testing.assert_allclose(st[f"{stat}/{g}"], m, rtol=1e-10)
            np.testing.assert_allclose(st[f"{stat}/{g}/layer"], layer, rtol=1e-10)
            np.testing.assert_allclose(st[f"{stat}/{g}/pooled"], pooled, rtol=1e-10)
            if f"{stat}/{g}/unit" in st.arrays:
                if cell in MIXED:
                    for l in range(L):
                        np.testing.assert_allclose(st[f"{stat}/{g}/unit"][l, :widths[l]],
                                                   unit[l][:widths[l]], rtol=1e-10)
                else:
                    assert_layout(st[f"{stat}/{g}/unit"], unit, widths, 1e-10)
        span = (-1.0, 1.0) if kind == "tanh" else (0.0, 1.0)
        hist = np.stack([np.histogram(acts[l], bins, span)[0] if l in ls else np.zeros(bins)
                         for l in range(L)])
        np.testing.assert_array_equal(st[f"hist/{g}"], hist)
        assert st[f"hist/{g}/pooled"].sum() + st[f"outside/{g}/pooled"].sum() == sum(
            a.size for a in acts.values())
        assert st[f"nonfinite/{g}/pooled"] == 0 and not st[f"nonfinite/{g}"].any()
        assert not st[f"outside/{g}"][[l for l in range(L) if l not in ls]].any()


def test_uniform_widths_are_the_int_stack():
    a, b = Stack("lstm", 3, 4, [8, 8, 8]), Stack("lstm", 3, 4, 8)
    assert a == b and hash(a) == hash(b) and a.config == b.config
    assert a.hidden_size == 8 and a.widths == (8, 8, 8) and a.uniform is False
    out = a.apply(a.init(jax.random.key(0)), jnp.ones((2, 3, 4)))
    assert out.widths is None and out.top.shape == (2, 3, 8)
    s = Stack("gru", 2, 4, (6, 3))
    assert s.config["hidden_size"] == [6, 3] and s.max_width == 6
    assert s.segments() == [(0, 1), (1, 2)]
    assert Stack("gru", 3, 4, (6, 3, 3)).segments() == [(0, 1), (1, 2), (2, 3)]
    assert Stack("gru", 4, 3, (3, 3, 5, 5), input_projection=True).segments() == [
        (0, 2), (2, 3), (3, 4)]
    assert s.replace(checkpoint=2).widths == (6, 3)


@pytest.mark.parametrize("widths,match", [
    ([4, 4], "one width per layer: got 2 widths for 3 layers"),
    ([4, 0, 4], r"hidden_size\[1\] must be a positive integer, got 0"),
    ([4, -2, 4], r"hidden_size\[1\] must be a positive integer, got -2"),
    ([4, 2.0, 4], r"hidden_size\[1\] must be a positive integer, got 2.0"),
    ([4, True, 4], r"hidden_size\[1\] must be a positive integer"),
    ("8", "hidden_size must be a positive integer or a list of 3"),
    (0, "hidden_size must be a positive integer or a list of 3"),
])
def test_bad_widths(widths, match):
    with pytest.raises(ValueError, match=match):
        Stack("lstm", 3, 4, widths)


def test_orders_and_square_cells_refuse_different_widths():
    with pytest.raises(ValueError, match="one width for all layers.*different cells or hidden"):
        Stack("lstm", 3, 4, [8, 4, 4], order="wavefront", input_projection=True)
    with pytest.raises(ValueError, match="layer 1 .4 wide. reads layer 0 .8 wide"):
        Stack("refined_lstm", 2, 8, [8, 4])
    Stack("refined_lstm", 2, 3, [8, 8], input_projection=True)  # one width: fine


def test_gates_of_cells_with_different_gates():
    pr = gradflow.problem(["gru", "star", "gru"], layers=3, steps=2, hidden=4, batch=1)
    g = pr.stack.apply(pr.params, pr.xs, gates=True).gates
    assert pr.stack.gate_names == ("r", "z@gru", "n", "k", "z@star")
    assert sorted(g) == sorted(pr.stack.gate_names) and g["k"].shape == (3, 1, 2, 4)
    assert np.isnan(np.asarray(g["k"])[[0, 2]]).all() and np.isfinite(g["k"][1]).all()
    assert pr.stack.apply(pr.params, pr.xs).gates == {}  # the states need no gates
    same = gradflow.problem(["gru", "gru"], layers=2, steps=2, hidden=[4, 3], batch=1)
    g = same.stack.apply(same.params, same.xs, gates=True).gates
    assert sorted(g) == ["n", "r", "z"] and g["r"].shape == (2, 1, 2, 4)
    # one cell name at two settings that make one gate name two gates: named by first layer
    add = gradflow.cells.get("refined_lstm", mode="add")
    keys = gradflow.stack.gate_keys([gradflow.cells.get("refined_lstm"), add, add])
    assert keys[0]["i"] == "i@0" and keys[2]["i"] == "i@1" and keys[2]["f"] == "f"


def test_params_of_another_width_are_refused():
    s = Stack("lstm", 3, 4, [8, 4, 4])
    wrong = Stack("lstm", 3, 4, [8, 8, 4]).init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"params\['layers'\]\[1\].*expects"):
        J.gradient_map(s, wrong, jnp.ones((2, 3, 4)))
    deep = Stack("gru", 70, 3, [8] + [4] * 69)  # past the 64-layer shortcut: traced whole
    p = jax.eval_shape(deep.init, jax.random.key(0))
    checks.check_params(deep, p)
    p["layers"][69] = p["layers"][0]
    with pytest.raises(ValueError, match=r"params\['layers'\]\[69\].*expects"):
        checks.check_params(deep, p)


def test_float32_gradient_map_equals_loop():
    """x64 off: the float32 path against the float32 loop."""
    stack, params, xs = case("gru", (3, 5), 2, dtype=jnp.float32, input_projection=True)
    fn = J.readout_loss("last", 5, T, B, 0, jnp.float32)
    zeros = [jnp.zeros((B, T, H), jnp.float32) for H in stack.widths]
    g = jax.grad(lambda e: fn(loop(stack, params, xs, {"h": e})[2][-1]))(zeros)
    ref = np.stack([np.linalg.norm(np.asarray(a), axis=-1).mean(0) for a in g])
    res = J.gradient_map(stack, params, xs)
    assert res["values"].dtype == np.float32
    np.testing.assert_allclose(res["values"], ref, rtol=1e-5)


def test_cost_closed_forms_and_xla():
    """Parameters and FLOPs of a (16, 8, 8) GRU stack counted by hand; memory within 2x of
    XLA's own analysis of the compiled map."""
    D, W, Bc, Tc = 5, (16, 8, 8), 4, 24
    stack = Stack("gru", 3, D, list(W))
    c = cost.estimate(stack, Bc, Tc, calibrate=False)
    ins = [D, 16, 8]
    per = [3 * (n * h + h * h + h) + h for n, h in zip(ins, W)]  # W, U, b of 3 gates; b_hn
    assert c.params == 4 * sum(per)
    assert c.flops == 3 * Tc * sum(2 * Bc * 3 * (n * h + h * h) for n, h in zip(ins, W))
    params = jax.eval_shape(stack.init, jax.random.key(0))
    xs = jax.ShapeDtypeStruct((Bc, Tc, D), jnp.float32)
    loss = J.readout_loss("last", 8, Tc, Bc)
    m = J._state_map_local.lower(stack, params, xs, loss, "h").compile().memory_analysis()
    xla = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    assert 0.5 <= c.total / xla <= 2.0, (c.total, xla)
    assert "H=[16, 8, 8]" in str(pytest.raises(
        ValueError, cost.check_fits, c, limit=1000).value)


def test_readme_example(capsys, run_readme_block):
    """README "Your own model": the block with ``hidden_size=[64, ...]`` runs as written."""
    ns = run_readme_block("hidden_size=[64, 32, 32, 32]")
    assert capsys.readouterr().out.strip() == "(64, 32, 32, 32) (4, 4, 10, 64) (4, 10, 32)"
    for res in (ns["res"], ns["jac"]):
        assert res.values.shape == (4, 10) and np.all(np.isfinite(res.values))
    assert np.all(ns["res"].values > 0) and ns["res"].config["hidden_size"] == [64, 32, 32, 32]


def test_cli_hidden_per_layer(capsys, tmp_path):
    out = tmp_path / "w.png"
    rc = cli.main(["heatmap", "--cell", "lstm", "--layers", "3", "--steps", "4", "--hidden",
                   "8,4,4", "--batch", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "H=8,4,4" in text and out.is_file()
    res = gradflow.load(str(out.with_suffix(".npz")))
    assert res.config["hidden_size"] == [8, 4, 4] and res.values.shape == (3, 4)
    for bad, msg in (("8,x", "must be a positive integer or one per layer"),
                     ("8,4", "got 2 widths for 3 layers"), ("8,0,4", "must be a positive")):
        rc = cli.main(["heatmap", "--cell", "lstm", "--layers", "3", "--hidden", bad,
                       "--out", str(tmp_path / "bad.png")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and msg in err, (bad, err)
