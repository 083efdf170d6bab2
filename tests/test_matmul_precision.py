"""Every matmul a map traces runs at the stack's ``matmul_precision``.

On a CPU, XLA computes float32 matmuls in float32 whatever the precision says, so the numbers
cannot tell; on GPUs and TPUs the default is a fast mode (TensorFloat-32, bfloat16 passes) that
changes them. The reference is therefore the compiled program's text: every ``dot_general`` of
the lowered map (forward, the hand-written and the autodiff-made backward steps, a user cell's
hoisted projection, the readout) carries the stack's precision, and none does with ``None``.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import gradflow
from gradflow import gates, parallel
from gradflow import jacobian as J
from gradflow import stack as S


def _user_gru(H=6):
    """A user's GRU as a plain step function (``from_function``; the bench's)."""
    from bench.suite import user_cell
    return user_cell(H)


def _problem(cell, precision, **kw):
    pr = gradflow.problem(cell, layers=3, steps=5, hidden=6, batch=4, seed=0, **kw)
    return pr._replace(stack=pr.stack.replace(matmul_precision=precision))


def _dots(text: str) -> tuple[int, int]:
    """``(dot_general ops, those marked HIGHEST)`` in a lowered program's StableHLO."""
    lines = [ln for ln in text.splitlines() if "dot_general" in ln and "=" in ln]
    return len(lines), sum(bool(re.search(r"precision = \[HIGHEST, HIGHEST\]", ln))
                           for ln in lines)


def _readout(pr, loss="last"):
    B, T, _ = pr.xs.shape
    return J.readout_loss(loss, pr.stack.hidden_size, T, B)


@pytest.mark.parametrize("cell", ["lstm", "star", "ur_lstm", "user"])
@pytest.mark.parametrize("wrt", ["h", "params"])
def test_every_dot_of_a_map_carries_the_stacks_precision(cell, wrt):
    # "highest" first, then None with the same cell and shapes: a per-cell cache (the user
    # cell's hoisted step is a traced jaxpr) must not hand one setting's matmuls to the other
    c = _user_gru() if cell == "user" else cell
    counts = {}
    for precision in ("highest", None):
        pr = _problem(c, precision)
        lf = _readout(pr)
        if wrt == "h":
            low = J._state_map_local.lower(pr.stack, pr.params, pr.xs, lf, "h")
        else:
            low = J._params_map.lower(pr.stack, pr.params, pr.xs, lf)
        counts[precision] = _dots(low.as_text())
    n, high = counts["highest"]
    assert n >= 4 and high == n, counts  # recurrent, projection, their transposes, readout
    assert counts[None][1] == 0, counts


def test_the_split_map_carries_the_stacks_precision():
    """The batch split's programs (``parallel._sharded_state_map``'s halves and the loss taken
    between them), over this process's devices (one in the test process: the same programs,
    a mesh of one)."""
    devices = jax.devices()[:2]
    for precision, want in (("highest", True), (None, False)):
        pr = _problem(_user_gru(), precision)
        mesh = Mesh(np.array(devices), (parallel.AXIS,))
        bufs, layout = parallel._replicate(pr.params, mesh)
        halves = parallel._sharded_state_map(pr.stack, "h", mesh, layout)
        xs = jax.device_put(pr.xs, NamedSharding(mesh, PartitionSpec(parallel.AXIS)))
        out, pull = halves.forward(bufs, xs)
        texts = [halves.forward.lower(bufs, xs).as_text(),
                 parallel._loss_and_cotangent.lower(_readout(pr), precision, out).as_text(),
                 halves.backward.lower(pull, out).as_text()]
        (n, high), (n_loss, high_loss), (n_back, high_back) = map(_dots, texts)
        assert n >= 2 and n_loss >= 1 and n_back >= 2, (n, n_loss, n_back)
        assert [high, high_loss, high_back] == ([n, n_loss, n_back] if want else [0, 0, 0]), (
            precision, texts)


def test_gate_statistics_and_local_gains_carry_the_stacks_precision():
    pr = _problem("lstm", "highest")
    texts = [gates._reduce.lower(pr.stack, pr.params, pr.xs, 0.05, 0.5, 10).as_text(),
             J._gains.lower(pr.stack, pr.params, pr.xs, 5).as_text()]
    for text in texts:
        n, high = _dots(text)
        assert n >= 1 and high == n, (n, high)


def test_stack_apply_and_a_users_own_gradient_carry_it():
    """Outside gradflow's measurements: ``Stack.apply`` and a user's ``jax.grad`` through it
    (the lean backward is traced where the user differentiates, outside ``apply``)."""
    pr = _problem(_user_gru(), "highest")

    def loss(taps):
        return jnp.sum(pr.stack.apply(pr.params, pr.xs, taps=taps,
                                      constant_params=True).top ** 2)

    zeros = {"h": jnp.zeros((3, 4, 5), jnp.float32)}
    n, high = _dots(jax.jit(jax.grad(loss)).lower(zeros).as_text())
    assert n >= 4 and high == n, (n, high)


def test_precision_is_in_the_config_and_bad_values_are_refused():
    st = gradflow.Stack("lstm", 2, 3, 4)
    assert st.matmul_precision == "highest" and st.config["matmul_precision"] == "highest"
    assert st.replace(matmul_precision="default").config["matmul_precision"] == "default"
    with pytest.raises(ValueError, match="valid: 'highest' \\(default\\), 'high', 'default'"):
        gradflow.Stack("lstm", 2, 3, 4, matmul_precision="tf32")


def test_the_setting_does_not_change_a_cpu_map():
    """On a CPU every mode computes float32: the maps are bit-for-bit equal."""
    if jax.default_backend() != "cpu":
        pytest.skip("on accelerators the fast modes differ by design")
    maps = [gradflow.gradient_map(pr.stack, pr.params, pr.xs).values
            for pr in (_problem("lstm", p) for p in ("highest", "default"))]
    np.testing.assert_array_equal(*maps)


def test_precision_scope():
    with S.precision_scope("high"):
        assert jax.config.jax_default_matmul_precision == "high"
    before = jax.config.jax_default_matmul_precision
    with S.precision_scope(None):
        assert jax.config.jax_default_matmul_precision == before
