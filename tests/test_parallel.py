"""gradflow.parallel: the batch split over devices equals the unsplit map, for every cell.

The split needs several devices, which XLA's CPU platform only exposes when told before JAX
starts, so those checks run in a subprocess (2 and 4 simulated CPU devices); the settings and
their errors are checked here in the (single-device) test process.
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
from gradflow import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In the child: cells through the stack in float32 with x64 off, then in float64; both losses;
# hidden and (where the cells have one) cell maps; B = 4 and a B = 6 that 4 devices do not divide
# (split over 3 or 2). "all" puts every registered cell into the stack at once: one mixed stack
# per set of states (a layer per cell), so the whole registry compiles as two programs. Reference:
# the same map with the split switched off.
CHILD = textwrap.dedent("""
    import json, sys
    from gradflow import parallel
    parallel.use_cpu_devices(int(sys.argv[1]))
    import jax, numpy as np, gradflow
    from gradflow import cells
    out = {"devices": len(jax.devices()), "rows": []}
    # the default, "auto": split only where each device gets enough work (B/n x widest state)
    out["auto"] = {f"{B}x{H}": len(parallel.devices_for(B, H)) for B, H in (
        (16, 64), (32, 64), (16, 128), (8, 256), (64, 32), (64, 128), (4, None))}
    pr = gradflow.problem("lstm", layers=1, steps=2, hidden=8, batch=4, seed=0)
    out["auto_small"] = len(parallel.should_split(pr.xs, pr.stack))
    # a width given in place of a stack's (a model's Jacobian map): B/n x width x rows >= 1024
    out["auto_width"] = [len(parallel.should_split(np.zeros((B, 1, 1)), None, None, rows=16,
                                                   width=4)) for B in (16, 32)]
    parallel.set_batch_devices("all")  # the tests' tiny maps: split whatever the size
    for dtype, names in (("float32", sys.argv[2]), ("float64", sys.argv[3])):
        jax.config.update("jax_enable_x64", dtype == "float64")
        if names == "all":  # one stack per set of states, a layer per cell
            by_states = {}
            for n in cells.names():
                by_states.setdefault(cells.get(n).state_names, []).append(n)
            groups = list(by_states.values())
        else:
            groups = [[n] for n in names.split(",")]
        for i, group in enumerate(groups):
            # B = 6 (not divided by 4 devices) for float64's first stack, B = 4 for float32's,
            # so a one-stack list per dtype still has a batch that every device count divides
            B = 6 if i % 3 == (0 if dtype == "float64" else 1) else 4
            loss = ("last", "all")[i % 2]
            cell = group[0] if len(group) == 1 else group
            pr = gradflow.problem(cell, layers=len(group) + (len(group) == 1), steps=4,
                                  hidden=6, batch=B, input_size=5, seed=i, dtype=dtype)
            wrts = ("hidden", "cell") if "c" in pr.stack.state_names and i < 2 else ("hidden",)
            for wrt in wrts:
                split = gradflow.gradient_map(*pr[:3], loss=loss, wrt=wrt)
                with parallel.batch_devices(None):
                    plain = gradflow.gradient_map(*pr[:3], loss=loss, wrt=wrt)
                a, b = np.asarray(split.values), np.asarray(plain.values)
                out["rows"].append({
                    "cells": group, "dtype": dtype, "wrt": wrt, "B": B,
                    "used": len(parallel.devices_for(B)),
                    "result_dtype": str(split.values.dtype),
                    "map_rel": float(np.max(np.abs(a - b)) / np.max(np.abs(b))),
                    "loss_rel": float(abs(float(split.arrays["loss_value"])
                                          - float(plain.arrays["loss_value"]))
                                      / abs(float(plain.arrays["loss_value"])))})
    if sys.argv[4] == "user":  # one adapter-wrapped user cell (float64 is on now)
        from bench.suite import user_cell
        pr = gradflow.problem(user_cell(6), layers=2, steps=4, hidden=6, batch=4, seed=0,
                              dtype="float64")
        split = gradflow.gradient_map(*pr[:3], loss="all")
        with parallel.batch_devices(None):
            plain = gradflow.gradient_map(*pr[:3], loss="all")
        a, b = np.asarray(split.values), np.asarray(plain.values)
        out["rows"].append({"cells": ["user_gru"], "dtype": "float64", "wrt": "hidden", "B": 4,
                            "used": len(parallel.devices_for(4)),
                            "result_dtype": str(split.values.dtype),
                            "map_rel": float(np.max(np.abs(a - b)) / np.max(np.abs(b))),
                            "loss_rel": 0.0})
        # parameters committed to different devices: gathered before they are packed
        moved = dict(pr.params, layers=[jax.device_put(pr.params["layers"][0], jax.devices()[1]),
                                        *pr.params["layers"][1:]])
        out["moved_rel"] = float(np.max(np.abs(np.asarray(
            gradflow.gradient_map(pr.stack, moved, pr.xs, loss="all").values) - b)) / np.max(b))
        # BN-STAR with batch statistics couples the examples: never split (a half batch has
        # other statistics, which changed its map by ~1% before this was checked)
        pr = gradflow.problem(cells.get("star", variant="bn"), layers=2, steps=4, hidden=6,
                              batch=4, seed=0, dtype="float64")
        split = gradflow.gradient_map(*pr[:3], loss="all")
        with parallel.batch_devices(None):
            plain = gradflow.gradient_map(*pr[:3], loss="all")
        out["bn"] = {"devices": len(parallel.should_split(pr.xs, pr.stack)),
                     "max_diff": float(np.max(np.abs(np.asarray(split.values)
                                                     - np.asarray(plain.values))))}
        # a model of the user's own (model_map): split only when it says its examples are
        # independent; any loss exact, also one that mixes the examples' outputs
        sys.path.insert(0, "tests")
        from test_model_map import dense_model, _dense_params
        p = _dense_params(jax.random.key(3), 2, 4, "float64")
        xs = jax.random.normal(jax.random.key(4), (6, 5, 2), "float64")
        mixed = lambda o: jax.numpy.mean(o[:, -1] ** 2) + jax.numpy.mean(o) ** 2
        out["model"] = []
        for loss in ("last", "all", mixed):
            before = parallel._sharded_model_map.cache_info().misses
            plain = gradflow.model_map(dense_model, p, xs, layers=3, loss=loss)
            unsplit = parallel._sharded_model_map.cache_info().misses - before
            split = gradflow.model_map(dense_model, p, xs, layers=3, loss=loss,
                                       couples_batch=False)
            a, b = np.asarray(split.values), np.asarray(plain.values)
            out["model"].append({"rel": float(np.max(np.abs(a - b)) / np.max(b)),
                                 "loss": float(split.loss_value) - float(plain.loss_value),
                                 "unsplit_compiles": unsplit, "split_compiles":
                                 parallel._sharded_model_map.cache_info().misses - before})
        # a model's Jacobian map: split (its examples must be independent), the same numbers;
        # a model mixing the examples refused on the devices too
        from test_model_jacobian import batch_mixing
        out["model_jacobian"] = []
        for kw in ({}, {"method": "probe", "probes": 4, "seed": 2}):
            before = parallel._sharded_examples.cache_info().misses
            split = gradflow.model_jacobian_map(dense_model, p, xs, layers=3, **kw)
            compiles = parallel._sharded_examples.cache_info().misses - before
            with parallel.batch_devices(None):
                plain = gradflow.model_jacobian_map(dense_model, p, xs, layers=3, **kw)
            out["model_jacobian"].append({"compiles": compiles, "rel": {
                k: float(np.max(np.abs(np.asarray(split.arrays[k], float)
                                       - np.asarray(plain.arrays[k], float)))
                         / np.max(np.abs(np.asarray(plain.arrays[k], float))))
                for k in plain.arrays}})
        with parallel.batch_devices("auto"):  # too little work per device: not split
            before = parallel._sharded_examples.cache_info().misses
            gradflow.model_jacobian_map(dense_model, p, xs, layers=3)
            out["model_jacobian_auto"] = parallel._sharded_examples.cache_info().misses - before
        try:
            gradflow.model_jacobian_map(batch_mixing, jax.numpy.ones((2, 2)), xs, layers=1)
            out["mixing_refused"] = False
        except ValueError as e:
            out["mixing_refused"] = "mixes the examples" in str(e)
        # a model's gate statistics: its sums and counts added over the devices (NaN entries,
        # a gate of one layer only), the same as on one device
        from test_model_gates import odd_gates
        from gradflow import gates

        def rel(a, b):
            a, b = np.asarray(a, float), np.asarray(b, float)
            if not np.array_equal(np.isnan(a), np.isnan(b)):
                return float("inf")
            d, ok = np.abs(np.nan_to_num(a - b)), ~np.isnan(b)
            return float(d.max() / np.abs(b[ok]).max()) if ok.any() and d.size else 0.0

        kg = iter(jax.random.split(jax.random.key(2), 4))
        pg = {n: jax.random.normal(next(kg), (3, 5), "float64") for n in ("A", "K", "O")}
        xg = jax.random.normal(next(kg), (6, 9, 3), "float64")
        kw = dict(kinds={"cand": "tanh", "k": "time", "keep": "other"}, retain={"keep": -1},
                  layers={"k": [1]}, bins=7)
        before = parallel._sharded_examples.cache_info().misses
        split = gates.model_saturation(odd_gates, pg, xg, couples_batch=False, **kw)
        compiles = parallel._sharded_examples.cache_info().misses - before
        plain = gates.model_saturation(odd_gates, pg, xg, **kw)
        # a Stack's gate statistics too (layers of different cells and widths)
        pr = gradflow.problem(["gru", "star", "gru"], layers=3, steps=5, hidden=[5, 4, 4],
                              batch=6, seed=4, dtype="float64")
        before = parallel._sharded_examples.cache_info().misses
        s_split = gates.saturation(*pr[:3], bins=9)
        s_compiles = parallel._sharded_examples.cache_info().misses - before
        with parallel.batch_devices(None):
            s_plain = gates.saturation(*pr[:3], bins=9)
        out["stack_gates"] = {"compiles": s_compiles, "rel": max(
            rel(s_split.arrays[k], s_plain.arrays[k]) for k in s_plain.arrays)}
        out["model_gates"] = {"compiles": compiles, "keys": sorted(split.arrays) == sorted(
            plain.arrays), "rel": max(rel(split.arrays[k], plain.arrays[k])
                                      for k in plain.arrays),
            "nonfinite": int(split.arrays["nonfinite/keep/pooled"])}
        # Jacobian maps: per-example, so split whenever the devices divide the batch
        pr = gradflow.problem("lstm", layers=2, steps=4, hidden=5, batch=6, seed=1,
                              dtype="float64")
        out["jacobian"] = []
        for kw in ({}, {"spectra_at": [(0, 1), (1, 3)]}, {"norm": "spectral"},
                   {"method": "probe", "probes": 4, "seed": 3}):
            before = parallel._sharded_examples.cache_info().misses
            split = gradflow.jacobian_map(*pr[:3], **kw)
            compiles = parallel._sharded_examples.cache_info().misses - before
            with parallel.batch_devices(None):
                plain = gradflow.jacobian_map(*pr[:3], **kw)
            out["jacobian"].append({"kw": str(kw), "compiles": compiles, "rel": {
                k: float(np.max(np.abs(np.asarray(split.arrays[k], float)
                                       - np.asarray(plain.arrays[k], float)))
                         / np.max(np.abs(np.asarray(plain.arrays[k], float))))
                for k in plain.arrays}})
        # programs handing LAPACK a batch of matrices run on one CPU device
        # (parallel.lapack_stalls): at these sizes split ones stalled (jaxlib 0.10.2), one
        # device finishes each in seconds. gradflow's own singular values hand it one matrix
        # per call (linalg.singular_values), so they split (float32, as users run them):
        jax.config.update("jax_enable_x64", False)
        pr = gradflow.problem("lstm", layers=4, steps=32, hidden=64, batch=8, input_size=16)
        before = parallel._sharded_examples.cache_info().misses
        with parallel.batch_devices("all"):
            big = gradflow.jacobian_map(*pr[:3], norm="spectral")
        out["spectral_split"] = {
            "split": parallel._sharded_examples.cache_info().misses - before,
            "finite": bool(np.isfinite(np.asarray(big.values)).all())}
        # a user's model and a user's cell taking a linear solve per step
        from test_parallel import solving_model, shared_solving_model, solving_cell
        k = jax.random.split(jax.random.key(5), 3)
        p = {"W": jax.random.normal(k[0], (64, 64)) / 8,
             "U": jax.random.normal(k[1], (64, 64)) / 8}
        xs = jax.random.normal(k[2], (8, 32, 64))
        out["lapack"] = {}
        for name, run in (
                ("model", lambda: gradflow.model_map(solving_model, p, xs, layers=2,
                                                     couples_batch=False).values),
                # one matrix per step, shared by the examples: never batched, so split
                ("shared", lambda: gradflow.model_map(shared_solving_model, p, xs, layers=2,
                                                      couples_batch=False).values),
                ("cell", lambda: gradflow.gradient_map(
                    pr2.stack, pr2.params, pr2.xs).values)):
            pr2 = gradflow.problem(solving_cell(), layers=2, steps=32, hidden=64, batch=8,
                                   input_size=16, seed=0)
            cache = {"model": parallel._sharded_model_map,
                     "shared": parallel._sharded_model_map,
                     "cell": parallel._sharded_state_map}[name]
            before = cache.cache_info().misses
            with parallel.batch_devices("all"):
                split = np.asarray(run())
            meshes = cache.cache_info().misses - before  # 2 devices, then 1
            with parallel.batch_devices(None):
                plain = np.asarray(run())
            out["lapack"][name] = {"meshes": meshes, "rel": float(
                np.max(np.abs(split - plain)) / np.max(np.abs(plain)))}
        # sweeps: a cell solving each example's system on one device (equal to each seed's
        # own map), the stock LSTM's (its orthogonal inits: one QR per matrix) on both
        from gradflow import sweep
        out["sweep"] = {}
        for name, cell in (("solving", solving_cell()), ("lstm", "lstm")):
            res = sweep.sweep([cell], [0, 1], layers=2, steps=32, hidden=64, batch=8,
                              input_size=16)[name]
            own = [gradflow.gradient_map(*gradflow.problem(cell, layers=2, steps=32,
                                                           hidden=64, batch=8, input_size=16,
                                                           seed=s)[:3]).values for s in (0, 1)]
            out["sweep"][name] = {"devices": res.config["devices"], "rel": float(
                np.max(np.abs(np.asarray(res.values) - np.stack(own)))
                / np.max(np.abs(np.stack(own))))}
        # the atlas's seed-sharded programs: local gains (one matrix per SVD) and maps on both
        from gradflow import atlas
        out["atlas_devices"] = {}
        for measure in ("local_gains", "gradient_map"):
            g = atlas.Grid(cells=("lstm",), inits=("orthogonal",), input_scales=(1.0,),
                           hidden=(4,), sizes=((2, 3),), seeds=(0, 1), batch=2,
                           measure=measure)
            res = atlas.measure_group(g.conditions()[:1], jax.devices())
            out["atlas_devices"][measure] = res[0].config["devices"]
        # a model drawing a dropout mask with the batch's shape from a fixed key: no example
        # reads another, but each device would draw its own mask (maps 24-28% off, split):
        # not split, its numbers those of the whole batch
        from test_parallel import masked_model, masked_gates
        jax.config.update("jax_enable_x64", True)
        w = jax.random.normal(jax.random.key(6), (3, 3), "float64") / 2
        xs = jax.random.normal(jax.random.key(7), (4, 5, 3), "float64")
        runs = {"map": (parallel._sharded_model_map, lambda: gradflow.model_map(
                            masked_model, w, xs, layers=1, couples_batch=False).values),
                "jacobian": (parallel._sharded_examples, lambda: gradflow.model_jacobian_map(
                                 masked_model, w, xs, layers=1).values),
                "gates": (parallel._sharded_examples, lambda: gates.model_saturation(
                              masked_gates, w, xs, kinds={"g": "other"},
                              couples_batch=False).arrays["mean/g/pooled"])}
        out["masked"] = {}
        for name, (cache, run) in runs.items():
            before = cache.cache_info().misses
            with parallel.batch_devices("all"):
                split = np.asarray(run())
            split_compiles = cache.cache_info().misses - before
            with parallel.batch_devices(None):
                plain = np.asarray(run())
            out["masked"][name] = {"split_compiles": split_compiles,
                                   "diff": float(np.max(np.abs(split - plain)))}
        # (the same model written per example, mask drawn per example: split as before)
        # placements and parameters a researcher's own code may hand over, each as unsplit:
        # a PRNG key among the parameters (its packing failed); parameters committed to
        # device 1 or replicated (their compiled programs pinned the uncommitted inputs to
        # device 0: "incompatible devices"); inputs sharded over the batch (checked for NaN
        # by a reduction XLA partitioned over the devices); a mesh of the caller's
        # (jax.set_mesh: a shard_map over gradflow's mesh, and the sweep's, were refused)
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from test_parallel import keyed_model
        kk = jax.random.split(jax.random.key(8), 3)
        kp = {"W": jax.random.normal(kk[0], (3, 4), "float64") / 2,
              "U": jax.random.normal(kk[1], (4, 4), "float64") / 3, "key": jax.random.key(7)}
        kx = jax.random.normal(kk[2], (4, 5, 3), "float64")
        mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
        bare = {n: v for n, v in kp.items() if n != "key"}
        pr = gradflow.problem("lstm", layers=2, steps=4, hidden=5, batch=4, seed=2,
                              dtype="float64")
        out["placed"] = {}
        with parallel.batch_devices("all"):  # split: placed over gradflow's mesh, nothing exchanged
            split = np.asarray(gradflow.gradient_map(
                pr.stack, pr.params, jax.device_put(pr.xs, NamedSharding(mesh, P("data"))),
                loss="all").values)
        with parallel.batch_devices(None):
            plain = np.asarray(gradflow.gradient_map(*pr[:3], loss="all").values)
        out["placed"]["xs_sharded_split"] = float(np.max(np.abs(split - plain)) / np.max(plain))
        # the rest run programs on the caller's placement (XLA partitions them over its devices),
        # not checked for exchanges: the programs lowered from here on
        import os
        out["ir_checked"] = len(os.listdir(os.environ["JAX_DUMP_IR_TO"]))
        for name, run in (
                ("key_map", lambda: gradflow.model_map(keyed_model, kp, kx, layers=1,
                                                       couples_batch=False).values),
                ("key_jacobian", lambda: gradflow.model_jacobian_map(keyed_model, kp, kx,
                                                                     layers=1).values),
                ("params_on_1", lambda: gradflow.model_map(
                    keyed_model, dict(jax.device_put(bare, jax.devices()[1]),
                                      key=kp["key"]), kx, layers=1,
                    couples_batch=False).values),
                ("params_replicated", lambda: gradflow.model_jacobian_map(
                    keyed_model, dict(jax.device_put(bare, NamedSharding(mesh, P())),
                                      key=kp["key"]), kx, layers=1).values),
                ("xs_sharded", lambda: gradflow.gradient_map(
                    pr.stack, pr.params, jax.device_put(pr.xs, NamedSharding(mesh, P("data"))),
                    loss="all").values)):
            with parallel.batch_devices("all"):
                split = np.asarray(run())
            with parallel.batch_devices(None):
                plain = np.asarray(run())
            out["placed"][name] = float(np.max(np.abs(split - plain)) / np.max(np.abs(plain)))
        with jax.set_mesh(mesh):
            inside = {"map": np.asarray(gradflow.gradient_map(*pr[:3], loss="all").values),
                      "sweep": np.asarray(sweep.sweep(["lstm"], [0, 1, 2], layers=2, steps=3,
                                                      hidden=4, batch=2)["lstm"].values)}
        with parallel.batch_devices(None):
            outside = {"map": np.asarray(gradflow.gradient_map(*pr[:3], loss="all").values)}
        outside["sweep"] = np.asarray(sweep.sweep(["lstm"], [0, 1, 2], layers=2, steps=3,
                                                  hidden=4, batch=2)["lstm"].values)
        out["set_mesh"] = {k: float(np.max(np.abs(inside[k] - outside[k]))) for k in inside}
    if out["devices"] == 4:  # a model's Jacobian map of 4 examples: over 2 devices, two each
        sys.path.insert(0, "tests")
        from test_model_map import dense_model, _dense_params
        jax.config.update("jax_enable_x64", True)
        p = _dense_params(jax.random.key(3), 2, 4, "float64")
        xs = jax.random.normal(jax.random.key(4), (4, 5, 2), "float64")
        before = parallel._sharded_examples.cache_info().misses
        split = np.asarray(gradflow.model_jacobian_map(dense_model, p, xs, layers=3).values)
        built = parallel._sharded_examples.cache_info().misses - before
        with parallel.batch_devices(None):
            plain = np.asarray(gradflow.model_jacobian_map(dense_model, p, xs, layers=3).values)
        out["jacobian_fewer"] = {"built": built, "rel": float(
            np.max(np.abs(split - plain)) / np.max(np.abs(plain)))}
    print(json.dumps(out))
""")


def masked_model(w, xs, taps):
    """One tanh layer whose outputs pass a dropout mask drawn with the batch's shape from a
    fixed key: the examples independent, but example b's mask is row b of the batch's."""
    mask = jax.random.bernoulli(jax.random.key(42), 0.5, (xs.shape[0], w.shape[1])) * 2.0

    def step(h, inp):
        x, s = inp
        h = gradflow.tap(jnp.tanh(x @ w + h @ w), s[0])
        return h, h * mask

    h0 = jnp.zeros((xs.shape[0], w.shape[1]), xs.dtype)
    _, ys = jax.lax.scan(step, h0, (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(taps, 0, 1)))
    return jnp.swapaxes(ys, 0, 1)


def masked_gates(w, xs):
    """:func:`masked_model`'s mask on a gate: ``{"g": (1, B, T, H)}``."""
    mask = jax.random.bernoulli(jax.random.key(42), 0.5, (xs.shape[0], 1, w.shape[1]))
    return {"g": (jax.nn.sigmoid(xs @ w) * mask)[None]}


def keyed_model(p, xs, taps):
    """One tanh layer with a fixed noise vector drawn from the PRNG key among its
    parameters (``p["key"]``, a ``jax.random.key``)."""
    noise = jax.random.normal(p["key"], (p["U"].shape[0],), xs.dtype)

    def step(h, inp):
        x, s = inp
        h = gradflow.tap(jnp.tanh(x @ p["W"] + h @ p["U"] + 0.1 * noise), s[0])
        return h, h

    h0 = jnp.zeros((xs.shape[0], p["U"].shape[0]), xs.dtype)
    _, top = jax.lax.scan(step, h0, (xs.swapaxes(0, 1), taps.swapaxes(0, 1)))
    return top.swapaxes(0, 1)


def solving_model(p, xs, taps):
    """A user's model (``gradflow.model_map``) whose layers each take a linear solve per
    example and step (``jnp.linalg.solve``: jaxlib's batched LAPACK LU and triangular solves):
    the child's check that such a program is not split over CPU devices (it stalled there)."""
    return _solving_layers(p, xs, taps, lambda h, t: _solved(h))


def shared_solving_model(p, xs, taps):
    """:func:`solving_model` with one ``(64, 64)`` system per step, its matrix made of the
    weights and the step, the examples its right-hand sides: LAPACK gets one matrix, which
    jaxlib solves inline, so this program is split."""
    def solved(h, t):
        u = p["U"] * jnp.cos(t)
        a = jnp.eye(h.shape[-1], dtype=h.dtype) + 0.1 * u @ u.T
        return jnp.linalg.solve(a, h.T).T
    return _solving_layers(p, xs, taps, solved)


def _solving_layers(p, xs, taps, solved):
    """Two tanh layers sharing ``p``, ``solved(h, t)`` applied to each new state."""
    def step(hs, inp):
        x, tap_t, t = inp
        new, below = [], x @ p["W"]
        for l, h in enumerate(hs):
            h = solved(jnp.tanh(below + h @ p["U"]), t)
            new.append(gradflow.tap(h, tap_t[l]))
            below = new[-1]
        return tuple(new), new[-1]

    h0 = jnp.zeros((xs.shape[0], p["U"].shape[0]), xs.dtype)
    steps = jnp.arange(xs.shape[1], dtype=xs.dtype)
    _, top = jax.lax.scan(step, (h0, h0),
                          (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(taps, 0, 1), steps))
    return jnp.swapaxes(top, 0, 1)


def _solved(h):
    """``(I + 0.1 h h^T)^{-1} h`` per example: one batched LAPACK solve."""
    a = jnp.eye(h.shape[-1], dtype=h.dtype) + 0.1 * h[:, :, None] * h[:, None, :]
    return jnp.linalg.solve(a, h[:, :, None])[:, :, 0]


def solving_cell():
    """A user's tanh cell (``gradflow.cells.from_function``) taking :func:`_solved` per step."""
    def init(key, n_in, n_h, dtype):
        kw, ku = jax.random.split(key)
        return {"W": jax.random.normal(kw, (n_in, n_h), dtype) / np.sqrt(n_in),
                "U": jax.random.normal(ku, (n_h, n_h), dtype) / np.sqrt(n_h)}

    def step(p, h, x):
        h = _solved(jnp.tanh(x @ p["W"] + h @ p["U"]))
        return h, h

    return gradflow.cells.from_function(step, init, hidden_size=64, name="solving")


#: The ops of a program that exchange data between devices (StableHLO, as JAX lowers them).
COLLECTIVE = re.compile(r"stablehlo\.(all_reduce|all_gather|all_to_all|reduce_scatter|"
                        r"collective_permute|collective_broadcast)\b")
PARTITIONS = re.compile(r"mhlo\.num_partitions = (\d+)")


def exchanges(ir_dir, upto=None):
    """``(programs over several devices, those that exchange data between them)`` among the
    programs JAX lowered into ``ir_dir`` (``JAX_DUMP_IR_TO``; ``upto``: the first ``upto``
    lowered, by their number in the file name): one that exchanges holds a
    collective, or is not a ``shard_map`` (XLA partitions it and adds what it needs). XLA's CPU
    runtime deadlocked, rarely and under load, in the all-reduce of a split map's programs
    (until 2026-12-07: the batch's loss, norms and sums were reduced inside them), one
    device's half waiting in the rendezvous, the other's launch never started; the split maps
    exchange nothing inside a program since."""
    split, exchange = [], []
    for name in sorted(os.listdir(ir_dir)):
        if upto is not None and int(re.match(r"jax_ir(\d+)_", name).group(1)) >= upto:
            continue
        with open(os.path.join(ir_dir, name)) as f:
            text = f.read()
        parts = PARTITIONS.search(text)
        if parts is None or int(parts.group(1)) < 2:
            continue
        split.append(name)
        if COLLECTIVE.search(text) or "sdy.manual_computation" not in text:
            exchange.append(name)
    return split, exchange


def _child(n, f32, f64, user, env):
    """The child's run, every program it lowers kept (``JAX_DUMP_IR_TO``) and read by
    :func:`exchanges` into ``run.exchanges``."""
    with tempfile.TemporaryDirectory() as ir_dir:
        run = subprocess.run([sys.executable, "-c", CHILD, str(n), f32, f64, user],
                             capture_output=True, text=True, cwd=ROOT, timeout=900,
                             env=dict(env, JAX_DUMP_IR_TO=ir_dir))
        try:  # the child says from which program on it runs the caller's placements
            upto = json.loads(run.stdout.strip().splitlines()[-1]).get("ir_checked")
        except (ValueError, IndexError, AttributeError):
            upto = None
        run.exchanges = exchanges(ir_dir, upto)
    return run


# 2 devices: every registered cell in float64 (the split is one mechanism in the map, not per
# cell); float32 with x64 off for one. 4 devices: one cell at each precision.
@pytest.mark.parametrize("n, f32, f64, user", [(2, "lstm", "all", "user"),
                                               (4, "gru", "lstm", "-")])
@pytest.mark.background(job=_child)
def test_split_map_equals_unsplit_on_simulated_cpu_devices(n, f32, f64, user, background):
    r = background
    assert r.returncode == 0, r.stderr[-3000:]
    split, exchange = r.exchanges  # nothing passes between the devices inside a program
    assert len(split) >= 4 and exchange == [], (len(split), exchange)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == n
    rows = out["rows"]
    if f64 == "all":
        assert {c for x in rows if x["dtype"] == "float64" for c in x["cells"]} == (
            set(gradflow.cells.names()) | {"user_gru"})
    assert {x["dtype"] for x in rows} == {"float32", "float64"}
    assert any(x["wrt"] == "cell" for x in rows) or n == 4
    for x in rows:
        assert x["map_rel"] <= 1e-6, x
        assert x["loss_rel"] <= 1e-6, x
        assert x["result_dtype"] == x["dtype"], x
        # the largest device count <= n dividing B
        assert x["used"] == max(k for k in range(1, n + 1) if x["B"] % k == 0), x
    assert any(x["used"] == n for x in rows)
    assert out["auto"] == {"16x64": 0, "32x64": 2, "16x128": 2, "8x256": 2, "64x32": 2,
                           "64x128": n, "4xNone": n}
    assert out["auto_small"] == 0 and out["auto_width"] == [0, 2]
    if n == 4:  # (it stayed unsplit: 4 devices would get one example each)
        assert out["jacobian_fewer"]["built"] == 1 and out["jacobian_fewer"]["rel"] <= 1e-12, \
            out["jacobian_fewer"]
    if user == "user":
        assert out["bn"] == {"devices": 0, "max_diff": 0.0}
        assert len(out["model"]) == 3
        # split only with couples_batch=False; equal to the unsplit map; the split programs
        # are built once for the three losses (taken between them, on one device)
        for i, m in enumerate(out["model"]):
            assert m["unsplit_compiles"] == 0 and m["split_compiles"] == (i == 0), m
            assert m["rel"] <= 1e-12 and abs(m["loss"]) <= 1e-12, m
        assert out["moved_rel"] <= 1e-12
        assert len(out["jacobian"]) == 4
        for j in out["jacobian"]:  # values, spectra, stderr, target_finite: as unsplit
            assert j["compiles"] == 1 and max(j["rel"].values()) <= 1e-12, j
        assert {"spectra", "stderr"} <= {k for j in out["jacobian"] for k in j["rel"]}
        # gradflow's singular values (one matrix per LAPACK call): split, and finished
        assert out["spectral_split"] == {"split": 1, "finite": True}
        # programs handing LAPACK a batch: on one device (the unsplit program, a mesh of one)
        for name in ("model", "cell"):
            m = out["lapack"][name]
            assert m["meshes"] == 2 and m["rel"] <= 1e-6, (name, m)
        m = out["lapack"]["shared"]  # one matrix a step: split, a mesh of 2 only
        assert m["meshes"] == 1 and m["rel"] <= 1e-6, m
        assert out["sweep"]["solving"]["devices"] == 1 and out["sweep"]["lstm"]["devices"] == 2
        assert max(v["rel"] for v in out["sweep"].values()) <= 1e-6, out["sweep"]
        assert out["atlas_devices"] == {"local_gains": 2, "gradient_map": 2}
        # a model's Jacobian map, exact and probes: split, compiled once, as unsplit
        assert len(out["model_jacobian"]) == 2 and out["mixing_refused"] is True
        assert out["model_jacobian_auto"] == 0
        g = out["model_gates"]  # a model's gate statistics: split, compiled once, as unsplit
        assert g["compiles"] == 1 and g["keys"] and g["rel"] <= 1e-12 and g["nonfinite"] > 0, g
        g = out["stack_gates"]
        assert g["compiles"] == 1 and g["rel"] <= 1e-12, g
        for j in out["model_jacobian"]:
            assert j["compiles"] == 1 and max(j["rel"].values()) <= 1e-12, j
        assert "stderr" in out["model_jacobian"][1]["rel"]
        for name, m in out["masked"].items():  # a mask of the batch's shape: never split
            assert m == {"split_compiles": 0, "diff": 0.0}, (name, m)
        assert set(out["placed"]) == {"key_map", "key_jacobian", "params_on_1",
                                      "params_replicated", "xs_sharded", "xs_sharded_split"}
        assert max(out["placed"].values()) <= 1e-12, out["placed"]
        assert out["set_mesh"] == {"map": 0.0, "sweep": 0.0}, out["set_mesh"]


def test_parameters_travel_packed_and_come_back_unchanged():
    """The split map places the parameters as one flat buffer per dtype (the same parameter of
    every layer side by side) and unpacks them in the sharded program: every leaf comes back
    with its shape, dtype and values."""
    tree = {"a": [jnp.arange(6.0).reshape(2, 3), jnp.float32(7.0)], "b": np.ones((1, 2, 2)),
            "c": jnp.arange(4, dtype=jnp.int32),
            "layers": [{"W": jnp.full((2, 3), l, jnp.float32), "n": jnp.int32(l)}
                       for l in range(3)]}
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), (parallel.AXIS,))
    bufs, layout = parallel._replicate(tree, mesh)
    assert sorted(bufs) == ["float32", "int32"]
    assert bufs["float32"].shape == (6 + 1 + 4 + 3 * 6,) and bufs["int32"].shape == (4 + 3,)
    # the layers' W side by side: one kind of 3 rows, in layer order
    assert [(rows, shape) for _, rows, shape in layout[2] if rows == 3] == [(3, (2, 3)), (3, ())]
    back = jax.jit(lambda b: parallel._unpack(b, layout))(bufs)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
        assert x.shape == np.shape(y) and x.dtype == jnp.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_split_program_does_not_grow_with_the_layers():
    """The sharded programs unpack a kind (one parameter of every layer) as one piece, which
    the stack's scan over layers takes whole: their compiled size (but for scalar constants,
    which XLA may clone) is the same at 2 and 6 layers
    (unpacked leaf by leaf it grew by a slice per leaf, each its own kernel: a 16-layer LSTM's
    split map compiled in 4.5 s instead of 2.7-2.9 s)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    sizes = []
    for L in (2, 6):
        pr = gradflow.problem("lstm", layers=L, steps=3, hidden=8, batch=2, seed=0)
        mesh = Mesh(np.array(jax.devices()[:1]), (parallel.AXIS,))
        bufs, layout = parallel._replicate(pr.params, mesh)
        halves = parallel._sharded_state_map(pr.stack, "h", mesh, layout)
        xs = jax.device_put(pr.xs, NamedSharding(mesh, PartitionSpec(parallel.AXIS)))
        out, pull = halves.forward(bufs, xs)
        sizes.append([sum("constant(" not in line  # (XLA may clone a scalar constant
                          for line in program.lower(*args).compile().as_text().splitlines())
                      for program, args in ((halves.forward, (bufs, xs)),
                                            (halves.backward, (pull, out)))])
    assert sizes[0] == sizes[1], sizes


def test_settings_and_divisor_choice():
    devs = jax.devices()  # one CPU device in the test process
    assert parallel.devices_for(4) == ()
    with parallel.batch_devices(None):
        assert parallel.devices_for(8) == ()
    with parallel.batch_devices(list(devs)):
        assert parallel.devices_for(8) == (() if len(devs) == 1 else tuple(devs))
    with parallel.batch_devices(1):
        assert parallel.devices_for(8) == ()
    assert parallel._SETTING["devices"] == "auto"


@pytest.mark.parametrize("bad", [0, -2, "some", [], [1, 2], 1.5])
def test_bad_device_setting_is_a_value_error(bad):
    with pytest.raises(ValueError, match="devices must be"):
        parallel.set_batch_devices(bad)
    assert parallel._SETTING["devices"] == "auto"


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2"])
def test_use_cpu_devices_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="positive integer"):
        parallel.use_cpu_devices(bad)


def test_use_cpu_devices_after_jax_started():
    jnp.zeros(1).block_until_ready()  # JAX has started in this process
    have = len(jax.devices("cpu"))
    parallel.use_cpu_devices(have)  # the count it has: a no-op
    with pytest.raises(RuntimeError, match="before any JAX computation"):
        parallel.use_cpu_devices(have + 1)


def test_traced_maps_are_never_split():
    assert parallel.should_split(jnp.zeros((4, 3, 2))) == parallel.devices_for(4)
    seen = []
    jax.jit(lambda x: seen.append(parallel.should_split(x)) or x)(jnp.zeros((4, 3, 2)))
    # parameters traced (jax.grad of a map w.r.t. them) with concrete inputs: not split either
    xs, params = jnp.zeros((4, 3, 2)), {"W": jnp.ones(3)}
    jax.grad(lambda p: seen.append(parallel.should_split(xs, None, p)) or p["W"].sum())(params)
    assert seen == [(), ()]
    assert parallel.should_split(xs, None, params) == parallel.devices_for(4)


def test_state_map_refuses_a_batch_the_devices_do_not_divide():
    pr = gradflow.problem("lstm", layers=1, steps=2, hidden=4, batch=3, seed=0)
    lf = gradflow.jacobian.readout_loss("last", 4, 2, 3)
    with pytest.raises(ValueError, match="does not split"):
        parallel.state_map(pr.stack, pr.params, pr.xs, lf, "h", jax.devices() * 2)


def test_single_device_state_map_equals_the_plain_map(x64):
    """The shard_map program on a one-device mesh (gather, loss on the whole batch, pull back
    the slice) against the plain autodiff map and a brute-force per-example gradient."""
    pr = gradflow.problem("gru", layers=2, steps=3, hidden=5, batch=3, seed=2, dtype="float64")
    lf = gradflow.jacobian.readout_loss("all", 5, 3, 3, 0, jnp.float64)
    v, m = parallel.state_map(pr.stack, pr.params, pr.xs, lf, "h", jax.devices()[:1])
    with parallel.batch_devices(None):
        ref = gradflow.gradient_map(*pr[:3], loss="all")
    np.testing.assert_allclose(np.asarray(m), ref.values, rtol=1e-12)
    np.testing.assert_allclose(float(v), float(ref.arrays["loss_value"]), rtol=1e-12)
    # independent: d loss / d h^l_t via perturbations, norms by numpy
    eps = {"h": jnp.zeros((2, 3, 3, 5))}
    g = jax.grad(lambda e: lf(pr.stack.apply(pr.params, pr.xs, perturb=e).top))(eps)["h"]
    np.testing.assert_allclose(np.asarray(m), np.linalg.norm(np.asarray(g), axis=-1).mean(1),
                               rtol=1e-10)


MALLOC_CHILD = textwrap.dedent("""
    import ctypes, json
    libc = ctypes.CDLL(None)
    libc.sbrk.restype = libc.malloc.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    libc.malloc.argtypes = [ctypes.c_size_t]

    def heap_block():  # a 64 MiB block: does it come from the heap, and stay there when freed?
        a = libc.sbrk(0)
        p = libc.malloc(64 << 20)
        b = libc.sbrk(0)
        libc.free(ctypes.c_void_p(p))
        # from the heap: the block ends above the old top and within the new one (an mmap'd
        # block lies far above the heap); kept: freeing it did not lower the top
        return {"in_heap": a < p + (64 << 20) <= b, "kept": libc.sbrk(0) == b}

    before = heap_block()
    from gradflow import parallel
    applied = parallel.tune_malloc()
    print(json.dumps({"before": before, "applied": applied, "after": heap_block()}))
""")


def _malloc_children(env):
    """The child without GLIBC_TUNABLES, and started with the launcher's (glibc only)."""
    import platform
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    env = {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}
    run = lambda e: json.loads(subprocess.run(  # noqa: E731
        [sys.executable, "-c", MALLOC_CHILD], capture_output=True, text=True, cwd=ROOT, env=e,
        timeout=300, check=True).stdout.strip().splitlines()[-1])
    return run(env), run({**env, "GLIBC_TUNABLES": parallel.GLIBC_TUNABLES})


@pytest.mark.background(job=_malloc_children)  # its work is fresh processes
def test_tune_malloc_serves_big_blocks_from_a_kept_heap(background):
    if background is None:
        pytest.skip("glibc's mallopt: Linux with glibc only")
    out, started_with_tunables = background
    # Where the block lies, not how much the heap grew: the heap's top may already hold free
    # space left by the imports (1.08 MiB in one CI run, beyond an allowance of 1 MiB).
    assert not out["before"]["in_heap"]  # default: mmap'd (and given back when freed)
    assert out["applied"] is True
    assert out["after"] == {"in_heap": True, "kept": True}  # heap, kept after free
    # started with GLIBC_TUNABLES: the user's settings stand, nothing is changed
    out = started_with_tunables
    assert out["applied"] is False
    assert out["before"] == {"in_heap": True, "kept": True}  # the env did the same


def _cli_two_devices(env):
    env = {k: v for k, v in env.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    with tempfile.TemporaryDirectory() as tmp:
        data, ir_dir = os.path.join(tmp, "m.npz"), os.path.join(tmp, "ir")
        r = subprocess.run([sys.executable, "-m", "gradflow", "--devices", "2", "heatmap",
                            "--cell", "gru", "--layers", "3", "--steps", "5", "--hidden", "8",
                            "--batch", "4", "--seed", "3", "--out", os.path.join(tmp, "m.png"),
                            "--data", data], capture_output=True, text=True, cwd=ROOT,
                           env=dict(env, JAX_DUMP_IR_TO=ir_dir), timeout=600)
        return (r, gradflow.results.Result.load(data) if r.returncode == 0 else None,
                exchanges(ir_dir))


@pytest.mark.background(job=_cli_two_devices)
def test_cli_devices_option_splits_and_equals_the_api_map(background):
    """The ``gradflow`` program with ``--devices 2``: the CPU gets 2 devices before JAX starts,
    the map is split over them and equals the unsplit API map."""
    r, got, (split, exchange) = background
    assert r.returncode == 0, r.stderr[-2000:]
    assert split and exchange == [], (split, exchange)  # split, nothing passed inside a program
    pr = gradflow.problem("gru", layers=3, steps=5, hidden=8, batch=4, seed=3, dtype="float32")
    ref = gradflow.gradient_map(*pr[:3]).values
    np.testing.assert_allclose(got.values, ref, rtol=1e-5)


@pytest.mark.parametrize("after", [False, True])
def test_cli_devices_after_jax_started_is_a_usage_error(capsys, after):
    """``--devices N`` before or after the command reaches the same setting: here a count
    the running JAX does not have, one line, exit 2; and 0 is refused by the parser."""
    from gradflow import cli
    jnp.zeros(1).block_until_ready()
    n = len(jax.devices("cpu")) + 1
    command = ["heatmap", "--layers", "1", "--steps", "2", "--hidden", "4", "--batch", "2",
               "--no-data"]
    devices = ["--devices", str(n)]
    rc = cli.main(command + devices if after else devices + command)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"--devices {n}: JAX has already started" in err[0], err
    assert parallel._SETTING["devices"] == "auto"
    rc = cli.main(command + ["--devices", "0"] if after else ["--devices", "0"] + command)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].endswith("argument --devices: must be a positive integer, got '0'")


# In the child: a program compiled before the cache is turned on, then the cache, then a map
# (its programs, and the eager initialisation's, go to the cache). Reference: JAX's own counters
# of cache hits, and the files in the folder.
CACHE_CHILD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if name.endswith("/cache_hits") else None)
    jax.jit(lambda x: x * 3.0)(jnp.ones(3)).block_until_ready()  # before: not cached
    from gradflow import parallel
    import gradflow
    folder = parallel.use_compile_cache(None if sys.argv[1] == "-" else sys.argv[1])
    values = None
    if sys.argv[2] == "map":
        pr = gradflow.problem("gru", layers=2, steps=4, hidden=8, batch=2, seed=1)
        values = np.asarray(gradflow.gradient_map(*pr[:3]).values).tolist()
    print(json.dumps({"folder": folder, "hits": len(hits), "values": values}))
""")


def _uncached_env(base=None, **extra):
    """``base`` (default this process's environment) without the suite's compile-cache
    settings (conftest.py's folder, its threshold, a GRADFLOW_COMPILE_CACHE), plus ``extra``:
    a child as users start it."""
    drop = ("JAX_COMPILATION_CACHE_DIR", parallel.COMPILE_CACHE_ENV,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    base = os.environ if base is None else base
    return {**{k: v for k, v in base.items() if k not in drop}, **extra}


def _cache_child(tmp, arg="-", what="map", base=None, **env):
    env = _uncached_env(base, XDG_CACHE_HOME=str(tmp), **env)
    r = subprocess.run([sys.executable, "-c", CACHE_CHILD, arg, what], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _cache_children(env):
    """Four fresh processes on one cache home: the first fills it, the second reads it, one
    given a folder, one with the cache off (a background job: its work is other processes)."""
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = {"tmp": str(tmp), "first": _cache_child(tmp, base=env)}
        folder = tmp / "gradflow" / "xla" / parallel._host_key()
        out["kept"] = sorted(p.name for p in folder.iterdir())
        out["second"] = _cache_child(tmp, base=env)
        out["given"] = _cache_child(tmp / "elsewhere", str(tmp / "mine"), "none", base=env)
        out["off"] = _cache_child(tmp / "none", what="none", base=env,
                                  **{parallel.COMPILE_CACHE_ENV: "off"})
        out["off_made"] = (tmp / "none").exists()
        return out


@pytest.mark.background(job=_cache_children)
def test_the_compile_cache_serves_the_next_process(background):
    r = background
    first, second, kept = r["first"], r["second"], r["kept"]
    assert first["folder"] == os.path.join(r["tmp"], "gradflow", "xla", parallel._host_key())
    assert first["hits"] == 0 and len(kept) >= 2  # the map's programs and the eager ones
    assert second["hits"] >= len(kept) and second["values"] == first["values"]
    # a folder given, and off
    assert r["given"]["folder"] == os.path.join(r["tmp"], "mine", parallel._host_key())
    assert r["off"]["folder"] is None and not r["off_made"]


def test_the_compile_cache_folder_must_be_writable_when_asked_for(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # JAX already has a folder in this process (the suite's): it stands, whatever is asked
    assert parallel.use_compile_cache(blocker / "x") == jax.config.jax_compilation_cache_dir
    with pytest.raises(ValueError, match="max_bytes"):
        parallel.use_compile_cache(max_bytes=-1)
    # a fresh process: asked for -> ValueError naming the folder; the default -> no cache
    env = _uncached_env()
    code = ("from gradflow import parallel\n"
            "try:\n    print(parallel.use_compile_cache(__import__('sys').argv[1] or None))\n"
            "except ValueError as e:\n    print('ValueError', e)\n")
    run = lambda arg, **e: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, arg], capture_output=True, text=True, cwd=ROOT,
        env={**env, **e}, timeout=300, check=True).stdout.strip().splitlines()[-1]
    out = run(str(blocker / "x"))
    assert out.startswith("ValueError") and str(blocker / "x") in out and "off" in out
    out = run("", **{parallel.COMPILE_CACHE_ENV: str(blocker / "y")})
    assert out.startswith("ValueError") and str(blocker / "y") in out
    assert run("", XDG_CACHE_HOME=str(blocker)) == "None"


def test_no_default_compile_cache_without_a_home_folder(monkeypatch):
    monkeypatch.delenv(parallel.COMPILE_CACHE_ENV, raising=False)
    monkeypatch.setattr(parallel, "cache_home", lambda: os.path.join("~", ".cache", "gradflow"))
    assert parallel.default_compile_cache() is None  # not a folder relative to the cwd
    monkeypatch.setattr(parallel, "cache_home", lambda: "/somewhere/gradflow")
    assert parallel.default_compile_cache() == os.path.join("/somewhere/gradflow", "xla")
    monkeypatch.setenv(parallel.COMPILE_CACHE_ENV, " Off ")
    assert parallel.default_compile_cache() is None


def test_the_compile_cache_is_pruned_least_recently_used_first(tmp_path):
    for i in range(5):  # written at 1000 + i; 0-cache read since (its access time later)
        f = tmp_path / f"{i}-cache"
        f.write_bytes(b"x" * 100)
        os.utime(f, (2000 if i == 0 else 1000 + i, 1000 + i))
    assert parallel._prune(str(tmp_path), 250) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0-cache", "4-cache"]
    assert parallel._prune(str(tmp_path), 250) == 0


def _refused_cache(env):
    with tempfile.TemporaryDirectory() as tmp:
        blocker = os.path.join(tmp, "a_file")
        open(blocker, "w").close()
        r = subprocess.run([sys.executable, "-m", "gradflow", "heatmap", "--cell", "rnn",
                            "--out", os.path.join(tmp, "m.png")], capture_output=True, text=True,
                           cwd=ROOT, timeout=600,
                           env=_uncached_env(env, **{parallel.COMPILE_CACHE_ENV: blocker}))
        return r, blocker, os.path.exists(os.path.join(tmp, "m.png"))


@pytest.mark.background(job=_refused_cache)  # its work is a fresh CLI process
def test_the_cli_refuses_a_compile_cache_folder_it_cannot_write(background):
    # (that the CLI fills its cache and a cached run gives the same map: tests/test_bench.py,
    # the cli_start benchmark)
    r, blocker, wrote = background
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert parallel.COMPILE_CACHE_ENV in r.stderr and blocker in r.stderr
    assert not wrote


# In the child: the CLI's process settings (as the gradflow program makes them), then a small
# program through the cache: its result, printed.
DAMAGE_CHILD = textwrap.dedent("""
    import warnings
    from gradflow import cli
    with warnings.catch_warnings(), cli._speed_settings(None, True):
        import jax, jax.numpy as jnp
        print(float(jax.jit(lambda x: jnp.sin(x).sum() * 3)(jnp.arange(4.0))))
""")


def _damaged_cache(env):
    """The child twice with one cache folder, its entries cut in half in between."""
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "c"
        env = _uncached_env(env, **{parallel.COMPILE_CACHE_ENV: str(folder)})
        runs = []
        for damage in (False, True):
            if damage:
                for f in (folder / parallel._host_key()).iterdir():
                    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            runs.append(subprocess.run([sys.executable, "-c", DAMAGE_CHILD], env=env,
                                       capture_output=True, text=True, cwd=ROOT, timeout=600))
        return runs, str(folder)


@pytest.mark.background(job=_damaged_cache)  # its work is fresh processes
def test_the_cli_says_in_one_line_when_a_cached_program_is_damaged(background):
    """An entry cut short (a run killed while JAX wrote it): JAX warns and compiles again; the
    CLI's settings turn its warning into one line naming the folder, the result unchanged."""
    runs, folder = background
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert "damaged" not in runs[0].stderr and runs[0].stdout == runs[1].stdout
    lines = [ln for ln in runs[1].stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "damaged entry" in lines[0] and folder in lines[0]


def test_only_batched_lapack_calls_count_as_stalling():
    """``num_batch_dims`` in the lowered call: one matrix (solved inline by jaxlib) does not
    keep a program on one device, a batch does, and a call that does not state it does."""
    solve = jax.jit(jnp.linalg.solve)
    one = solve.lower(jnp.ones((64, 64)), jnp.ones((64, 8))).as_text()
    many = solve.lower(jnp.ones((8, 64, 64)), jnp.ones((8, 64, 1))).as_text()
    svd = jax.jit(jax.vmap(lambda a: jnp.linalg.svd(a, compute_uv=False)))
    assert "@lapack_" in one and not parallel._batched_lapack(one)
    assert parallel._batched_lapack(many)
    assert parallel._batched_lapack(svd.lower(jnp.ones((4, 8, 8))).as_text())
    assert not parallel._batched_lapack(jax.jit(jnp.tanh).lower(jnp.ones(3)).as_text())
    unstated = "\n".join(line.replace('num_batch_dims = "0"', "") for line in one.splitlines())
    assert parallel._batched_lapack(unstated)
    # on one device nothing stalls, whatever the program
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    assert not parallel.lapack_stalls(solve, (jnp.ones((8, 64, 64)), jnp.ones((8, 64, 1))), mesh)
