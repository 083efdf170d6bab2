"""The lean backward (``Cell.lean``, ``gradflow.stack.lean_layers``) equals autodiff.

The state maps (``Stack.apply(constant_params=True)``, set by :func:`gradflow.jacobian.map_arrays`)
run a cell's hand-written step backward over stored factors; everything here compares it with
autodiff of the same stack (``constant_params=False``, the default), which tests/test_stack.py
checks against Python loops and finite differences. Every cell is found by its own attribute
(``cell.lean``), and ``jax.test_util.check_grads`` checks lean layers (one, and a run of three
with residual and norm) against finite differences.
"""
import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import gradflow
from gradflow import cells, jacobian
from gradflow import stack as stack_module
from gradflow.cells import base
from gradflow.stack import autodiff_step, lean_layers

pytestmark = pytest.mark.child  # in-process work: the child lane runs it (tests/conftest.py)

# Every registered cell whose default form has a lean backward, plus the variants with their
# own equations (GRU's reset before the recurrent matrix, STAR's official update, a forget
# bias inside the LSTM's forget sigmoid).
LEAN = ([n for n in cells.names() if cells.get(n).lean is not None]
        + [("gru", {"reset": "before"}), ("rnn", {"nonlinearity": "relu"}),
           ("star", {"variant": "official"}),
           ("lstm", {"forget_bias": 1.0, "init": "chrono"})])


def _cell(spec):
    return cells.get(spec) if isinstance(spec, str) else cells.get(spec[0], **spec[1])


def _id(spec):
    return spec if isinstance(spec, str) else spec[0] + "-" + "-".join(map(str, spec[1].values()))


@functools.partial(jax.jit, static_argnames=("stack", "loss", "constant"))
def _maps(stack, params, xs, loss, constant):
    """The loss value and its gradients w.r.t. zero perturbations and zero norm taps of every
    state, ``{name: (L, B, T, H)}`` and ``{name: (L, B, T)}`` (the hidden and cell maps)."""
    B, T, _ = xs.shape
    L, H = stack.layers, stack.max_width
    zp = {k: jnp.zeros((L, B, T, H), xs.dtype) for k in stack.state_names}
    zt = {k: jnp.zeros((L, B, T), xs.dtype) for k in stack.state_names}
    fn = jacobian.readout_loss(loss, stack.widths[-1], T, B, 0, xs.dtype)
    return jax.value_and_grad(lambda e, t: fn(stack.apply(
        params, xs, perturb=e, taps=t, constant_params=constant).top), argnums=(0, 1))(zp, zt)


def _compare(stack, params, xs, rtol, loss):
    lean, auto = _maps(stack, params, xs, loss, True), _maps(stack, params, xs, loss, False)
    worst = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(lean), jax.tree_util.tree_leaves(auto)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.all(np.isfinite(a))
        scale = np.max(np.abs(b))
        assert scale > 0
        worst = max(worst, float(np.max(np.abs(a - b)) / scale))
    assert worst <= rtol, worst
    return worst


def _data(stack, dtype, B=3, T=5, seed=1):
    params = stack.init(jax.random.key(seed), dtype)
    xs = jax.random.normal(jax.random.key(seed + 1), (B, T, stack.input_size), dtype)
    return params, xs


def _layer_case(cell, T=4, B=2, H=3, dtype=jnp.float64):
    """One layer's inputs: parameters, inputs ``(T, B, H)``, initial state, perturbations,
    taps, and cotangents for its outputs (every state at every step, the final state)."""
    p = cell.init(jax.random.key(0), H, H, dtype)
    k = iter(jax.random.split(jax.random.key(1), 16))
    rnd = lambda *shape: jax.random.normal(next(k), shape, dtype)  # noqa: E731
    x = rnd(T, B, H)
    s0 = {n: 0.5 * rnd(B, H) for n in cell.state_names}
    e = {n: 0.1 * rnd(T, B, H) for n in cell.state_names}
    taps = {n: jnp.zeros((T, B), dtype) for n in cell.state_names}
    cts = ({n: rnd(T, B, H) for n in cell.state_names}, {n: rnd(B, H) for n in cell.state_names})
    return p, x, s0, e, taps, cts


@functools.partial(jax.jit, static_argnames=("cell",))
def _layer_vjps(cell, p, x, s0, e, taps, cts):
    """The VJPs of one layer w.r.t. (inputs, initial state, perturbations, taps): the lean
    scan's (from its own projection, ``lean_inputs``) and autodiff's (the stack's scan of
    ``recur`` from ``cell.project``, with norm taps)."""
    def auto(x, s0, e, taps):
        T = x.shape[0]
        xin = cell.project(p, x)

        def body(state, inp):
            xp_t, e_t, tap_t, t = inp
            new, _, _ = cell.recur(p, state, xp_t, t)
            new = stack_module._leave(new, e_t, tap_t)
            return new, new

        final, states = jax.lax.scan(body, s0, (xin, e, taps, jnp.arange(T)))
        return states, final

    def lean(x, s0, e, taps):  # a run of one layer; the emission is h itself here
        one = lambda tree: jax.tree_util.tree_map(lambda a: a[None], tree)  # noqa: E731
        states, _, final = lean_layers(cell, False, None, "highest", one(p), None, x, one(s0),
                                       one(e), one(taps))
        return jax.tree_util.tree_map(lambda a: a[0], (states, final))

    return [jax.vjp(f, x, s0, e, taps)[1](cts) for f in (lean, auto)]


@pytest.mark.parametrize("spec", LEAN, ids=_id)
def test_lean_layer_equals_autodiff_every_cell(spec, x64):
    """One layer, random output cotangents: the lean VJP equals autodiff's (inputs, initial
    state, perturbations, norm taps) to 1e-10 relative."""
    cell = _cell(spec)
    assert cell.lean is not None
    lean, auto = _layer_vjps(cell, *_layer_case(cell))
    for a, b in zip(jax.tree_util.tree_leaves(lean), jax.tree_util.tree_leaves(auto)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("spec", LEAN, ids=_id)
def test_lean_layer_equals_autodiff_every_cell_float32(spec):
    """The same in float32 with x64 off (what users have; tests/test_default_opt.py runs it
    again as users compile): equal to float32 rounding, 2e-5 of the largest entry."""
    assert not jax.config.jax_enable_x64
    cell = _cell(spec)
    lean, auto = _layer_vjps(cell, *_layer_case(cell, dtype=jnp.float32))
    for a, b in zip(jax.tree_util.tree_leaves(lean), jax.tree_util.tree_leaves(auto)):
        assert a.dtype == jnp.float32 and np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(b))))


def test_lean_equals_autodiff_stack(x64):
    """Whole stacks, hidden and cell maps (norm taps and perturbations of both states): a list
    of different cells (UR-LSTM in the middle has no lean backward: autodiff there), of
    different widths, residual where widths match, LayerNorm; loss "all" (the map_arrays
    and float32 tests use "last"; the per-layer tests take random output cotangents)."""
    stack = gradflow.Stack([cells.get("lstm", forget_bias=1.0), "ur_lstm", "lstm"], 3, 4,
                           [6, 4, 4], residual=True, norm="layer")
    assert [c.lean is not None for c in stack.cells] == [True, False, True]
    _compare(stack, *_data(stack, jnp.float64), 1e-10, "all")


@pytest.mark.parametrize("cell,layers,inputs,norm", [("gru", 4, 2, None), ("lstm", 3, 4, "rms"),
                                                     ("star", 4, 3, "layer")])
def test_lean_runs_of_layers_equal_autodiff(cell, layers, inputs, norm, x64):
    """Runs of several lean layers (one custom VJP per run, its factors in one buffer), with a
    residual between layers and each norm: where the input size differs from the width (5) the
    first layer is a run of its own and the rest one run; where it equals it, one run with a
    residual everywhere. Hidden and cell maps, loss "all"."""
    stack = gradflow.Stack(cell, layers, inputs, 5 if inputs != 4 else 4, residual=True,
                           norm=norm)
    assert [b - a for a, b in stack.segments()] == ([1, layers - 1] if inputs != 4 else [layers])
    _compare(stack, *_data(stack, jnp.float64), 1e-10, "all")


def _user_cell():
    """A user's tanh RNN through ``from_function`` (a cell gradflow knows nothing about)."""
    def init(key, n_in, H, dtype):
        k1, k2 = jax.random.split(key)
        return {"W": jax.random.normal(k1, (n_in, H), dtype) / np.sqrt(n_in),
                "U": jax.random.normal(k2, (H, H), dtype) / np.sqrt(H)}

    def step(p, h, x):
        h = jnp.tanh(x @ p["W"] + h @ p["U"] + jnp.roll(h, 1, axis=-1) ** 2)
        return h, h
    return cells.from_function(step, init)


def _dots(fn, *args) -> list:
    """The primitive names of ``fn``'s jaxpr that are matmuls or ``tanh``."""
    return [e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns
            if e.primitive.name in ("dot_general", "tanh")]


def test_hoist_inputs_moves_the_input_matmul_out_of_the_step(x64):
    """A user cell computes ``x W`` in its step; ``hoist_inputs`` moves that linear input-only
    work into the projection (one matmul for the whole sequence) and leaves the step one
    matmul (``h U``); a nonlinearity of the input stays in the step, and so do the bias added
    after the matmul and the split into gates (fused there; in the projection each would be a
    pass over the sequence), while a scaling before the matmul moves with it. Projection +
    step equal the cell's step at every t (float64), and the state map through them equals
    autodiff's."""
    def init(key, n_in, H, dtype):
        k1, k2 = jax.random.split(key)
        return {"W": jax.random.normal(k1, (n_in, 2 * H), dtype) / np.sqrt(n_in),
                "U": jax.random.normal(k2, (H, H), dtype) / np.sqrt(H), "b": jnp.ones(H, dtype),
                "c": jnp.linspace(-1, 1, 2 * H, dtype=dtype)}

    def step(p, h, x):
        a, z = jnp.split((0.5 * x) @ p["W"] + p["c"], 2, axis=-1)  # (0.5 x) W hoisted
        h = jnp.tanh(a + h @ p["U"] + p["b"]) * jnp.tanh(z) + 0.5 * h  # tanh(z) stays
        return h, h
    cell = cells.from_function(step, init)
    T, B, D, H = 5, 3, 4, 6
    p = cell.init(jax.random.key(0), D, H, jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (T, B, D), jnp.float64)
    s = {"h": jax.random.normal(jax.random.key(2), (B, H), jnp.float64)}
    hc = stack_module.hoist_inputs(cell, p, s, xs[0])
    assert hc is not cell and hc.init_fn is cell.init_fn
    bnd = hc.project(p, xs)
    assert [b.shape for b in bnd] == [(T, B, 2 * H)]  # (0.5 x) W; + c and the split: the step's
    prims = {e.primitive.name for e in jax.make_jaxpr(hc.project)(p, xs).jaxpr.eqns}
    assert "dot_general" in prims and not prims & {"add", "split", "slice"}, prims
    assert _dots(cell.recur, p, s, xs[0], 0) == ["dot_general", "dot_general", "tanh", "tanh"]
    assert _dots(hc.recur, p, s, tuple(b[0] for b in bnd), 0) == ["dot_general", "tanh", "tanh"]
    for t in range(T):
        want = cell.recur(p, s, cell.project(p, xs[t]), t)
        got = hc.recur(p, s, tuple(b[t] for b in bnd), t)
        np.testing.assert_allclose(got[0]["h"], want[0]["h"], rtol=1e-13)
    # a built-in cell (its projection already holds its input matmuls) is left as it is
    rnn = cells.get("rnn")
    pr = rnn.init(jax.random.key(0), D, H, jnp.float64)
    assert stack_module.hoist_inputs(rnn, pr, s, rnn.project(pr, xs[0])) is rnn
    stack = gradflow.Stack(cell, 2, D, H)
    params, xs = _data(stack, jnp.float64)
    _compare(stack, params, xs, 1e-10, "all")


def test_autodiff_step_every_cell(x64, monkeypatch):
    """Every registered cell without its own lean step, and a user cell, runs the state maps
    through ``lean_layers`` with a step made by autodiff (``autodiff_step``); the maps equal
    plain autodiff's to 1e-10 relative (hidden and cell maps, loss "all"). One stack per set of
    states, a layer per cell; the stored factors are the step's own residuals (shaped by the
    batch, 3, or per-unit vectors): no parameter-sized matrix (the transposed ``U``) per step."""
    plain = [cells.get(n) for n in cells.names() if cells.get(n).lean is None] + [_user_cell()]
    groups = {}
    for cell in plain:
        groups.setdefault(cell.state_names, []).append(cell)
    for group in groups.values():
        stack = gradflow.Stack(group, len(group), 4, 4)
        params, xs = _data(stack, jnp.float64)
        _compare(stack, params, xs, 1e-10, "all")
        for cell, p in zip(stack.cells, params["layers"]):
            state = cell.initial_state((3,), 4, jnp.float64)
            xp = cell.project(p, jnp.zeros((3, 4), jnp.float64))
            rule = stack_module.step_rule(cell, p, state, xp)
            factors = jax.eval_shape(lambda xp: rule.forward(p, state, xp, jnp.int32(0))[2], xp)
            shapes = [f.shape for f in jax.tree_util.tree_leaves(factors)]
            assert shapes and all(s[:1] == (3,) or len(s) <= 1 for s in shapes), (cell.name, shapes)
    # the state map's program makes its steps by autodiff_step (once per run, forward and
    # backward), the plain autodiff program does not
    made = []
    monkeypatch.setattr(stack_module, "autodiff_step", lambda cell, *a: made.append(cell)
                        or autodiff_step(cell, *a))
    zeros = {"h": jnp.zeros((len(group), 3, 5), jnp.float64)}
    fn = jacobian.readout_loss("last", 4, 5, 3, 0, jnp.float64)
    for constant in (False, True):
        jax.make_jaxpr(jax.grad(lambda t: fn(stack.apply(
            params, xs, taps=t, constant_params=constant).top)))(zeros)
    # (a cell without a projection of its own runs with its input-only work hoisted out of
    # the time loop: the same cell, other functions)
    origin = {c: next(s for s in stack.cells if s.init_fn is c.init_fn and s.name == c.name)
              for c in made}
    assert len(made) == 2 * len(stack.cells) and set(origin.values()) == set(stack.cells)


def test_autodiff_step_stores_costly_outputs_only(x64):
    """An autodiff-made step stores the outputs of costly primitives (its ``tanh``s,
    sigmoids, matmuls) and the state it reads, not the element-wise arithmetic made from
    them: GRU (reset after, as PyTorch) stores h, r, z, n and the recurrent matmul, 5 arrays
    per step, where plain autodiff's residuals are 9; its map equals autodiff's."""
    cell = cells.get("gru")
    p = cell.init(jax.random.key(0), 4, 4, jnp.float64)
    state = cell.initial_state((3,), 4, jnp.float64)
    xp = cell.project(p, jnp.zeros((3, 4), jnp.float64))
    rule = stack_module.autodiff_step(cell, p, state, xp)
    factors = jax.eval_shape(lambda xp: rule.forward(p, state, xp, jnp.int32(0))[2], xp)
    assert sorted(f.shape for f in factors) == [(3, 4)] * 4 + [(3, 12)]

    def f(s, x):
        new, h, _ = cell.recur(p, s, x, 0)
        return new, h
    plain = jax.tree_util.tree_leaves(jax.vjp(f, state, xp, has_aux=True)[1])
    assert len([a for a in plain if a.shape[:1] == (3,)]) == 9
    # the step's backward is autodiff's
    x = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.key(1), a.shape,
                                                            jnp.float64), xp)
    s = {"h": jax.random.normal(jax.random.key(2), (3, 4), jnp.float64)}
    d = {"h": jax.random.normal(jax.random.key(3), (3, 4), jnp.float64)}
    new, _, fac = rule.forward(p, s, x, jnp.int32(0))
    got = rule.backward(p, fac, d)
    want = jax.vjp(lambda s, x: cell.recur(p, s, x, 0)[0], s, x)[1](d)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(new["h"], cell.recur(p, s, x, 0)[0]["h"], rtol=1e-14)


def test_lean_float32():
    """float32 with x64 off: the lean map equals autodiff to 1e-5 relative."""
    assert not jax.config.jax_enable_x64
    stack = gradflow.Stack("lstm", 1, 8, 8)
    params, xs = _data(stack, jnp.float32, B=4, T=6)
    _compare(stack, params, xs, 1e-5, "last")


def test_map_arrays_runs_the_lean_path(x64):
    """The hidden map of map_arrays is the lean map (the cell map: the stack tests above), and
    equals autodiff's."""
    pr = gradflow.problem("lstm", layers=2, steps=5, hidden=4, batch=3, input_size=2,
                          dtype="float64")
    stack, params, xs = pr[:3]
    fn = jacobian.readout_loss("last", 4, 5, 3, 0, xs.dtype)
    value, m = jacobian.map_arrays(stack, params, xs, fn, "hidden")
    v0, (_, n0) = _maps(stack, params, xs, "last", False)
    np.testing.assert_allclose(m, jnp.mean(n0["h"], axis=1), rtol=1e-10)
    np.testing.assert_allclose(value, v0, rtol=1e-12)
    zeros = {"h": jnp.zeros((2, 3, 5), xs.dtype)}
    # the map's program runs the lean step (its sigmoids from tanh), not autodiff of recur
    # (jax.nn.sigmoid: the logistic primitive)
    def program(constant):
        return str(jax.make_jaxpr(jax.grad(lambda t: fn(stack.apply(
            params, xs, taps=t, constant_params=constant).top)))(zeros))
    assert "logistic" not in program(True) and "logistic" in program(False)


def test_param_grads_use_autodiff(x64):
    """jax.grad w.r.t. the parameters through Stack.apply (the flag off, as in training)
    equals the gradient of a Python loop over cell.step; with the flag on the parameters
    are constants (zero cotangent), not silently wrong."""
    stack = gradflow.Stack("lstm", 2, 2, 4)
    params, xs = _data(stack, jnp.float64, B=2, T=3)

    def loop(params):
        x = jnp.swapaxes(xs, 0, 1)
        for l, cell in enumerate(stack.cells):
            s = cell.initial_state((xs.shape[0],), 4, xs.dtype)
            hs = []
            for t in range(x.shape[0]):
                s, h, _ = cell.step(params["layers"][l], s, x[t], t)
                hs.append(h)
            x = jnp.stack(hs)
        return jnp.sum(jnp.sin(x))

    loss = lambda params, **kw: jnp.sum(jnp.sin(stack.apply(params, xs, **kw).top))  # noqa: E731
    g = jax.jit(jax.grad(loss))(params)
    ref = jax.jit(jax.grad(loop))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    frozen = jax.jit(jax.grad(functools.partial(loss, constant_params=True)))(params)
    assert all(float(jnp.max(jnp.abs(a))) == 0.0 for a in jax.tree_util.tree_leaves(frozen))


@pytest.mark.parametrize("spec", LEAN, ids=_id)
def test_check_grads_lean_layers(spec, x64):
    """A run of three lean layers (residual, RMS norm between them) against finite
    differences (order 1, reverse mode), w.r.t. the first layer's input, the initial states,
    the perturbations and the norm parameters (cell parameters held constant; norm taps are
    not derivatives, so none here)."""
    cell = _cell(spec)
    n, T, B, H = 3, 3, 2, 3
    ks = iter(jax.random.split(jax.random.key(1), 16))
    P = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[
        cell.init(jax.random.fold_in(next(ks), l), H, H, jnp.float64) for l in range(n)])
    def rnd(scale, *shape):
        return scale * jax.random.normal(next(ks), shape, jnp.float64)
    pn = {"scale": 1.0 + rnd(0.1, n, H)}
    x = rnd(1.0, T, B, H)
    s0 = {k: rnd(0.5, n, B, H) for k in cell.state_names}
    e = {k: rnd(0.1, n, T, B, H) for k in cell.state_names}

    def f(x, s0, e, pn):
        states, up, final = lean_layers(cell, True, "rms", None, P, pn, x, s0, e, {})
        return states, jnp.sin(up), final

    check_grads(f, (x, s0, e, pn), order=1, modes=("rev",))


def test_matmul_derivatives(x64):
    """``cells.base.matmul`` (its backward multiplies by a materialised transpose) is ``v @ m``
    in value, and its derivatives agree with finite differences in forward and reverse mode,
    to second order; ``fused_transpose`` is ``dy @ concat(U).T``."""
    ks = jax.random.split(jax.random.key(3), 3)
    v = jax.random.normal(ks[0], (2, 3, 4), jnp.float64)
    m = jax.random.normal(ks[1], (4, 5), jnp.float64)
    np.testing.assert_allclose(base.matmul(v, m), np.asarray(v) @ np.asarray(m), rtol=1e-14)
    check_grads(base.matmul, (v, m), order=2, modes=("fwd", "rev"))
    # inside a scan, as the cells use it (a loop-invariant matrix)
    def scanned(v, m):
        return jax.lax.scan(lambda c, x: (jnp.tanh(base.matmul(c, m[:, :4]) + x), c),
                            v[0], v)[1]
    check_grads(scanned, (v, m), order=1, modes=("fwd", "rev"))
    p = {g: {"U": jax.random.normal(jax.random.fold_in(ks[2], i), (4, 3), jnp.float64)}
         for i, g in enumerate("ab")}
    dy = jax.random.normal(ks[2], (2, 6), jnp.float64)
    ref = np.asarray(dy) @ np.concatenate([np.asarray(p["a"]["U"]), np.asarray(p["b"]["U"])], 1).T
    np.testing.assert_allclose(base.fused_transpose(dy, p, ("a", "b")), ref, rtol=1e-13)


@pytest.mark.parametrize("spec", LEAN, ids=_id)
def test_lean_inputs_hold_cell_project(spec, x64):
    """A lean step's own input layout (``Lean.project``, where given) carries the same numbers
    as ``cell.project``, with or without the biases (LSTM, GRU, RNN leave them to the step,
    where they fuse; STAR keeps them: it slices its projection in two anyway): every gate's
    block of the packed array is that gate's ``x W`` (+ ``b``)."""
    cell = _cell(spec)
    p = cell.init(jax.random.key(0), 3, 4, jnp.float64)
    p = jax.tree_util.tree_map_with_path(  # biases that tell (some initialise to zero)
        lambda k, a: a + 1.0 + jnp.arange(a.size).reshape(a.shape) / 7.0
        if str(k[-1].key).startswith("b") else a, p)
    x = jax.random.normal(jax.random.key(1), (5, 2, 3), jnp.float64)
    mine, ref = stack_module.lean_inputs(cell, p, x), cell.project(p, x)
    if cell.lean.project is None:
        assert jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(ref)
        return
    if isinstance(mine, tuple):  # one array per gate, in the order of cell.project's
        mine = jnp.concatenate(mine, axis=-1)
    # cell.project is affine in x: its value at x = 0 is the biases
    zero = cell.project(p, jnp.zeros_like(x))
    biased = cell.name == "star"
    blocks = [np.asarray(a if biased else a - b) for a, b in zip(
        jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(zero))]
    blocks = [c for b in blocks for c in np.split(b, b.shape[-1] // 4, axis=-1)]  # per gate
    assert mine.shape == (5, 2, 4 * len(blocks))
    # the gates' order is the lean step's own (checked by the tests above, from raw inputs)
    mine = np.split(np.asarray(mine), len(blocks), axis=-1)
    match = [[j for j, b in enumerate(blocks) if np.allclose(a, b, rtol=1e-12, atol=1e-13)]
             for a in mine]  # (x W + b) - b: rounding of b's size
    assert sorted(j for m in match for j in m) == list(range(len(blocks))), match


def _count(jaxpr, name) -> int:
    """How many ``name`` equations ``jaxpr`` holds, inside scans, conds and custom rules."""
    n = 0
    for e in jaxpr.eqns:
        n += e.primitive.name == name
        for v in e.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax.extend.core.Jaxpr):
                    n += _count(sub, name)
    return n


def test_lean_layers_skip_the_input_cotangent_nobody_reads(x64):
    """A map differentiates the perturbations, not the stack's inputs: the backward of a run
    of lean layers then forms no cotangent for the run's input ``x`` (one ``(T, B, 4H) x
    (4H, H)`` matmul fewer): at trace time for a run of one layer, by a ``cond`` in the layer
    scan (first layer only) for longer runs; differentiated, it is formed (and equals finite
    differences, ``test_check_grads_lean_layers``)."""
    cell = cells.get("lstm")
    T, B, H = 4, 2, 5
    x = jax.random.normal(jax.random.key(1), (T, B, H), jnp.float64)
    for n in (1, 2):
        P = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[
            cell.init(jax.random.key(l), H, H, jnp.float64) for l in range(n)])
        s0 = {k: jnp.zeros((n, B, H), jnp.float64) for k in cell.state_names}
        e = {k: jnp.zeros((n, T, B, H), jnp.float64) for k in cell.state_names}

        def f(x, e):
            states, up, _ = lean_layers(cell, False, None, None, P, None, x, s0, e, {})
            return jnp.sum(jnp.sin(up)) + sum(jnp.sum(v ** 2) for v in states.values())

        with_x = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, e).jaxpr
        without = jax.make_jaxpr(jax.grad(f, argnums=1))(x, e).jaxpr
        if n == 1:  # undifferentiated x: x W (projection), h U (forward step), dz U^T (backward)
            assert _count(without, "dot_general") == 3
            assert _count(with_x, "dot_general") > 3  # + dz W^T (its VJP also traces a dead x W)
        assert _count(without, "cond") == n - 1
        assert _count(with_x, "cond") == 0
        np.testing.assert_array_equal(jax.grad(f, argnums=1)(x, e)["h"],
                                      jax.grad(f, argnums=(0, 1))(x, e)[1]["h"])
