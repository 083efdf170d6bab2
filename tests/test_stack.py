"""Stack against a brute-force Python loop over layers and steps calling ``cell.step``.

Every cell, both orders, every checkpoint form, with and without the input projection, with a
non-zero initial state and a perturbation added where each state leaves its cell; the reported
gates and final states too. Gradients against finite differences (``check_grads``, float64) and
against autodiff through the loop; ``jit``, ``grad``, ``vmap``; float32 and float64; a
Hypothesis property (layer order == wavefront order == loop for random sizes); bad input.
"""
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import gradflow
from gradflow import Stack, cells
from test_cells import random_params as random_cell_params

F64, F32 = jnp.float64, jnp.float32
L, T, B, H, D = 3, 5, 2, 4, 3


def random_params(stack, seed, dtype=F64, scale=0.5):
    """Params in ``stack.init``'s layout: each layer's from :func:`test_cells.random_params`
    (every entry ``N(0.1, scale^2)``, so no bias is zero; time gates that open and close within
    a few steps), the input projection likewise."""
    H = stack.hidden_size
    first = H if stack.input_projection else stack.input_size
    p = {"layers": [random_cell_params(stack.cell, seed * 1000 + l, first if l == 0 else H, H,
                                       dtype, scale) for l in range(stack.layers)]}
    if stack.input_projection:
        rng = np.random.default_rng(seed + 10 ** 6)
        p["input"] = {"W": jnp.asarray(scale * rng.standard_normal((stack.input_size, H)) + 0.1,
                                       dtype),
                      "b": jnp.asarray(scale * rng.standard_normal(H) + 0.1, dtype)}
    return p


def random_like(shapes, seed, dtype=F64, scale=0.5):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(scale * rng.standard_normal(s), dtype) for k, s in shapes.items()}


def brute_force(stack, params, xs, state0=None, perturb=None):
    """The stack as a plain loop: ``for l: for t: state = cell.step(...) + perturb[l, :, t]``.

    Returns ``(states {k: (L, B, T, H)}, gates {g: (L, B, T, H)}, final {k: (L, B, H)})``.
    """
    cell = stack.cell
    perturb = perturb or {}
    x = xs
    if stack.input_projection:
        x = xs @ params["input"]["W"] + params["input"]["b"]
    inputs = [x[:, t] for t in range(xs.shape[1])]
    states, gates, final = {}, {}, {}
    for l in range(stack.layers):
        s = ({k: v[l] for k, v in state0.items()} if state0 is not None else
             cell.initial_state((xs.shape[0],), stack.hidden_size, xs.dtype))
        outs = []
        for t, x_t in enumerate(inputs):
            s, _, g = cell.step(params["layers"][l], s, x_t, t)
            s = {k: v + perturb[k][l, :, t] if k in perturb else v for k, v in s.items()}
            for k, v in s.items():
                states.setdefault(k, {})[l, t] = v
            for k, v in g.items():
                gates.setdefault(k, {})[l, t] = v
            outs.append(s["h"])
        inputs = outs
        for k, v in s.items():
            final.setdefault(k, []).append(v)
    grid = lambda d: jnp.stack([jnp.stack([d[l, t] for t in range(xs.shape[1])], axis=1)  # noqa
                                for l in range(stack.layers)])
    return ({k: grid(v) for k, v in states.items()}, {k: grid(v) for k, v in gates.items()},
            {k: jnp.stack(v) for k, v in final.items()})


def assert_matches(out, ref, atol=1e-6):
    states, gates, final = ref
    assert set(out.states) == set(states) and set(out.gates) == set(gates)
    assert set(out.final) == set(final)
    for k in states:
        np.testing.assert_allclose(out.states[k], states[k], atol=atol, rtol=0)
        np.testing.assert_allclose(out.final[k], final[k], atol=atol, rtol=0)
    for k in gates:
        np.testing.assert_allclose(out.gates[k], gates[k], atol=atol, rtol=0)


def make_case(cell, *, order="layer", checkpoint=None, input_projection=False, input_size=D,
              layers=L, steps=T, seed=0, gates=True, **options):
    """A stack with random params, inputs, a non-zero state0 and a perturb on every state."""
    stack = Stack(cell, layers, input_size, H, input_projection=input_projection, order=order,
                  checkpoint=checkpoint, **options)
    rng = np.random.default_rng(seed + 1)
    xs = jnp.asarray(rng.standard_normal((B, steps, input_size)), F64)
    names = stack.cell.state_names
    state0 = random_like({k: (layers, B, H) for k in names}, seed + 2)
    perturb = random_like({k: (layers, B, steps, H) for k in names}, seed + 3, scale=0.1)
    return stack, gates, (random_params(stack, seed), xs, state0, perturb)


def check_cases(cases, atol=1e-6):
    """Run every case's stack inside one ``jax.jit`` (one compilation for all of them, which is
    much cheaper than one each) and compare each with the brute-force loop."""
    stacks = [(s, g) for s, g, _ in cases]
    args = [a for _, _, a in cases]

    @jax.jit
    def run(args):
        return [s.apply(p, x, state0=s0, perturb=e, gates=g)
                for (s, g), (p, x, s0, e) in zip(stacks, args)]

    for (stack, gates, (p, x, s0, e)), out in zip(cases, run(args)):
        ref = brute_force(stack, p, x, s0, e)
        if not gates:
            ref = (ref[0], {}, ref[2])
        assert_matches(out, ref, atol)
        layers, steps = stack.layers, x.shape[1]
        assert out.h.shape == (layers, B, steps, H) and out.top.shape == (B, steps, H)
        assert set(out.gates) == (set(stack.cell.gate_names) if gates else set())


# ---------------------------------------------------------------------------------------------
# Brute force, every cell


CELLS = cells.names()
CKPTS = (None, 2, "auto")


@pytest.mark.parametrize("i,name", list(enumerate(CELLS)), ids=CELLS)
def test_stack_equals_loop_every_cell(i, name, x64):
    """Both orders per cell; the checkpoint forms and the input projection rotate over the
    cells (the full grid is run for lstm below)."""
    square = cells.get(name).square
    proj = bool(i % 2)
    check_cases([
        # layer order: layer 0 reads D != H features (its own shape) or their projection
        make_case(name, order="layer", checkpoint=CKPTS[i % 3], input_projection=proj or square),
        # wavefront: every layer of one shape, by projection or because D == H
        make_case(name, order="wavefront", checkpoint=CKPTS[(i + 1) % 3],
                  input_projection=not proj, input_size=H if proj else D, seed=1),
    ])


def test_rotation_covers_the_whole_grid():
    """The configurations of test_stack_equals_loop_every_cell, over the cells, include every
    (order, checkpoint, input_projection) combination."""
    seen = set()
    for i, name in enumerate(CELLS):
        proj = bool(i % 2)
        seen.add(("layer", CKPTS[i % 3], proj or cells.get(name).square))
        seen.add(("wavefront", CKPTS[(i + 1) % 3], not proj))
    assert seen == set(itertools.product(("layer", "wavefront"), CKPTS, (False, True)))


def test_checkpoint_edges_single_layer_gates_off(x64):
    """Chunks dividing T, longer than T, a single step; one layer; gates not requested."""
    check_cases([
        make_case("gru", checkpoint=2, steps=4, input_size=H, order="wavefront"),
        make_case("gru", checkpoint=7, steps=5, input_size=H),
        make_case("gru", checkpoint=1, steps=1, input_size=H, order="wavefront"),
        make_case("lstm", layers=1, checkpoint=2, gates=False),
    ])


def test_zero_state_default_and_no_perturb(x64):
    stack = Stack("lstm", L, D, H)
    params = random_params(stack, 4)
    xs = jnp.asarray(np.random.default_rng(5).standard_normal((B, T, D)), F64)
    assert_matches(stack.apply(params, xs, gates=True), brute_force(stack, params, xs))


# ---------------------------------------------------------------------------------------------
# Gradients


# checkpointed gradients are slow to compile: one cell here, and test_grad_equals_grad_of_loop
GRAD_CFGS = {"gru": ("layer", 2)}
# cells grouped so that one check_grads (one compilation) covers a family
GRAD_GROUPS = [("rnn", "indrnn", "star"), ("lstm", "g_lstm", "phased_lstm"),
               ("gru", "mgu", "ur_gru"), ("ur_lstm", "on_lstm"),
               ("refined_lstm", "refined_gru", "refined_mgu")]


def test_grad_groups_cover_every_cell():
    assert sorted(sum(GRAD_GROUPS, ())) == sorted(CELLS)


@pytest.mark.parametrize("group", GRAD_GROUPS, ids=["-".join(g) for g in GRAD_GROUPS])
def test_stack_grads_finite_differences(group, x64):
    """check_grads (rev, order 1, float64) of 3-layer x 5-step losses w.r.t. every cell's
    params and inputs; the orders alternate over the cells."""
    stacks, args, ws = [], [], []
    for name in group:
        i = CELLS.index(name)
        order, checkpoint = GRAD_CFGS.get(name, (("layer", "wavefront")[i % 2], None))
        stack = Stack(name, L, H, H, order=order, checkpoint=checkpoint)
        rng = np.random.default_rng(20 + i)
        stacks.append(stack)
        args.append((random_params(stack, 10 + i),
                     jnp.asarray(rng.standard_normal((B, T, H)), F64)))
        ws.append(jnp.asarray(rng.standard_normal((L, B, T, H)), F64))

    @jax.jit
    def losses(args):
        out = []
        for stack, w, (p, x) in zip(stacks, ws, args):
            o = stack.apply(p, x)
            out.append(jnp.sum(w * jnp.tanh(o.h)) + sum(jnp.sum(v ** 2) for v in o.final.values()))
        return out

    check_grads(losses, (args,), order=1, modes=["rev"])


def test_grad_equals_grad_of_loop(x64):
    """Autodiff through the wavefront scan (projected input) equals autodiff through the plain
    loop, w.r.t. params, inputs and a zero perturbation (the hidden-state gradient map)."""
    stack = Stack("lstm", L, D, H, order="wavefront", input_projection=True)
    params = random_params(stack, 6)
    xs = jnp.asarray(np.random.default_rng(7).standard_normal((B, T, D)), F64)
    eps = {"h": jnp.zeros((L, B, T, H), F64), "c": jnp.zeros((L, B, T, H), F64)}
    w = jnp.asarray(np.random.default_rng(8).standard_normal((B, H)), F64)
    loss = lambda h_top: jnp.sum(jnp.sin(h_top[:, -1] * w))  # noqa: E731
    f = jax.jit(jax.grad(lambda p, x, e: loss(stack.apply(p, x, perturb=e).top), (0, 1, 2)))
    g_ref = jax.grad(lambda p, x, e: loss(brute_force(stack, p, x, perturb=e)[0]["h"][-1]),
                     (0, 1, 2))(params, xs, eps)
    g = f(params, xs, eps)
    assert jnp.abs(g[2]["h"][:, :, 0]).max() > 0  # the map reaches the bottom-left corner
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-9, rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# Transformations and precisions


def test_vmap_over_params_and_inputs(x64):
    """vmap over a batch of params (layer order) and over a batch of inputs (wavefront)."""
    xs = jnp.asarray(np.random.default_rng(9).standard_normal((3, B, T, H)), F64)
    layer = Stack("gru", L, H, H)
    wave = layer.replace(order="wavefront")
    ps = [random_params(layer, s) for s in range(3)]
    batch = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ps)
    by_params, by_inputs = jax.jit(lambda batch, p, xs: (
        jax.vmap(lambda q: layer.apply(q, xs[0]).h)(batch),
        jax.vmap(lambda x: wave.apply(p, x).h)(xs)))(batch, ps[0], xs)
    for n in range(3):
        np.testing.assert_allclose(by_params[n], brute_force(layer, ps[n], xs[0])[0]["h"],
                                   atol=1e-6, rtol=0)
        np.testing.assert_allclose(by_inputs[n], brute_force(layer, ps[0], xs[n])[0]["h"],
                                   atol=1e-6, rtol=0)


def test_float32(x64):
    """A float32 stack gives float32 outputs equal to the float64 loop to float32 accuracy
    (the float64 runs are every other test here)."""
    stack = Stack("lstm", L, H, H, order="wavefront", checkpoint=2)
    p32 = jax.tree_util.tree_map(lambda a: a.astype(F32), random_params(stack, 11))
    xs = jnp.asarray(np.random.default_rng(12).standard_normal((B, T, H)), F32)
    out = jax.jit(lambda p, x: stack.apply(p, x, gates=True))(p32, xs)
    assert all(v.dtype == F32 for v in jax.tree_util.tree_leaves(out))
    ref = brute_force(stack, jax.tree_util.tree_map(lambda a: a.astype(F64), p32),
                      xs.astype(F64))
    assert_matches(out, ref, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Property: the two orders and the loop agree for random sizes


@settings(max_examples=3, deadline=None, derandomize=True)
@given(layers=st.integers(1, 3), steps=st.integers(1, 4), batch=st.integers(1, 2),
       hidden=st.integers(1, 3), name=st.sampled_from(["gru", "lstm", "star", "phased_lstm"]),
       checkpoint=st.sampled_from([None, 1, 2, "auto"]))
def test_layer_order_equals_wavefront(layers, steps, batch, hidden, name, checkpoint):
    with jax.enable_x64(True):  # a fixture does not mix with @given
        _layer_order_equals_wavefront(layers, steps, batch, hidden, name, checkpoint)


def _layer_order_equals_wavefront(layers, steps, batch, hidden, name, checkpoint):
    a = Stack(name, layers, hidden, hidden, checkpoint=checkpoint)
    b = a.replace(order="wavefront")
    params = random_params(a, layers * 100 + steps * 10 + hidden)
    xs = jnp.asarray(np.random.default_rng(batch).standard_normal((batch, steps, hidden)), F64)
    out_a, out_b = jax.jit(lambda p, x: (a.apply(p, x, gates=True), b.apply(p, x, gates=True)))(
        params, xs)
    ref = brute_force(a, params, xs)
    assert_matches(out_a, ref)
    assert_matches(out_b, ref)


# ---------------------------------------------------------------------------------------------
# Configuration and errors


def test_init_layout_and_config(x64):
    s = Stack("lstm", L, D, H)
    p = jax.eval_shape(lambda k: s.init(k, F32), jax.random.key(0))
    assert len(p["layers"]) == L and "input" not in p
    assert p["layers"][0]["i"]["W"].shape == (D, H) and p["layers"][1]["i"]["W"].shape == (H, H)
    sp = Stack("lstm", L, D, H, input_projection=True)
    p = jax.eval_shape(lambda k: sp.init(k, F32), jax.random.key(0))
    assert p["input"]["W"].shape == (D, H) and p["input"]["b"].shape == (H,)
    assert p["layers"][0]["i"]["W"].shape == (H, H)
    # refined cells get the projection by default when D != H, not when D == H
    assert Stack("refined_gru", L, D, H).input_projection
    assert not Stack("refined_gru", L, H, H).input_projection
    assert not s.input_projection and not s.uniform and sp.uniform
    c = Stack("lstm", L, D, H, cell_options={"forget_bias": 1.0}).config
    assert c["cell"] == "lstm" and c["forget_bias"] == 1.0 and c["layers"] == L
    assert s.replace(order="wavefront", input_size=H).order == "wavefront"
    assert s.initial_state(B, F64)["c"].shape == (L, B, H)


def test_what_each_step_was_given_is_the_state_a_step_earlier_and_the_layer_below():
    """``previous_states`` and ``layer_inputs`` against a Python loop over the cells' steps:
    stepping each layer on them gives the stack's own states (widths differ per layer, with
    an input projection and a layer norm, so the padding and the projection are on the way)."""
    s = Stack("gru", 3, D, (6, 4, 5), input_projection=True, norm="layer")
    params = s.init(jax.random.key(1), F32)
    xs = jax.random.normal(jax.random.key(2), (B, T, D), F32)
    out = s.apply(params, xs)
    prev, inputs = s.previous_states(out), s.layer_inputs(params, xs, out)
    assert prev["h"].shape == (3, B, T, s.max_width)
    np.testing.assert_array_equal(prev["h"][:, :, 0], 0.0)  # the initial state
    np.testing.assert_array_equal(prev["h"][:, :, 1:], out.states["h"][:, :, :-1])
    np.testing.assert_allclose(inputs[0], xs @ params["input"]["W"] + params["input"]["b"],
                               rtol=1e-6)
    for l, H in enumerate(s.widths):
        assert inputs[l].shape == (B, T, s.layer_in(l))
        for t in range(T):
            new, _, _ = s.cells[l].step(params["layers"][l], {"h": prev["h"][l, :, t, :H]},
                                     inputs[l][:, t], t)
            np.testing.assert_allclose(new["h"], out.states["h"][l, :, t, :H], rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3", None])
def test_bad_layers(bad):
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        Stack("lstm", layers=bad, input_size=D, hidden_size=H)


@pytest.mark.parametrize("kw,match", [
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"input_size": -2}, "input_size must be a positive integer"),
    ({"order": "diagonal"}, "valid: 'auto', 'layer', 'wavefront'"),
    ({"checkpoint": 0}, "checkpoint must be a positive integer"),
    ({"checkpoint": "sqrt"}, "checkpoint must be a positive integer"),
    ({"checkpoint": 1.5}, "checkpoint must be a positive integer"),
    ({"order": "wavefront"}, "input_projection=True or input_size == hidden_size"),
    ({"cell": "lstn"}, "valid cells"),
    ({"forget_biass": 1.0}, "valid options"),
    ({"cell": "refined_lstm", "input_projection": False}, "use input_projection=True"),
])
def test_bad_stack_config(kw, match):
    kw = {"cell": "lstm", "layers": L, "input_size": D, "hidden_size": H, **kw}
    with pytest.raises(ValueError, match=match):
        Stack(kw.pop("cell"), **kw)


@pytest.mark.parametrize("xs", [
    np.zeros((B, T)), np.zeros((B, T, D + 1)), np.zeros((0, T, D)), np.zeros((B, 0, D)),
    np.zeros((1, B, T, D)), [[[0.0] * D] * T] * B,
])
def test_bad_input_shapes(xs):
    stack = Stack("gru", L, D, H)
    params = jax.eval_shape(lambda k: stack.init(k, F32), jax.random.key(0))
    with pytest.raises(ValueError, match=r"inputs"):
        stack.apply(params, xs)


def test_bad_perturb_key(x64):
    stack = Stack("gru", L, D, H)
    params = random_params(stack, 0)
    with pytest.raises(ValueError, match="not states of cell 'gru'"):
        stack.apply(params, jnp.zeros((B, T, D), F64), perturb={"c": jnp.zeros((L, B, T, H))})


@pytest.mark.parametrize("key", [0, None, np.ones(3, np.float32)])
def test_init_takes_a_key(key):
    stack = Stack("gru", L, D, H)
    with pytest.raises(TypeError, match=rf"Stack.init takes a PRNG key such as "
                                        rf"jax.random.key\(0\), got {type(key).__name__}"):
        stack.init(key)
    legacy, new = stack.init(jax.random.PRNGKey(3)), stack.init(jax.random.key(3))
    for a, b in zip(jax.tree_util.tree_leaves(legacy), jax.tree_util.tree_leaves(new)):
        np.testing.assert_array_equal(a, b)  # the same draws from either kind of key


def test_package_exports():
    assert gradflow.Stack is Stack
    assert gradflow.StackOutput._fields == ("states", "gates", "final", "up", "widths")


def _bare_import(env):
    import subprocess
    import sys
    code = ("import sys, gradflow; assert 'jax' not in sys.modules; "
            "names = [n for n in dir(gradflow) if not n.startswith('_')]; "
            "print(sorted((n, getattr(gradflow, n).__name__) for n in gradflow._SUBMODULES)); "
            "print(names)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.background(job=_bare_import)  # its work is a fresh process
def test_every_module_is_an_attribute_after_a_bare_import(background):
    """``import gradflow`` then ``gradflow.cost.estimate``, ``gradflow.parallel...``,
    ``gradflow.atlas.CLAIMS`` (as README writes them) work, loaded on first use: the bare
    import loads no JAX."""
    r = background
    assert r.returncode == 0, r.stderr[-2000:]
    loaded, names = r.stdout.strip().splitlines()
    assert eval(loaded) == [(m, f"gradflow.{m}") for m in sorted(gradflow._SUBMODULES)]
    for m in ("cost", "parallel", "atlas", "plot", "experiments", "runs", "reproduce",
              "seeds", "cells", "gates"):
        assert f"'{m}'" in names
    assert "importlib" not in names


@pytest.mark.parametrize("name,order,checkpoint", [
    ("lstm", "layer", None), ("gru", "layer", 2), ("g_lstm", "layer", "auto"),
    ("gru", "wavefront", None), ("g_lstm", "wavefront", 3), ("lstm", "wavefront", 3)])
def test_taps_give_the_norms_of_the_perturbation_gradients(name, order, checkpoint, x64):
    """``taps`` (norm_tap) against the perturbation gradients they summarise: for every state,
    grad w.r.t. taps[l, b, t] == ||grad w.r.t. perturb[l, b, t, :]||_2. Each cell (two states,
    one, a time gate) in both orders, each order's checkpointing once (the taps are the
    stack's, the same for every cell: pairs cover it, not the product)."""
    stack = Stack(name, layers=L, input_size=D, hidden_size=H, input_projection=True,
                  order=order, checkpoint=checkpoint)
    params = random_params(stack, 7)
    xs = jnp.asarray(np.random.default_rng(8).standard_normal((B, T, D)))
    names = stack.cell.state_names

    def loss(out):  # every state of every layer and step matters, nonlinearly
        return sum(jnp.sum(jnp.sin(3.0 * v) * (1 + jnp.arange(T))[:, None])
                   for v in out.states.values())

    eps = {k: jnp.zeros((L, B, T, H), F64) for k in names}
    taps = {k: jnp.zeros((L, B, T), F64) for k in names}
    g_eps = jax.grad(lambda e: loss(stack.apply(params, xs, perturb=e)))(eps)
    g_tap = jax.jit(jax.grad(lambda t: loss(stack.apply(params, xs, taps=t))))(taps)
    for k in names:
        np.testing.assert_allclose(g_tap[k], np.linalg.norm(g_eps[k], axis=-1), rtol=1e-10,
                                   atol=1e-14, err_msg=k)
        assert np.all(np.asarray(g_tap[k]) > 0)
    # taps are the identity in the forward pass
    plain = stack.apply(params, xs)
    np.testing.assert_array_equal(stack.apply(params, xs, taps=taps).h, plain.h)
    with pytest.raises(ValueError, match="taps keys \\['z'\\] are not states"):
        stack.apply(params, xs, taps={"z": taps[names[0]]})
    with pytest.raises(ValueError, match="param_taps must have shape \\(layers, steps\\)"):
        stack.apply(params, xs, param_taps=jnp.zeros((L, T + 1)))


def test_auto_order_runs_the_wavefront_on_the_listed_backends_only(monkeypatch, x64):
    """``order="auto"`` (the default) runs the wavefront where JAX's default backend is in
    ``WAVEFRONT_BACKENDS`` (measured: GPUs) for a uniform stack of two or more layers, else the
    layer order; the config keeps ``"auto"`` (it round-trips). Here the list is patched to hold this
    CPU, and the run is checked to take the wavefront and to equal the brute-force loop."""
    from gradflow import stack as S
    uniform = Stack("lstm", L, H, H)
    here = "wavefront" if jax.default_backend() in S.WAVEFRONT_BACKENDS else "layer"
    assert uniform.order == "auto" and uniform.evaluation_order == here  # CPU: layer
    monkeypatch.setattr(S, "WAVEFRONT_BACKENDS", ())
    assert uniform.evaluation_order == "layer"
    monkeypatch.setattr(S, "WAVEFRONT_BACKENDS", (jax.default_backend(),))
    assert uniform.evaluation_order == "wavefront"
    assert uniform.config["order"] == "auto"
    assert Stack("lstm", L, D, H).evaluation_order == "layer"  # layer 0 reads D != H
    assert Stack("lstm", 1, H, H).evaluation_order == "layer"  # one layer: nothing to batch
    assert Stack("lstm", L, H, H, order="layer").evaluation_order == "layer"
    assert Stack("lstm", L, D, H, input_projection=True).evaluation_order == "wavefront"
    ran, original = [], S._wavefront
    monkeypatch.setattr(S, "_wavefront", lambda *a: ran.append(1) or original(*a))
    params = random_params(uniform, 3)
    xs = jnp.asarray(np.random.default_rng(4).standard_normal((B, T, H)), F64)
    out = uniform.apply(params, xs)
    assert ran
    want, _, _ = brute_force(uniform, params, xs)
    np.testing.assert_allclose(out.states["h"], want["h"], rtol=1e-12, atol=1e-12)



def test_init_of_a_stack_too_wide_for_the_machine_is_refused():
    """Stack.init allocated whatever it was asked: 447 GiB of parameters aborted the process
    (problem() and the measurements refused it; the Stack's own init did not)."""
    import jax

    with pytest.raises(ValueError, match=r"Stack.init: the parameters take 447.0 GiB, more "
                                         r"than the .* available: use a smaller hidden size"):
        gradflow.Stack("lstm", 2, 4, 10**5).init(jax.random.key(0))
    shapes = jax.eval_shape(gradflow.Stack("lstm", 2, 4, 10**5).init, jax.random.key(0))
    assert shapes["layers"][1]["i"]["U"].shape == (10**5, 10**5)  # shapes alone: not refused


def test_apply_and_gate_readers_check_the_params():
    """``Stack.apply``, ``gates.activations`` and ``gates.slopes`` given another cell's params
    (a GRU's for an LSTM stack) say which leaf is missing and what the layer holds (they
    raised KeyError 'i' from inside the cell)."""
    from gradflow import gates
    lstm = gradflow.problem("lstm", layers=2, steps=4, hidden=8, batch=2)
    gru = gradflow.problem("gru", layers=2, steps=4, hidden=8, batch=2)
    for call in (lambda: lstm.stack.apply(gru.params, lstm.xs),
                 lambda: gates.activations(lstm.stack, gru.params, lstm.xs),
                 lambda: gates.slopes(lstm.stack, gru.params, lstm.xs)):
        with pytest.raises(ValueError, match=r"params\['layers'\]\[0\]\['f'\]\['U'\] is "
                                             r"missing.*holds '[nrz]', '[nrz]', '[nrz]'"):
            call()
    with pytest.raises(ValueError, match="params hold 1 layers, the stack has 2"):
        lstm.stack.apply({"layers": lstm.params["layers"][:1]}, lstm.xs)


def test_apply_checks_its_instruments():
    """``state0``, ``perturb`` and ``taps`` of the wrong keys or shapes: one message naming
    the states and the shape (they failed in the scan as KeyError 'c' or JAX shape errors);
    ``initial_state`` takes a positive batch."""
    pr = gradflow.problem("lstm", layers=2, steps=3, hidden=4, batch=2)
    s, p, xs = pr.stack, pr.params, pr.xs
    with pytest.raises(ValueError, match=r"state0 lacks the states \['c'\] of cell 'lstm'"):
        s.apply(p, xs, state0={"h": jnp.zeros((2, 2, 4))})
    with pytest.raises(ValueError, match=r"state0\['c'\] must have shape \(2, 2, 4\) \(layers, "
                                         r"batch, max width\), got \(2, 5, 4\)"):
        s.apply(p, xs, state0={"h": jnp.zeros((2, 2, 4)), "c": jnp.zeros((2, 5, 4))})
    with pytest.raises(TypeError, match="state0 must be a dict"):
        s.apply(p, xs, state0=[1])
    with pytest.raises(ValueError, match=r"taps\['h'\] must have shape \(2, 2, 3\)"):
        s.apply(p, xs, taps={"h": jnp.zeros((5,))})
    with pytest.raises(ValueError, match=r"perturb\['c'\] must have shape \(2, 2, 3, 4\)"):
        s.apply(p, xs, perturb={"c": jnp.zeros((2, 2, 3))})
    ones = {"h": jnp.ones((2, 2, 4)), "c": jnp.ones((2, 2, 4))}
    assert not np.allclose(s.apply(p, xs, state0=ones).states["h"], s.apply(p, xs).states["h"])
    for bad in (-1, 0, 1.5):
        with pytest.raises(ValueError, match="batch must be a positive integer"):
            s.initial_state(bad)


def test_a_very_deep_stack_is_described_without_walking_its_cells():
    """A stack of ten million layers hashed (a cache key of every estimate) and compared each of
    its cells: ``gradflow heatmap --layers 10000000 --dry-run`` took 29 s to answer, 4 s now
    (timed in bench notes, not here). Equal stacks hash equal, stacks of other cells compare
    unequal."""
    deep = Stack("lstm", 10**6, 4, 4)
    assert deep.uniform and hash(deep) == hash(Stack("lstm", 10**6, 4, 4))
    assert deep.replace(layers=2).cells == deep.cells[:2]
    mixed = Stack(["lstm", "ur_lstm", "lstm"], 3, 4, 4)
    same = Stack(["lstm", "ur_lstm", "lstm"], 3, 4, 4)
    assert mixed == same and hash(mixed) == hash(same) and not mixed.uniform
    assert mixed != Stack("lstm", 3, 4, 4) and mixed.replace(layers=3) == mixed


@pytest.mark.parametrize("flag", [True, False])
def test_checkpoint_as_a_switch_names_its_forms(flag):
    """checkpoint=True (a switch, as in other libraries) was refused as "must be a positive
    integer"; the message now names the forms it takes."""
    with pytest.raises(TypeError, match=rf"checkpoint={flag}: give 'auto' .*, a chunk length "
                                        r"\(an integer >= 1\) or None"):
        Stack("lstm", 2, 3, 4, checkpoint=flag)


@pytest.mark.parametrize("name, options", [
    ("lstm", {"refined": ("i", "f")}), ("lstm", {"refined": ("f",)}),
    ("refined_gru", {"refined": ()}),
    ("phased_lstm", {"log_tau": (0.5, 2.0)}), ("phased_lstm", {"log_tau": (-1e20, 3.0)}),
    ("star", {"variant": "official", "t_max": 50.0}),
    ("lstm", {"forget_bias": 1.0, "tied": True})])
def test_a_cells_label_typed_back_builds_that_cell(name, options):
    """A label wrote a tuple option as ``refined=i+f``, which no command read ("option
    refined='i+f' is not valid"): a tuple option given as that text is the tuple, so the
    label of a title or a summary, typed back as ``--cell``, is the very cell."""
    from gradflow import cells

    cell = cells.get(name, **options)
    name, written = cells.parse_spec(cell.label)
    assert cells.get(name, **written) is cell
    assert cells.for_length(cell.label, 5) is cell.for_length(5)


def test_a_tuple_option_written_as_text_is_checked_as_the_tuple():
    from gradflow import cells

    assert cells.get("phased_lstm", log_tau="1+3") is cells.get("phased_lstm", log_tau=(1, 3))
    with pytest.raises(ValueError, match=r"option log_tau='1\+x' of cell 'phased_lstm' takes "
                                         r"two finite numbers"):
        cells.get("phased_lstm", log_tau="1+x")
    with pytest.raises(ValueError, match="option refined='z' is not valid; choose from"):
        cells.get("lstm", refined="i+z")


def test_a_cells_label_names_the_options_of_note_and_titles_carry_it():
    """A map of ``lstm:forget_bias=1.0`` was titled ``lstm``: the figure of another network
    read as the default's. ``Cell.label`` names the options that differ from the factory's
    defaults (not init, which results name apart; not the length a time gate is initialised
    over; not an option another implies), the stack's config keeps it, titles show it."""
    from gradflow import cells, plot

    assert cells.get("lstm").label == "lstm" and cells.get("lstm", init="ugi").label == "lstm"
    assert cells.get("lstm", forget_bias=1.0).label == "lstm:forget_bias=1.0"
    assert cells.get("g_lstm", steps=6).label == "g_lstm"
    assert cells.get("star", variant="official").label == "star:variant=official"  # (t_max
    # follows from the variant)
    assert cells.get("star", variant="official", t_max=50.0).label == \
        "star:t_max=50.0,variant=official"
    assert "cell_label" not in gradflow.Stack("lstm", 2, 3, 4).config
    config = gradflow.Stack(cells.get("lstm", forget_bias=1.0), 2, 3, 4).config
    assert config["cell_label"] == "lstm:forget_bias=1.0"
    assert plot.subject(config) == "lstm:forget_bias=1.0"
    mixed = gradflow.Stack([cells.get("gru"), cells.get("star", variant="official")], 2, 3, 4)
    assert mixed.config["cell_label"] == ["gru", "star:variant=official"]
    assert plot.subject(mixed.config) == "gru / star:variant=official"
    rebuilt = gradflow.runs.stack_from_config(json.loads(json.dumps(config)))
    assert rebuilt.cells[0] is cells.get("lstm", forget_bias=1.0)  # (the label is no option)


def test_an_option_written_twice_in_a_cell_is_refused():
    """``lstm:forget_bias=1,forget_bias=2`` was the last value, silently (``--option`` given
    twice is refused)."""
    from gradflow import cells

    with pytest.raises(ValueError, match=r"option forget_bias is given twice \(1 and 2\)"):
        cells.parse_spec("lstm:forget_bias=1,forget_bias=2")
    assert cells.parse_spec("lstm:forget_bias=1,tied=true") == (
        "lstm", {"forget_bias": 1, "tied": True})


def test_a_tied_lstm_refining_its_input_gate_says_why():
    """``refined_lstm:tied=True`` was refused as "option refined='i' is not valid", an option
    not given: the message names the tie and the refined gates that remain."""
    from gradflow import cells

    with pytest.raises(ValueError, match=r"tied=True ties the input gate to 1 - forget, so "
                                         r"there is no input gate i to refine \(refined=i\+o\); "
                                         r"give refined=o with it"):
        cells.get("refined_lstm", tied=True)
    with pytest.raises(ValueError, match="leave refined out with it"):
        cells.get("lstm", tied=True, refined="i")
    assert cells.get("refined_lstm", tied=True, refined="o").label == \
        "refined_lstm:refined=o,tied=True"
