"""gradflow.jacobian against independent references.

The reference stack here is a plain Python loop over layers and steps calling ``cell.step``;
per-position derivatives are taken one ``(l, t)`` at a time (vmapped over positions only to
keep the suite fast), and per-step parameter gradients come from explicit per-step copies of the
parameters. Everything in float64.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import gradflow
from gradflow import jacobian as J
from gradflow.results import NonFiniteWarning, Result

L, T, B, H = 3, 4, 2, 4


def loop_stack(stack, params, xs, eps=None, deltas=None):
    """Brute force: Python loops; ``eps[l, :, t]`` added to h (and "c" keyed dict allowed),
    ``deltas[l][t]`` added to layer l's parameters at step t."""
    cell = stack.cell
    x = xs @ params["input"]["W"] + params["input"]["b"] if stack.input_projection else xs
    hs = []
    for l in range(stack.layers):
        s = cell.initial_state((xs.shape[0],), stack.hidden_size, xs.dtype)
        ys = []
        for t in range(xs.shape[1]):
            p = params["layers"][l]
            if deltas is not None:
                p = jax.tree_util.tree_map(jnp.add, p, deltas[l][t])
            s, _, _ = cell.step(p, s, x[:, t], t)
            if eps is not None:
                s = {k: v + eps[k][l, :, t] if k in eps else v for k, v in s.items()}
            ys.append(s["h"])
        x = jnp.stack(ys, 1)
        hs.append(x)
    return jnp.stack(hs)  # (L, B, T, H)


def make(cell, **kw):
    opts = dict(layers=L, steps=T, hidden=H, batch=B, dtype="float64", seed=3)
    opts.update(kw)
    pr = gradflow.problem(cell, **opts)
    # non-zero biases everywhere, so no structure of the init hides a mistake
    leaves, tree = jax.tree_util.tree_flatten(pr.params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [a + 0.1 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    return pr.stack, jax.tree_util.tree_unflatten(tree, leaves), pr.xs


def brute_state_map(stack, params, xs, loss_fn, name):
    """G[l, t] from a separate derivative per position (perturbation at that position only).
    ``loss_fn`` may be a tuple of losses: one map each, from one compiled program."""
    fns = loss_fn if isinstance(loss_fn, tuple) else (loss_fn,)
    Lz, Bz, Tz, Hz = stack.layers, xs.shape[0], xs.shape[1], stack.hidden_size

    def at(l, t):
        def f(e):
            eps = {name: jnp.zeros((Lz, Bz, Tz, Hz), xs.dtype).at[l, :, t].set(e)}
            top = loop_stack(stack, params, xs, eps)[-1]
            return jnp.stack([fn(top) for fn in fns])
        g = jax.jacrev(f)(jnp.zeros((Bz, Hz), xs.dtype))  # (losses, B, H)
        return jnp.mean(jnp.linalg.norm(g, axis=-1), axis=-1)

    ls, ts = np.meshgrid(np.arange(Lz), np.arange(Tz), indexing="ij")
    maps = np.asarray(jax.jit(jax.vmap(at))(ls.ravel(), ts.ravel())).T.reshape(-1, Lz, Tz)
    return tuple(maps) if isinstance(loss_fn, tuple) else maps[0]


@pytest.mark.parametrize("cell", gradflow.cells.names())
def test_hidden_map_equals_brute_force_every_cell(cell, x64):
    """Every cell under the sequence loss (a cotangent enters at every step, so every step's
    backward is exercised); the final-output loss too for an LSTM and a GRU (where the
    cotangent enters is the loss's business, not the cell's: one program per loss to compile)."""
    stack, params, xs = make(cell)
    losses = ("last", "all") if cell in ("lstm", "gru") else ("all",)
    refs = brute_state_map(stack, params, xs, tuple(J.readout_loss(loss, H, T, B, 0, xs.dtype)
                                                    for loss in losses), "h")
    for loss, ref in zip(losses, refs):
        res = J.gradient_map(stack, params, xs, loss=loss, wrt="hidden")
        np.testing.assert_allclose(res.values, ref, rtol=1e-5, atol=1e-12)
        assert res.values.shape == (L, T)
        assert res.config["loss"] == loss and res.config["wrt"] == "hidden"


@pytest.mark.parametrize("cell", ["lstm", "ur_lstm", "g_lstm"])
def test_cell_map_equals_brute_force(cell, x64):
    stack, params, xs = make(cell)
    res = J.gradient_map(stack, params, xs, loss="all", wrt="cell")
    ref = brute_state_map(stack, params, xs, J.readout_loss("all", H, T, B, 0, xs.dtype), "c")
    np.testing.assert_allclose(res.values, ref, rtol=1e-5, atol=1e-12)


def test_hidden_map_finite_differences(x64):
    """The total derivative at one position agrees with central finite differences."""
    stack, params, xs = make("gru")
    loss_fn = J.readout_loss("last", H, T, B, 0, xs.dtype)

    def f(e):
        eps = {"h": jnp.zeros((L, B, T, H), xs.dtype).at[1, :, 2].set(e)}
        return loss_fn(stack.apply(params, xs, perturb=eps).top)

    check_grads(f, (jnp.zeros((B, H), xs.dtype),), order=1, modes=["rev"])
    g = jax.grad(f)(jnp.zeros((B, H), xs.dtype))
    res = J.gradient_map(stack, params, xs, loss="last")
    assert res.values[1, 2] == pytest.approx(float(jnp.mean(jnp.linalg.norm(g, axis=-1))),
                                              rel=1e-10)


def test_callable_loss_and_orders_agree(x64):
    stack, params, xs = make("lstm", hidden=4, input_size=4)

    def loss(outputs):
        return jnp.sum(outputs[:, -1] ** 2)

    ref = J.gradient_map(stack, params, xs, loss=loss)
    for st in (stack.replace(order="wavefront"), stack.replace(checkpoint=2),
               stack.replace(order="wavefront", checkpoint="auto")):
        np.testing.assert_allclose(J.gradient_map(st, params, xs, loss=loss).values,
                                   ref.values, rtol=1e-10)
    assert ref.config["loss"] == "loss"


@pytest.mark.parametrize("cell", ["rnn", "lstm", "star", "gru", "g_lstm", "refined_mgu"])
def test_params_map_per_step_copies(cell, x64):
    """P[l, t] equals mean |dL/d delta_(l,t)| with explicit per-step parameter copies, and the
    per-step gradients sum to the ordinary gradient."""
    stack, params, xs = make(cell)
    loss_fn = J.readout_loss("all", H, T, B, 0, xs.dtype)
    res = J.gradient_map(stack, params, xs, loss="all", wrt="params")
    zeros = [[jax.tree_util.tree_map(jnp.zeros_like, params["layers"][l]) for _ in range(T)]
             for l in range(L)]
    grads = jax.jit(jax.grad(lambda d: loss_fn(loop_stack(stack, params, xs, deltas=d)[-1])))(
        zeros)
    ref = np.array([[np.mean(np.abs(np.concatenate(
        [np.ravel(a) for a in jax.tree_util.tree_leaves(grads[l][t])]))) for t in range(T)]
        for l in range(L)])
    np.testing.assert_allclose(res.values, ref, rtol=1e-8, atol=1e-14)

    full = jax.grad(lambda p: loss_fn(loop_stack(stack, p, xs)[-1]))(params)
    for l in range(L):
        summed = jax.tree_util.tree_map(lambda *a: sum(a), *grads[l])
        for a, b in zip(jax.tree_util.tree_leaves(summed),
                        jax.tree_util.tree_leaves(full["layers"][l])):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)


def test_per_step_param_grads_chunking_is_exact(x64):
    stack, params, xs = make("lstm")
    loss_fn = J.readout_loss("all", H, T, B, 0, xs.dtype)
    _, a = J.per_step_param_grads(stack, params, xs, loss_fn, chunk=1)
    _, b = J.per_step_param_grads(stack, params, xs, loss_fn, chunk=3)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-12)


@pytest.mark.parametrize("cell,order,checkpoint", [
    ("lstm", "layer", None), ("gru", "wavefront", None), ("g_lstm", "layer", 2),
    ("ur_lstm", "wavefront", 3), ("indrnn", "layer", "auto"), ("refined_gru", "layer", None)])
def test_params_map_taps_equal_per_step_vjps(cell, order, checkpoint, x64):
    """The tapped params map (one backward pass) against the per-step VJP formulation."""
    stack, params, xs = make(cell)
    stack = stack.replace(order=order, checkpoint=checkpoint)
    for loss in ("last", "all"):
        loss_fn = J.readout_loss(loss, H, T, B, 0, xs.dtype)
        res = J.gradient_map(stack, params, xs, loss=loss, wrt="params")
        value, per_step = J.per_step_param_grads(stack, params, xs, loss_fn)
        leaves = jax.tree_util.tree_leaves(per_step)
        ref = sum(np.abs(np.asarray(a)).reshape(L, T, -1).sum(-1) for a in leaves) / sum(
            np.prod(a.shape[2:]) for a in leaves)
        np.testing.assert_allclose(res.values, ref, rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(res.loss_value, value, rtol=1e-12)


def per_example_jacobians(stack, params, xs, target):
    """(B, L, T, H, H) by jax.jacrev of the Python-loop stack, per example."""
    tl, tt = target

    def f(eps):
        return loop_stack(stack, params, xs, {"h": eps})[tl, :, tt]

    jac = jax.jacrev(f)(jnp.zeros((L, B, T, H), xs.dtype))  # (B, H, L, B, T, H)
    return np.stack([np.moveaxis(np.asarray(jac[b, :, :, b]), 0, -2) for b in range(B)])


@pytest.mark.parametrize("cell", ["lstm", "star", "mgu"])
def test_jacobian_map_exact_equals_jacrev(cell, x64):
    stack, params, xs = make(cell)
    jac = per_example_jacobians(stack, params, xs, (2, 3))
    rms = np.mean(np.linalg.norm(jac, axis=(-2, -1)), axis=0) / np.sqrt(H)
    spec = np.mean(np.linalg.norm(jac, ord=2, axis=(-2, -1)), axis=0)
    res = J.jacobian_map(stack, params, xs, spectra_at=[(0, 1), (2, 3)], chunk=3)
    np.testing.assert_allclose(res.values, rms, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(res.values[2, 3], 1.0)  # d h / d h at the target
    res2 = J.jacobian_map(stack, params, xs, norm="spectral")
    np.testing.assert_allclose(res2.values, spec, rtol=1e-9, atol=1e-15)
    sv = np.linalg.svd(jac[:, 0, 1], compute_uv=False)
    np.testing.assert_allclose(res.spectra[0], sv, rtol=1e-9, atol=1e-15)


def test_jacobian_map_target_and_finite_differences(x64):
    """A target below the top: positions after it are zero; a column of the Jacobian agrees
    with central finite differences of the stack."""
    stack, params, xs = make("rnn")
    res = J.jacobian_map(stack, params, xs, target=(1, 2))
    assert np.all(res.values[:, 3] == 0) and np.all(res.values[2] == 0)
    # the layer above the target never reaches it: structural zeros, not underflow
    assert res.underflow == {"values": 0}
    assert np.all(res.values[:2, :3] > 0)
    jac = per_example_jacobians(stack, params, xs, (1, 2))
    step = 1e-6
    e = np.zeros((L, B, T, H))
    e[0, :, 1, 2] = step
    hi = loop_stack(stack, params, xs, {"h": jnp.asarray(e)})[1, :, 2]
    lo = loop_stack(stack, params, xs, {"h": -jnp.asarray(e)})[1, :, 2]
    np.testing.assert_allclose((hi - lo) / (2 * step), jac[:, 0, 1, :, 2], rtol=1e-6, atol=1e-9)
    rms = np.mean(np.linalg.norm(jac, axis=(-2, -1)), axis=0) / np.sqrt(H)
    np.testing.assert_allclose(res.values, rms, rtol=1e-9, atol=1e-15)


def test_probe_estimate_within_its_standard_error(x64):
    """Over 40 fixed seeds, the z-scores (estimate - exact)/stderr behave like a standard error:
    at least 90% within 3, a mean near 0."""
    stack, params, xs = make("gru", batch=8, hidden=6)
    exact = J.jacobian_map(stack, params, xs).values
    mask = exact > 0
    zs = []
    for seed in range(40):
        r = J.jacobian_map(stack, params, xs, method="probe", probes=16, seed=seed)
        assert r.stderr.shape == exact.shape
        zs.append(((r.values - exact) / np.where(mask, r.stderr, 1.0))[mask])
    zs = np.concatenate(zs)
    assert np.mean(np.abs(zs) < 3) > 0.9
    assert abs(np.mean(zs)) < 0.5
    # more probes, smaller error
    r64 = J.jacobian_map(stack, params, xs, method="probe", probes=256, seed=0)
    assert np.median(r64.stderr[mask] / exact[mask]) < 0.05


def test_float64_maps_where_xla_cpu_miscompiles(x64):
    """XLA:CPU's fusion emitters (jaxlib 0.9.2-0.10.2) miscompile the vmapped VJP of an LSTM's
    scan at batch 4 x H 5 in float64: the exact map was 6-8% off ``chunk=1`` (one cotangent at
    a time), the probes biased likewise. gradflow compiles float64 programs on a CPU without
    them (:mod:`gradflow.xla`). Checked against the pure-JAX reproduction too."""
    stack, params, xs = make("lstm", layers=2, steps=6, hidden=5, batch=4)
    with gradflow.parallel.batch_devices(None):  # (the program of one device)
        exact = J.jacobian_map(stack, params, xs).values
        one = J.jacobian_map(stack, params, xs, chunk=1).values
        r = J.jacobian_map(stack, params, xs, method="probe", probes=512, seed=0)
    np.testing.assert_allclose(exact, one, rtol=1e-12)
    assert np.max(np.abs(r.values - exact) / r.stderr) < 5
    # the program itself: vmapped VJPs of a scan, as jax.jit gets them wrong here
    U = jax.random.normal(jax.random.key(0), (5, 20)) / np.sqrt(5)
    zs = jax.random.normal(jax.random.key(1), (6, 4, 20))

    def run(h0):
        def step(carry, z):
            c, h = carry
            i, f, g, o = jnp.split(h @ U + z, 4, -1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            return (c, jax.nn.sigmoid(o) * jnp.tanh(c)), None
        return jax.lax.scan(step, (jnp.zeros((4, 5)), h0), zs)[0][1]

    h0 = jax.random.normal(jax.random.key(2), (4, 5))
    cts = jax.random.normal(jax.random.key(3), (5, 4, 5))
    vjps = lambda c, h: jax.vmap(jax.vjp(run, h)[1])(c)[0]  # noqa: E731
    each = np.stack([jax.vjp(run, h0)[1](c)[0] for c in cts])
    np.testing.assert_allclose(gradflow.xla.jit(vjps)(cts, h0), each, rtol=1e-12, atol=1e-15)
    one = lambda c, h: jax.vjp(run, h)[1](c)[0]  # noqa: E731
    np.testing.assert_allclose(jax.vmap(lambda c: gradflow.xla.jit(one)(c, h0))(cts), each,
                               rtol=1e-12, atol=1e-15)  # the caller's vmap: exact too
    # inside the caller's own jax.jit JAX allows no options: run as that program is compiled
    got = jax.jit(lambda y: gradflow.xla.jit(vjps)(cts, h0) + y)(0.0)
    assert got.shape == each.shape and np.all(np.isfinite(got))


def test_local_gains_equal_cell_jacobians(x64):
    stack, params, xs = make("gru")
    res = J.local_gains(stack, params, xs)
    h = loop_stack(stack, params, xs)
    cell = stack.cell
    for l in (0, 2):
        s = cell.initial_state((B,), H, xs.dtype)
        x_in = xs if l == 0 else h[l - 1]
        for t in range(T):
            prev = s
            vj = [jax.jacrev(lambda x: cell.step(params["layers"][l], {k: v[b] for k, v in
                                                                        prev.items()}, x, t)[1])(
                x_in[b, t]) for b in range(B)]
            tj = [jax.jacrev(lambda hh: cell.step(params["layers"][l], {"h": hh}, x_in[b, t],
                                                  t)[1])(prev["h"][b]) for b in range(B)]
            n_in = x_in.shape[-1]
            np.testing.assert_allclose(
                res.vertical_rms[l, t], np.mean([np.linalg.norm(j) / np.sqrt(n_in) for j in vj]),
                rtol=1e-9)
            np.testing.assert_allclose(
                res.vertical_spectral[l, t], np.mean([np.linalg.norm(j, 2) for j in vj]),
                rtol=1e-9)
            np.testing.assert_allclose(
                res.temporal_rms[l, t], np.mean([np.linalg.norm(j) / np.sqrt(H) for j in tj]),
                rtol=1e-9)
            np.testing.assert_allclose(
                res.temporal_spectral[l, t], np.mean([np.linalg.norm(j, 2) for j in tj]),
                rtol=1e-9)
            s, _, _ = cell.step(params["layers"][l], s, x_in[:, t], t)


@pytest.mark.parametrize("norm", [None, "layer", "rms"])
def test_vertical_gains_cross_the_residual_and_the_norm(norm, x64):
    """With residual and norm, the vertical gain is that of what a layer emits upward, against
    a Python loop with its own LayerNorm/RMSNorm (norm parameters moved off identity); layer 0
    reads 3 features into 4 units, so it has no skip path."""
    D, Hs = 3, 4
    stack = gradflow.Stack("gru", layers=3, input_size=D, hidden_size=Hs, residual=True,
                           norm=norm)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                    stack.init(jax.random.key(1)))
    if norm is not None:
        k = iter(jax.random.split(jax.random.key(2), 6))
        params["norm"] = [{n: v + 0.3 * jax.random.normal(next(k), v.shape, v.dtype)
                           for n, v in d.items()} for d in params["norm"]]
    xs = jax.random.normal(jax.random.key(3), (2, 4, D), jnp.float64)
    res = J.local_gains(stack, params, xs)

    def own_emit(h, x, pn):
        y = h + x if x.shape == h.shape else h
        if norm is None:
            return y
        if norm == "layer":
            y = y - y.mean()
        y = y / jnp.sqrt(jnp.mean(y * y) + 1e-6) * pn["scale"]
        return y + pn["bias"] if "bias" in pn else y

    cell, x_in = stack.cell, xs
    for l in range(3):
        p, pn = params["layers"][l], params["norm"][l] if norm else {}
        s = cell.initial_state((2,), Hs, xs.dtype)
        ys = []
        for t in range(4):
            gains = []
            for b in range(2):
                sb = {k: v[b] for k, v in s.items()}
                j = jax.jacrev(lambda x: own_emit(cell.step(p, sb, x, t)[1], x, pn))(x_in[b, t])
                gains.append(np.linalg.norm(j) / np.sqrt(x_in.shape[-1]))
            np.testing.assert_allclose(res.vertical_rms[l, t], np.mean(gains), rtol=1e-9)
            s, h, _ = cell.step(p, s, x_in[:, t], t)
            ys.append(jax.vmap(own_emit, in_axes=(0, 0, None))(h, x_in[:, t], pn))
        x_in = jnp.stack(ys, axis=1)
    if norm is None:  # the skip path: every layer above the first passes about 1 or more
        assert np.all(res.vertical_rms[1:] > 0.9)


@pytest.mark.parametrize("cell,kind,expected", [
    ("lstm", "vertical", 0.25),  # sigma(0) * sigma(0): o * i * W_g
    ("star", "vertical", 0.5),   # k * W_z with k = sigma(0)
    ("rnn", "temporal", 1.0),    # orthogonal U, tanh'(0) = 1
])
def test_local_gain_closed_forms(cell, kind, expected, x64):
    pr = gradflow.problem(cell, layers=6, steps=5, hidden=32, batch=4, input_scale=1e-4,
                          dtype="float64", init="orthogonal")
    res = J.local_gains(pr.stack, pr.params, pr.xs)
    for stat in ("rms", "spectral"):
        np.testing.assert_allclose(res[f"{kind}_{stat}"], expected, rtol=2e-3)


def test_exploding_gradients_are_counted_not_raised():
    pr = gradflow.problem("indrnn", layers=2, steps=30, hidden=8, batch=2, u_max=1.0)
    params = pr.params
    params["layers"][0]["h"]["u"] = jnp.full((8,), 1e3, jnp.float32)
    with pytest.warns(NonFiniteWarning):
        res = J.gradient_map(pr.stack, params, pr.xs, loss="all")
    assert res.total_nonfinite > 0
    assert res.nonfinite["values"] == int(np.sum(~np.isfinite(res.values)))


def test_errors_are_clear(x64):
    stack, params, xs = make("gru")
    with pytest.raises(ValueError, match="valid: last, all"):
        J.gradient_map(stack, params, xs, loss="first")
    with pytest.raises(ValueError, match="valid: hidden, cell, params"):
        J.gradient_map(stack, params, xs, wrt="weights")
    with pytest.raises(ValueError, match="memory state c"):
        J.gradient_map(stack, params, xs, wrt="cell")
    with pytest.raises(ValueError, match="NaN"):
        J.gradient_map(stack, params, xs.at[0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="shape"):
        J.gradient_map(stack, params, xs[..., :2])
    with pytest.raises(ValueError, match="valid: rms, spectral"):
        J.jacobian_map(stack, params, xs, norm="nuclear")
    with pytest.raises(ValueError, match="valid: exact, probe"):
        J.jacobian_map(stack, params, xs, method="sample")
    with pytest.raises(ValueError, match="outside the stack"):
        J.jacobian_map(stack, params, xs, target=(5, 0))
    for bad in ((1.0, 2), (0, 1.5), ("1", 2)):  # 1.0 was taken as layer 1
        with pytest.raises(ValueError, match=r"target must be a \(layer, step\) pair of "
                                             r"integers, got "):
            J.jacobian_map(stack, params, xs, target=bad)
    with pytest.raises(ValueError, match="probes"):
        J.jacobian_map(stack, params, xs, method="probe", probes=1)
    np.testing.assert_array_equal(  # a NumPy integer is an integer
        J.jacobian_map(stack, params, xs, method="probe", probes=np.int64(3)).values,
        J.jacobian_map(stack, params, xs, method="probe", probes=3).values)
    with pytest.raises(ValueError, match="rms"):
        J.jacobian_map(stack, params, xs, method="probe", norm="spectral")
    with pytest.raises(TypeError, match="gradflow.Stack"):
        J.gradient_map("gru", params, xs)


def test_result_carries_config_and_round_trips(tmp_path):
    pr = gradflow.problem("star", layers=2, steps=3, hidden=4, batch=2, seed=5)
    res = J.gradient_map(pr.stack, pr.params, pr.xs, loss="all", wrt="params", meta=pr.config)
    for key in ("cell", "layers", "steps", "hidden_size", "batch", "seed", "init", "loss", "wrt",
                "dtype", "readout_seed"):
        assert key in res.config
    assert res.config["seed"] == 5 and res.config["dtype"] == "float32"
    path = res.save(tmp_path / "map")
    back = Result.load(path)
    assert back.kind == "gradient_map" and back.config == res.config
    np.testing.assert_array_equal(back.values, res.values)


def test_deterministic():
    a = gradflow.problem("lstm", layers=2, steps=3, hidden=4, batch=2, seed=1)
    b = gradflow.problem("lstm", layers=2, steps=3, hidden=4, batch=2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ra = J.gradient_map(a.stack, a.params, a.xs)
        rb = J.gradient_map(b.stack, b.params, b.xs)
    np.testing.assert_array_equal(ra.values, rb.values)


def test_jacobian_map_config_keeps_the_stacks_norm_and_the_problems_seed():
    """The map's norm and probe seed are its own keys: the stack's norm ("layer") and the
    problem's seed survive, with or without meta, and meta cannot overwrite how the map was
    measured."""
    pr = gradflow.problem("lstm", layers=2, steps=3, hidden=4, batch=2, seed=3,
                          stack_options={"norm": "layer"})
    for meta in (None, pr.config):
        res = J.jacobian_map(pr.stack, pr.params, pr.xs, method="probe", probes=4, seed=7,
                             meta=meta)
        c = res.config
        assert (c["norm"], c["jacobian_norm"], c["probe_seed"], c["method"]) == (
            "layer", "rms", 7, "probe")
        assert c.get("seed") == (3 if meta else None)
    exact = J.jacobian_map(pr.stack, pr.params, pr.xs, norm="spectral", meta=pr.config)
    assert exact.config["jacobian_norm"] == "spectral" and exact.config["probe_seed"] is None
    clash = J.gradient_map(pr.stack, pr.params, pr.xs, loss="all", meta={"loss": "last"})
    assert clash.config["loss"] == "all"  # the measurement's own setting wins over meta


@pytest.mark.parametrize("cell,wrt,modes", [("lstm", "hidden", ["rev", "fwd"]),
                                             ("lstm", "cell", ["rev"]), ("gru", "hidden", ["rev"]),
                                             ("star", "hidden", ["rev"])])
def test_maps_differentiate_exactly_in_params_and_inputs(cell, wrt, modes, x64):
    """A map is a function of the parameters and inputs like any other: jax.grad and jax.jvp
    of it (e.g. to tune an initialisation that flattens it) agree with finite differences.
    The state maps' fast backward holds the parameters constant; their derivatives come from
    the same map by plain autodiff (they were exact zeros, silently)."""
    stack, params, xs = make(cell)
    loss_fn = J.readout_loss("last", H, T, B, 0, xs.dtype)

    def f(p, x):
        return J.map_arrays(stack, p, x, loss_fn, wrt)[1]

    check_grads(f, (params, xs), order=1, modes=modes)
    g = jax.grad(lambda p: f(p, xs).sum())(params)
    assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree_util.tree_leaves(g["layers"][0]))
    # the value itself is still the fast path's
    np.testing.assert_allclose(f(params, xs), J.gradient_map(stack, params, xs,
                                                             wrt=wrt).values, rtol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "g_lstm"])
def test_state_gains_equal_whole_state_jacobians(cell, x64):
    """The state gain: the Jacobian of every state component one step on w.r.t. all of them,
    per example, from jax.jacrev of the cell's step on the concatenated (c, h); for an LSTM at
    init it exceeds the temporal gain (the memory path, f = 0.5, against h's 0.25)."""
    stack, params, xs = make(cell)
    res = J.local_gains(stack, params, xs)
    h = loop_stack(stack, params, xs)
    c = stack.cell
    for l in range(L):
        s = c.initial_state((B,), H, xs.dtype)
        x_in = xs if l == 0 else h[l - 1]
        for t in range(T):
            def step(flat, b):
                new = c.step(params["layers"][l], {"c": flat[:H], "h": flat[H:]}, x_in[b, t], t)[0]
                return jnp.concatenate([new["c"], new["h"]])
            js = [np.asarray(jax.jacrev(step)(jnp.concatenate([s["c"][b], s["h"][b]]), b))
                  for b in range(B)]
            np.testing.assert_allclose(res.state_rms[l, t],
                                       np.mean([np.linalg.norm(j) / np.sqrt(2 * H) for j in js]),
                                       rtol=1e-9)
            np.testing.assert_allclose(res.state_spectral[l, t],
                                       np.mean([np.linalg.norm(j, 2) for j in js]), rtol=1e-9)
            s, _, _ = c.step(params["layers"][l], s, x_in[:, t], t)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_local_gains_without_spectral_norms_are_the_same_rms_gains(cell):
    """``spectral=False`` leaves out the SVDs: the rms arrays, bit for bit those computed with
    them (float32, 64-bit JAX off), and no spectral array; the config says which."""
    with jax.enable_x64(False):
        stack, params, xs = make(cell, dtype="float32")
        both = J.local_gains(stack, params, xs)
        rms = J.local_gains(stack, params, xs, spectral=False)
    assert sorted(rms.arrays) == ["state_rms", "temporal_rms", "vertical_rms"]
    for k in rms.arrays:
        np.testing.assert_array_equal(rms[k], both[k], err_msg=k)
    assert rms.config["spectral"] is False and both.config["spectral"] is True
    # and the estimate leaves their work out: the FLOPs of the SVDs, nothing else
    from gradflow import cost

    full = cost.estimate(stack, B, T, method="gains", calibrate=False)
    lean = cost.estimate(stack, B, T, method="gains", calibrate=False, spectral=False)
    assert lean.total == full.total - 3 * L * T * 4 and lean.flops < full.flops
    assert lean.passes == "forward + one-step Jacobians"


def test_lstm_state_gain_is_near_the_maps_fade_in_time_as_the_readme_says():
    """README (residual section): at init a 16-layer LSTM's temporal gain is 0.25 (as low as
    the vertical one), its state gain RMS 0.56 / spectral 0.79, around the 0.65 per step by
    which its map's top layer fades back in time (geometric mean over the row)."""
    pr = gradflow.problem("lstm", layers=16, steps=16, hidden=32, batch=8, seed=0)
    g = gradflow.local_gains(pr.stack, pr.params, pr.xs)
    np.testing.assert_allclose(np.median(g.temporal_rms), 0.25, atol=0.005)
    np.testing.assert_allclose(np.median(g.state_rms), 0.56, atol=0.005)
    np.testing.assert_allclose(np.median(g.state_spectral), 0.79, atol=0.005)
    top = gradflow.gradient_map(pr.stack, pr.params, pr.xs, loss="last").values[-1]
    fade = np.exp(np.mean(np.log(top[:-1] / top[1:])))  # per step back in time
    np.testing.assert_allclose(fade, 0.65, atol=0.005)


def test_singular_values_hand_lapack_one_matrix_per_call(x64):
    """``linalg.singular_values`` equals NumPy's SVD (float64) at any batch shape and under
    nested ``vmap``s, and its lowered program hands LAPACK single matrices only
    (``num_batch_dims = "0"``): jaxlib 0.10.2's batched kernels block on XLA's thread pool
    and hung a 64-layer LSTM's local gains when two ran at once."""
    from gradflow import parallel
    from gradflow.linalg import singular_values
    x = np.random.default_rng(0).normal(size=(3, 2, 5, 4))
    want = np.linalg.svd(x, compute_uv=False)
    np.testing.assert_allclose(singular_values(jnp.asarray(x)), want, rtol=1e-12)
    nested = jax.jit(jax.vmap(jax.vmap(singular_values)))
    np.testing.assert_allclose(nested(jnp.asarray(x)), want, rtol=1e-12)
    text = nested.lower(jnp.asarray(x)).as_text()
    assert "@lapack_" in text and not parallel._batched_lapack(text)
    assert parallel._batched_lapack(jax.jit(lambda a: jnp.linalg.svd(
        a, compute_uv=False)).lower(jnp.asarray(x)).as_text())  # what it replaces


def test_spectral_programs_take_no_batched_lapack_call():
    """Local gains (an LSTM: vertical, temporal and state Jacobians, whose SVDs XLA runs side
    by side) and an exact spectral Jacobian map with spectra: no batched LAPACK call."""
    from gradflow import parallel
    pr = gradflow.problem("lstm", layers=2, steps=3, hidden=4, batch=2, input_size=3)
    gains = J._gains.lower(pr.stack, pr.params, pr.xs, 3, True).as_text()
    exact = J._exact_map.lower(pr.stack, pr.params, pr.xs, (1, 2), "spectral", ((0, 1),),
                               4).as_text()
    for text in (gains, exact):
        assert "@lapack_" in text and not parallel._batched_lapack(text)


def test_local_gains_of_a_64_layer_lstm_finish():
    """The case that hung (2-core Zen 4, jaxlib 0.10.2: two batched SVDs at once, each waiting
    for the pool): a fresh process finishes it well inside the time limit."""
    import subprocess
    import sys
    code = ("import gradflow\nfrom gradflow.problem import cell_problem\n"
            "p = cell_problem('lstm', layers=64, steps=4, hidden=32, batch=4, seed=0, "
            "init='orthogonal', input_scale=0.01)\n"
            "r = gradflow.local_gains(p.stack, p.params, p.xs)\n"
            "print(r.arrays['state_spectral'].shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "(64, 4)" in out.stdout, out.stderr[-2000:]


def test_singular_values_differentiate_as_jax_svd(x64):
    """Forward and reverse mode through ``linalg.singular_values`` (a custom JVP around the
    per-matrix SVDs; ``sequential_vmap`` alone has no reverse mode): equal to the derivative
    of ``jnp.linalg.svd``'s values and to finite differences (float64), also vmapped."""
    from gradflow.linalg import singular_values
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 3)))
    check_grads(singular_values, (x,), order=1, modes=("fwd", "rev"))
    check_grads(singular_values, (x,), order=2, modes=("fwd",))
    f = lambda a: jnp.sum(singular_values(a) ** 2 * jnp.arange(1.0, 4.0))  # noqa: E731
    g = lambda a: jnp.sum(jnp.linalg.svd(a, compute_uv=False) ** 2 * jnp.arange(1.0, 4.0))  # noqa
    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-10)
    np.testing.assert_allclose(jax.vmap(jax.grad(f))(x[None]), jax.grad(g)(x)[None], rtol=1e-10)


def test_spectra_at_names_each_position_once():
    """A position named twice (also as its negative index) was computed twice."""
    pr = gradflow.problem("lstm", layers=2, steps=3, hidden=4, batch=2)
    with pytest.raises(ValueError, match=r"spectra_at names \(layer, step\) \(1, 2\) twice"):
        gradflow.jacobian_map(*pr[:3], spectra_at=[(1, 2), (-1, -1)])


def test_float64_inputs_measured_in_float32_params_are_said(x64):
    """64-bit JAX on, float64 inputs, float32 parameters (Stack.init's default): the map runs
    in float32, which only config["dtype"] said; now a warning names the fix. Matching dtypes,
    and 32-bit JAX (where every float64 array is float32), say nothing."""
    stack = gradflow.Stack("lstm", 2, 3, 4)
    p32 = stack.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (2, 3, 3), jnp.float64)
    for measure in (J.gradient_map, J.jacobian_map, gradflow.gates.saturation):
        with pytest.warns(UserWarning, match=r"the inputs are float64, the parameters float32: "
                                             r".* give float64 parameters") as seen:
            res = measure(stack, p32, xs)
        assert seen[0].filename == __file__ and res.config["dtype"] == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        J.gradient_map(stack, stack.init(jax.random.key(0), jnp.float64), xs)
        J.gradient_map(stack, p32, xs.astype(jnp.float32))
