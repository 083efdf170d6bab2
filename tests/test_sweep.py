"""gradflow.sweep against per-seed problem() + gradient_map, on one and on four devices.

The reference for every (cell, seed) is the unvectorised path: ``gradflow.problem(seed=s)``
followed by ``gradflow.gradient_map`` (itself checked against brute-force loops and finite
differences in test_jacobian.py). Four CPU devices are simulated in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``; its maps must equal the single-device
ones and must have been computed sharded over the four devices.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import sweep as S
from test_parallel import exchanges

# the in-process tests: the child lane runs them (those with a background job stay here)
pytestmark = pytest.mark.child

SIZES = dict(layers=3, steps=5, hidden=6, batch=2)
SEEDS = [0, 3, 11]


def reference(cell, seed, wrt, loss="last", dtype="float64"):
    pr = gradflow.problem(cell, seed=seed, dtype=dtype, **SIZES)
    return gradflow.gradient_map(pr.stack, pr.params, pr.xs, loss=loss, wrt=wrt)


@pytest.mark.parametrize("wrt,loss", [("hidden", "last"), ("params", "all"), ("cell", "all")])
def test_sweep_equals_per_seed_gradient_map(wrt, loss, x64):
    out = S.sweep(["lstm", "gru"] if wrt != "cell" else ["lstm"], SEEDS, wrt=wrt,
                               loss=loss, dtype="float64", **SIZES)
    for cell, res in out.items():
        assert res.values.shape == (len(SEEDS), SIZES["layers"], SIZES["steps"])
        assert res.config["seeds"] == SEEDS and res.config["wrt"] == wrt
        for i, seed in enumerate(SEEDS):
            ref = reference(cell, seed, wrt, loss)
            np.testing.assert_allclose(res.values[i], ref.values, rtol=1e-12, atol=0)
            np.testing.assert_allclose(res.loss_value[i], ref.loss_value, rtol=1e-12)
        # different seeds give different maps (the seed really reaches params and inputs)
        assert not np.allclose(res.values[0], res.values[1])


def test_sweep_float32_and_callable_loss():
    loss = lambda outs: jnp.mean(outs[:, -1] ** 2)  # noqa: E731
    res = S.sweep("rnn", [1, 2], dtype="float32", loss=loss, **SIZES)["rnn"]
    assert res.values.dtype == np.float32
    for i, seed in enumerate([1, 2]):
        ref = reference("rnn", seed, "hidden", loss, "float32")
        np.testing.assert_allclose(res.values[i], ref.values, rtol=1e-6)


def test_sweep_keys_each_cell_at_its_options_by_the_text_given(x64):
    """The same cell at two settings (was: one result kept, the other computed and dropped)."""
    out = S.sweep(["lstm", "lstm:forget_bias=1.0"], [0, 5], dtype="float64", **SIZES)
    assert list(out) == ["lstm", "lstm:forget_bias=1.0"]
    assert out["lstm:forget_bias=1.0"].config["forget_bias"] == 1.0
    for i, seed in enumerate([0, 5]):
        pr = gradflow.problem("lstm", seed=seed, dtype="float64", forget_bias=1.0, **SIZES)
        ref = gradflow.gradient_map(pr.stack, pr.params, pr.xs)
        np.testing.assert_allclose(out["lstm:forget_bias=1.0"].values[i], ref.values,
                                   rtol=1e-12)
    assert not np.allclose(out["lstm"].values, out["lstm:forget_bias=1.0"].values)


def test_seed_problem_matches_problem(x64):
    pr = gradflow.problem("lstm", seed=7, dtype="float64", input_scale=0.5, **SIZES)
    params, xs = jax.jit(lambda s: S.seed_problem(pr.stack, s, steps=SIZES["steps"],
                                                   batch=SIZES["batch"], dtype=jnp.float64,
                                                   input_scale=0.5))(jnp.int32(7))
    np.testing.assert_array_equal(xs, pr.xs)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(pr.params)):
        np.testing.assert_array_equal(a, b)


FOUR_DEVICES = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    from gradflow import Stack
    from gradflow.sweep import sweep, sweep_arrays
    sizes = json.loads(sys.argv[2])
    res = sweep(["lstm", "star"], [0, 3, 11, 4, 5], dtype="float64", **sizes)
    _, maps = sweep_arrays(Stack("lstm", sizes["layers"], sizes["hidden"], sizes["hidden"]),
                           list(range(8)), steps=sizes["steps"], batch=sizes["batch"])
    np.savez(sys.argv[1], lstm=res["lstm"].values, star=res["star"].values,
             n_devices=len(jax.devices()), used=res["lstm"].config["devices"],
             shards=[s.data.shape[0] for s in maps.addressable_shards],
             shard_devices=len({s.device for s in maps.addressable_shards}))
""")


def _four_devices(env):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "four.npz")
        # the child compiles with this process's other flags (the suite's optimisation level),
        # so its maps can equal this process's to the last bit
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        env = {**env, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=4".strip()}
        ir_dir = os.path.join(tmp, "ir")
        done = subprocess.run([sys.executable, "-c", FOUR_DEVICES, path, json.dumps(SIZES)],
                              env=dict(env, JAX_DUMP_IR_TO=ir_dir), capture_output=True,
                              text=True, timeout=300)
        return (done, dict(np.load(path)) if done.returncode == 0 else None,
                exchanges(ir_dir))


@pytest.mark.background(job=_four_devices)
def test_four_cpu_devices_equal_one_device(background, x64):
    done, four, (split, exchange) = background
    assert done.returncode == 0, done.stderr[-3000:]
    # the seeds' programs over the devices, nothing passed between them inside a program (5
    # seeds padded to 8: trimmed on one device, not by a program over the 4)
    assert split and exchange == [], (split, exchange)
    assert int(four["n_devices"]) == 4 and int(four["used"]) == 4
    assert list(four["shards"]) == [2, 2, 2, 2] and int(four["shard_devices"]) == 4
    one = S.sweep(["lstm", "star"], [0, 3, 11, 4, 5], dtype="float64", **SIZES)
    assert one["lstm"].config["devices"] == len(jax.devices())
    for cell in ("lstm", "star"):
        np.testing.assert_allclose(four[cell], one[cell].values, rtol=1e-12, atol=0)
        for i, seed in enumerate([0, 3, 11, 4, 5]):  # 5 seeds padded to 8 and trimmed back
            np.testing.assert_allclose(four[cell][i], reference(cell, seed, "hidden").values,
                                       rtol=1e-12, atol=0)


@pytest.mark.parametrize("kw,match", [
    (dict(seeds=[]), "seeds"),
    (dict(seeds=[1.5]), "seeds"),
    (dict(seeds=[True]), "seeds"),
    (dict(seeds=[-1]), "seeds"),
    (dict(seeds=3), "seeds"),
    (dict(cells="nope"), "valid cells"),
    (dict(cells=[]), "at least one cell"),
    (dict(wrt="weights"), "hidden, cell, params"),
    (dict(loss="first"), "last, all"),
    (dict(cells="gru", wrt="cell"), "memory state"),
    (dict(steps=0), "steps"),
    (dict(dtype="float16"), "gradflow measures in float32 or float64"),
    (dict(devices=[]), "at least one device"),
    (dict(cells=["lstm", "lstm"]), "'lstm' is given twice"),
    (dict(cells=[gradflow.cells.get("lstm", forget_bias=1.0), "lstm"]), "given twice"),
    (dict(cells=["lstm:nope=1"]), "unknown option"),
    (dict(seeds=[0, 0]), "seeds repeat"),
    # inputs that are inf in float32, and a sweep that cannot fit (it compiled, then ran out)
    (dict(input_scale=3e38), "input_scale must be a finite number below 2.1e\\+37"),
    (dict(layers=64, steps=100000, hidden=4096, batch=64),
     r"the sweep of lstm \(1 seed x batch 64, 64 layers x 100000 steps, H=4096\) needs about "
     r".* more than the"),
])
def test_bad_input(kw, match):
    args = {"cells": "lstm", "seeds": [0], **SIZES, **kw}
    with pytest.raises(TypeError if kw.get("seeds") == 3 else ValueError, match=match):
        S.sweep(args.pop("cells"), args.pop("seeds"), **args)


def test_repeated_sweeps_reuse_one_compiled_program():
    S._sharded_map.cache_clear()
    first = S.sweep("rnn", [1, 2], dtype="float32", **SIZES)["rnn"]
    again = S.sweep("rnn", [1, 2], dtype="float32", **SIZES)["rnn"]
    info = S._sharded_map.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    np.testing.assert_array_equal(first.values, again.values)


DEEP = textwrap.dedent("""
    import sys
    import numpy as np
    from gradflow.sweep import sweep
    res = sweep("lstm", [0, 1], layers=2, steps=32, hidden=64, batch=8)["lstm"]
    np.save(sys.argv[1], res.values)
""")


def _deep(env):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "deep.npy")
        done = subprocess.run([sys.executable, "-c", DEEP, path], capture_output=True,
                              text=True, timeout=240, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return np.load(path)


@pytest.mark.background(job=_deep)  # its work is a fresh process
def test_sweep_of_several_layers_at_h64_finishes(background):
    """Regression: vmapped orthogonal inits of two H = 64 layers deadlocked XLA's CPU runtime
    (the sweep now builds its problems with lax.map). In a subprocess with a time limit, so a
    recurrence fails instead of hanging the suite; the maps equal per-seed gradient maps."""
    maps = background
    for i, seed in enumerate([0, 1]):
        pr = gradflow.problem("lstm", seed=seed, layers=2, steps=32, hidden=64, batch=8)
        ref = gradflow.gradient_map(pr.stack, pr.params, pr.xs, loss="last", wrt="hidden")
        np.testing.assert_allclose(maps[i], ref.values, rtol=2e-5)


def test_one_seed_of_a_sweep_is_that_seeds_map_and_draws(x64):
    from gradflow import plot

    res = S.sweep("lstm", [2, 9], dtype="float64", **SIZES)["lstm"]
    one = S.seed_result(res, 9)
    np.testing.assert_array_equal(one.values, res.values[1])
    np.testing.assert_allclose(one.values, reference("lstm", 9, "hidden").values, rtol=1e-12)
    assert one.config["seed"] == 9 and "seeds" not in one.config
    # what the sweep computed it on (not this process), its underflow counted as a map's
    assert one.provenance == res.provenance and one.underflow == {"values": 0}
    zeroed = gradflow.results.make_result("gradient_map", {**res.arrays, "values": np.where(
        np.arange(SIZES["layers"])[:, None] == 0, 0.0, res.values)}, res.config, warn=False)
    assert S.seed_result(zeroed, 9).underflow == {"values": SIZES["steps"]}
    assert S.seed_result is gradflow.views.seed_result  # NumPy only, as the plots
    with pytest.raises(ValueError, match=r"one map per seed.*seed_result"):
        plot.heatmap(res)
    plot.heatmap(one)
    with pytest.raises(ValueError, match="no seed 4 in this sweep; its seeds: \\[2, 9\\]"):
        S.seed_result(res, 4)


def test_a_sweep_counts_every_seeds_parameters_and_checks_its_readout_seed(monkeypatch):
    """The seeds' maps run as one program holding each seed's parameters (and their
    layer-stacked copy): a sweep that fits by its examples alone but not with S sets of
    parameters is refused before it compiles; a readout seed that is no integer is refused
    (1.5 ran as 1 and was recorded as 1.5)."""
    from gradflow import cost

    seeds = list(range(32))
    stack = gradflow.Stack("lstm", layers=2, input_size=64, hidden_size=64)
    est = cost.estimate(stack, len(seeds), 4, jnp.float32, "hidden", calibrate=False)
    monkeypatch.setattr(cost, "available_memory", lambda: est.total + 4 * est.params)
    with pytest.raises(ValueError, match=r"the sweep of lstm \(32 seeds x batch 1, 2 layers"):
        S.sweep("lstm", seeds, layers=2, steps=4, batch=1, hidden=64)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"readout_seed must be an integer .* got 1.5"):
        S.sweep("lstm", [0], readout_seed=1.5, **SIZES)


def test_a_zero_dimensional_seed_is_named_as_one_seed():
    from gradflow import checks

    for one in (np.array(3), jnp.asarray(3)):
        with pytest.raises(TypeError, match="seeds must be a list of integers"):
            checks.seed_list(one)
