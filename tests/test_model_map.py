"""gradflow.model_map: the hidden map of a model of the user's own, tapped with gradflow.tap.

Checked against gradient_map on a Stack written as such a model, against brute force (explicit
perturbations of every state in a Python loop over the steps, per-example norms by NumPy), and
against a closed form where float32 squares would underflow.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import plot
from gradflow.results import NonFiniteForwardWarning, NonFiniteWarning, load

STACK = gradflow.Stack(["gru", "star", "gru"], layers=3, input_size=3, hidden_size=[5, 4, 4],
                       residual=True, norm="layer")


def stack_model(params, xs, taps):
    """gradflow's own stack written as a user's model: its norm taps are gradflow.tap."""
    return STACK.apply(params, xs, taps={"h": jnp.swapaxes(taps, 1, 2)}).top


@pytest.mark.parametrize("loss", ["last", "all"])
def test_a_stack_as_a_model_gives_gradient_map(loss, x64):
    params = STACK.init(jax.random.key(0), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (4, 6, 3), jnp.float64)
    got = gradflow.model_map(stack_model, params, xs, layers=3, loss=loss, readout_seed=2)
    want = gradflow.gradient_map(STACK, params, xs, loss=loss, readout_seed=2)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-10)
    assert float(got.loss_value) == pytest.approx(float(want.loss_value), rel=1e-12)
    assert got.config["model"] == "stack_model" and got.config["layers"] == 3


def _dense_params(key, D, H, dtype):
    k = iter(jax.random.split(key, 8))
    m = lambda n, s: 0.6 * jax.random.normal(next(k), (n, H), dtype) / np.sqrt(n)  # noqa: E731
    return {"W0": m(D, 0), "U0": m(H, 0), "W1": m(H, 0), "U1": m(H, 0),
            "W2": m(2 * H, 0), "V2": m(D, 0), "U2": m(H, 0)}


def _layers(p, x, hs):
    """One step of a 3-layer tanh RNN no Stack expresses: layer 2 reads layers 0 and 1 (a
    dense connection) and the inputs (a skip); ``hs`` the previous states."""
    h0 = jnp.tanh(x @ p["W0"] + hs[0] @ p["U0"])
    h1 = jnp.tanh(h0 @ p["W1"] + hs[1] @ p["U1"])
    return h0, h1, jnp.tanh(jnp.concatenate([h0, h1], -1) @ p["W2"] + x @ p["V2"]
                            + hs[2] @ p["U2"])


def dense_model(p, xs, taps):
    """The user's model as they would scan it, one gradflow.tap per layer."""
    def step(hs, inp):
        x, tap_t = inp
        new = _layers(p, x, hs)
        new = tuple(gradflow.tap(h, tap_t[l]) for l, h in enumerate(new))
        return new, new[2]

    h = jnp.zeros((xs.shape[0], p["U0"].shape[0]), xs.dtype)
    _, top = jax.lax.scan(step, (h, h, h), (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(taps, 0, 1)))
    return jnp.swapaxes(top, 0, 1)


def test_a_model_no_stack_expresses_equals_brute_force(x64):
    """Perturbations ``e[l][t]`` added to every state in a Python loop over the steps (no scan,
    no tap), their gradients taken by jax.grad, per-example norms and batch means by NumPy."""
    B, T, D, H = 3, 5, 2, 4
    p = _dense_params(jax.random.key(3), D, H, jnp.float64)
    xs = jax.random.normal(jax.random.key(4), (B, T, D), jnp.float64)
    ys = jax.random.normal(jax.random.key(5), (B, H), jnp.float64)

    def loss(outputs):  # the user's own loss of the outputs
        return jnp.mean((outputs[:, -1] - ys) ** 2) + 0.1 * jnp.mean(outputs ** 2)

    def by_loop(e):
        hs, tops = (jnp.zeros((B, H)),) * 3, []
        for t in range(T):
            hs = tuple(h + e[l][t] for l, h in enumerate(_layers(p, xs[:, t], hs)))
            tops.append(hs[2])
        return loss(jnp.stack(tops, 1))

    zeros = [[jnp.zeros((B, H)) for _ in range(T)] for _ in range(3)]
    g = jax.grad(by_loop)(zeros)
    want = np.array([[np.mean(np.linalg.norm(np.asarray(g[l][t]), axis=-1)) for t in range(T)]
                     for l in range(3)])
    got = gradflow.model_map(dense_model, p, xs, layers=3, loss=loss)
    np.testing.assert_allclose(got.values, want, rtol=1e-12)
    assert got.underflow == {}  # a callable loss may leave states unread: nothing assumed


def scaled_layers(L, T):
    """A model of ``L`` linear layers, each but the first scaling its input by ``params`` (a
    scalar), over ``T`` steps that do not read each other; every state tapped."""
    def scaled(p, xs, taps):
        hs = []
        for t in range(T):
            h = xs[:, t]
            for l in range(L):
                h = gradflow.tap(p * h if l else h, taps[l, t])
            hs.append(h)
        return jnp.stack(hs, 1)
    return scaled


def test_float32_norms_do_not_underflow():
    """20 linear layers that scale a state by 0.02 each: the bottom layer's gradient is
    5e-33 of the top's, its square far below float32's range (1.2e-38); the map holds the
    closed form ``G[l, T-1] = ||w|| / B * 0.02^(L-1-l)`` under the loss
    ``sum_b w . h^{L-1}_{T-1}[b] / B``."""
    assert not jax.config.jax_enable_x64
    L, B, T, H = 20, 2, 3, 4
    w = jnp.arange(1.0, H + 1)
    scaled = scaled_layers(L, T)

    def loss(outputs):
        return jnp.sum(outputs[:, -1] @ w) / B

    res = gradflow.model_map(scaled, jnp.float32(0.02), jnp.ones((B, T, H)), layers=L, loss=loss)
    closed = np.linalg.norm(np.arange(1.0, H + 1)) / B * 0.02 ** np.arange(L - 1, -1, -1)
    assert res.values.dtype == np.float32
    np.testing.assert_allclose(res.values[:, -1], closed, rtol=1e-4)
    assert 0 < res.values[0, -1] < 1e-31 and (res.values[:, :-1] == 0).all()


def test_result_is_drawn_and_saved(tmp_path):
    params = STACK.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (2, 4, 3))
    res = gradflow.model_map(stack_model, params, xs, layers=3, meta={"params": "mine"})
    assert res.kind == "gradient_map" and res.values.shape == (3, 4) and res.total_underflow == 0
    fig = plot.heatmap(res)
    title = fig.axes[0].get_title()
    assert title.startswith("stack_model \u00b7 loss=last \u00b7 wrt=hidden\nL=3, T=4")
    assert "mine" in title
    back = load(res.save(tmp_path / "mine.npz"))
    np.testing.assert_array_equal(back.values, res.values)
    assert back.config == res.config


def test_a_request_larger_than_the_machine_is_refused_before_it_runs(monkeypatch):
    """XLA's own memory analysis of the compiled map against the memory available."""
    from gradflow import cost
    params, xs = STACK.init(jax.random.key(0)), jnp.ones((2, 4, 3))
    monkeypatch.setattr(cost, "available_memory", lambda device=None: 1000)
    with pytest.raises(ValueError, match=r"model_map \(stack_model, 3 layers x 4 steps, batch 2, "
                                         r"float32\) needs about .* more than the 1000 bytes "
                                         r"available: give fewer examples or steps"):
        gradflow.model_map(stack_model, params, xs, layers=3)
    monkeypatch.undo()
    assert gradflow.model_map(stack_model, params, xs, layers=3).values.shape == (3, 4)


def test_one_compile_per_matmul_precision(x64):
    """The compiled map is cached per model and shapes, and per matmul precision: a call inside
    jax.default_matmul_precision compiles its own program instead of reusing one compiled
    outside it (as jax.jit's cache keys on it)."""
    from gradflow import cost
    params = STACK.init(jax.random.key(0), jnp.float64)
    xs = jnp.ones((2, 4, 3), jnp.float64)
    cost._compile.cache_clear()
    plain = gradflow.model_map(stack_model, params, xs, layers=3)
    with jax.default_matmul_precision("highest"):
        highest = gradflow.model_map(stack_model, params, xs, layers=3)
    assert cost._compile.cache_info().misses == 2
    gradflow.model_map(stack_model, params, xs, layers=3)
    assert cost._compile.cache_info().hits == 1
    np.testing.assert_allclose(plain.values, highest.values, rtol=1e-12)  # CPU: float64 both


def untapped(params, xs, taps):
    return xs * params


def test_bad_input_gets_one_clear_message():
    xs = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match="passed no state through gradflow.tap"):
        gradflow.model_map(untapped, 1.0, xs, layers=1)
    with pytest.raises(ValueError, match="layers"):
        gradflow.model_map(untapped, 1.0, xs, layers=0)
    with pytest.raises(ValueError, match=r"\(batch, steps, features\)"):
        gradflow.model_map(untapped, 1.0, jnp.ones((2, 3)), layers=1)
    with pytest.raises(ValueError, match="one example, one step and one feature"):
        gradflow.model_map(untapped, 1.0, jnp.ones((2, 3, 0)), layers=1)
    with pytest.raises(TypeError, match="inputs must be floating point, got dtype int32"):
        gradflow.model_map(untapped, 1.0, jnp.ones((2, 3, 4), jnp.int32), layers=1)
    with pytest.raises(ValueError, match="NaN or inf"):
        gradflow.model_map(untapped, 1.0, xs.at[0, 0, 0].set(jnp.nan), layers=1)
    with pytest.raises(ValueError, match=r"shape \(batch, steps, K\) = \(2, 3, K\), got \(2, 3\)"):
        gradflow.model_map(lambda p, x, s: x[..., 0], 1.0, xs, layers=1)
    with pytest.raises(ValueError, match="model.*failed: .*boom"):
        gradflow.model_map(lambda p, x, s: (_ for _ in ()).throw(RuntimeError("boom")), 1.0, xs,
                           layers=1)
    with pytest.raises(ValueError, match="unknown loss|valid"):
        gradflow.model_map(stack_model, STACK.init(jax.random.key(0)), jnp.ones((2, 3, 3)),
                           layers=3, loss="first")
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(lambda x: gradflow.model_map(untapped, 1.0, x, layers=1).values)(xs)
    # a PyTorch tensor (its dtype is not NumPy's): say how to pass it
    tensor = type("Tensor", (), {"__module__": "torch", "shape": (2, 3, 4),
                                 "dtype": "torch.float32"})()
    with pytest.raises(TypeError, match=r"got a Tensor of PyTorch: pass xs.detach\(\)"):
        gradflow.model_map(untapped, 1.0, tensor, layers=1)
    with pytest.raises(TypeError, match="couples_batch must be True or False"):
        gradflow.model_map(stack_model, STACK.init(jax.random.key(0)), jnp.ones((2, 3, 3)),
                           layers=3, couples_batch="no")


def exploding(params, xs, taps):
    return gradflow.tap(jnp.exp(1e3 * xs[..., :1]) * xs, jnp.swapaxes(taps[0], 0, 1))


def test_an_exploding_forward_gives_nan_and_warns():
    xs = jnp.ones((2, 3, 4))
    with pytest.warns(NonFiniteWarning) as said:  # the forward's, and the result's count
        res = gradflow.model_map(exploding, None, xs, layers=1)
    assert any(w.category is NonFiniteForwardWarning and "forward pass left the finite numbers"
               in str(w.message) for w in said)
    assert np.isnan(res.values).all() and res.nonfinite["values"] == 3
    # the result's count names the function called, not the result's kind
    assert any(w.category is NonFiniteWarning and str(w.message).startswith("model_map: ")
               for w in said)


def test_an_equinox_module_with_static_leaves_is_its_params(x64):
    """An Equinox module as ``params``: its weights traced, its activation function and Python
    number held static (as eqx.filter_jit does); the map equals the same model with a dict."""
    eqx = pytest.importorskip("equinox")  # in the dev extras: present wherever the suite runs

    class Dense(eqx.Module):
        p: dict
        act: object
        gain: float

        def __call__(self, xs, taps):
            scaled = {k: self.gain * v for k, v in self.p.items()}
            return self.act(dense_model(scaled, xs, taps))

    p = _dense_params(jax.random.key(3), 2, 4, jnp.float64)
    xs = jax.random.normal(jax.random.key(4), (3, 5, 2), jnp.float64)
    module = Dense(p, jax.nn.tanh, 1.5)
    got = gradflow.model_map(lambda m, xs, taps: m(xs, taps), module, xs, layers=3, loss="all")
    want = gradflow.model_map(
        lambda q, xs, taps: jnp.tanh(dense_model({k: 1.5 * v for k, v in q.items()}, xs, taps)),
        p, xs, layers=3, loss="all")
    np.testing.assert_allclose(got.values, want.values, rtol=1e-12)
    traced = jax.tree_util.tree_leaves(gradflow.checks.split_static(module)[0])
    assert len(traced) == len(p) and all(a is b for a, b in zip(traced, jax.tree.leaves(p)))
    with pytest.raises(TypeError, match=r"params\['s'\] is a set, neither an array nor hashable"):
        gradflow.model_map(untapped, {"s": {1}, "w": jnp.ones(())}, jnp.ones((2, 3, 4)),
                           layers=1)


def test_a_flax_nnx_module_is_its_params(x64):
    """A Flax NNX module (a pytree) as ``params`` gives the map of its functional form
    (``nnx.split``'s state, merged inside the model)."""
    nnx = pytest.importorskip("flax.nnx")  # in the dev extras: present wherever the suite runs

    class Two(nnx.Module):
        def __init__(self, rngs):
            self.c0 = nnx.GRUCell(3, 6, rngs=rngs, param_dtype=jnp.float64)
            self.c1 = nnx.GRUCell(6, 6, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, xs, taps):
            def step(hs, inp):
                x, tap_t = inp
                h0 = gradflow.tap(self.c0(hs[0], x)[0], tap_t[0])
                h1 = gradflow.tap(self.c1(hs[1], h0)[0], tap_t[1])
                return (h0, h1), h1
            h = jnp.zeros((xs.shape[0], 6), xs.dtype)
            _, top = jax.lax.scan(step, (h, h), (xs.swapaxes(0, 1), taps.swapaxes(0, 1)))
            return top.swapaxes(0, 1)

    module = Two(nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(1), (3, 5, 3), jnp.float64)
    got = gradflow.model_map(lambda m, xs, taps: m(xs, taps), module, xs, layers=2)
    graphdef, state = nnx.split(module)
    want = gradflow.model_map(lambda s, xs, taps: nnx.merge(graphdef, s)(xs, taps), state, xs,
                              layers=2)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-12)
    assert (got.values > 0).all()


def two_layer_tanh(params, xs, taps):
    """Two tanh layers, each tapped at every step: ``taps[0]``, ``taps[1]``."""
    h_in = jnp.swapaxes(xs, 0, 1)
    for l in range(2):
        def step(c, inp, W=params[l]):
            x, s = inp
            c = gradflow.tap(jnp.tanh(x @ W + c @ W), s)
            return c, c
        _, h_in = jax.lax.scan(step, jnp.zeros((xs.shape[0], W_SIZE)), (h_in, taps[l]))
    return jnp.swapaxes(h_in, 0, 1)


W_SIZE = 4


@pytest.mark.parametrize("measure", ["model_map", "model_jacobian_map"])
def test_layers_must_count_the_tapped_layers(measure):
    """``layers`` fewer than the model taps (JAX clamps ``taps[1]`` onto ``taps[0]``: the
    row added both layers' norms) or more (a row of zeros counted as underflow) is refused,
    naming the row; the right count measures."""
    fn = getattr(gradflow, measure)
    params = [jnp.eye(W_SIZE) * 0.5] * 2
    xs = jax.random.normal(jax.random.key(0), (2, 3, W_SIZE))
    with pytest.raises(ValueError, match=r"passes taps\[0, 0\] through gradflow.tap 2 times: "
                                         r"it taps more layers than layers=1"):
        fn(two_layer_tanh, params, xs, layers=1)
    with pytest.raises(ValueError, match=r"never passes taps\[2\] through gradflow.tap to its "
                                         r"outputs \(rows \[2\] of 3\): give layers=2"):
        fn(two_layer_tanh, params, xs, layers=3)
    assert fn(two_layer_tanh, params, xs, layers=2).values.shape == (2, 3)


def test_untapped_entries_are_not_underflow():
    """A model tapping its top layer at even steps only: those entries read 0 and are not
    counted as underflow (they were); the tapped ones equal the fully tapped model's."""
    def sparse(params, xs, taps):
        h_in, W = jnp.swapaxes(xs, 0, 1), params
        for l in range(2):
            c, hs = jnp.zeros((xs.shape[0], W_SIZE)), []
            for t in range(xs.shape[1]):
                c = jnp.tanh(h_in[t] @ W + c @ W)
                if l == 0 or t % 2 == 0:
                    c = gradflow.tap(c, taps[l, t])
                hs.append(c)
            h_in = jnp.stack(hs)
        return jnp.swapaxes(h_in, 0, 1)
    xs = jax.random.normal(jax.random.key(0), (2, 3, W_SIZE))
    res = gradflow.model_map(sparse, jnp.eye(W_SIZE) * 0.5, xs, layers=2)
    full = gradflow.model_map(two_layer_tanh, [jnp.eye(W_SIZE) * 0.5] * 2, xs, layers=2)
    assert res.values[1, 1] == 0 and res.underflow["values"] == 0
    keep = np.array([[1, 1, 1], [1, 0, 1]], bool)
    np.testing.assert_allclose(res.values[keep], full.values[keep], rtol=1e-6)


def batch_normalised(params, xs, taps):
    """One tanh layer whose states are normalised over the batch: it mixes the examples."""
    def step(c, inp):
        x, s = inp
        h = jnp.tanh(x @ params + c @ params)
        h = gradflow.tap((h - h.mean(axis=0)) / (h.std(axis=0) + 1.0), s)
        return h, h
    _, hs = jax.lax.scan(step, jnp.zeros((xs.shape[0], W_SIZE)),
                         (jnp.swapaxes(xs, 0, 1), taps[0]))
    return jnp.swapaxes(hs, 0, 1)


def test_couples_batch_false_is_checked():
    """A model normalising over the batch declared ``couples_batch=False`` would be split into
    a different model: refused (it was trusted); the independent model measures."""
    xs = jax.random.normal(jax.random.key(0), (4, 3, W_SIZE))
    w = jnp.eye(W_SIZE) * 0.5
    with pytest.raises(ValueError, match="couples_batch=False, but one example's outputs "
                                         "depend on another's inputs"):
        gradflow.model_map(batch_normalised, w, xs, layers=1, couples_batch=False)
    assert gradflow.model_map(batch_normalised, w, xs, layers=1).values.shape == (1, 3)
    res = gradflow.model_map(two_layer_tanh, [w, w], xs, layers=2, couples_batch=False)
    assert res.values.shape == (2, 3)


def test_a_layer_the_outputs_never_read_is_named_as_such():
    """A model computing and tapping a layer whose states its outputs never use was told
    it "never passes taps[1] through gradflow.tap": it does, and the message says both."""
    def layer(W, h_in, taps_l):
        def step(c, inp):
            x, s = inp
            c = gradflow.tap(jnp.tanh(x @ W + c @ W), s)
            return c, c
        return jax.lax.scan(step, jnp.zeros((h_in.shape[1], W_SIZE)), (h_in, taps_l))[1]

    def dead_top(params, xs, taps):
        bottom = layer(params[0], jnp.swapaxes(xs, 0, 1), taps[0])  # tapped, read
        layer(params[1], bottom, taps[1])  # tapped, never read by the outputs
        return jnp.swapaxes(bottom, 0, 1)
    with pytest.raises(ValueError, match=r"never passes taps\[1\] through gradflow.tap to its "
                                         r"outputs .* no gradient to measure"):
        gradflow.model_map(dead_top, [jnp.eye(W_SIZE) * 0.5] * 2,
                           jnp.ones((2, 3, W_SIZE)), layers=2)


@pytest.mark.parametrize("couples_batch", [True, False])
def test_a_model_map_too_big_is_refused_before_the_model_runs(monkeypatch, couples_batch):
    """The memory check comes first: with couples_batch=False the coupling check ran the model
    on three examples at full length, and the tap counts ran, before the refusal (16 layers x
    3000 steps, H 1024: two minutes and 1.9 GB, then "needs 6.48 GiB"). The model's step
    reports each run (jax.debug.callback, which tracing does not call): none before it."""
    from gradflow import cost

    runs = []

    def model(w, xs, taps):
        def step(h, inp):
            x, s = inp
            jax.debug.callback(lambda: runs.append(1))
            h = gradflow.tap(jnp.tanh(x @ w + h @ w), s[0])
            return h, h
        _, ys = jax.lax.scan(step, jnp.zeros((xs.shape[0], 3)),
                             (xs.swapaxes(0, 1), taps.swapaxes(0, 1)))
        return ys.swapaxes(0, 1)

    w, xs = jnp.eye(3) / 2, jnp.ones((4, 5, 3))
    monkeypatch.setattr(cost, "available_memory", lambda device=None: 1000)
    with pytest.raises(ValueError, match=r"model_map \(model, 1 layers x 5 steps, batch 4, "
                                         r"float32\) needs about .* more than the 1000 bytes"):
        gradflow.model_map(model, w, xs, layers=1, couples_batch=couples_batch)
    assert runs == []
    with pytest.raises(ValueError, match=r"model_jacobian_map \(model, 1 layers x 5 steps, "
                                         r"batch 4, 3 outputs, float32\) needs about .* more "
                                         r"than the 1000 bytes"):
        gradflow.model_jacobian_map(model, w, xs, layers=1)
    assert runs == []
    monkeypatch.undo()
    res = gradflow.model_map(model, w, xs, layers=1, couples_batch=couples_batch)
    assert runs and np.all(res.values[0] > 0)


def test_a_model_map_too_big_names_the_batch_and_steps_that_fit(monkeypatch):
    """The model functions' refusal said "give fewer examples or steps" without a number; it
    names about the batch and the steps that fit, the need (XLA's count of the compiled map)
    less the parameters' bytes taken as proportional to each: 3/4 of it available here, 2 of 4
    examples (3 would need 3/4 of it and the parameters), 3 of 5 steps."""
    from gradflow import cost

    def model(w, xs, taps):
        def step(h, inp):
            x, s = inp
            h = gradflow.tap(jnp.tanh(x @ w + h @ w), s)
            return h, h
        _, ys = jax.lax.scan(step, jnp.zeros((xs.shape[0], 3)),
                             (xs.swapaxes(0, 1), taps[0]))
        return ys.swapaxes(0, 1)

    w, xs = jnp.eye(3) / 2, jnp.ones((4, 5, 3))
    needs, check = [], cost.check_need
    monkeypatch.setattr(cost, "check_need", lambda need, what, smaller: needs.append(need))
    gradflow.model_map(model, w, xs, layers=1)
    monkeypatch.setattr(cost, "check_need", check)
    monkeypatch.setattr(cost, "available_memory", lambda device=None: needs[0] * 3 // 4)
    with pytest.raises(ValueError, match=r"needs about .*: give fewer examples or steps \(about "
                                         r"batch 2 or 3 steps would fit\), or checkpoint your "
                                         r"scan"):
        gradflow.model_map(model, w, xs, layers=1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_a_model_of_16_bit_inputs_and_weights_is_measured_in_float32(dtype):
    """A model whose inputs, weights and states are all 16-bit: its taps were made in the
    inputs' dtype and both maps failed at the end ("underflow is counted in floating arrays,
    got bfloat16"). The taps are float32 at least (checks.tap_dtype): the map equals the norms
    of jax.grad w.r.t. a perturbation of each state, the model computing as it does."""
    B, T, H = 3, 4, 5
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    p = {"W": jax.random.normal(k1, (H, H)).astype(dtype),
         "U": (jax.random.normal(k2, (H, H)) / 2).astype(dtype)}
    xs = jax.random.normal(k3, (B, T, H)).astype(dtype)

    def model(p, xs, taps, eps=None):
        def step(h, inp):
            x, s, e = inp
            h = gradflow.tap(jnp.tanh(x @ p["W"] + h @ p["U"]) + e, s)
            return h, h
        e = jnp.zeros((T, B, H), dtype) if eps is None else eps
        _, ys = jax.lax.scan(step, jnp.zeros((B, H), dtype),
                             (xs.swapaxes(0, 1), taps[0], e))
        return ys.swapaxes(0, 1)

    def loss(out):
        return jnp.sum(out.astype(jnp.float32) ** 2) / 2

    res = gradflow.model_map(model, p, xs, layers=1, loss=loss)
    assert res.values.dtype == np.float32 and res.config["dtype"] == jnp.dtype(dtype).name
    g = jax.grad(lambda e: loss(model(p, xs, jnp.zeros((1, T, B)), e)))(
        jnp.zeros((T, B, H), dtype))
    brute = np.linalg.norm(np.asarray(g, np.float32), axis=-1).mean(axis=1)
    np.testing.assert_allclose(res.values[0], brute, rtol=1e-2)
    for method in ("exact", "probe"):
        jac = gradflow.model_jacobian_map(model, p, xs, layers=1, method=method)
        assert jac.values.dtype == np.float32 and np.isfinite(jac.values).all()
    assert jac.values[0, -1] == pytest.approx(1, abs=0.2)  # the target itself: 1 (probes)
    exact = gradflow.model_jacobian_map(model, p, xs, layers=1)
    assert exact.values[0, -1] == pytest.approx(1, rel=1e-2)


def test_a_model_with_bfloat16_states_is_measured_in_the_taps_dtype():
    """A model computing in bfloat16 from float32 inputs: the tap handed its bfloat16 norm
    to float32 taps and the map failed ("underflow is counted in floating arrays, got
    bfloat16"). The norm of the bfloat16 gradient is summed in float32, the taps' dtype,
    equal to that of jax.grad w.r.t. a perturbation of each state."""
    B, T, H = 3, 4, 5
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    p = {"W": jax.random.normal(k1, (H, H)), "U": jax.random.normal(k2, (H, H)) / 2}
    xs = jax.random.normal(k3, (B, T, H))

    def model(p, xs, taps, eps=None):
        def step(h, inp):
            x, s, e = inp
            h = gradflow.tap(jnp.tanh(x.astype(jnp.bfloat16) @ p["W"].astype(jnp.bfloat16)
                                      + h @ p["U"].astype(jnp.bfloat16)) + e, s[0])
            return h, h.astype(jnp.float32)
        e = jnp.zeros((T, B, H), jnp.bfloat16) if eps is None else eps
        _, ys = jax.lax.scan(step, jnp.zeros((B, H), jnp.bfloat16),
                             (xs.swapaxes(0, 1), taps.swapaxes(0, 1), e))
        return ys.swapaxes(0, 1)

    res = gradflow.model_map(model, p, xs, layers=1, loss=lambda out: jnp.sum(out ** 2) / 2)
    assert res.values.dtype == np.float32
    g = jax.grad(lambda e: jnp.sum(model(p, xs, jnp.zeros((1, T, B)), e) ** 2) / 2)(
        jnp.zeros((T, B, H), jnp.bfloat16))
    brute = np.linalg.norm(np.asarray(g, np.float32), axis=-1).mean(axis=1)  # g: (T, B, H)
    # (each program rounds its bfloat16 backward in its own order: 8 bits, 4e-3)
    np.testing.assert_allclose(res.values[0], brute, rtol=1e-2)
    jac = gradflow.model_jacobian_map(model, p, xs, layers=1)
    assert jac.values.dtype == np.float32 and np.isfinite(jac.values).all()


def test_readme_chunked_checkpoint_recipe_gives_the_same_map_in_less_memory(run_readme_block):
    """README's recipe for a long sequence through your own scan (chunks of steps, each in
    ``jax.checkpoint``): the map equals the same model scanned step by step, and the gradient's
    compiled program needs less scratch memory (XLA's own count)."""
    ns = run_readme_block("def long_model")
    model, p, xs, res = ns["long_model"], ns["p"], ns["xs"], ns["res"]
    assert res.values.shape == (1, 1000) and res.underflow["values"] == 0
    whole = gradflow.model_map(lambda p, xs, taps: model(p, xs, taps, chunk=xs.shape[1]), p, xs,
                               layers=1, loss="all")
    np.testing.assert_allclose(res.values, whole.values, rtol=1e-6)

    def scratch(chunk):
        taps = jnp.zeros((1,) + xs.shape[1::-1])
        grad = jax.jit(jax.grad(lambda p: model(p, xs, taps, chunk=chunk).sum()))
        return grad.lower(p).compile().memory_analysis().temp_size_in_bytes

    assert scratch(50) < scratch(1000) / 4
