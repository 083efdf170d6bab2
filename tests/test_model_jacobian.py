"""gradflow.model_jacobian_map: the Jacobian map of a model of the user's own.

Checked against brute force (every state perturbed in a Python loop over the steps, the full
per-example Jacobians by jax.jacrev, rms norms by NumPy), against jacobian_map on a Stack written
by hand as such a model (exact, and the same Gaussian probes), and against a closed form in
float32 where the squares of the Jacobians' entries lie below the float range.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import plot
from gradflow.results import NonFiniteForwardWarning, NonFiniteWarning, load

from test_model_map import _dense_params, _layers, dense_model, scaled_layers

pytestmark = pytest.mark.child  # in-process work: the child lane runs it (tests/conftest.py)


def _brute_force(p, xs, target):
    """``J[l, t] = mean_b ||d y_target[b] / d h^l_t[b]||_F / sqrt(H)`` of the dense model: the
    states perturbed in a Python loop, jax.jacrev of the target output, norms by NumPy."""
    B, T, _ = xs.shape
    H = p["U0"].shape[0]

    def top(e):
        hs = (jnp.zeros((B, H), xs.dtype),) * 3
        for t in range(target + 1):
            hs = tuple(h + e[l][t] for l, h in enumerate(_layers(p, xs[:, t], hs)))
        return hs[2]  # (B, H): the output at the target step

    zeros = [[jnp.zeros((B, H), xs.dtype) for _ in range(T)] for _ in range(3)]
    jac = jax.jacrev(top)(zeros)  # jac[l][t]: (B, H_out, B, H_in)
    return np.array([[np.mean([np.linalg.norm(np.asarray(jac[l][t])[b, :, b]) / np.sqrt(H)
                               for b in range(B)]) for t in range(T)] for l in range(3)])


@pytest.mark.parametrize("target", [-1, 2])
def test_a_model_no_stack_expresses_equals_brute_force(target, x64):
    B, T, D, H = 3, 5, 2, 4
    p = _dense_params(jax.random.key(3), D, H, jnp.float64)
    xs = jax.random.normal(jax.random.key(4), (B, T, D), jnp.float64)
    got = gradflow.model_jacobian_map(dense_model, p, xs, layers=3, target=target)
    want = _brute_force(p, xs, target % T)
    np.testing.assert_allclose(got.values, want, rtol=1e-12, atol=0)
    assert got.values[2, target] == pytest.approx(1.0, rel=1e-14)  # the target: the identity
    assert (got.values[:, target % T + 1:] == 0).all()
    # this model taps a state after the layers above read it: h^0, h^1 of step T' reach only
    # later steps, their zeros counted (the map assumes every tapped state at or before T'
    # reaches it)
    assert (got.values[:2, target] == 0).all() and got.underflow == {"values": 2}
    assert got.target_finite.all() and got.config["target"] == target % T
    chunked = gradflow.model_jacobian_map(dense_model, p, xs, layers=3, target=target, chunk=3)
    np.testing.assert_allclose(chunked.values, got.values, rtol=1e-14)


STACK = gradflow.Stack("rnn", layers=3, input_size=3, hidden_size=[5, 4, 4])


def stack_by_hand(params, xs, taps):
    """STACK (tanh RNN layers of widths 5, 4, 4) written as a user's model, tapped per layer."""
    layers = [q["h"] for q in params["layers"]]

    def step(hs, inp):
        x, tap_t = inp
        new = []
        for l, (q, h) in enumerate(zip(layers, hs)):
            x = gradflow.tap(jnp.tanh(x @ q["W"] + q["b"] + h @ q["U"]), tap_t[l])
            new.append(x)
        return tuple(new), x

    h0 = tuple(jnp.zeros((xs.shape[0], w), xs.dtype) for w in STACK.widths)
    _, top = jax.lax.scan(step, h0, (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(taps, 0, 1)))
    return jnp.swapaxes(top, 0, 1)


def test_a_stack_written_as_a_model_gives_jacobian_map(x64):
    """Layers of three widths (the rms norm divides by each tapped state's own): exact, and the
    probe estimate with the same Gaussian probes (K = H of the top layer) and its error."""
    params = STACK.init(jax.random.key(0), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (4, 6, 3), jnp.float64)
    taps = jnp.zeros((3, 6, 4, 2), jnp.float64)
    np.testing.assert_allclose(stack_by_hand(params, xs, taps), STACK.apply(params, xs).top,
                               rtol=1e-12)  # the model is the stack
    got = gradflow.model_jacobian_map(stack_by_hand, params, xs, layers=3)
    want = gradflow.jacobian_map(STACK, params, xs)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-10)
    got = gradflow.model_jacobian_map(stack_by_hand, params, xs, layers=3, method="probe",
                                      probes=8, seed=5)
    want = gradflow.jacobian_map(STACK, params, xs, method="probe", probes=8, seed=5)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-10)
    np.testing.assert_allclose(got.stderr, want.stderr, rtol=1e-10)
    assert got.config["probes"] == 8 and got.config["probe_seed"] == 5


def test_float32_norms_do_not_underflow():
    """20 linear layers that scale a state by 0.02 each: the output's Jacobian w.r.t. the bottom
    state is 0.02^19 I = 5.2e-33 I, its entries' squares far below float32's range; the map holds
    the closed form ``J[l, T-1] = 0.02^(L-1-l)``."""
    assert not jax.config.jax_enable_x64
    L, B, T, H = 20, 2, 3, 4
    res = gradflow.model_jacobian_map(scaled_layers(L, T), jnp.float32(0.02),
                                      jnp.ones((B, T, H)), layers=L)
    assert res.values.dtype == np.float32
    np.testing.assert_allclose(res.values[:, -1], 0.02 ** np.arange(L - 1, -1, -1), rtol=1e-4)
    assert 0 < res.values[0, -1] < 1e-31
    assert (res.values[:, :-1] == 0).all()  # no step reads an earlier one: counted as underflow
    assert res.underflow == {"values": L * (T - 1)}


def batch_mixing(p, xs, taps):
    h = gradflow.tap(jnp.tanh(xs @ p), jnp.swapaxes(taps[0], 0, 1))
    return h - jnp.mean(h, axis=0)  # batch statistics: each example reads the others' states


def running_mix(p, xs, taps):
    h = gradflow.tap(jnp.tanh(xs @ p), jnp.swapaxes(taps[0], 0, 1))
    return jnp.cumsum(h, axis=0)  # a running statistic: later examples read the earlier ones


def centred_mixing(p, xs, taps):
    h = batch_mixing(p, xs, taps)
    return h - jnp.mean(h, axis=-1, keepdims=True)  # centred per example: equal weights cancel


def middle_mix(p, xs, taps):
    h = gradflow.tap(jnp.tanh(xs @ p), jnp.swapaxes(taps[0], 0, 1))
    return h.at[1].add(h[2])  # example 1 reads example 2 only


def test_a_model_that_mixes_examples_is_refused():
    xs = jax.random.normal(jax.random.key(0), (3, 4, 2))
    for model in (batch_mixing, running_mix, centred_mixing):  # (the last two were accepted:
        # only example 0's outputs were pulled back, with equal weights)
        with pytest.raises(ValueError, match="mixes the examples of a batch.*gradflow.model_map"):
            gradflow.model_jacobian_map(model, jnp.ones((2, 2)), xs, layers=1)
        with pytest.raises(ValueError, match="couples_batch=False, but one example's outputs "):
            gradflow.model_map(model, jnp.ones((2, 2)), xs, layers=1, couples_batch=False)
    with pytest.raises(ValueError, match="couples_batch=False, but one example's outputs "):
        gradflow.model_map(middle_mix, jnp.ones((2, 2)), xs, layers=1, couples_batch=False)
    # one example mixes nothing, but reads its own state minus itself: exactly 0 everywhere
    with pytest.raises(ValueError, match="every entry is exactly 0"):
        gradflow.model_jacobian_map(batch_mixing, jnp.ones((2, 2)), xs[:1], layers=1)


def exploding(p, xs, taps):
    return gradflow.tap(jnp.exp(1e3 * xs[..., :1]) * xs, jnp.swapaxes(taps[0], 0, 1))


def test_a_non_finite_target_leaves_its_examples_out_and_warns():
    xs = jnp.ones((3, 4, 2)).at[0].set(-1.0)  # example 0 stays finite, 1 and 2 overflow
    with pytest.warns(NonFiniteForwardWarning, match=r"output y\[:, 3\] is not finite in 2 of 3 "
                                                     r"examples \(1, 2; .*mean over the other 1"):
        res = gradflow.model_jacobian_map(exploding, None, xs, layers=1)
    assert res.target_finite.tolist() == [True, False, False]
    np.testing.assert_allclose(res.values, np.eye(4)[-1:], atol=0)  # example 0's: I at T' only
    with pytest.warns(NonFiniteWarning) as said:  # the forward's, and the result's count
        res = gradflow.model_jacobian_map(exploding, None, jnp.ones((2, 4, 2)), layers=1)
    assert any(w.category is NonFiniteForwardWarning and "every Jacobian that reaches it is NaN"
               in str(w.message) for w in said)
    assert np.isnan(res.values).all() and res.nonfinite["values"] == 4
    assert any(w.category is NonFiniteWarning and str(w.message).startswith(
        "model_jacobian_map: ") for w in said)


def test_a_model_that_taps_nothing_is_refused():
    """As :func:`gradflow.model_map`: a map of exact zeros would read as vanishing."""
    with pytest.raises(ValueError, match=r"passed no state through gradflow.tap.*y\[:, 4\]"):
        gradflow.model_jacobian_map(lambda p, xs, taps: jnp.tanh(xs @ p), jnp.ones((3, 4)),
                                    jnp.ones((4, 5, 3)), layers=2)


def test_result_is_drawn_and_saved(tmp_path):
    params = STACK.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (2, 4, 3))
    res = gradflow.model_jacobian_map(stack_by_hand, params, xs, layers=3,
                                      meta={"params": "mine"})
    assert res.kind == "jacobian_map" and res.values.shape == (3, 4) and res.total_underflow == 0
    fig = plot.heatmap(res)
    title = fig.axes[0].get_title()
    assert title.startswith("stack_by_hand") and "Jacobian (rms)" in title and "mine" in title
    back = load(res.save(tmp_path / "mine.npz"))
    np.testing.assert_array_equal(back.values, res.values)
    assert back.config == res.config and back.config["outputs"] == 4


def test_bad_input_gets_one_clear_message(monkeypatch):
    params, xs = STACK.init(jax.random.key(0)), jnp.ones((2, 4, 3))
    run = lambda **kw: gradflow.model_jacobian_map(stack_by_hand, params, xs,  # noqa: E731
                                                   **{"layers": 3, **kw})
    with pytest.raises(ValueError, match="target 4 is outside the 4 steps"):
        run(target=4)
    with pytest.raises(ValueError, match="target must be an integer output step, got 1.0"):
        run(target=1.0)
    with pytest.raises(ValueError, match="method"):
        run(method="jacrev")
    with pytest.raises(ValueError, match="probes must be an integer >= 2"):
        run(method="probe", probes=1)
    np.testing.assert_array_equal(run(method="probe", probes=np.int64(3)).values,  # (it said
                                  run(method="probe", probes=3).values)  # "an integer, got 3")
    with pytest.raises(ValueError, match="chunk"):
        run(chunk=0)
    with pytest.raises(ValueError, match="layers"):
        run(layers=0)
    with pytest.raises(ValueError, match=r"shape \(batch, steps, K\)"):
        gradflow.model_jacobian_map(lambda p, x, s: x[..., 0], 1.0, xs, layers=1)
    with pytest.raises(ValueError, match="NaN or inf"):
        gradflow.model_jacobian_map(stack_by_hand, params, xs.at[0, 0, 0].set(jnp.inf),
                                    layers=3)
    from gradflow import cost
    monkeypatch.setattr(cost, "available_memory", lambda device=None: 1000)
    with pytest.raises(ValueError, match=r"model_jacobian_map \(stack_by_hand, 3 layers x 4 steps"
                                         r", batch 2, 4 outputs, float32\) needs about .* more "
                                         r"than the 1000 bytes available"):
        run()


def test_tap_hands_back_the_norm_and_with_a_second_channel_the_width(x64):
    """``gradflow.tap``'s gradient: the cotangent's norm per example, and with ``s: (..., 2)``
    also the state's width; one example (``h: (H,)``, ``s: ()``) as a batch."""
    h = jnp.array([[3.0, 4.0, 0.0], [1e-30, 0.0, 0.0]], jnp.float64)
    w = jnp.array([1.0, 2.0, -2.0], jnp.float64)
    f = lambda s, h: jnp.sum(gradflow.tap(h, s) * h * w)  # noqa: E731  dL/dh = h * w
    np.testing.assert_allclose(jax.grad(f)(jnp.zeros(2), h), [np.sqrt(9 + 64), 1e-30])
    np.testing.assert_allclose(jax.grad(f)(jnp.zeros((2, 2)), h),
                               [[np.sqrt(9 + 64), 3], [1e-30, 3]])
    assert float(jax.grad(f)(0.0, h[0])) == pytest.approx(np.sqrt(73))
    np.testing.assert_allclose(jax.grad(f)(jnp.zeros(2), h[0]), [np.sqrt(73), 3])
    np.testing.assert_array_equal(gradflow.tap(h, jnp.zeros(2)), h)  # the identity


def _bidirectional(p, xs, add):
    """Layer 0 reads the inputs forward in time, layer 1 reads layer 0 backward; ``add(h, l,
    t)`` marks where each state leaves its layer (a tap, or a perturbation)."""
    B, T, _ = xs.shape
    h, low = jnp.zeros((B, 4), xs.dtype), []
    for t in range(T):
        h = add(jnp.tanh(xs[:, t] @ p["W0"] + h @ p["U0"]), 0, t)
        low.append(h)
    h, top = jnp.zeros((B, 4), xs.dtype), [None] * T
    for t in reversed(range(T)):
        h = add(jnp.tanh(low[t] @ p["W1"] + h @ p["U1"]), 1, t)
        top[t] = h
    return jnp.stack(top, 1)


def test_a_bidirectional_model_reaches_the_target_from_later_steps(x64):
    """States after the target step reach it through the backward layer: measured, equal to
    brute force, and shown."""
    B, T, D, H = 2, 5, 3, 4
    k = iter(jax.random.split(jax.random.key(7), 5))
    p = {n: jax.random.normal(next(k), (D if n == "W0" else H, H), jnp.float64) / 2
         for n in ("W0", "U0", "W1", "U1")}
    xs = jax.random.normal(next(k), (B, T, D), jnp.float64)
    model = lambda p, xs, taps: _bidirectional(  # noqa: E731
        p, xs, lambda h, l, t: gradflow.tap(h, taps[l, t]))
    got = gradflow.model_jacobian_map(model, p, xs, layers=2, target=2)

    def out(e):
        return _bidirectional(p, xs, lambda h, l, t: h + e[l][t])[:, 2]

    jac = jax.jacrev(out)([[jnp.zeros((B, H), jnp.float64)] * T for _ in range(2)])
    want = np.array([[np.mean([np.linalg.norm(np.asarray(jac[l][t])[b, :, b]) / 2
                               for b in range(B)]) for t in range(T)] for l in range(2)])
    np.testing.assert_allclose(got.values, want, rtol=1e-12, atol=0)
    assert (got.values[1, 3:] > 0).all() and (got.values[0, 3:] > 0).all()  # later steps reach
    # the backward layer's states before T' do not reach it: exact zeros, counted as underflow
    # (the map assumes every state at or before T' reaches it, as its docstring says)
    assert got.values[1, :2].max() == 0 and got.underflow == {"values": 2}
