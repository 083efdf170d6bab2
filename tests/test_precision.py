"""One problem at every precision: the same seed gives the same draws whatever the dtype.

Parameters, inputs, the readout and its labels, Jacobian probes and task samples are standard
variates drawn in float32 (the same bits whether 64-bit JAX is on or off) and cast; what is
computed from them (QR, affine maps, logs) is computed in the target dtype. So a float64 problem
is the float32 problem up to float32 rounding, and float32 vs float64 compares precision, not
randomness. References: the float32 draws themselves (cast), ``jax.random`` called directly,
and orthogonality checked in float64.
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import cells, tasks
from gradflow import sweep as S
from gradflow.cells import base

P = importlib.import_module("gradflow.problem")
J = importlib.import_module("gradflow.jacobian")
SIZES = dict(layers=4, steps=16, hidden=16, batch=4, seed=5)


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def _problem(cell, dtype, **kw):
    with P.precision(dtype):
        return P.problem(cell, **{**SIZES, **kw}, dtype=dtype)


@pytest.mark.parametrize("name", cells.names())
def test_every_cell_draws_the_same_parameters_at_both_precisions(name):
    p32, p64 = (_problem(name, dt, layers=2, steps=6, hidden=6, batch=2).params
                for dt in ("float32", "float64"))
    for a, b in zip(_leaves(p32), _leaves(p64)):
        assert a.dtype == np.float32 and b.dtype == np.float64
        # equal up to float32 rounding of what is computed from the draws (QR, log, exp)
        np.testing.assert_allclose(b, a, rtol=2e-6, atol=2e-6 * max(1.0, np.abs(a).max()))


def test_float32_draws_are_jax_random_and_float64_ones_are_their_casts():
    key, shape = jax.random.key(4), (5, 3)
    with jax.enable_x64(True):
        n64 = base.normal(key, shape, jnp.float64)
        u64 = base.uniform(key, shape, jnp.float64, -2.0, 3.0)
        q64 = np.asarray(base.orthogonal(key, (7, 3), jnp.float64))
    n32 = np.asarray(jax.random.normal(key, shape, jnp.float32))
    np.testing.assert_array_equal(np.asarray(n64), n32.astype(np.float64))
    np.testing.assert_array_equal(np.asarray(base.uniform(key, shape, jnp.float32, -2.0, 3.0)),
                                  np.asarray(jax.random.uniform(key, shape, jnp.float32, -2.0,
                                                                3.0)))
    u = np.asarray(jax.random.uniform(key, shape, jnp.float32)).astype(np.float64)
    np.testing.assert_allclose(np.asarray(u64), -2.0 + 5.0 * u, rtol=1e-15)
    # the float64 orthogonal block is orthogonal to float64 accuracy, and the float32 one's
    np.testing.assert_allclose(q64.T @ q64, np.eye(3), atol=1e-14)
    q32 = np.asarray(jax.nn.initializers.orthogonal()(key, (7, 3), jnp.float32))
    np.testing.assert_array_equal(np.asarray(base.orthogonal(key, (7, 3))), q32)
    np.testing.assert_allclose(q64, q32, atol=1e-6)


def test_float32_problem_does_not_depend_on_the_x64_flag():
    def draws():
        pr = P.problem("ur_lstm", **SIZES, stack_options={"input_projection": True},
                       input_size=3)
        w, labels = J.readout_loss("all", 16, 16, 4, seed=2).readout()
        v = base.normal(jax.random.key(9), (2, 4, 16), jnp.float32)
        return _leaves(pr.params) + [np.asarray(pr.xs), np.asarray(w), np.asarray(labels),
                                     np.asarray(v)]

    with jax.enable_x64(False):
        off = draws()
    with jax.enable_x64(True):
        on = draws()
    for a, b in zip(off, on):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_inputs_readout_and_labels_are_the_same_draws(x64):
    pr32, pr64 = _problem("lstm", "float32"), _problem("lstm", "float64")
    np.testing.assert_array_equal(np.asarray(pr64.xs), np.asarray(pr32.xs).astype(np.float64))
    w32, y32 = J.readout_loss("all", 16, 16, 4, 0, jnp.float32).readout()
    w64, y64 = J.readout_loss("all", 16, 16, 4, 0, jnp.float64).readout()
    assert w64.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(w64), np.asarray(w32), rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(y64), np.asarray(y32))
    # sweep builds its problems the same way
    params, xs = S.seed_problem(pr64.stack, 5, steps=16, batch=4, dtype=jnp.float64)
    np.testing.assert_array_equal(np.asarray(xs), np.asarray(pr64.xs))
    for a, b in zip(_leaves(params), _leaves(pr64.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("task,opts", [("adding", {"steps": 9}), ("copy", {"lag": 3}),
                                       ("counting", {"steps": 7})])
def test_task_samples_are_the_same_at_both_precisions(task, opts, x64):
    t = tasks.make(task, **opts)
    key = jax.random.key(3)
    a, b = t.sample_fn(key, 5, jnp.float32), t.sample_fn(key, 5, jnp.float64)
    for x32, x64_ in zip(a, b):
        np.testing.assert_allclose(np.asarray(x64_), np.asarray(x32).astype(np.float64),
                                   rtol=1e-7)


# Measured on these sizes: at most 9.4e-7 relative (rtol below leaves room for other CPUs).
MAP_CASES = [("lstm", "hidden", "last"), ("lstm", "cell", "all"), ("gru", "hidden", "all"),
             ("star", "params", "last"), ("ur_lstm", "hidden", "last"),
             ("g_lstm", "hidden", "all"), ("rnn", "params", "all")]


@pytest.mark.parametrize("cell,wrt,loss", MAP_CASES)
def test_float32_and_float64_maps_agree_at_the_same_seed(cell, wrt, loss):
    maps = {}
    for dt in ("float32", "float64"):
        pr = _problem(cell, dt)
        with P.precision(dt):
            maps[dt] = gradflow.gradient_map(pr.stack, pr.params, pr.xs, loss=loss, wrt=wrt)
    v32, v64 = maps["float32"].values, maps["float64"].values
    assert v32.dtype == np.float32 and v64.dtype == np.float64
    # positive where the loss reaches (a memory c at the last step does not reach it: exact 0)
    reach = np.broadcast_to(J.expected_positive(loss, wrt, v64.shape[1])["values"], v64.shape)
    assert np.all(v64[reach] > 0) and np.all(v64[~reach] == 0) and np.all(v32[~reach] == 0)
    assert maps["float32"].underflow == maps["float64"].underflow == {"values": 0}
    np.testing.assert_allclose(v32, v64, rtol=1e-5)
    np.testing.assert_allclose(maps["float32"].loss_value, maps["float64"].loss_value, rtol=1e-5)


def test_probe_jacobian_maps_use_the_same_probes():
    maps = {}
    for dt in ("float32", "float64"):
        pr = _problem("gru", dt)
        with P.precision(dt):
            maps[dt] = gradflow.jacobian_map(pr.stack, pr.params, pr.xs, method="probe",
                                             probes=4, seed=1)
    # with different probes the estimates would differ by about their standard error (~30%)
    np.testing.assert_allclose(maps["float32"].values, maps["float64"].values, rtol=1e-5)
    np.testing.assert_allclose(maps["float32"].stderr, maps["float64"].stderr, rtol=1e-3,
                               atol=1e-6 * maps["float64"].stderr.max())
