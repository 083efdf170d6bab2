"""The user's own cells (gradflow.cells.adapters) and stack topologies, against independent
references: gradflow's own cells on ported weights, and brute-force Python loops that call the
user's module step by step (perturbation gradients: ``jax.grad`` w.r.t. explicit zero
perturbations added to ``h`` where it leaves the cell, and ``c`` for the LSTM memory).

float64 where precision is the point (the ``x64`` fixture), float32 otherwise.
"""
import functools
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import cells, gates
from gradflow.cells import adapters

eqx = pytest.importorskip("equinox")
nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

L, T, B, D, H = 3, 5, 2, 4, 6
README = Path(__file__).resolve().parents[1] / "README.md"


def loss_fn(top):
    """A loss on every step of the top output ``(B, T, H)`` (every ``(l, t)`` reaches it)."""
    w = jnp.cos(jnp.arange(top.shape[-1], dtype=top.dtype) * 1.3)
    steps = 1.0 + jnp.arange(top.shape[1], dtype=top.dtype)
    return jnp.sum(jnp.sin(top @ w) * steps)


def jiggle(tree, key, scale=0.3):
    """``tree`` plus Gaussian noise on every leaf: weights and biases away from their defaults."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])


def inputs(dtype, d=D, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, d), dtype)


def hidden_map(stack, params, xs, wrt="hidden"):
    return np.asarray(gradflow.gradient_map(stack, params, xs, loss=loss_fn, wrt=wrt).values)


def brute_maps(step, carry0, h_of, set_h, xs, c_of=None, set_c=None):
    """Hidden (and cell) maps of a stack run as a Python loop over layers and steps.

    ``step[l](carry, x: (B, in)) -> carry`` is layer ``l``'s cell, called as the user calls it;
    ``h_of/set_h`` (``c_of/set_c``) read and replace the output (memory) in a carry. Returns
    ``(G_h, G_c)``: ``mean_b ||dL/ds^l_t[b]||`` of shape ``(L, T)`` (``G_c`` None without c).
    """
    n = len(step)
    eps = {"h": jnp.zeros((n, T, B, H), xs.dtype)}
    if c_of is not None:
        eps["c"] = jnp.zeros((n, T, B, H), xs.dtype)

    def forward(eps):
        x = xs
        for l in range(n):
            carry, outs = carry0(xs.dtype), []
            for t in range(T):
                carry = step[l](carry, x[:, t])
                carry = set_h(carry, h_of(carry) + eps["h"][l, t])
                if c_of is not None:
                    carry = set_c(carry, c_of(carry) + eps["c"][l, t])
                outs.append(h_of(carry))
            x = jnp.stack(outs, axis=1)
        return loss_fn(x)

    g = jax.jit(jax.grad(forward))(eps)
    norm = lambda v: np.asarray(jnp.mean(jnp.linalg.norm(v, axis=-1), axis=-1))  # noqa: E731
    return norm(g["h"]), (norm(g["c"]) if c_of is not None else None)


ERRORS = []  # the largest relative error of each comparison (for the README's claim)


def assert_maps(got, want, rtol=1e-6):
    assert np.all(np.asarray(want)[:, :-1] > 0)  # (a memory c at the last step reaches no loss)
    nz = np.asarray(want) > 0
    ERRORS.append(float(np.max(np.abs(np.asarray(got)[nz] / np.asarray(want)[nz] - 1))))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


# ---------------------------------------------------------------------------------------------
# Porting the user's weights to gradflow's per-gate layout


def linen_lstm_to_gradflow(p):
    return {g: {"W": p["i" + g]["kernel"], "U": p["h" + g]["kernel"], "b": p["h" + g]["bias"]}
            for g in "ifgo"}


def nnx_lstm_to_gradflow(p):
    key = lambda g: g + "_" if g == "if" else g  # noqa: E731  (nnx names the forget input if_)
    return {g: {"W": p[key("i" + g)]["kernel"], "U": p["h" + g]["kernel"],
                "b": p["h" + g]["bias"]} for g in "ifgo"}


def linen_gru_to_gradflow(p):
    out = {g: {"W": p["i" + g]["kernel"], "U": p["h" + g]["kernel"], "b": p["i" + g]["bias"]}
           for g in "rz"}
    out["n"] = {"W": p["in"]["kernel"], "U": p["hn"]["kernel"], "b": p["in"]["bias"],
                "b_hn": p["hn"]["bias"]}
    return out


def eqx_to_gradflow(p, names, extra=None):
    """Rows of ``weight_ih (G*H, in)``, ``weight_hh``, ``bias`` split per gate, transposed."""
    out = {}
    for k, g in enumerate(names):
        rows = slice(k * H, (k + 1) * H)
        out[g] = {"W": p["weight_ih"][rows].T, "U": p["weight_hh"][rows].T, "b": p["bias"][rows]}
    if extra:
        out[extra[0]][extra[1]] = p["bias_n"]
    return out


# ---------------------------------------------------------------------------------------------
# Each adapter: the map of a 3-layer stack of the user's module equals gradflow's own cell on
# ported weights and a Python loop over the user's module


def test_linen_lstm(x64):
    module = nn.LSTMCell(features=H)
    cell = cells.from_linen(module)
    assert cell.state_names == ("c", "h") and cell.gate_kinds == ()
    stack = gradflow.Stack(cell, L, D, H)
    params = jiggle(stack.init(jax.random.key(0), jnp.float64), jax.random.key(1))
    xs = inputs(jnp.float64)
    got = hidden_map(stack, params, xs)
    ported = {"layers": [linen_lstm_to_gradflow(p) for p in params["layers"]]}
    assert_maps(got, hidden_map(gradflow.Stack("lstm", L, D, H), ported, xs))
    step = [lambda carry, x, p=p: module.apply({"params": p}, carry, x)[0]
            for p in params["layers"]]
    want, _ = brute_maps(step, lambda dt: (jnp.zeros((B, H), dt),) * 2, lambda c: c[1],
                         lambda c, v: (c[0], v), xs)
    assert_maps(got, want)


def test_linen_gru_and_trained_variables(x64):
    module = nn.GRUCell(features=H)
    cell = cells.from_linen(module)
    assert cell.state_names == ("h",)
    stack = gradflow.Stack(cell, L, D, H)
    # "trained" variable dicts, one per layer, as a user holds them
    variables = [{"params": jiggle(module.init(k, jnp.zeros((B, H)), jnp.zeros((B, n))),
                                   jax.random.fold_in(k, 1))["params"]}
                 for k, n in zip(jax.random.split(jax.random.key(2), L), (D, H, H))]
    variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables)
    params = cells.stack_params(stack, variables)
    xs = inputs(jnp.float64)
    got = hidden_map(stack, params, xs)
    ref = gradflow.Stack("gru", L, D, H)
    assert_maps(got, hidden_map(ref, {"layers": [linen_gru_to_gradflow(v["params"])
                                                 for v in variables]}, xs))
    step = [lambda carry, x, v=v: module.apply(v, carry, x)[0] for v in variables]
    want, _ = brute_maps(step, lambda dt: jnp.zeros((B, H), dt), lambda c: c, lambda c, v: v, xs)
    assert_maps(got, want)


@pytest.mark.parametrize("make", [lambda: nn.OptimizedLSTMCell(features=H),
                                  lambda: nn.MGUCell(features=H),
                                  lambda: nn.SimpleCell(features=H),
                                  lambda: nnx.GRUCell(D, H, rngs=nnx.Rngs(0))],
                         ids=["linen-OptimizedLSTMCell", "linen-MGUCell", "linen-SimpleCell",
                              "nnx-GRUCell"])
def test_other_flax_cells_equal_a_python_loop(make):
    module = make()
    linen = isinstance(module, nn.Module)
    cell = cells.from_linen(module) if linen else cells.from_nnx(module)
    two = cell.state_names == ("c", "h")
    assert cell.state_names in (("h",), ("c", "h"))
    stack = gradflow.Stack(cell, 2, D, H)
    params = jiggle(stack.init(jax.random.key(0)), jax.random.key(1))
    xs = inputs(jnp.float32)
    got = hidden_map(stack, params, xs)
    if linen:
        step = [lambda c, x, p=p: module.apply({"params": p}, c, x)[0] for p in params["layers"]]
    else:
        graphdef, _, rest = nnx.split(module, nnx.Param, ...)
        step = [lambda c, x, p=p: nnx.merge(graphdef, p, rest)(c, x)[0]
                for p in params["layers"]]
    zeros = lambda dt: (jnp.zeros((B, H), dt),) * 2 if two else jnp.zeros((B, H), dt)  # noqa
    want, _ = brute_maps(step[:2], zeros, (lambda c: c[1]) if two else (lambda c: c),
                         (lambda c, v: (c[0], v)) if two else (lambda c, v: v), xs)
    np.testing.assert_allclose(got, want, rtol=2e-4)


def _eqx_cells(kind, seed):
    """Three trained-looking Equinox cells (layer 0 reads D features), float64."""
    ks = jax.random.split(jax.random.key(seed), L)
    made = [kind(n, H, dtype=jnp.float64, key=k) for k, n in zip(ks, (D, H, H))]
    return [jiggle(m, jax.random.fold_in(k, 1)) for m, k in zip(made, ks)]


def test_equinox_gru(x64):
    trained = _eqx_cells(eqx.nn.GRUCell, 3)
    cell = cells.from_equinox(trained[1])
    assert cell.state_names == ("h",)
    stack = gradflow.Stack(cell, L, D, H)
    params = cells.stack_params(stack, trained)
    for p, m in zip(params["layers"], trained):  # exactly the modules' own weights
        assert all(np.array_equal(p[k], getattr(m, k)) for k in p)
    xs = inputs(jnp.float64)
    got = hidden_map(stack, params, xs)
    # Equinox's GRU is the reset-after (PyTorch) form with its bias_n: gradflow's "gru" default
    ported = {"layers": [eqx_to_gradflow(p, "rzn", ("n", "b_hn")) for p in params["layers"]]}
    assert_maps(got, hidden_map(gradflow.Stack("gru", L, D, H), ported, xs))
    before = gradflow.Stack(cells.get("gru", reset="before"), L, D, H)
    no_bhn = {"layers": [{**p, "n": {k: v for k, v in p["n"].items() if k != "b_hn"}}
                         for p in ported["layers"]]}
    assert not np.allclose(got, hidden_map(before, no_bhn, xs), rtol=1e-3)
    step = [lambda h, x, m=m: jax.vmap(m)(x, h) for m in trained]
    want, _ = brute_maps(step, lambda dt: jnp.zeros((B, H), dt), lambda c: c, lambda c, v: v, xs)
    assert_maps(got, want)


class _MinGRU(eqx.Module):
    """A user's own Equinox cell: no ``input_size`` attribute, one concatenated matmul."""
    Wz: jax.Array
    Wh: jax.Array
    hidden_size: int = eqx.field(static=True)

    def __init__(self, n_in, n_h, key):
        k1, k2 = jax.random.split(key)
        self.Wz = jax.random.normal(k1, (n_h, n_in + n_h), jnp.float64) / np.sqrt(n_in + n_h)
        self.Wh = jax.random.normal(k2, (n_h, n_in + n_h), jnp.float64) / np.sqrt(n_in + n_h)
        self.hidden_size = n_h

    def __call__(self, x, h):
        xh = jnp.concatenate([x, h])
        z = jax.nn.sigmoid(self.Wz @ xh)
        return (1 - z) * h + z * jnp.tanh(self.Wh @ xh)


def test_equinox_user_module_without_input_size(x64):
    """Gate kinds come from a probe step; a module that does not say its input size (here D = 4
    features into H = 6 units) is probed as a fresh init(key, H, H) module."""
    keys = jax.random.split(jax.random.key(11), L)
    trained = [_MinGRU(D if l == 0 else H, H, k) for l, k in enumerate(keys)]
    z_of = lambda m, h, x: {"z": jax.nn.sigmoid(m.Wz @ jnp.concatenate([x, h]))}  # noqa: E731
    cell = cells.from_equinox(trained[0], gates=z_of, init=lambda k, n, h: _MinGRU(n, h, k))
    assert cell.gate_kinds == (("z", "sigmoid"),)
    stack = gradflow.Stack(cell, L, D, H)
    params = cells.stack_params(stack, trained)
    xs = inputs(jnp.float64)
    step = [lambda h, x, m=m: jax.vmap(m)(x, h) for m in trained]
    want, _ = brute_maps(step, lambda dt: jnp.zeros((B, H), dt), lambda c: c, lambda c, v: v, xs)
    assert_maps(hidden_map(stack, params, xs), want)
    fresh = stack.init(jax.random.key(0), jnp.float64)  # init= builds each layer at its width
    assert fresh["layers"][0]["Wz"].shape == (H, D + H)
    assert fresh["layers"][1]["Wz"].shape == (H, 2 * H)
    # without init, finding the gate kinds needs its input width: input_size= (else the message)
    with pytest.raises(ValueError, match=r"_MinGRU does not say how many features it reads.*"
                                         r"give from_equinox\(..., input_size=N\)"):
        cells.from_equinox(trained[0], gates=z_of)
    assert cells.from_equinox(trained[0], gates=z_of, input_size=D).gate_kinds == (
        ("z", "sigmoid"),)


def test_nnx_user_module_without_in_features(x64):
    """The same for flax.nnx: a user's module with no ``in_features``, D != H, probed (for its
    output leaf and gate kinds) as a fresh init(key, H, H) module."""
    class MinGRU(nnx.Module):
        def __init__(self, n_in, n_h, rngs):
            shape = (n_in + n_h, n_h)
            self.Wz = nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float64)
                                / np.sqrt(n_in + n_h))
            self.Wh = nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float64)
                                / np.sqrt(n_in + n_h))

        def __call__(self, carry, x):  # a GRU-like h with a slow memory c beside it
            h, c = carry
            xh = jnp.concatenate([x, h], -1)
            z = jax.nn.sigmoid(xh @ self.Wz[...])
            h = (1 - z) * h + z * jnp.tanh(xh @ self.Wh[...] + c)
            return (h, 0.9 * c + 0.1 * h), h

    trained = [MinGRU(D if l == 0 else H, H, nnx.Rngs(l)) for l in range(L)]
    def z_of(m, s, x):
        return {"z": jax.nn.sigmoid(jnp.concatenate([x, s[0]], -1) @ m.Wz[...])}

    cell = cells.from_nnx(trained[0], hidden_size=H, state=2, gates=z_of,
                          init=lambda k, n, h: MinGRU(n, h, nnx.Rngs(k)))
    assert cell.state_names == ("h", "c") and cell.gate_kinds == (("z", "sigmoid"),)
    stack = gradflow.Stack(cell, L, D, H)
    params = cells.stack_params(stack, trained)
    xs = inputs(jnp.float64)
    step = [lambda s, x, m=m: m(s, x)[0] for m in trained]
    want, _ = brute_maps(step, lambda dt: (jnp.zeros((B, H), dt),) * 2, lambda s: s[0],
                         lambda s, v: (v, s[1]), xs)
    assert_maps(hidden_map(stack, params, xs), want)
    # no init: the probe needs the module's input width, which it does not say; input_size=
    # says it, and the trained modules stack as one cell per layer
    with pytest.raises(ValueError, match=rf"MinGRU does not say how many features it reads, so "
                                         rf"the probe gave it hidden_size={H}: give from_nnx"
                                         r"\(..., input_size=N\)"):
        cells.from_nnx(trained[0], hidden_size=H, state=2)
    per_layer = [cells.from_nnx(m, hidden_size=H, state=2, gates=z_of, input_size=n)
                 for m, n in zip(trained, (D, H, H))]
    assert per_layer[0].state_names == ("h", "c") and per_layer[0].gate_kinds == cell.gate_kinds
    stack = gradflow.Stack(per_layer, L, D, H)
    assert_maps(hidden_map(stack, cells.stack_params(stack, trained), xs), want)


def test_equinox_lstm(x64):
    trained = _eqx_cells(eqx.nn.LSTMCell, 4)
    cell = cells.from_equinox(trained[0])
    assert cell.state_names == ("h", "c")  # Equinox's state is (h, c)
    stack = gradflow.Stack(cell, L, D, H)
    params = cells.stack_params(stack, trained)
    xs = inputs(jnp.float64)
    got_h, got_c = hidden_map(stack, params, xs), hidden_map(stack, params, xs, "cell")
    ported = {"layers": [eqx_to_gradflow(p, "ifgo") for p in params["layers"]]}
    ref = gradflow.Stack("lstm", L, D, H)
    assert_maps(got_h, hidden_map(ref, ported, xs))
    assert_maps(got_c, hidden_map(ref, ported, xs, "cell"))
    step = [lambda s, x, m=m: jax.vmap(m)(x, s) for m in trained]
    want_h, want_c = brute_maps(
        step, lambda dt: (jnp.zeros((B, H), dt),) * 2, lambda s: s[0], lambda s, v: (v, s[1]),
        xs, lambda s: s[1], lambda s, v: (s[0], v))
    assert_maps(got_h, want_h)
    assert_maps(got_c, want_c)


def test_cells_carrying_the_same_states_in_another_order_share_a_stack(x64):
    """Equinox's LSTM carries (h, c), linen's and gradflow's (c, h): the same states, so one
    stack takes them all; its maps equal gradflow's LSTM on the ported weights."""
    trained = _eqx_cells(eqx.nn.LSTMCell, 4)
    linen = nn.LSTMCell(features=H)
    mixed = [cells.from_equinox(trained[0]), cells.get("lstm"), cells.from_linen(linen)]
    stack = gradflow.Stack(mixed, L, D, H)
    lin_p = jiggle(linen.init(jax.random.key(3), (jnp.zeros((1, H)),) * 2,
                              jnp.zeros((1, H)))["params"], jax.random.key(4))
    own_p = jiggle(cells.get("lstm").init(jax.random.key(5), H, H, jnp.float64),
                   jax.random.key(6))
    params = cells.stack_params(stack, [trained[0], own_p, {"params": lin_p}])
    ported = {"layers": [eqx_to_gradflow(params["layers"][0], "ifgo"), own_p,
                         linen_lstm_to_gradflow(params["layers"][2])]}
    ref = gradflow.Stack("lstm", L, D, H)
    xs = inputs(jnp.float64)
    for wrt in ("hidden", "cell"):
        assert_maps(hidden_map(stack, params, xs, wrt), hidden_map(ref, ported, xs, wrt))
    with pytest.raises(ValueError, match="must carry the same states"):
        gradflow.Stack([cells.get("lstm"), cells.get("gru")], 2, D, H)


class _PermCell(eqx.Module):
    """A user's Equinox cell with an integer buffer (a fixed permutation of the units)."""
    perm: jax.Array
    W: jax.Array
    U: jax.Array
    hidden_size: int = eqx.field(static=True)

    def __init__(self, n_in, n_h, key, flip=True):
        k1, k2 = jax.random.split(key)
        self.perm = jnp.arange(n_h)[::-1] if flip else jnp.roll(jnp.arange(n_h), 1)
        self.W = jax.random.normal(k1, (n_h, n_in), jnp.float64) / n_in ** 0.5
        self.U = jax.random.normal(k2, (n_h, n_h), jnp.float64) / n_h ** 0.5
        self.hidden_size = n_h

    def __call__(self, x, h):
        return jnp.tanh(self.W @ x + self.U @ h[self.perm])


def test_equinox_integer_arrays_are_fixed_not_parameters(x64):
    ks = jax.random.split(jax.random.key(8), L)
    trained = [_PermCell(n, H, k) for n, k in zip((D, H, H), ks)]
    stack = gradflow.Stack([cells.from_equinox(m) for m in trained], L, D, H)
    params = cells.stack_params(stack, trained)
    assert all(sorted(p) == ["U", "W"] for p in params["layers"])  # perm is not a parameter
    xs = inputs(jnp.float64)
    step = [lambda h, x, m=m: jax.vmap(m)(x, h) for m in trained]
    want, _ = brute_maps(step, lambda dt: jnp.zeros((B, H), dt), lambda h: h,
                         lambda h, v: v, xs)
    assert_maps(hidden_map(stack, params, xs), want)
    one = gradflow.Stack(cells.from_equinox(trained[1]), L, H, H)
    with pytest.warns(UserWarning, match="has no init=, so every layer starts from the "
                                         "module's own weights"):
        fresh = one.init(jax.random.key(0), jnp.float64)
    assert all(sorted(p) == ["U", "W"] for p in fresh["layers"])
    assert all(np.array_equal(p["U"], trained[1].U) for p in fresh["layers"])
    other = _PermCell(H, H, ks[2], flip=False)  # another buffer than the cell's module
    with pytest.raises(ValueError, match="other integer or boolean arrays"):
        cells.stack_params(one, [trained[1], trained[2], other])


class _BNCell(nnx.Module):
    """A user's NNX cell with BatchNorm at inference: running statistics outside its Params."""

    def __init__(self, n_in, n_h, *, rngs, level=1.0):
        self.in_features, self.hidden_features = n_in, n_h
        self.wi = nnx.Linear(n_in, n_h, rngs=rngs, param_dtype=jnp.float64)
        self.wh = nnx.Linear(n_h, n_h, use_bias=False, rngs=rngs, param_dtype=jnp.float64)
        self.bn = nnx.BatchNorm(n_h, use_running_average=True, rngs=rngs,
                                param_dtype=jnp.float64)
        self.bn.mean.value = jnp.full((n_h,), 0.5 * level, jnp.float64)
        self.bn.var.value = jnp.full((n_h,), 4.0 * level, jnp.float64)

    def __call__(self, h, x):
        h = jnp.tanh(self.bn(self.wi(x) + self.wh(h)))
        return h, h

    def initialize_carry(self, input_shape, rngs=None):
        return jnp.zeros(input_shape[:-1] + (self.hidden_features,), jnp.float64)


def test_nnx_state_outside_params_is_each_layers_own_or_refused(x64):
    """Trained layers with their own BatchNorm running statistics: one cell for all layers
    would run every layer with the first module's statistics (it did, silently: outputs 0.33
    off); stack_params refuses that, and a cell per layer measures each with its own."""
    trained = [_BNCell(n, H, rngs=nnx.Rngs(l), level=l + 1.0)
               for l, n in enumerate((D, H, H))]
    one = gradflow.Stack(cells.from_nnx(trained[0]), L, D, H)
    with pytest.raises(ValueError, match=r"other state outside its nnx.Params than the cell's "
                                         r"module \(bn.mean, bn.var; .*from_nnx\(m\) for m"):
        cells.stack_params(one, trained)
    stack = gradflow.Stack([cells.from_nnx(m) for m in trained], L, D, H)
    params = cells.stack_params(stack, trained)
    xs = inputs(jnp.float64)
    step = [lambda h, x, m=m: m(h, x)[0] for m in trained]
    want, _ = brute_maps(step, lambda dt: jnp.zeros((B, H), dt), lambda h: h,
                         lambda h, v: v, xs)
    assert_maps(hidden_map(stack, params, xs), want)
    same = [_BNCell(n, H, rngs=nnx.Rngs(l)) for l, n in enumerate((H, H, H))]  # equal stats
    cells.stack_params(gradflow.Stack(cells.from_nnx(same[0]), L, H, H), same)


class _GainCell(nnx.Module):
    """A user's NNX cell of the signature gradflow rebuilds, with a fixed gain outside its
    Params (an nnx.Variable)."""

    def __init__(self, in_features, hidden_features, *, rngs):
        self.in_features, self.hidden_features = in_features, hidden_features
        self.W = nnx.Param(jax.random.normal(rngs.params(), (in_features + hidden_features,
                                                              hidden_features), jnp.float64)
                           / (in_features + hidden_features) ** 0.5)
        self.gain = nnx.Variable(jnp.ones(hidden_features, jnp.float64))

    def __call__(self, h, x):
        h = self.gain[...] * jnp.tanh(jnp.concatenate([x, h], -1) @ self.W)
        return h, h

    def initialize_carry(self, input_shape, rngs=None):
        return jnp.zeros(input_shape[:-1] + (self.hidden_features,), jnp.float64)


def test_fresh_modules_run_with_the_wrapped_modules_state_outside_params(x64):
    """Stack.init rebuilds (or init= makes) a module per layer inside a trace: comparing its
    state outside the Params with the wrapped module's raised a tracer error (any
    nnx.Variable; an Equinox integer buffer made by init=); every layer runs with the wrapped
    module's (here a gain of 1.5, not a fresh module's 1)."""
    cell_module = _GainCell(D, H, rngs=nnx.Rngs(0))
    cell_module.gain.value = jnp.full((H,), 1.5, jnp.float64)
    stack = gradflow.Stack(cells.from_nnx(cell_module), L, D, H)
    params = stack.init(jax.random.key(0), jnp.float64)
    xs = inputs(jnp.float64)
    step = [lambda h, x, W=p["W"]: 1.5 * jnp.tanh(jnp.concatenate([x, h], -1) @ W)
            for p in params["layers"]]
    want, _ = brute_maps(step, lambda dt: jnp.zeros((B, H), dt), lambda h: h,
                         lambda h, v: v, xs)
    assert_maps(hidden_map(stack, params, xs), want)
    made = gradflow.Stack(cells.from_nnx(cell_module, init=lambda k, i, h: _GainCell(
        i, h, rngs=nnx.Rngs(k))), L, D, H)
    made.init(jax.random.key(0), jnp.float64)
    trained = [_GainCell(n, H, rngs=nnx.Rngs(l)) for l, n in enumerate((D, H, H))]
    for m in trained:
        m.gain.value = jnp.full((H,), 1.5, jnp.float64)
    cells.stack_params(stack, trained)  # the same fixed state: accepted
    trained[2].gain.value = jnp.ones(H, jnp.float64)  # its own: refused, as before
    with pytest.raises(ValueError, match=r"other state outside its nnx.Params .*\(gain;"):
        cells.stack_params(stack, trained)
    eqx_stack = gradflow.Stack(cells.from_equinox(
        _PermCell(D, H, jax.random.key(1)), init=lambda k, i, h: _PermCell(i, h, k)), L, D, H)
    assert all(sorted(p) == ["U", "W"] for p in eqx_stack.init(jax.random.key(0))["layers"])


class _Leaky(eqx.Module):
    """A leaky tanh cell whose leak is a static float field: a fixed setting, no parameter."""
    W: jax.Array
    hidden_size: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)

    def __call__(self, x, h):
        return (1 - self.alpha) * h + self.alpha * jnp.tanh(jnp.concatenate([x, h]) @ self.W)


def test_layers_whose_fixed_settings_differ_are_refused_or_each_their_own_cell(x64):
    """Trained layers that differ in a setting outside their weights (an NNX cell's
    activation, an Equinox static float) ran every layer with the wrapped module's, silently:
    maps up to 65x off. stack_params runs each layer's module as itself against the cell on
    its weights and refuses the difference; a cell per layer measures each as itself (brute
    force); layers of other input widths but equal settings are accepted."""
    acts = (jnp.tanh, jax.nn.relu, jnp.tanh)
    mods = [nnx.SimpleCell(n, H, activation_fn=a, rngs=nnx.Rngs(l), dtype=jnp.float64,
                           param_dtype=jnp.float64)
            for l, (n, a) in enumerate(zip((D, H, H), acts))]
    with pytest.raises(ValueError, match=r"from_nnx: a layer's module computes another "
                                         r"function .*Stack\(\[from_nnx\(m\) for m"):
        cells.stack_params(gradflow.Stack(cells.from_nnx(mods[0]), L, D, H), mods)
    leaky = [_Leaky(jax.random.normal(jax.random.key(l), (n + H, H), jnp.float64) / 3, H, a)
             for l, (n, a) in enumerate(zip((D, H, H), (0.9, 0.05, 0.9)))]
    with pytest.raises(ValueError, match=r"from_equinox: a layer's module computes another "
                                         r"function"):
        cells.stack_params(gradflow.Stack(cells.from_equinox(leaky[0], input_size=D), L, D, H),
                           leaky)
    xs = inputs(jnp.float64)
    for make, layers, step in (
            (cells.from_nnx, mods, [lambda h, x, m=m: m(h, x)[0] for m in mods]),
            (lambda m: cells.from_equinox(m, input_size=m.W.shape[0] - H), leaky,
             [lambda h, x, m=m: jax.vmap(m)(x, h) for m in leaky])):
        stack = gradflow.Stack([make(m) for m in layers], L, D, H)
        want, _ = brute_maps(step, lambda dt: jnp.zeros((B, H), dt), lambda h: h,
                             lambda h, v: v, xs)
        assert_maps(hidden_map(stack, cells.stack_params(stack, layers), xs), want)
    same = [_Leaky(m.W, H, 0.9) for m in leaky]  # equal settings: accepted
    cells.stack_params(gradflow.Stack(cells.from_equinox(same[0], input_size=D), 1, D, H),
                       same[:1])
    grus = [eqx.nn.GRUCell(n, H, key=jax.random.key(l), dtype=jnp.float64)
            for l, n in enumerate((D, H, H))]  # layer 0 reads D, the others H: accepted
    cells.stack_params(gradflow.Stack(cells.from_equinox(grus[0]), L, D, H), grus)


class _MyGRU(eqx.Module):
    """A researcher's own Equinox cell around eqx.nn.GRUCell: gradflow cannot rebuild it."""
    cell: eqx.nn.GRUCell
    hidden_size: int = eqx.field(static=True)

    def __init__(self, n_in, n_h, key):
        self.cell = eqx.nn.GRUCell(n_in, n_h, key=key, dtype=jnp.float64)
        self.hidden_size = n_h

    def __call__(self, x, h):
        return self.cell(x, h)


def test_a_module_that_cannot_be_rebuilt_says_how_to_stack_other_input_sizes(x64):
    """input_size != hidden_size: one cell of the first layer's module cannot make the layers
    above (every layer gets its own weights, of the wrong input size); the message says so and
    names both remedies, and the cell-per-layer one measures the trained modules."""
    trained = [_MyGRU(n, H, k) for n, k in zip((D, H, H), jax.random.split(jax.random.key(3), L))]
    one = gradflow.Stack(cells.from_equinox(trained[0]), L, D, H)
    with pytest.raises(ValueError, match=r"parameters the cell makes for a layer of input size "
                                         rf"{H} .*give init=\(key, input_size, hidden_size\) "
                                         r"-> module, or one cell per layer: Stack\(\["
                                         r"from_equinox\(m\) for m in modules\]"):
        cells.stack_params(one, trained)
    stack = gradflow.Stack([cells.from_equinox(m) for m in trained], L, D, H)
    params = cells.stack_params(stack, trained)
    xs = inputs(jnp.float64)
    step = [lambda h, x, m=m: jax.vmap(m)(x, h) for m in trained]
    want, _ = brute_maps(step, lambda dt: jnp.zeros((B, H), dt), lambda h: h,
                         lambda h, v: v, xs)
    assert_maps(hidden_map(stack, params, xs), want)


class _TrainingBN(nnx.Module):
    """A user's NNX cell with BatchNorm left in training mode."""

    def __init__(self, n_in, n_h, *, rngs):
        self.in_features, self.hidden_features = n_in, n_h
        self.wi = nnx.Linear(n_in, n_h, rngs=rngs)
        self.bn = nnx.BatchNorm(n_h, use_running_average=False, rngs=rngs)

    def __call__(self, h, x):
        h = jnp.tanh(self.bn(self.wi(x)) + h)
        return h, h

    def initialize_carry(self, input_shape, rngs=None):
        return jnp.zeros(input_shape[:-1] + (self.hidden_features,))


def test_a_module_in_training_mode_is_told_eval_not_init():
    """A step that fails at the module's own size was told to give init= or a cell per layer
    (advice for weights made at another size); a BatchNorm in training mode is told eval()."""
    module = _TrainingBN(D, D, rngs=nnx.Rngs(0))
    stack = gradflow.Stack(cells.from_nnx(module), L, D, D)
    with pytest.raises(ValueError, match=r"BatchNorm in training mode\?\): measure it at "
                                         r"inference: module.eval\(\), then wrap it again") as e:
        stack.init(jax.random.key(0))
    assert "init=" not in str(e.value)
    module.eval()  # (the cell wraps the module as it was: wrap it again)
    stack = gradflow.Stack(cells.from_nnx(module), L, D, D)
    with pytest.warns(UserWarning, match="has no init=, so every layer starts from the "
                                         "module's own weights"):
        params = stack.init(jax.random.key(0))
    assert np.isfinite(gradflow.gradient_map(stack, params, inputs(jnp.float32)).values).all()


def test_nnx_lstm(x64):
    ks = jax.random.split(jax.random.key(5), L)
    trained = [nnx.LSTMCell(n, H, param_dtype=jnp.float64, rngs=nnx.Rngs(k))
               for k, n in zip(ks, (D, H, H))]
    for m, k in zip(trained, ks):  # training moved the weights (biases included)
        _, state = nnx.split(m, nnx.Param)
        nnx.update(m, jiggle(state, jax.random.fold_in(k, 1)))
    cell = cells.from_nnx(trained[0])
    assert cell.state_names == ("c", "h")
    stack = gradflow.Stack(cell, L, D, H)
    params = cells.stack_params(stack, trained)
    xs = inputs(jnp.float64)
    got = hidden_map(stack, params, xs)
    ported = {"layers": [nnx_lstm_to_gradflow(p) for p in params["layers"]]}
    assert_maps(got, hidden_map(gradflow.Stack("lstm", L, D, H), ported, xs))
    step = [lambda carry, x, m=m: m(carry, x)[0] for m in trained]
    want, _ = brute_maps(step, lambda dt: (jnp.zeros((B, H), dt),) * 2, lambda c: c[1],
                         lambda c, v: (c[0], v), xs)
    assert_maps(got, want)
    # fresh weights: a new module of the class per layer, each its own input size
    fresh = stack.init(jax.random.key(9))["layers"]
    assert fresh[0]["ii"]["kernel"].shape == (D, H) and fresh[1]["ii"]["kernel"].shape == (H, H)
    assert not np.allclose(fresh[1]["hi"]["kernel"], fresh[2]["hi"]["kernel"])


def _lstm_step(p, carry, x):
    """A hand-written LSTM on gradflow's layout, carry ``(c, h)``; returns ``(carry, h)``."""
    c, h = carry
    z = {g: x @ p[g]["W"] + h @ p[g]["U"] + p[g]["b"] for g in "ifgo"}
    c = jax.nn.sigmoid(z["f"]) * c + jax.nn.sigmoid(z["i"]) * jnp.tanh(z["g"])
    h = jax.nn.sigmoid(z["o"]) * jnp.tanh(c)
    return (c, h), h


def _lstm_gates(p, carry, x):
    z = {g: x @ p[g]["W"] + carry[1] @ p[g]["U"] + p[g]["b"] for g in "fg"}
    return {"f": jax.nn.sigmoid(z["f"]), "cand": jnp.tanh(z["g"])}


def _lstm_init(key, n_in, n_h, dtype):
    return cells.get("lstm").init(key, n_in, n_h, dtype)


def test_function_lstm_finds_h_and_equals_gradflow(x64):
    cell = cells.from_function(_lstm_step, _lstm_init, hidden_size=H, state=2)
    assert cell.state_names == ("c", "h")  # the probe step found h at index 1
    cell_dict = cells.from_function(
        lambda p, s, x: (lambda cs, h: ({"mem": cs[0], "out": cs[1]}, h))(
            *_lstm_step(p, (s["mem"], s["out"]), x)), _lstm_init, hidden_size=H,
        state=lambda shape, n, dt: {"mem": jnp.zeros(shape + (n,), dt),
                                    "out": jnp.zeros(shape + (n,), dt)})
    assert cell_dict.state_names == ("c", "h")
    stack = gradflow.Stack(cell, L, D, H)
    params = jiggle(stack.init(jax.random.key(6), jnp.float64), jax.random.key(7))
    xs = inputs(jnp.float64)
    ref = gradflow.Stack("lstm", L, D, H)
    want = hidden_map(ref, params, xs)
    # a dict carry, and the same function on one example (batched=False, vmapped by the adapter)
    one = cells.from_function(lambda p, s, x: _lstm_step(p, s, x), _lstm_init, hidden_size=H,
                              state=2, batched=False)
    for c in (cell, cell_dict, one):
        assert_maps(hidden_map(gradflow.Stack(c, L, D, H), params, xs), want)
    assert_maps(hidden_map(stack, params, xs, "cell"), hidden_map(ref, params, xs, "cell"))
    np.testing.assert_allclose(gradflow.local_gains(stack, params, xs)["vertical_rms"],
                               gradflow.local_gains(ref, params, xs)["vertical_rms"], rtol=1e-10)


def test_function_params_given_directly(x64):
    p = jiggle(cells.get("lstm").init(jax.random.key(8), H, H, jnp.float64), jax.random.key(9))
    cell = cells.from_function(_lstm_step, p, hidden_size=H, state=2, output=1)
    stack = gradflow.Stack(cell, L, H, H)
    params = stack.init(jax.random.key(0), jnp.float64)
    assert all(np.array_equal(a, b) for l in range(L) for a, b in zip(
        jax.tree_util.tree_leaves(params["layers"][l]), jax.tree_util.tree_leaves(p)))
    xs = inputs(jnp.float64, d=H)  # both evaluation orders (a user cell vmapped over layers)
    assert_maps(hidden_map(stack.replace(order="wavefront"), params, xs),
                hidden_map(stack, params, xs))
    with pytest.raises(ValueError, match="fit input_size=4"):
        gradflow.Stack(cell, L, D, H).init(jax.random.key(0))
    with pytest.raises(ValueError, match="hidden size is 6"):
        gradflow.Stack(cell, L, H, 8).init(jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# Distinct user cells, one name: the cache-collision regression


def _rnn(act):
    def step(p, h, x):
        h = act(x @ p["W"] + h @ p["U"])
        return h, h
    return step


def _rnn_init(key, n_in, n_h, dtype):
    k1, k2 = jax.random.split(key)
    return {"W": jax.random.normal(k1, (n_in, n_h), dtype) / np.sqrt(n_in),
            "U": jax.nn.initializers.orthogonal()(k2, (n_h, n_h), dtype)}


def test_same_name_different_functions_give_their_own_maps():
    tanh = cells.from_function(_rnn(jnp.tanh), _rnn_init)
    sin = cells.from_function(_rnn(jnp.sin), _rnn_init)
    assert tanh.name == sin.name == "user" and tanh != sin and hash(tanh) != hash(sin)
    s_tanh, s_sin = gradflow.Stack(tanh, L, D, H), gradflow.Stack(sin, L, D, H)
    params = s_tanh.init(jax.random.key(0))
    xs = inputs(jnp.float32)
    m_tanh, m_sin = hidden_map(s_tanh, params, xs), hidden_map(s_sin, params, xs)
    for act, got in ((jnp.tanh, m_tanh), (jnp.sin, m_sin)):
        step = [lambda h, x, p=p: _rnn(act)(p, h, x)[0] for p in params["layers"]]
        want, _ = brute_maps(step, lambda dt: jnp.zeros((B, H), dt), lambda c: c,
                             lambda c, v: v, xs)
        np.testing.assert_allclose(got, want, rtol=1e-4)
    assert np.max(np.abs(m_tanh / m_sin - 1)) > 1e-2


def test_builtin_cell_built_twice_compiles_once():
    traces = []

    @functools.partial(jax.jit, static_argnames="stack")
    def run(stack, params, xs):
        traces.append(stack)  # a Python side effect: runs once per compilation
        return stack.apply(params, xs).top

    xs = inputs(jnp.float32, d=H)
    first = gradflow.Stack(cells.get("lstm"), 2, H, H)
    params = first.init(jax.random.key(0))
    run(first, params, xs)
    again = gradflow.Stack(cells.get("lstm"), 2, H, H)  # a second, equal build
    assert again == first and hash(again) == hash(first)
    run(again, params, xs)
    assert len(traces) == 1
    tanh = gradflow.Stack(cells.from_function(_rnn(jnp.tanh), _rnn_init), 2, H, H)
    sin = gradflow.Stack(cells.from_function(_rnn(jnp.sin), _rnn_init), 2, H, H)
    p = tanh.init(jax.random.key(0))
    out_tanh, out_sin = run(tanh, p, xs), run(sin, p, xs)
    assert len(traces) == 3 and not np.allclose(out_tanh, out_sin)


# ---------------------------------------------------------------------------------------------
# Gates


def test_function_gates_statistics_and_kinds():
    cell = cells.from_function(_lstm_step, _lstm_init, hidden_size=H, state=2,
                               gates=_lstm_gates)
    assert cell.kinds == {"f": "sigmoid", "cand": "tanh"}  # from the probe step's values
    stack = gradflow.Stack(cell, L, D, H)
    params = jiggle(stack.init(jax.random.key(1)), jax.random.key(2))
    xs = inputs(jnp.float32)
    stats = gates.saturation(stack, params, xs)
    # f and the tanh candidate from a Python loop over the hand-written cell
    f, cand, x = [], [], xs
    for p in params["layers"]:
        carry, fl, cl, outs = (jnp.zeros((B, H)),) * 2, [], [], []
        for t in range(T):
            g = _lstm_gates(p, carry, x[:, t])
            fl.append(g["f"])
            cl.append(g["cand"])
            carry, h = _lstm_step(p, carry, x[:, t])
            outs.append(h)
        f.append(jnp.stack(fl, 1))
        cand.append(jnp.stack(cl, 1))
        x = jnp.stack(outs, 1)
    f, cand = np.asarray(jnp.stack(f)), np.asarray(jnp.stack(cand))  # (L, B, T, H)
    np.testing.assert_allclose(stats["mean/f"], f.mean(axis=(1, 3)), rtol=1e-5)
    np.testing.assert_allclose(stats["slope/f"], (f * (1 - f)).mean(axis=(1, 3)), rtol=1e-5)
    # a tanh gate saturates near +-1, its slope is 1 - a^2
    np.testing.assert_allclose(stats["saturated/cand"],
                               (np.abs(cand) > 0.95).mean(axis=(1, 3)), atol=1e-6)
    np.testing.assert_allclose(stats["slope/cand"], (1 - cand ** 2).mean(axis=(1, 3)),
                               rtol=1e-5)
    assert (np.abs(cand) > 0.95).any() and (cand < 0.05).mean() > 0.3  # the kinds differ here
    # declared "other": no slope, saturation read on [0, 1] as the docs say
    other = cells.from_function(_lstm_step, _lstm_init, hidden_size=H, state=2,
                                gates=_lstm_gates, gate_kinds={"cand": "other", "f": "sigmoid"})
    assert other.kinds == {"f": "sigmoid", "cand": "other"}
    o = gates.saturation(gradflow.Stack(other, L, D, H), params, xs)
    assert "slope/cand" not in o.arrays
    np.testing.assert_allclose(o["saturated/cand"],
                               ((cand < 0.05) | (cand > 0.95)).mean(axis=(1, 3)), atol=1e-6)
    assert not any(k.startswith("timescale/") for k in stats.arrays)  # no gate said to keep
    # retain= names the gate that keeps the state: its memory timescale 1 / (1 - mean f)
    kept = cells.from_function(_lstm_step, _lstm_init, hidden_size=H, state=2,
                               gates=_lstm_gates, retain={"f": 1})
    assert kept.retain == (("f", 1),)
    k = gates.saturation(gradflow.Stack(kept, L, D, H), params, xs)
    np.testing.assert_allclose(k["timescale/f"], 1 / (1 - f.mean(axis=(1, 3))), rtol=1e-5)
    flipped = cells.from_function(_lstm_step, _lstm_init, hidden_size=H, state=2,
                                  gates=_lstm_gates, retain={"f": -1})
    np.testing.assert_allclose(gates.saturation(gradflow.Stack(flipped, L, D, H), params,
                                                xs)["timescale/f"],
                               1 / f.mean(axis=(1, 3)), rtol=1e-5)
    for bad, err, match in (({"g": 1}, ValueError, r"retain names 'g', which is not a reported "
                                                    r"gate \('f', 'cand'\)"),
                            ({"f": True}, ValueError, r"retain\['f'\] must be 1"),
                            ({"cand": 1}, ValueError, "a 'tanh' gate is no fraction"),
                            ([("f", 1)], TypeError, r"retain must be a dict")):
        with pytest.raises(err, match=match):
            cells.from_function(_lstm_step, _lstm_init, hidden_size=H, state=2,
                                gates=_lstm_gates, retain=bad)
    with pytest.raises(ValueError, match="none: give gates="):
        cells.from_function(_lstm_step, _lstm_init, hidden_size=H, state=2, retain={"f": 1})


def test_no_gates_maps_work_statistics_say_how():
    cell = cells.from_linen(nn.LSTMCell(features=H))
    stack = gradflow.Stack(cell, 2, D, H)
    params = stack.init(jax.random.key(0))
    xs = inputs(jnp.float32)
    assert hidden_map(stack, params, xs).shape == (2, T)
    with pytest.raises(ValueError, match="reports no gates.*gates=fn"):
        gates.saturation(stack, params, xs)


class _LinenCell(nn.RNNCellBase):
    """A user's linen cell with a one-array carry of ``features`` units; subclasses write
    ``__call__``."""
    features: int

    def initialize_carry(self, rng, input_shape):
        return jnp.zeros(input_shape[:-1] + (self.features,))

    @property
    def num_feature_axes(self):
        return 1


class _SowingCell(_LinenCell):
    """A user's linen cell (a minimal GRU-like cell) that sows its update gate (and, with
    ``extra``, a scalar that is no gate)."""
    extra: bool = False

    @nn.compact
    def __call__(self, h, x):
        z = nn.sigmoid(nn.Dense(self.features, name="Wz")(jnp.concatenate([x, h], -1)))
        n = jnp.tanh(nn.Dense(self.features, name="Wn")(jnp.concatenate([x, h], -1)))
        self.sow("intermediates", "z", z)
        if self.extra:
            self.sow("intermediates", "h_norm", jnp.linalg.norm(h))
        h = z * h + (1 - z) * n
        return h, h


def test_linen_sown_gates():
    module = _SowingCell(features=H)
    cell = cells.from_linen(module, gates="sown")
    assert cell.kinds == {"z": "sigmoid"}
    stack = gradflow.Stack(cell, 2, D, H)
    params = stack.init(jax.random.key(3))
    xs = inputs(jnp.float32)
    z, x = [], xs
    for p in params["layers"]:
        h, zl, outs = jnp.zeros((B, H)), [], []
        for t in range(T):
            (h, _), st = module.apply({"params": p}, h, x[:, t], mutable=["intermediates"])
            zl.append(st["intermediates"]["z"][0])
            outs.append(h)
        z.append(jnp.stack(zl, 1))
        x = jnp.stack(outs, 1)
    z = np.asarray(jnp.stack(z))
    stats = gates.saturation(stack, params, xs)
    np.testing.assert_allclose(stats["mean/z"], z.mean(axis=(1, 3)), rtol=1e-5)
    # a module that sows more than its gates: gate_kinds picks them
    more = _SowingCell(features=H, extra=True)
    with pytest.raises(ValueError, match="gate 'h_norm' has shape"):
        cells.from_linen(more, gates="sown")
    picked = gradflow.Stack(cells.from_linen(more, gates="sown", gate_kinds={"z": "sigmoid"}),
                            2, D, H)
    np.testing.assert_allclose(gates.saturation(picked, params, xs)["mean/z"],
                               stats["mean/z"], rtol=1e-6)
    # retain= passes through every adapter: z keeps 1 - z of the state here
    kept = gradflow.Stack(cells.from_linen(module, gates="sown", retain={"z": -1}), 2, D, H)
    np.testing.assert_allclose(gates.saturation(kept, params, xs)["timescale/z"],
                               1 / z.mean(axis=(1, 3)), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input and optional dependencies


def test_an_output_that_is_not_the_carry_is_refused_not_dropped():
    """A cell whose y is a readout of its carry would run as another network (the stack passes
    the carry's h up): refused at build (a probe step) or, with no hidden_size to probe
    with, at the first init; output= naming another array than y is refused too."""
    class Readout(_LinenCell):
        @nn.compact
        def __call__(self, h, x):
            h = jnp.tanh(nn.Dense(self.features)(x) + nn.Dense(self.features)(h))
            return h, nn.Dense(self.features, name="out")(h)

    with pytest.raises(ValueError, match="output y .* is none of the carry's arrays.*loss"):
        cells.from_linen(Readout(H))
    init = lambda k, n, h, dtype: {"W": jnp.ones((n, h), dtype) / n}  # noqa: E731
    readout = cells.from_function(lambda p, h, x: (jnp.tanh(x @ p["W"] + h), 3 * h + 1), init)
    with pytest.raises(ValueError, match="none of the carry's arrays"):
        gradflow.Stack(readout, L, D, H).init(jax.random.key(0))
    with pytest.raises(ValueError, match="none of the carry's arrays"):
        cells.from_function(lambda p, h, x: (jnp.tanh(x @ p["W"] + h), 3 * h + 1), init,
                            hidden_size=H)
    with pytest.raises(ValueError, match=r"output=0 names carry array 0, but the step's output "
                                         r"y equals carry array\(s\) \[1\]"):
        cells.from_function(_lstm_step, _lstm_init, hidden_size=H, state=2, output=0)
    same = cells.from_function(lambda p, h, x: (jnp.tanh(x @ p["W"] + h),) * 2, init)
    gradflow.Stack(same, L, D, H).init(jax.random.key(0))  # y is h: fine


def test_a_failing_step_is_reported_with_its_cause():
    """The user's step failing while gradflow runs it says what went wrong and the fix; a bug
    in the step's own code keeps its type (with a note), never reads as unfitting params."""
    init = lambda k, n, h, dtype: {"W": jnp.ones((n, h), dtype) / n}  # noqa: E731

    def build(step, **kw):
        gradflow.Stack(cells.from_function(step, init, **kw), L, D, H).init(jax.random.key(0))

    def typo(p, h, x):
        h = jnp.tanh(x @ p["W"] + h + undefined_bias)  # noqa: F821
        return h, h

    for kw in ({}, {"hidden_size": H, "gates": lambda p, h, x: {"g": h}}):  # init, probe
        with pytest.raises(NameError, match="undefined_bias") as e:
            build(typo, **kw)
        assert any("raised by the cell's step" in n for n in e.value.__notes__)

    def branch(p, h, x):
        h = jnp.tanh(x @ p["W"] + h)
        return (h * 0.5, h) if jnp.mean(h) > 0 else (h, h)

    with pytest.raises(ValueError, match="decides in Python.*jnp.where or jax.lax.cond"):
        build(branch)

    def tuple_carry(p, carry, x):
        c, h = carry
        return (c, jnp.tanh(x @ p["W"] + h)), h

    with pytest.raises(ValueError, match="unpacks its carry.*state="):
        build(tuple_carry)

    def dict_carry(p, carry, x):  # (it said only "JAX does not support string indexing")
        h = jnp.tanh(x @ p["W"] + carry["h"])
        return {"h": h, "m": carry["m"] + h}, h

    with pytest.raises(ValueError, match=r"string indexing; .*indexes an array by name: its "
                                         r"carry .*for a dict carry give state=lambda "
                                         r"batch_shape, H, dtype.*its params what init returns"):
        build(dict_carry)
    with pytest.raises(TypeError, match=r"the step must return \(carry, y\), got a "):
        build(lambda p, h, x: jnp.tanh(x @ p["W"] + h))

    class Dropped(_LinenCell):
        @nn.compact
        def __call__(self, h, x):
            h = nn.Dropout(0.5, deterministic=False)(jnp.tanh(nn.Dense(self.features)(x) + h))
            return h, h

    with pytest.raises(ValueError, match="draws random numbers.*deterministic=True"):
        cells.from_linen(Dropped(H))


def test_what_a_step_got_wrong_is_what_the_message_says():
    """Each message points at the user's actual mistake (found by a researcher's session)."""
    init = lambda k, n, h, dtype: {"W": jnp.ones((n, h), dtype) / n}  # noqa: E731
    # a cell that is NaN for some inputs is still a cell whose y is its carry
    nan_some = cells.from_function(lambda p, h, x: (jnp.tanh(x @ p["W"] + h) * jnp.sqrt(
        x[..., :1]),) * 2, init, hidden_size=H)
    assert nan_some.state_names == ("h",)
    # a linen step returning (y, carry) is told the order, not state= (from_linen has none)
    class Swapped(nn.RNNCellBase):
        features: int

        @nn.compact
        def __call__(self, carry, x):
            c, y = nn.LSTMCell(self.features)(carry, x)
            return y, c

        def initialize_carry(self, rng, shape):
            return (jnp.zeros(shape[:-1] + (self.features,)),) * 2

        @property
        def num_feature_axes(self):
            return 1

    with pytest.raises(ValueError, match=r"returns \(carry, y\) in that order, and the carry "
                                         r"is what the module's initialize_carry builds$"):
        gradflow.Stack(cells.from_linen(Swapped(H)), L, D, H).init(jax.random.key(0))

    class NoCarry(nn.Module):
        features: int

        @nn.compact
        def __call__(self, h, x):
            return h, nn.Dense(self.features)(x)

    with pytest.raises(TypeError, match=r"NoCarry has no initialize_carry.*from_function\("):
        cells.from_linen(NoCarry(H))
    # arguments in another order: no "do the parameters fit the sizes?", the call it gets
    with pytest.raises(ValueError, match=r"failed: .*string.* \(.*; it is called as "
                                         r"step\(params, carry, x\)\)$") as e:
        cells.from_function(lambda x, h, p: (jnp.tanh(x @ p["W"]),) * 2, init, hidden_size=H)
    assert "do the parameters fit" not in str(e.value)
    # a memory wider than the output: refused, with how to carry it
    with pytest.raises(ValueError, match=r"has shape \(1, 12\) for batch 1; .* several "
                                         r"hidden_size-wide arrays \(a tuple\)$"):
        cells.from_function(lambda p, c, x: (c, c[..., :H]), init, hidden_size=H,
                            state=lambda b, h, dtype: jnp.zeros(b + (2 * h,), dtype))
    # 16-bit Flax modules: parameters refused with the fix, computation measured with a warning
    with pytest.raises(ValueError, match=r"param_dtype=bfloat16; .* param_dtype=jnp.float32"):
        cells.from_linen(nn.LSTMCell(H, param_dtype=jnp.bfloat16))
    with pytest.warns(UserWarning, match="computes in bfloat16"):
        cells.from_linen(nn.GRUCell(H, dtype=jnp.bfloat16))


def _centred_step(p, h, x):
    """A user's cell that mixes the examples of a batch (it centres the input over it)."""
    h = jnp.tanh((x - x.mean(0)) @ p["W"] + h @ p["U"] + 0.3)
    return h, h


def _wu_init(k, n, h, dtype):
    k1, k2 = jax.random.split(k)
    return {"W": jax.random.normal(k1, (n, h), dtype) / n ** 0.5,
            "U": jax.random.normal(k2, (h, h), dtype) / h ** 0.5}


def test_a_cell_that_mixes_examples_is_found_and_refused_per_example(x64):
    coupled = cells.from_function(_centred_step, _wu_init, hidden_size=H)
    assert coupled.couples_batch  # found by the probe step
    plain = cells.from_function(lambda p, h, x: (jnp.tanh(x @ p["W"] + h @ p["U"]),) * 2,
                                _wu_init, hidden_size=H)
    assert not plain.couples_batch
    through_h = cells.from_function(  # coupled through the carry only
        lambda p, h, x: (jnp.tanh(x @ p["W"] + (h - h.mean(0)) @ p["U"]),) * 2, _wu_init,
        hidden_size=H)
    assert through_h.couples_batch
    running = cells.from_function(  # a running statistic: example 0 reads no other, 1 reads 0
        lambda p, h, x: (jnp.tanh(jnp.cumsum(x @ p["W"] + h @ p["U"], axis=0)),) * 2, _wu_init,
        hidden_size=H)
    assert running.couples_batch  # (only example 0 was watched: it was split, maps 45% apart)
    from gradflow.errors import InputError
    with pytest.raises(InputError, match=r"one example's new carry moves with another's input "
                                         r"and carry\), though couples_batch=False says"):
        cells.from_function(lambda p, h, x: (jnp.tanh(jnp.cumsum(x @ p["W"] + h @ p["U"], 0)),)
                            * 2, _wu_init, hidden_size=H, couples_batch=False)
    stack = gradflow.Stack(coupled, L, D, H)
    params = stack.init(jax.random.key(0), jnp.float64)
    xs = inputs(jnp.float64)
    for measure in (gradflow.jacobian_map, gradflow.local_gains):
        with pytest.raises(ValueError, match="couples the examples of a batch"):
            measure(stack, params, xs)
    bn = gradflow.Stack(cells.get("star", variant="bn"), L, D, H)
    with pytest.raises(ValueError, match="jacobian_map measures per-example"):
        gradflow.jacobian_map(bn, bn.init(jax.random.key(0)), inputs(jnp.float32))
    # the gradient map includes the coupling: equal to a Python loop over the user's step
    step = [lambda h, x, p=p: _centred_step(p, h, x)[0] for p in params["layers"]]
    want, _ = brute_maps(step, lambda dt: jnp.zeros((B, H), dt), lambda h: h,
                         lambda h, v: v, xs)
    assert_maps(hidden_map(stack, params, xs), want)
    # with no probe to find it (no hidden_size), the first init refuses it undeclared: the
    # user's to fix (an InputError: exit 2 on the command line, not an internal error)
    from gradflow.errors import InputError
    with pytest.raises(InputError, match="mixes the examples.*couples_batch=True"):
        gradflow.Stack(cells.from_function(_centred_step, _wu_init), L, D, H).init(
            jax.random.key(0))
    # a step that gives NaN on the probe's inputs does not read as one that mixes examples
    nan_step = lambda p, h, x: (h * 0 + jnp.log(-1.0 + 0 * x @ p["W"]),) * 2  # noqa: E731
    assert not cells.from_function(nan_step, _wu_init, hidden_size=H).couples_batch
    gradflow.Stack(cells.from_function(nan_step, _wu_init), L, D, H).init(jax.random.key(0))
    declared = cells.from_function(_centred_step, _wu_init, couples_batch=True)
    assert declared.couples_batch
    gradflow.Stack(declared, L, D, H).init(jax.random.key(0))
    # declared not to mix them, it is checked as model_map checks its models (it was trusted:
    # each example measured alone, where centring over the batch gives 0: maps of 1e-8)
    with pytest.raises(ValueError, match="mixes the examples.*though couples_batch=False"):
        cells.from_function(_centred_step, _wu_init, hidden_size=H, couples_batch=False)
    with pytest.raises(InputError, match="though couples_batch=False"):
        gradflow.Stack(cells.from_function(_centred_step, _wu_init, couples_batch=False), L,
                       D, H).init(jax.random.key(0))
    assert not cells.from_function(lambda p, h, x: (jnp.tanh(x @ p["W"] + h @ p["U"]),) * 2,
                                   _wu_init, hidden_size=H, couples_batch=False).couples_batch
    with pytest.raises(TypeError, match="couples_batch must be"):
        cells.from_function(_centred_step, _wu_init, couples_batch="yes")


def test_local_gains_are_the_jacobians_backpropagation_uses(x64):
    """A cell with a custom_vjp (here: the gradient through h scaled by 1/2, the value
    unchanged) has gains as backprop sees them: half the plain cell's temporal gains."""
    @jax.custom_vjp
    def half_grad(v):
        return v

    half_grad.defvjp(lambda v: (v, None), lambda _, g: (0.5 * g,))

    def make(f):
        return cells.from_function(lambda p, h, x: (jnp.tanh(x @ p["W"] + f(h) @ p["U"]),) * 2,
                                   _wu_init, hidden_size=H)

    plain, halved = (gradflow.Stack(make(f), L, D, H) for f in (lambda v: v, half_grad))
    params = plain.init(jax.random.key(0), jnp.float64)
    xs = inputs(jnp.float64)
    a, b = gradflow.local_gains(plain, params, xs), gradflow.local_gains(halved, params, xs)
    for k in ("temporal_rms", "temporal_spectral"):
        np.testing.assert_allclose(b[k], 0.5 * a[k], rtol=1e-12)
    for k in ("vertical_rms", "vertical_spectral"):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-12)


def test_clear_errors():
    with pytest.raises(TypeError, match="init must be"):
        cells.from_function(_lstm_step, None)
    with pytest.raises(ValueError, match="give hidden_size="):
        cells.from_function(_lstm_step, _lstm_init, state=2)
    both = lambda p, c, x: ((c[0] * 0 + 1, c[1] * 0 + 1), c[1] * 0 + 1)  # noqa: E731
    with pytest.raises(ValueError, match="carry arrays \\[0, 1\\].*output="):
        cells.from_function(both, _lstm_init, hidden_size=H, state=2)
    with pytest.raises(ValueError, match="output=5 is out of range"):
        cells.from_function(_lstm_step, _lstm_init, hidden_size=H, state=2, output=5)
    with pytest.raises(ValueError, match="unknown kind 'gate'"):
        cells.from_function(_lstm_step, _lstm_init, hidden_size=H, state=2, gates=_lstm_gates,
                            gate_kinds={"f": "gate"})
    # functions of the wrong arity are named with the signature they need, before any run
    with pytest.raises(TypeError, match=r"init must take \(key, input_size, hidden_size, "
                                        r"dtype\); <lambda>\(k, n, h\) does not"):
        cells.from_function(_lstm_step, lambda k, n, h: None, state=2)
    with pytest.raises(TypeError, match=r"step must take \(params, carry, x\)"):
        cells.from_function(lambda p, c: (c, c), _lstm_init)
    with pytest.raises(TypeError, match=r"gates must take \(module, state, x\)"):
        cells.from_equinox(eqx.nn.GRUCell(D, H, key=jax.random.key(0)), gates=lambda m, h: {})
    with pytest.raises(TypeError, match=r"gates must be a function \(params, carry, x\)"):
        cells.from_linen(nn.GRUCell(features=H), gates="all")
    # a step whose carry comes back in another structure than it was given (state=None: one
    # array; the step returns a tuple of one): said at init, with both structures
    wrapped = cells.from_function(lambda p, h, x: ((x @ p["W"],), x @ p["W"]),
                                  lambda k, n, h, dtype: {"W": jnp.ones((n, h), dtype)})
    with pytest.raises(ValueError, match=r"returns a carry shaped \(\(1, 6\),\) but is given "
                                         r"one shaped \(1, 6\); .* state="):
        gradflow.Stack(wrapped, L, D, H).init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"returns a carry shaped \(\(3, 6\),\) but is given "
                                         r"one shaped \(3, 6\)"):  # the probe step says it too
        cells.from_function(lambda p, h, x: ((x @ p["W"],), x @ p["W"]),
                            lambda k, n, h, dtype: {"W": jnp.ones((n, h), dtype)},
                            hidden_size=H, gates=lambda p, h, x: {"g": h})
    # another family's module, a class, a function: each named, with what to use instead
    with pytest.raises(TypeError, match="from_linen: expected a flax.linen Module, got "
                                        "GRUCell, an equinox module: use gradflow.cells."
                                        "from_equinox"):
        cells.from_linen(eqx.nn.GRUCell(2, 2, key=jax.random.key(0)))
    with pytest.raises(TypeError, match="from_equinox: expected an equinox Module, got "
                                        "GRUCell, a flax.linen module: use gradflow.cells."
                                        "from_linen"):
        cells.from_equinox(nn.GRUCell(features=2))
    with pytest.raises(TypeError, match="from_linen: expected a flax.linen Module, got the "
                                        "class GRUCell, a flax.nnx module: use gradflow.cells."
                                        "from_nnx"):
        cells.from_linen(nnx.GRUCell)
    with pytest.raises(TypeError, match="from_linen: expected a flax.linen Module instance, "
                                        "got the class LSTMCell: build the cell first"):
        cells.from_linen(nn.LSTMCell)
    with pytest.raises(TypeError, match="from_equinox: expected an equinox Module, got "
                                        "function; a step function .* gradflow.cells."
                                        "from_function"):
        cells.from_equinox(_lstm_step)
    with pytest.raises(TypeError, match="from_nnx: expected a flax.nnx Module, got int$"):
        cells.from_nnx(3)
    with pytest.raises(TypeError, match="from_function: step is GRUCell, a flax.linen module: "
                                        "use gradflow.cells.from_linen"):
        cells.from_function(nn.GRUCell(features=2))
    user = eqx.nn.MLP(2, 2, 2, 1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="hidden_size="):
        cells.from_equinox(user)
    stack = gradflow.Stack(cells.from_equinox(eqx.nn.GRUCell(D, H, key=jax.random.key(0))),
                           L, D, H)
    with pytest.raises(ValueError, match="2 layer objects for a stack of 3"):
        cells.stack_params(stack, [eqx.nn.GRUCell(D, H, key=jax.random.key(0))] * 2)
    with pytest.raises(ValueError, match=r"\['layers'\]\[0\]\['weight_ih'\] has shape \(18, 6\)"):
        cells.stack_params(stack, [eqx.nn.GRUCell(H, H, key=jax.random.key(0))] * 3)
    with pytest.raises(TypeError, match="structure"):
        cells.stack_params(stack, [eqx.nn.LSTMCell(D, H, key=jax.random.key(0))] * 3)
    # a whole model's params given for each layer (a Flax model of three LSTMCells)
    lstm = cells.from_linen(nn.LSTMCell(features=H))
    model = {"params": {f"LSTMCell_{i}": nn.LSTMCell(features=H).init(
        jax.random.key(i), (jnp.zeros((1, H)),) * 2, jnp.zeros((1, D if i == 0 else H)))["params"]
        for i in range(L)}}
    with pytest.raises(ValueError, match=r"^params\['layers'\]\[0\]\[.*\] is "
                                         r"missing: .*; params\['layers'\]\[0\] holds "
                                         r"'LSTMCell_0', 'LSTMCell_1', 'LSTMCell_2'$"):
        cells.stack_params(gradflow.Stack(lstm, L, D, H), [model] * L)
    for whole in (model, model["params"]):  # the whole model where the list of layers goes
        with pytest.raises(TypeError, match=r"^layers is one trained object per layer, bottom "
                                            r"first, in a list .*; got a dict with keys "):
            cells.stack_params(gradflow.Stack(lstm, L, D, H), whole)
    ported = cells.stack_params(gradflow.Stack(lstm, L, D, H), [
        {"params": model["params"][f"LSTMCell_{i}"]} for i in range(L)])  # one cell's each
    np.testing.assert_array_equal(ported["layers"][2]["hf"]["kernel"],
                                  model["params"]["LSTMCell_2"]["hf"]["kernel"])
    with pytest.raises(ImportError, match=r'pip install "gradflow\[flax\]"'):
        adapters._require("gradflow_no_such_module", "flax", "from_linen")


def test_core_imports_neither_flax_nor_equinox():
    code = ("import sys, gradflow, gradflow.cells, gradflow.stack, gradflow.jacobian, "
            "gradflow.gates; gradflow.gradient_map; "
            "bad = [m for m in ('flax', 'equinox') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# Residual and normalised stacks against a Python loop


def _norm(y, pn, kind):
    if kind is None:
        return y
    if kind == "layer":
        y = (y - y.mean(-1, keepdims=True)) / jnp.sqrt(y.var(-1, keepdims=True) + 1e-6)
        return y * pn["scale"] + pn["bias"]
    return y / jnp.sqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6) * pn["scale"]


@pytest.mark.parametrize("residual,norm,d", [(True, None, H), (True, "rms", H),
                                             (True, "layer", D)])
def test_residual_and_norm_stacks_equal_a_python_loop(x64, residual, norm, d):
    stack = gradflow.Stack("lstm", L, d, H, residual=residual, norm=norm)
    params = jiggle(stack.init(jax.random.key(4), jnp.float64), jax.random.key(5))
    xs = inputs(jnp.float64, d=d)

    def forward(eps):
        x = xs
        for l, p in enumerate(params["layers"]):
            carry, ys = (jnp.zeros((B, H)),) * 2, []
            for t in range(T):
                (c, h), _ = _lstm_step(p, carry, x[:, t])
                h = h + eps[l, t]  # the cell state h where it leaves the cell, goes forward
                carry = (c, h)
                y = h + x[:, t] if residual and x.shape[-1] == H else h  # y^l_t goes up
                ys.append(_norm(y, params["norm"][l] if norm else None, norm))
            x = jnp.stack(ys, 1)
        return loss_fn(x)

    g = jax.jit(jax.grad(forward))(jnp.zeros((L, T, B, H)))
    want = np.asarray(jnp.mean(jnp.linalg.norm(g, axis=-1), axis=-1))
    assert_maps(hidden_map(stack, params, xs), want)
    if norm == "rms":  # both evaluation orders
        wave = stack.replace(order="wavefront")
        assert_maps(hidden_map(wave, params, xs), want)


def deep_lstm_ratios(layers=16, hidden=32, steps=8, batch=8, seed=0):
    """Bottom/top ratio of the hidden map at the last step under the final-output loss,
    ``G[0, T-1] / G[L-1, T-1]``, for a plain and a residual LSTM stack at orthogonal init with
    zero biases and N(0, 1) inputs (the README's "Your own model" numbers)."""
    out = {}
    for label, opts in (("plain", {}), ("residual", {"residual": True}),
                        ("residual+layernorm", {"residual": True, "norm": "layer"})):
        prob = gradflow.problem("lstm", layers=layers, steps=steps, hidden=hidden, batch=batch,
                                seed=seed, stack_options=opts)
        g = np.asarray(gradflow.gradient_map(prob.stack, prob.params, prob.xs, loss="last").values)
        out[label] = float(g[0, -1] / g[-1, -1])
    return out


def test_deep_lstm_attenuates_residual_lstm_does_not():
    r = deep_lstm_ratios()
    # each LSTM layer scales a gradient by about sigma(0)^2 = 0.25 at orthogonal init
    assert 0.25 ** 15 / 1.5 < r["plain"] < 0.25 ** 15 * 1.5, r  # measured 0.96 x 0.25^15
    assert 0.1 < r["residual"] < 10, r  # measured 1.24
    assert 0.1 < r["residual+layernorm"] < 10, r  # measured 0.87
    # figures/residual_lstm.png's committed maps are these (same configuration)
    saved = gradflow.load(Path(__file__).resolve().parents[1] / "figures" / "residual_lstm.npz")
    for label, key in (("plain", "plain"), ("residual", "residual"),
                       ("residual+layernorm", "residual + LayerNorm")):
        v = saved[f"values/{key}"]
        np.testing.assert_allclose(v[0, -1] / v[-1, -1], r[label], rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# The README's examples


def readme_blocks(section="Your own model"):
    text = README.read_text()
    m = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, f"README has no section {section!r}"
    return re.findall(r"```python\n(.*?)```", m.group(1), re.S)


def test_readme_your_own_model_examples_run():
    blocks = readme_blocks()
    assert len(blocks) >= 2 and any("flax" in b for b in blocks) and any("equinox" in b
                                                                         for b in blocks)
    for code in blocks:
        if "hidden_size=[64, 32, 32, 32]" in code or "def long_model" in code:
            continue  # run, and checked, by tests/test_widths.py and tests/test_model_map.py
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_a_module_given_as_a_cell_is_told_its_adapter():
    """gradflow.Stack(nn.LSTMCell(H), ...) named the module's whole repr as an 'unknown cell'
    and listed the built-in names; now it names the adapter that wraps it."""
    given = {"from_linen": nn.LSTMCell(H),
             "from_equinox": eqx.nn.LSTMCell(D, H, key=jax.random.key(0)),
             "from_nnx": nnx.GRUCell(D, H, rngs=nnx.Rngs(0))}
    for adapter, module in given.items():
        with pytest.raises(TypeError, match=rf"a cell is a name or a gradflow Cell, got "
                                            rf"{type(module).__name__}, .* module: use "
                                            rf"gradflow.cells.{adapter} to wrap it"):
            gradflow.Stack(module, L, D, H)
    with pytest.raises(ValueError, match=r"^unknown cell 3; a cell is a name or a gradflow "
                                         r"Cell; valid cells: g_lstm, "):
        gradflow.Stack(3, L, D, H)


def test_a_step_that_changes_the_carry_dtype_is_told_at_init(x64):
    """A NumPy float64 constant in a float32 step (x64 on) made a float64 carry: Stack.init
    passed and gradient_map failed inside lax.scan ('carry input and carry output must have
    equal types'); now Stack.init says which dtype the step turned the carry into."""
    def init(key, n_in, n_h, dtype):
        k1, k2 = jax.random.split(key)
        return {"W": jax.random.normal(k1, (n_in, n_h), dtype),
                "U": jax.random.normal(k2, (n_h, n_h), dtype) / n_h ** 0.5}

    def step(p, h, x):
        h = jnp.tanh(x @ p["W"] + h @ p["U"]) * np.float64(0.9)
        return h, h

    stack = gradflow.Stack(cells.from_function(step, init, hidden_size=H), L, D, H)
    with pytest.raises(ValueError, match=r"^from_function: the step turns a float32 carry into "
                                         r"float64 .*jnp.asarray\(c, h.dtype\)"):
        stack.init(jax.random.key(0), jnp.float32)
    params = stack.init(jax.random.key(0), jnp.float64)  # in float64 it keeps its dtype
    assert np.isfinite(hidden_map(stack, params, inputs(jnp.float64))).all()


class _LinenBN(nn.Module):
    """A user's linen cell with BatchNorm at inference: a batch_stats collection."""
    features: int

    @nn.compact
    def __call__(self, h, x):
        z = nn.Dense(self.features, param_dtype=jnp.float64)(x) + nn.Dense(
            self.features, use_bias=False, param_dtype=jnp.float64)(h)
        h = jnp.tanh(nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64)(z))
        return h, h

    def initialize_carry(self, rng, shape):
        return jnp.zeros(shape[:-1] + (self.features,))


def test_a_linen_cell_with_batch_stats_is_told_how_to_measure_it(x64):
    """from_linen passes module.apply its params alone: a cell with BatchNorm's batch_stats
    failed with 'do the parameters fit input_size=..?'. Now the message names the collection
    and the remedy, and the remedy (a step closing over the trained statistics) measures the
    module as it is (against brute force)."""
    module = _LinenBN(H)
    with pytest.raises(ValueError, match=r"from_linen: _LinenBN has variable collections "
                                         r"besides params \(batch_stats; .*'batch_stats': "
                                         r"yours}, carry, x\), init=\.\.\.\)"):
        cells.from_linen(module)
    x0 = jnp.zeros((1, H), jnp.float64)
    variables = module.init(jax.random.key(0), module.initialize_carry(None, (1, H)), x0)
    stats = jax.tree_util.tree_map(lambda a: a + 0.5, variables["batch_stats"])  # "trained"
    cell = cells.from_function(
        lambda p, carry, x: module.apply({"params": p, "batch_stats": stats}, carry, x),
        init=variables["params"], hidden_size=H)
    stack = gradflow.Stack(cell, 1, H, H)
    params = stack.init(jax.random.key(1), jnp.float64)
    xs = jax.random.normal(jax.random.key(2), (B, T, H), jnp.float64)
    step = [lambda h, x: module.apply({"params": variables["params"], "batch_stats": stats},
                                      h, x)[0]]
    want, _ = brute_maps(step, lambda dt: jnp.zeros((B, H), dt), lambda h: h,
                         lambda h, v: v, xs)
    assert_maps(hidden_map(stack, params, xs), want)


def _tanh_step(p, c, x):
    h = jnp.tanh(x @ p["W"] + c @ p["U"])
    return h, h


def test_params_given_as_jax_arrays_initialise():
    """``init`` = the params themselves, as JAX arrays: the probe step runs on them inside
    ``Stack.init``'s trace (it raised TracerArrayConversionError as an internal error)."""
    cell = gradflow.cells.from_function(_tanh_step, {"W": jnp.eye(4) * 0.5,
                                                    "U": jnp.eye(4) * 0.5})
    stack = gradflow.Stack(cell, layers=2, input_size=4, hidden_size=4)
    params = stack.init(jax.random.key(0))
    np.testing.assert_array_equal(params["layers"][1]["U"], np.eye(4) * 0.5)
    assert stack.cells[0].couples_batch is False


@pytest.mark.parametrize("gates", [lambda p, c, x: [c], lambda p, c, x: c])
def test_gates_must_be_a_dict(gates):
    """A gates function returning a list or a bare array: one TypeError saying what it must
    return (an AttributeError came from inside gradflow)."""
    init = lambda k, i, h, d: {"W": jnp.eye(i, h, dtype=d), "U": jnp.eye(h, dtype=d)}  # noqa
    with pytest.raises(TypeError, match=r"gates must return a dict \{name: \(batch, "
                                        r"hidden_size\) array\}, got (list|an array)"):
        gradflow.cells.from_function(_tanh_step, init, hidden_size=4, gates=gates)


@pytest.mark.parametrize("bad", ["4", -3, 0, 2.5, True])
def test_sizes_must_be_positive_integers(bad):
    init = lambda k, i, h, d: {"W": jnp.eye(i, h, dtype=d), "U": jnp.eye(h, dtype=d)}  # noqa
    with pytest.raises(ValueError, match=rf"from_function: hidden_size must be a positive "
                                         rf"integer or None, got {re.escape(repr(bad))}"):
        gradflow.cells.from_function(_tanh_step, init, hidden_size=bad)
    with pytest.raises(ValueError, match="input_size must be a positive integer"):
        gradflow.cells.from_function(_tanh_step, init, input_size=bad)
    with pytest.raises(TypeError, match="name must be a non-empty string, got 3"):
        gradflow.cells.from_function(_tanh_step, init, name=3)


def test_a_non_zero_initial_carry_is_refused():
    """``nn.LSTMCell(carry_init=ones)``: gradflow measured it from zero states, a map that was
    not the network's (0.048 against the module's own loop's 0.035 at the first step)."""
    nn = pytest.importorskip("flax.linen")
    with pytest.raises(ValueError, match=r"from_linen: LSTMCell.initialize_carry gives a "
                                         r"non-zero carry \(its carry_init\)"):
        gradflow.cells.from_linen(nn.LSTMCell(8, carry_init=nn.initializers.ones))
    assert gradflow.cells.from_linen(nn.LSTMCell(8)).name == "LSTMCell"


def test_user_gate_and_tap_mistakes_get_one_message():
    """A gate of another width (an internal error without hidden_size=), gate_kinds naming a
    gate the function does not return (KeyError 'q'), and a tap of the wrong shape in a model
    (JAX's custom_vjp type error)."""
    init = lambda k, i, h, d: {"W": jnp.eye(i, h, dtype=d), "U": jnp.eye(h, dtype=d)}  # noqa
    narrow = gradflow.cells.from_function(_tanh_step, init, gates=lambda p, c, x: {"g": c[:, :3]},
                                          gate_kinds={"g": "tanh"})
    stack = gradflow.Stack(narrow, layers=1, input_size=8, hidden_size=8)
    with pytest.raises(ValueError, match=r"gate 'g' has shape \(\d, 3\) where the carry's "
                                         r"arrays have \(\d, 8\)"):
        gates.saturation(stack, stack.init(jax.random.key(0)), jnp.ones((2, 3, 8)))
    absent = gradflow.cells.from_function(_tanh_step, init, gates=lambda p, c, x: {"g": c},
                                          gate_kinds={"q": "tanh"})
    stack = gradflow.Stack(absent, layers=1, input_size=8, hidden_size=8)
    with pytest.raises(ValueError, match="gate_kinds names 'q', which the gates do not report"):
        gates.saturation(stack, stack.init(jax.random.key(0)), jnp.ones((2, 3, 8)))

    def model(p, xs, taps):
        h = jnp.tanh(xs)
        return gradflow.tap(h, taps[0, 0, :1])  # one example's tap for a batch of 2
    with pytest.raises(ValueError, match=r"gradflow.tap\(h, s\): h has shape \(2, 3, 4\), so "
                                         r"s must be its examples' tap, shape \(2, 3\)"):
        gradflow.model_map(model, jnp.ones(()), jnp.ones((2, 3, 4)), layers=1)

    def carry_model(p, xs, taps):  # an LSTM's (c, h) carry tapped whole: a NumPy tracer error
        c = h = jnp.tanh(xs[:, 0])
        c, h = gradflow.tap((c, h), taps[0, 0])
        return h[:, None]
    with pytest.raises(ValueError, match=r"taps one array, the state h: \(batch, H\) that "
                                         r"leaves a layer, got a tuple of 2; .* tap its h"):
        gradflow.model_map(carry_model, jnp.ones(()), jnp.ones((2, 1, 4)), layers=1)


def test_an_rnn_wrapper_is_pointed_at_its_cell():
    """``from_linen(nn.RNN(cell))`` asked for hidden_size= (then failed on initialize_carry)."""
    nn = pytest.importorskip("flax.linen")
    with pytest.raises(TypeError, match=r"takes one step's cell, not the RNN that scans it "
                                        r"over time: from_linen\(rnn.cell\)"):
        gradflow.cells.from_linen(nn.RNN(nn.LSTMCell(4)))
    # NNX's too (they asked for hidden_size=, then state=, then named a private class)
    cell = nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
    for wrapper, name in ((nnx.RNN(cell), "RNN"),
                          (nnx.Bidirectional(nnx.RNN(cell), nnx.RNN(cell)), "Bidirectional")):
        with pytest.raises(TypeError, match=rf"not the {name} that scans it over time: "
                                            r"from_nnx\(rnn.cell\) \(a bidirectional"):
            gradflow.cells.from_nnx(wrapper)


def test_a_sown_gate_named_wrongly_lists_what_is_sown():
    """``gates="sown"`` with a typo in ``gate_kinds`` listed no gates at all ("()")."""
    nn = pytest.importorskip("flax.linen")

    class SowCell(nn.RNNCellBase):
        features: int

        @nn.compact
        def __call__(self, carry, x):
            f = jax.nn.sigmoid(nn.Dense(self.features)(x) + nn.Dense(self.features)(carry))
            self.sow("intermediates", "f", f)
            h = f * carry + (1 - f) * jnp.tanh(nn.Dense(self.features)(x))
            return h, h

        def initialize_carry(self, rng, input_shape):
            return jnp.zeros(input_shape[:-1] + (self.features,))

        @property
        def num_feature_axes(self):
            return 1
    with pytest.raises(ValueError, match="gate_kinds names 'forget', which the module does not "
                                         "sow; it sows 'f'"):
        gradflow.cells.from_linen(SowCell(8), gates="sown", gate_kinds={"forget": "sigmoid"})


def test_a_module_that_is_no_cell_is_told_how_cells_are_called():
    """An Equinox Linear as a cell: its call fails on the arguments, which was blamed on the
    parameters' sizes (with a hint to rebuild the module at another size)."""
    eqx = pytest.importorskip("equinox")
    lin = eqx.nn.Linear(8, 8, key=jax.random.key(0))
    stack = gradflow.Stack(gradflow.cells.from_equinox(lin, hidden_size=8), 2, 8, 8)
    with pytest.raises(ValueError, match=r"the cell is called as module\(x, state\): an RNN "
                                         r"cell, one step\)"):
        stack.init(jax.random.key(0))


def test_trained_layer_norms_as_flax_gives_them():
    """stack_params(norm=...) refused a LayerNorm(use_bias=False)'s params ("bias is missing",
    no fix said) and Flax's {"params": ...} dict of one; both are the norm they name."""
    stack = gradflow.Stack("lstm", 2, D, H, norm="layer")
    layers = stack.init(jax.random.key(0))["layers"]
    ln = nn.LayerNorm(use_bias=False, scale_init=nn.initializers.uniform(2.0))
    scales = [ln.init(jax.random.key(i), jnp.ones((1, H)))["params"] for i in (1, 2)]
    assert set(scales[0]) == {"scale"}
    params = cells.stack_params(stack, layers, norm=[scales[0], {"params": scales[1]}])
    for got, s in zip(params["norm"], scales):
        np.testing.assert_array_equal(got["scale"], s["scale"])
        np.testing.assert_array_equal(got["bias"], np.zeros(H))
    explicit = cells.stack_params(stack, layers, norm=[{**s, "bias": jnp.zeros(H)}
                                                       for s in scales])
    xs = inputs(jnp.float32)
    np.testing.assert_array_equal(gradflow.gradient_map(stack, params, xs).values,
                                  gradflow.gradient_map(stack, explicit, xs).values)
    # without a scale (use_scale=False; it was "scale is missing"), or neither: the identity's
    biased = nn.LayerNorm(use_scale=False, bias_init=nn.initializers.uniform(1.0))
    biases = [biased.init(jax.random.key(i), jnp.ones((1, H))) for i in (3, 4)]
    bare = nn.LayerNorm(use_scale=False, use_bias=False).init(jax.random.key(5),
                                                              jnp.ones((1, H)))
    params = cells.stack_params(stack, layers, norm=[biases[0], bare])
    np.testing.assert_array_equal(params["norm"][0]["scale"], np.ones(H))
    np.testing.assert_array_equal(params["norm"][0]["bias"], biases[0]["params"]["bias"])
    np.testing.assert_array_equal(params["norm"][1]["bias"], np.zeros(H))
    # one entry per layer, said as such (it was "params['norm'][1]['bias'] is missing")
    assert cells.stack_params(stack, layers, norm=(s for s in scales))["norm"][1]["scale"] \
        .shape == (H,)  # any iterable, as layers=
    for norm, got in (([scales[0]], "1 entries"), (scales[0], "a dict")):
        with pytest.raises(ValueError, match=f"norm= holds one layer's norm params per layer, "
                                             f"a list of 2; got {got}"):
            cells.stack_params(stack, layers, norm=norm)
