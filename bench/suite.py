"""The benchmarks. Each returns a JSON-able dict: config, cross-checks, timings and ratios.

Sizes come from a config dict (``run.FULL`` or ``run.QUICK``); every timed implementation is
first checked to compute the same numbers as gradflow (``checks``), then timed interleaved with
what it is compared to (see :mod:`bench.harness`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import gradflow
from gradflow import jacobian as J
from gradflow.stack import precision_scope
from bench import filing_day as FD
from bench import flops
from bench.harness import block, compile_jit, ratio, timed


def problem(size: dict, order: str = "layer", checkpoint=None, seed: int = 0):
    """``gradflow.problem`` for an LSTM of ``size = {L, T, H, B}`` (data size ``D = H``)."""
    return gradflow.problem("lstm", layers=size["L"], steps=size["T"], hidden=size["H"],
                            batch=size["B"], seed=seed,
                            stack_options={"order": order, "checkpoint": checkpoint})


def loss_of(pr, loss="last"):
    B, T, _ = pr.xs.shape
    return J.readout_loss(loss, pr.stack.hidden_size, T, B)


def rel_err(a, b) -> float:
    """``max |a - b| / max |b|``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _api_hidden(pr, loss="last"):
    return lambda: gradflow.gradient_map(pr.stack, pr.params, pr.xs, loss=loss, wrt="hidden")


def _api_params(pr, loss="last"):
    return lambda: gradflow.gradient_map(pr.stack, pr.params, pr.xs, loss=loss, wrt="params")


def compile_hidden(pr, loss="last"):
    return compile_jit(J._state_map_local, pr.stack, pr.params, pr.xs, loss_of(pr, loss), "h")


def compile_params(pr, loss="last"):
    return compile_jit(J._params_map, pr.stack, pr.params, pr.xs, loss_of(pr, loss))


def _floor_fns(pr, loss="last"):
    lf = loss_of(pr, loss)
    f = lambda p, x: lf(pr.stack.apply(p, x).top)  # noqa: E731
    return jax.grad(f), jax.grad(f, argnums=1), jax.value_and_grad(f)


# ---------------------------------------------------------------------------------------------
# 1. maps vs plain jax.grad


def floor(cfg) -> dict:
    """Hidden and params maps vs ``jax.grad`` of the same loss through the same stack."""
    size, reps = cfg["std"], cfg["repeats"]
    out = {"config": {**size, "cell": "lstm", "loss": "last", "dtype": "float32"}}
    rows = {}
    for order in cfg.get("orders", ("layer", "wavefront")):
        pr = problem(size, order)
        gp, gx, vg = (jax.jit(f) for f in _floor_fns(pr))
        fns = {"hidden_map": _api_hidden(pr), "params_map": _api_params(pr),
               "grad_params": lambda: block(gp(pr.params, pr.xs)),
               "grad_inputs": lambda: block(gx(pr.params, pr.xs))}
        t = timed(fns, reps)
        hid = _api_hidden(pr)()
        value, _ = vg(pr.params, pr.xs)
        rows[order] = {
            "compile_s": {k: v["compile_s"] for k, v in t.items()},
            "times": t,
            "checks": {"loss_value_rel_err": rel_err(hid.arrays["loss_value"], value)},
            "ratios": {"hidden_map/grad_params": ratio(t["hidden_map"], t["grad_params"]),
                       "params_map/grad_params": ratio(t["params_map"], t["grad_params"]),
                       "hidden_map/grad_inputs": ratio(t["hidden_map"], t["grad_inputs"])}}
        out.setdefault("maps", {})[order] = hid.values
    out["orders"] = rows
    if "wavefront" in rows:
        out["checks"] = {"wavefront_vs_layer_rel_err": rel_err(out["maps"]["wavefront"],
                                                               out["maps"]["layer"])}
        lay, wav = rows["layer"]["times"], rows["wavefront"]["times"]
        out["order_ratio_wavefront/layer"] = {k: ratio(wav[k], lay[k]) for k in lay}
    del out["maps"]
    return out


# ---------------------------------------------------------------------------------------------
# 2. hidden map vs the PyTorch retain_grad loop


def _plain_hidden(pr, loss="last"):
    """Today's map: the same API call with the batch split switched off (one device)."""
    from gradflow import parallel

    def f():
        with parallel.batch_devices(None):
            return gradflow.gradient_map(pr.stack, pr.params, pr.xs, loss=loss, wrt="hidden")
    return f


def torch_peers(pr, cfg, kinds=("stock", "frozen", "wavefront", "wavefront_compiled"),
                device=None):
    """The PyTorch versions of ``pr``'s LSTM hidden map (:mod:`bench.torch_ref`) on its
    weights, on ``device`` (torch's CPU by default): ``({kind: zero-argument callable -> (L, T)
    tensor, waiting for its device}, notes)``. Kinds: ``stock`` (``retain_grad`` loop, weight
    gradients on), ``frozen`` (the same, parameters frozen), ``wavefront`` (manual forward and
    backward with ``bmm``), ``wavefront_compiled`` (its gates through ``torch.compile``; only
    where ``cfg["torch_compile"]``, and left out, with the reason in
    ``notes["compile_error"]``, where inductor fails). ``notes`` also holds torch's thread
    count, the device and the compile time."""
    import torch
    from bench import torch_ref as TR
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg["torch_threads"])
    cells = TR.port_lstm(pr.params, device)
    w, labels = TR.readout(loss_of(pr), device)
    xs = torch.from_numpy(np.array(pr.xs, np.float32)).to(device)
    sync = torch.cuda.synchronize if xs.is_cuda else (lambda: None)
    make = {"stock": lambda: TR.hidden_map(cells, xs, w, labels, "last", True),
            "frozen": lambda: TR.hidden_map(cells, xs, w, labels, "last", False),
            "wavefront": lambda: TR.hidden_map_wavefront(cells, xs, w, labels, "last"),
            "wavefront_compiled": lambda: TR.hidden_map_wavefront(cells, xs, w, labels, "last",
                                                                  compiled=True)}

    def waiting(f):
        def g():
            out = f()
            sync()
            return out
        return g

    notes = {"torch_threads": torch.get_num_threads(), "device": str(xs.device)}
    peers = {}
    for kind in kinds:
        if kind == "wavefront_compiled":
            if not cfg.get("torch_compile", False):
                continue
            t0 = time.perf_counter()
            try:
                waiting(make[kind])()
                notes["compile_s"] = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001  (inductor needs a C++ compiler)
                notes["compile_error"] = repr(e)[:500]
                continue
        peers[kind] = waiting(make[kind])
    return peers, notes


def torch_hidden(cfg) -> dict:
    """gradflow's hidden map (batch split over the devices, and unsplit) vs four PyTorch
    versions: the stock ``retain_grad`` loop (weight gradients on / parameters frozen) and a
    hand-written wavefront forward/backward with ``bmm`` (eager / ``torch.compile``-d gates)."""
    from gradflow import parallel
    size, reps = cfg["std"], cfg["repeats"]
    pr = problem(size)
    ref = _plain_hidden(pr)().values
    found, notes = torch_peers(pr, cfg)
    names = {"stock": "torch_weight_grads"}
    peers = {names.get(k, f"torch_{k}"): f for k, f in found.items()}
    compile_note = None
    if "compile_s" in notes or "compile_error" in notes:
        compile_note = ({"compile_s": notes["compile_s"]} if "compile_s" in notes
                        else {"error": notes["compile_error"]})
    checks = {f"{k}_vs_gradflow_rel_err": rel_err(f().numpy(), ref) for k, f in peers.items()}
    split = _api_hidden(pr)()
    checks["gradflow_split_vs_unsplit_rel_err"] = rel_err(split.values, ref)
    n_dev = len(parallel.devices_for(size["B"])) or 1
    t = timed({"gradflow": _api_hidden(pr), "gradflow_unsplit": _plain_hidden(pr), **peers},
              reps)
    speed = {f"vs_{k[len('torch_'):]}": ratio(t[k], t["gradflow"]) for k in peers}
    speed.update({f"unsplit_vs_{k[len('torch_'):]}": ratio(t[k], t["gradflow_unsplit"])
                  for k in peers})
    best = min(peers, key=lambda k: t[k]["median_s"] if k != "torch_weight_grads" else 1e9)
    speed["vs_strongest_peer"] = ratio(t[best], t["gradflow"])
    return {"config": {**size, "cell": "lstm", "loss": "last", "torch_threads":
                       notes["torch_threads"], "split_devices": n_dev},
            "checks": checks, "torch_compile": compile_note, "strongest_peer": best,
            "compile_s": {k: t[k]["compile_s"] for k in ("gradflow", "gradflow_unsplit")},
            "times": t, "speedup": speed,
            "split_over_unsplit": ratio(t["gradflow"], t["gradflow_unsplit"])}


def user_cell(hidden: int, cells=None):
    """A user's GRU written as a plain step function, wrapped by
    :func:`gradflow.cells.from_function` (the adapter path: no gradflow cell code); ``cells``:
    the ``cells`` module to wrap it with (default gradflow's; the filing-day package's for
    :mod:`bench.filing_day`)."""
    import math as _m
    if cells is None:
        from gradflow import cells

    def init(key, n_in, n_h, dtype):
        kw, ku = jax.random.split(key)
        return {"W": jax.random.normal(kw, (n_in, 3 * n_h), dtype) / _m.sqrt(n_in),
                "U": jax.random.normal(ku, (n_h, 3 * n_h), dtype) / _m.sqrt(n_h),
                "b": jnp.zeros((3 * n_h,), dtype)}

    def step(p, h, x):
        zr, zz, zn = jnp.split(x @ p["W"] + p["b"], 3, -1)
        rr, rz, rn = jnp.split(h @ p["U"], 3, -1)
        r, u = jax.nn.sigmoid(zr + rr), jax.nn.sigmoid(zz + rz)
        h = (1 - u) * jnp.tanh(zn + r * rn) + u * h
        return h, h

    return cells.from_function(step, init, hidden_size=hidden, name="user_gru")


def cells_split(cfg) -> dict:
    """Split / unsplit hidden-map time for several cells at the standard size: the batch split
    is one mechanism for every cell, so the speed-up factor should not depend on the cell."""
    from gradflow import parallel
    size, reps = cfg["std"], cfg["repeats"]
    rows = {}
    for name in cfg.get("split_cells", ("lstm", "gru", "star")):
        cell = user_cell(size["H"]) if name == "user_gru" else name
        pr = gradflow.problem(cell, layers=size["L"], steps=size["T"], hidden=size["H"],
                              batch=size["B"], seed=0)
        plain = _plain_hidden(pr)
        ref = plain().values
        split = _api_hidden(pr)
        t = timed({"split": split, "unsplit": plain}, reps)
        rows[name] = {"times": t, "split_over_unsplit": ratio(t["split"], t["unsplit"]),
                      "checks": {"split_vs_unsplit_rel_err": rel_err(split().values, ref)}}
    return {"config": {**size, "loss": "last", "dtype": "float32",
                       "devices": len(parallel.devices_for(size["B"])) or 1}, "rows": rows}


def _halves(size: dict, n: int, reps: int, cores) -> list:
    """``n`` processes, each timing the unsplit map of ``B / n`` examples pinned to its core of
    ``cores``, all started together once every one has compiled (:func:`bench.probes.half`)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device each
    args = [str(size["L"]), str(size["T"]), str(size["H"]), str(size["B"] // n), str(reps)]
    procs = [subprocess.Popen([sys.executable, "-m", "bench.probes", "half", *args, str(c)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                              cwd=os.path.dirname(os.path.dirname(__file__))) for c in cores]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a timing process failed: {p.communicate()[0][-2000:]}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    out = [json.loads(p.communicate(timeout=900)[0].strip().splitlines()[-1]) for p in procs]
    return out


def split_floor(cfg) -> dict:
    """The batch split against what perfectly independent devices would give on this machine:
    the hidden map split over this process's ``n`` devices, vs its ``n`` halves (``B / n``
    examples each) as ``n`` separate processes, each pinned to its own core and running at
    once (no shared thread pool, no collectives, nothing else), and one such process alone.
    The halves do the same work as the split's devices (same sizes; their own examples, so no
    cross-check of values). The in-process split is timed before and after the processes."""
    from gradflow import parallel
    size, reps = cfg["std"], cfg["repeats"]
    B = size["B"]
    n = cfg.get("floor_processes") or len(parallel.devices_for(B))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if n < 2 or B % n or len(cores) < n:
        return {"config": {**size, "processes": n, "cores": len(cores)},
                "not_applicable": f"needs >= 2 devices dividing B and as many cores (devices "
                                  f"{n}, cores {len(cores)})"}
    pr = problem(size)
    split = _api_hidden(pr)
    split()
    before = timed({"split": split}, reps)["split"]
    together = _halves(size, n, reps, cores[:n])
    alone = _halves(size, n, reps, cores[:1])[0]
    after = timed({"split": split}, reps)["split"]
    split_s = float(np.median(before["times_s"] + after["times_s"]))
    halves_s = max(h["median_s"] for h in together)
    return {"config": {**size, "processes": n, "cores": cores[:n], "loss": "last",
                       "dtype": "float32", "devices": len(parallel.devices_for(B)) or 1},
            "times": {"split_before": before, "split_after": after, "halves_together": together,
                      "half_alone": alone},
            "split_s": split_s, "halves_together_s": halves_s, "half_alone_s": alone["median_s"],
            "split_over_halves": split_s / halves_s}


def wavefront(cfg) -> dict:
    """The hidden map (``gradient_map``, batch split over the devices) in layer and wavefront
    order, same process, interleaved, at several depth x length shapes of one total size: where
    the wavefront (``T + L - 1`` sequential steps instead of ``L * T``) pays, and where not."""
    size, reps = cfg["std"], cfg["repeats"]
    rows = []
    for L, T in cfg.get("order_shapes", ((size["L"], size["T"]),)):
        prs = {o: problem({**size, "L": L, "T": T}, order=o) for o in ("layer", "wavefront")}
        fns = {o: (lambda api=_api_hidden(pr): block(api().values)) for o, pr in prs.items()}
        err = rel_err(fns["wavefront"](), fns["layer"]())
        t = timed(fns, reps)
        rows.append({"L": L, "T": T, "times": t, "wavefront_over_layer":
                     ratio(t["wavefront"], t["layer"]), "checks": {"rel_err": err}})
    return {"config": {**size, "cell": "lstm", "loss": "last"}, "rows": rows}


def accelerator(cfg) -> dict:
    """The hidden map on JAX's default backend (the GPU or TPU where there is one) at
    ``cfg["accelerator"]`` (issue 13: LSTM 16 x 1000 x 256, B 32), same process, interleaved:
    ``gradient_map`` in layer order (lean backward) and in wavefront order, the layer order
    with the lean path off (autodiff), the layer order at the backend's fast matmul mode
    (``matmul_precision="default"``: TensorFloat-32 on recent NVIDIA GPUs; its error against
    the float32 map is reported), and the PyTorch peers on the same device (its CUDA device
    when JAX runs on a GPU; torch's float32 matmuls, TF32 off as torch ships). On a CPU
    (``--quick``, the tests) the same code runs with the peers on the CPU."""
    size = cfg["accelerator"]
    reps = cfg.get("accelerator_repeats", cfg["repeats"])
    backend = jax.default_backend()
    out = {"config": {**size, "cell": "lstm", "loss": "last", "dtype": "float32",
                      "backend": backend, "devices": [str(d) for d in jax.devices()]}}
    prs = {o: problem(size, order=o) for o in ("layer", "wavefront")}
    fast = prs["layer"]._replace(stack=prs["layer"].stack.replace(matmul_precision="default"))
    fns = {o: (lambda api=_api_hidden(pr): block(api().values)) for o, pr in prs.items()}
    fns["layer_autodiff"] = lambda f=_autodiff_hidden(prs["layer"]): np.asarray(f()[1])
    fns["layer_fast_matmul"] = lambda api=_api_hidden(fast): block(api().values)
    ref = fns["layer_autodiff"]()
    checks = {f"{k}_vs_layer_autodiff_rel_err": rel_err(fns[k](), ref)
              for k in ("layer", "wavefront", "layer_fast_matmul")}
    try:
        import torch
    except ImportError as e:
        torch, out["torch"] = None, {"error": str(e)}
    if torch is not None and backend == "gpu" and not torch.cuda.is_available():
        torch, out["torch"] = None, {"error": "JAX runs on a GPU that torch does not see"}
    if torch is not None:
        peers, notes = torch_peers(prs["layer"], cfg, ("stock", "wavefront", "wavefront_compiled"),
                                   "cuda" if backend == "gpu" else None)
        out["torch"] = {**notes, "version": torch.__version__, "tf32_matmul":
                        bool(torch.backends.cuda.matmul.allow_tf32)}
        for k, f in peers.items():
            fns[f"torch_{k}"] = f
            checks[f"torch_{k}_vs_layer_autodiff_rel_err"] = rel_err(f().cpu().numpy(), ref)
    t = timed(fns, reps)
    ours = {k: t[k] for k in ("layer", "wavefront", "layer_autodiff")}
    best = min(ours, key=lambda k: ours[k]["median_s"])
    out.update(checks=checks, times=t, best_gradflow=best, ratios={
        "wavefront/layer": ratio(t["wavefront"], t["layer"]),
        "layer/layer_autodiff": ratio(t["layer"], t["layer_autodiff"]),
        "layer_fast_matmul/layer": ratio(t["layer_fast_matmul"], t["layer"]),
        **{f"{k}/{best}": ratio(t[k], t[best]) for k in t if k.startswith("torch")}})
    return out


def _autodiff_hidden(pr, loss="last"):
    """The hidden map with the lean backward switched off: ``jacobian._state_map_local``'s
    program with ``constant_params=False`` (autodiff of every cell's ``recur``), jitted,
    one device."""
    stack, lf = pr.stack, loss_of(pr, loss)

    @jax.jit
    def f(params, xs):
        B, T, _ = xs.shape
        zeros = {"h": jnp.zeros((stack.layers, B, T), xs.dtype)}
        with precision_scope(stack.matmul_precision):  # the readout too, as the maps
            value, norms = jax.value_and_grad(
                lambda taps: lf(stack.apply(params, xs, taps=taps).top))(zeros)
        return value, jnp.mean(norms["h"], axis=1)
    return lambda: block(f(pr.params, pr.xs))


def _lean_hidden(pr, loss="last"):
    """The hidden map as ``gradient_map`` runs it unsplit (``jacobian._state_map_local``: runs
    of layers through ``stack.lean_layers``), one device."""
    from gradflow import parallel
    lf = loss_of(pr, loss)

    def f():
        with parallel.batch_devices(None):
            return block(J.map_arrays(pr.stack, pr.params, pr.xs, lf, "hidden"))
    return f


def lean(cfg) -> dict:
    """The hidden map as ``gradient_map`` runs it (batch split over the devices, runs of layers
    through ``stack.lean_layers``), the same unsplit, today's code with the lean path off
    (autodiff, one device) and the filing-day map (the code issue 13 timed,
    :mod:`bench.filing_day`, one device; where this checkout's git history has it), same
    process, interleaved, per cell (LSTM, GRU, STAR, a user's GRU through ``from_function``,
    whose steps ``stack.autodiff_step`` makes); LSTM also with the PyTorch peers (stock
    ``retain_grad`` loop, manual wavefront, also ``torch.compile``-d)."""
    from gradflow import parallel
    size, reps = cfg["std"], cfg["repeats"]
    out = {"config": {**size, "loss": "last", "dtype": "float32",
                      "split_devices": len(parallel.devices_for(size["B"])) or 1}, "rows": {}}
    then = None
    if cfg.get("filing_day", True):
        try:
            then = FD.load()
            out["config"]["filing_day_commit"] = FD.COMMIT
        except RuntimeError as e:
            out["filing_day_error"] = str(e)
    for name in cfg.get("lean_cells", ("lstm", "gru", "star")):
        cell = user_cell(size["H"]) if name == "user_gru" else name
        pr = gradflow.problem(cell, layers=size["L"], steps=size["T"], hidden=size["H"],
                              batch=size["B"], seed=0)
        api = _api_hidden(pr)
        fns = {"split": lambda api=api: block(api().values), "lean": _lean_hidden(pr),
               "autodiff": _autodiff_hidden(pr)}
        ref = np.asarray(fns["autodiff"]()[1])
        checks = {"lean_vs_autodiff_rel_err": rel_err(fns["lean"]()[1], ref),
                  "split_vs_autodiff_rel_err": rel_err(fns["split"](), ref)}
        if then is not None:
            fns["filing_day"] = FD.hidden_map(
                then, user_cell(size["H"], then.cells) if name == "user_gru" else name, size)
            checks["filing_day_vs_autodiff_rel_err"] = rel_err(fns["filing_day"](), ref)
        if name == "lstm" and cfg.get("lean_torch", True):
            try:
                import torch
            except ImportError:
                torch = None
            if torch is not None:
                found, notes = torch_peers(pr, cfg, ("stock", "wavefront", "wavefront_compiled"))
                fns.update({f"torch_{k}": f for k, f in found.items()})
                if "compile_error" in notes:
                    checks["torch_compile_error"] = notes["compile_error"][:300]
                for k in [k for k in fns if k.startswith("torch")]:
                    checks[f"{k}_vs_autodiff_rel_err"] = rel_err(fns[k]().numpy(), ref)
                out["config"]["torch_threads"] = notes["torch_threads"]
        t = timed(fns, reps)
        row = {"times": t, "checks": checks,
               "lean_over_autodiff": ratio(t["lean"], t["autodiff"]),
               "split_over_autodiff": ratio(t["split"], t["autodiff"]),
               **({"split_over_filing_day": ratio(t["split"], t["filing_day"]),
                   "autodiff_over_filing_day": ratio(t["autodiff"], t["filing_day"])}
                  if "filing_day" in t else {}),
               "speedup": {f"lean_vs_{k}": ratio(t[k], t["lean"]) for k in fns if k != "lean"}}
        row["speedup"].update({f"split_vs_{k}": ratio(t[k], t["split"])
                               for k in fns if k.startswith("torch")})
        row["speedup"].update({f"autodiff_vs_{k}": ratio(t[k], t["autodiff"])
                               for k in fns if k.startswith("torch")})
        out["rows"][name] = row
    return out


# ---------------------------------------------------------------------------------------------
# 3. Jacobian maps


def jacobian(cfg) -> dict:
    size, reps = cfg["jac"], cfg["jac_repeats"]
    pr = problem(size)
    L, T, H, B = size["L"], size["T"], size["H"], size["B"]
    exact = lambda: gradflow.jacobian_map(pr.stack, pr.params, pr.xs)  # noqa: E731
    probe = lambda: gradflow.jacobian_map(pr.stack, pr.params, pr.xs, method="probe",  # noqa
                                          probes=16, seed=0)
    chunk = min(J._basis_chunk(L, T, B, H, "rms"), H)

    # H separate VJPs: one jitted VJP per basis cotangent of the target
    def one_vjp(params, xs, i):
        vjp = J._target_vjp(pr.stack, params, xs, (L - 1, T - 1))
        cot = jnp.broadcast_to(jax.nn.one_hot(i, H, dtype=xs.dtype), (B, H))
        return jnp.sum(vjp(cot) ** 2, axis=-1)  # (L, B, T)
    c_vjp, t_cv = compile_jit(one_vjp, pr.params, pr.xs, jnp.int32(0))

    def separate():
        acc = None
        for i in range(H):
            r = c_vjp(pr.params, pr.xs, jnp.int32(i))
            acc = r if acc is None else acc + r
        return block(jnp.mean(jnp.sqrt(acc / H), axis=1))

    t0 = time.perf_counter()
    ex = exact()
    t_ce = time.perf_counter() - t0
    t0 = time.perf_counter()
    pb = probe()
    t_cp = time.perf_counter() - t0
    sep = np.asarray(separate())
    checks = {"separate_vjps_vs_exact_rel_err": rel_err(sep, ex.values)}
    fns = {"exact": exact, "probe_k16": probe}
    t_single = timed({"one_vjp": lambda: block(c_vjp(pr.params, pr.xs, jnp.int32(0)))}, reps)
    out = {"config": {**size, "cell": "lstm", "target": [L - 1, T - 1], "norm": "rms",
                      "exact_chunk": chunk, "probes": 16},
           "first_call_s": {"exact": t_ce, "probe_k16": t_cp}, "compile_s": {"one_vjp": t_cv}}
    try:
        import torch
        from bench import torch_ref as TR
        cells = TR.port_lstm(pr.params)
        xs = torch.from_numpy(np.array(pr.xs, np.float32))
        checks["torch_jacrev_vs_exact_rel_err"] = rel_err(TR.jacobian_map(cells, xs).numpy(),
                                                          ex.values)
        fns["torch_jacrev_vmap"] = lambda: TR.jacobian_map(cells, xs)
    except ImportError:
        out["torch"] = "not installed"
    t = timed(fns, reps)
    out["compile_s"].update({k: v["compile_s"] for k, v in t.items()})
    t["H_separate_vjps"] = {"median_s": H * t_single["one_vjp"]["median_s"],
                            "note": f"{H} x median of one jitted VJP"}
    t["one_vjp"] = t_single["one_vjp"]
    err = np.abs(pb.values - ex.values)
    nz = ex.values > 0
    checks["probe_k16"] = {
        "median_rel_err": float(np.median(err[nz] / ex.values[nz])),
        "max_rel_err": float(np.max(err[nz] / ex.values[nz])),
        "share_within_2_stderr": float(np.mean(err[nz] <= 2 * pb.arrays["stderr"][nz])),
        "median_stderr_over_value": float(np.median(pb.arrays["stderr"][nz] / ex.values[nz]))}
    out.update(checks=checks, times=t, ratios={
        "exact/H_separate_vjps": ratio(t["exact"], t["H_separate_vjps"]),
        "probe_k16/exact": ratio(t["probe_k16"], t["exact"])})
    if "torch_jacrev_vmap" in t:
        out["ratios"]["speedup_vs_torch_jacrev"] = ratio(t["torch_jacrev_vmap"], t["exact"])
    return out


def spectral(cfg) -> dict:
    """Singular values one matrix per LAPACK call (``linalg.singular_values``, what gradflow
    runs: jaxlib 0.10.2's batched kernels can hang when two run at once) against the batched
    call (``jnp.linalg.svd``) on the same matrices, one call at a time; then the time of local
    gains with spectral norms (one program: local gains take no batch split of their own; the
    atlas splits its seeds)."""
    from gradflow.linalg import singular_values
    reps, size = cfg["repeats"], cfg["spectral"]
    out = {"config": dict(size), "times": {}, "ratios": {}, "checks": {}}
    for n, count in size["matrices"]:
        a = jax.random.normal(jax.random.key(0), (count, n, n), jnp.float32) / np.sqrt(n)
        one = jax.jit(singular_values)
        batched = jax.jit(lambda m: jnp.linalg.svd(m, compute_uv=False))
        out["checks"][f"{n}x{n}_rel_err"] = rel_err(np.asarray(one(a)), np.asarray(batched(a)))
        t = timed({"per_matrix": lambda: block(one(a)), "batched": lambda: block(batched(a))},
                  reps)
        out["times"][f"{count}x{n}x{n}"] = t
        out["ratios"][f"per_matrix/batched {count}x{n}x{n}"] = ratio(t["per_matrix"],
                                                                    t["batched"])
    pr = gradflow.problem(size["cell"], layers=size["L"], steps=size["T"], hidden=size["H"],
                          batch=size["B"], seed=0)
    out["times"]["local_gains"] = timed(
        {"local_gains": lambda: gradflow.local_gains(*pr[:3])}, reps)["local_gains"]
    return out


# ---------------------------------------------------------------------------------------------
# 4. FLOP/s


def matmul_peak(n: int, reps: int) -> dict:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    c, _ = compile_jit(lambda x, y: x @ y, a, b)
    t = timed({"matmul": lambda: block(c(a, b))}, reps)["matmul"]
    return {"n": n, "flops": 2 * n ** 3, "time": t, "flop_s": 2 * n ** 3 / t["median_s"]}


def flop_rate(cfg, floor_result: dict | None = None) -> dict:
    size, reps = cfg["std"], cfg["repeats"]
    L, T, H, B = size["L"], size["T"], size["H"], size["B"]
    G = flops.gate_blocks("lstm")
    pr = problem(size)
    compiled, _ = compile_hidden(pr)
    fwd_c, _ = compile_jit(lambda p, x: pr.stack.apply(p, x).top, pr.params, pr.xs)
    n_map = flops.hidden_map(L, T, H, B, H, G)
    n_fwd = flops.forward(L, T, H, B, H, G)
    peak = matmul_peak(cfg["matmul"], reps)
    split = _api_hidden(pr)
    split()
    t = timed({"hidden_map": lambda: block(compiled(pr.params, pr.xs)),
               "hidden_map_split": split,
               "forward": lambda: block(fwd_c(pr.params, pr.xs))}, reps)
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        xla_flops = float(ca.get("flops", float("nan")))
    except Exception as e:  # noqa: BLE001  (not every backend reports it)
        xla_flops = repr(e)
    rate = n_map / t["hidden_map"]["median_s"]
    rate_split = n_map / t["hidden_map_split"]["median_s"]
    return {"config": {**size, "cell": "lstm", "gate_blocks": G, "matmul_n": cfg["matmul"]},
            "flops": {"hidden_map": n_map, "forward": n_fwd,
                      "backward_inputs": n_map - n_fwd,
                      "xla_cost_analysis_hidden_map": xla_flops,
                      "note": "XLA's cost analysis counts a while-loop body once, not once per "
                              "iteration, so it undercounts scans"},
            "times": t, "matmul": peak,
            "flop_s": {"hidden_map": rate, "hidden_map_split": rate_split,
                       "forward": n_fwd / t["forward"]["median_s"], "matmul": peak["flop_s"]},
            "fraction_of_matmul": {"hidden_map": rate / peak["flop_s"],
                                   "hidden_map_split": rate_split / peak["flop_s"],
                                   "forward": n_fwd / t["forward"]["median_s"] / peak["flop_s"]}}


# ---------------------------------------------------------------------------------------------
# 5. scaling and memory


def scaling(cfg) -> dict:
    base, reps = cfg["std"], cfg["scaling_repeats"]
    G = flops.gate_blocks("lstm")
    rows, seen = [], {}
    for dim, values in cfg["scaling"].items():
        for v in values:
            size = {**base, dim: v}
            key = tuple(sorted(size.items()))
            if key not in seen:
                pr = problem(size)
                seen[key] = timed({"hidden_map": _api_hidden(pr)}, reps)["hidden_map"]
            t = seen[key]
            n = flops.hidden_map(size["L"], size["T"], size["H"], size["B"], size["H"], G)
            rows.append({"vary": dim, **size, "compile_s": t["compile_s"],
                         "median_s": t["median_s"], "flop_s": n / t["median_s"]})
    return {"config": {"base": base, "repeats": reps}, "rows": rows}


def _subprocess_json(args, env=None, timeout=600) -> dict:
    env = {**os.environ, **(env or {})}
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def memory(cfg) -> dict:
    m = cfg["memory"]
    args = ["bench.probes", "memory", str(m["L"]), str(m["T"]), str(m["H"]), str(m["B"])]
    run = _subprocess_json(args + ["auto", "run"])
    no_ckpt = _subprocess_json(args + ["none", "compile"])
    return {"config": m, "checkpoint_auto": run, "no_checkpoint_compile_only": no_ckpt}


def sweep(cfg) -> dict:
    s = cfg["sweep"]
    args = ["bench.probes", "sweep", ",".join(s["cells"]), str(s["seeds"]), str(s["L"]),
            str(s["T"]), str(s["H"]), str(s["B"]), str(cfg["repeats"])]
    rows = {}
    for n in (1, 2):
        rows[f"{n}_devices"] = _subprocess_json(
            args, {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"})
    out = {"config": s, "rows": rows}
    try:
        out["speedup_2_vs_1"] = rows["1_devices"]["median_s"] / rows["2_devices"]["median_s"]
        out["checks"] = {"2_vs_1_device_rel_err": rel_err(rows["2_devices"]["checksum"],
                                                          rows["1_devices"]["checksum"])}
    except (KeyError, TypeError):
        pass
    return out


def atlas(cfg) -> dict:
    """The atlas's throughput (maps per second, cold and warm) on 1 simulated CPU device and on
    all (``cfg["atlas"]["devices"]``, default 2), each in a fresh process, alternating
    ``rounds`` times (default 1), so the ratios are measured side by side; the maps of every
    device count must agree."""
    import statistics
    s = cfg["atlas"]
    args = ["bench.probes", "atlas", ",".join(s["cells"]), str(s["seeds"]), str(s["L"]),
            str(s["T"]), str(s["H"]), str(s["B"]), str(cfg["repeats"])]
    counts = (1, s.get("devices", 2))
    runs = {f"{n}_devices": [] for n in counts}
    for _ in range(s.get("rounds", 1)):
        for n in counts:
            runs[f"{n}_devices"].append(_subprocess_json(
                args, {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}))
    out = {"config": s, "runs": runs}
    try:
        rows = {k: {m: statistics.median(r[m] for r in v) for m in
                    ("maps_per_s", "maps_per_s_cold", "median_s", "first_call_s")}
                for k, v in runs.items()}
        for k, v in rows.items():
            v.update(devices=runs[k][0]["devices"], maps=runs[k][0]["maps"],
                     result_devices=runs[k][0]["result_devices"])
        out["rows"] = rows
        one, many = rows[f"{counts[0]}_devices"], rows[f"{counts[1]}_devices"]
        out["all_vs_1_device"] = {"warm": many["maps_per_s"] / one["maps_per_s"],
                                  "cold": many["maps_per_s_cold"] / one["maps_per_s_cold"]}
        out["checks"] = {"all_vs_1_device_rel_err": max(
            rel_err(r["checksum"], runs[f"{counts[0]}_devices"][0]["checksum"])
            for v in runs.values() for r in v)}
    except (KeyError, TypeError, IndexError):
        pass
    return out


def glibc(cfg) -> dict:
    """The hidden map (split and unsplit) in fresh processes of three kinds, alternating:
    the default C allocator; started with ``GLIBC_TUNABLES`` (:data:`gradflow.parallel.
    GLIBC_TUNABLES`); and the default process calling :func:`gradflow.parallel.tune_malloc`
    first (what the ``gradflow`` CLI does). Each process reports the median of ``repeats``
    calls."""
    import statistics
    from gradflow.parallel import GLIBC_TUNABLES
    size, reps = cfg["std"], cfg["repeats"]
    args = ["bench.probes", "hidden", str(size["L"]), str(size["T"]), str(size["H"]),
            str(size["B"]), str(reps)]
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    runs = {"default": [], "glibc_tunables_env": [], "mallopt": []}
    for _ in range(cfg.get("glibc_rounds", 3)):
        for k in runs:
            env = dict(base)
            if k == "glibc_tunables_env":
                env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
            r = subprocess.run([sys.executable, "-m", *args, k], capture_output=True,
                               text=True, env=env, timeout=900,
                               cwd=os.path.dirname(os.path.dirname(__file__)))
            runs[k].append(json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0
                           else {"error": r.stderr[-2000:]})
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("split_s", "unsplit_s")}
           for k, v in runs.items() if v and all("error" not in x for x in v)}
    out = {"config": {**size, "tunables": GLIBC_TUNABLES}, "runs": runs, "median_s": med}
    if "default" in med:
        out["over_default"] = {k: {m: v[m] / med["default"][m] for m in v}
                               for k, v in med.items() if k != "default"}
    return out


def cli_start(cfg) -> dict:
    """The CLI's main job from a fresh process (``gradflow heatmap --cell lstm`` with
    ``cfg["cli"]``: ``--layers 16``, the README's first command), wall time including Python's
    start and JAX's imports: without the compilation cache (``GRADFLOW_COMPILE_CACHE=off``) and
    with its programs already in a cache folder (primed by one run first), processes
    alternating. Every run writes its map (``--data``): all must equal the primed run's."""
    import shutil
    import statistics
    import tempfile
    extra, rounds = list(cfg["cli"]), cfg.get("cli_rounds", 3)
    base = {k: v for k, v in os.environ.items()
            if k not in ("JAX_COMPILATION_CACHE_DIR", "GRADFLOW_COMPILE_CACHE",
                         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    tmp = tempfile.mkdtemp(prefix="gradflow-bench-cli-")
    kinds = {"no_cache": "off", "cache_warm": os.path.join(tmp, "cache")}

    def one(kind, i):
        data = os.path.join(tmp, f"{kind}{i}.npz")
        cmd = [sys.executable, "-m", "gradflow", "heatmap", "--cell", "lstm", *extra,
               "--out", os.path.join(tmp, f"{kind}{i}.png"), "--data", data]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                           env={**base, "GRADFLOW_COMPILE_CACHE": kinds[kind]})
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr[-2000:]}")
        return wall, np.asarray(gradflow.load(data).values)

    try:
        prime_s, ref = one("cache_warm", "prime")
        walls = {k: [] for k in kinds}
        err = 0.0
        for i in range(rounds):
            for k in kinds:
                w, v = one(k, i)
                walls[k].append(w)
                err = max(err, rel_err(v, ref))
        kept = os.listdir(kinds["cache_warm"])
        n_files = sum(len(os.listdir(os.path.join(kinds["cache_warm"], d))) for d in kept)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    return {"config": {"command": " ".join(["gradflow heatmap --cell lstm", *extra]),
                       "rounds": rounds},
            "walls_s": walls, "median_s": med, "prime_s": prime_s, "cache_files": n_files,
            "ratios": {"cache_warm/no_cache": med["cache_warm"] / med["no_cache"]},
            "checks": {"maps_vs_primed_rel_err": err}}


def split_sizes(cfg) -> dict:
    """Where the batch split pays on this machine: split (every device, ``"all"``) / one device
    for LSTM maps of several ``B x H`` (``cfg["split_sizes"]``, ``cfg["split_layers"]`` x 32
    steps), interleaved, with what the default ``"auto"`` setting chooses
    (:func:`gradflow.parallel.devices_for`) and whether its choice was the faster one."""
    from gradflow import parallel
    L, T, reps = cfg.get("split_layers", 8), 32, cfg["repeats"]
    rows = []
    for B, H in cfg["split_sizes"]:
        pr = gradflow.problem("lstm", layers=L, steps=T, hidden=H, batch=B, seed=0)
        plain = _plain_hidden(pr)
        with parallel.batch_devices("all"):
            split = _api_hidden(pr)
            t = timed({"split": split, "unsplit": plain}, reps)
            err = rel_err(split().values, plain().values)
        with parallel.batch_devices("auto"):
            auto = len(parallel.devices_for(B, H))
        r = ratio(t["split"], t["unsplit"])
        rows.append({"B": B, "H": H, "times": t, "split_over_unsplit": r, "auto_devices": auto,
                     "auto_chose_faster": (auto > 1) == (r < 1),
                     "checks": {"split_vs_unsplit_rel_err": err}})
    return {"config": {"L": L, "T": T, "devices": len(jax.devices()),
                       "min_rows_x_width": parallel.MIN_ROWS_X_WIDTH}, "rows": rows}


def dense_rnn(layers: int, hidden: int, features: int, seed: int = 0):
    """``(model, params)``: a user's model :func:`gradflow.model_map` takes and a ``Stack`` does
    not express: ``layers`` tanh layers, each also reading the inputs (a skip connection), one
    ``gradflow.tap`` per layer, in the user's own ``lax.scan``; examples independent."""
    k = iter(jax.random.split(jax.random.key(seed), 4))
    L, H, D = layers, hidden, features
    params = {"V0": jax.random.normal(next(k), (D, H)) / D ** 0.5,
              "U": jax.random.normal(next(k), (L, H, H)) / H ** 0.5,
              "X": 0.1 * jax.random.normal(next(k), (L, D, H)) / D ** 0.5,
              "W": jax.random.normal(next(k), (L, H, H)) / H ** 0.5}

    def dense_rnn_model(p, xs, taps):
        def step(hs, inp):
            x, tap_t = inp
            new, below = [], x @ p["V0"]
            for l in range(L):
                h = gradflow.tap(jnp.tanh(below + hs[l] @ p["U"][l] + x @ p["X"][l]), tap_t[l])
                new.append(h)
                below = h @ p["W"][l]
            return tuple(new), new[-1]

        h = jnp.zeros((xs.shape[0], H), xs.dtype)
        _, top = jax.lax.scan(step, (h,) * L, (xs.swapaxes(0, 1), taps.swapaxes(0, 1)))
        return top.swapaxes(0, 1)

    return dense_rnn_model, params


def model_split(cfg) -> dict:
    """:func:`gradflow.model_map` of a user's model (:func:`dense_rnn`, ``cfg["model_split"]``
    sizes) split over every device (``couples_batch=False``, setting ``"all"``) against one
    device (the default, ``couples_batch=True``), interleaved, per batch size."""
    from gradflow import parallel
    c = cfg["model_split"]
    model, params = dense_rnn(c["L"], c["H"], c["D"])
    rows = []
    for B in c["B"]:
        xs = jax.random.normal(jax.random.key(1), (B, c["T"], c["D"]))
        one = lambda xs=xs: gradflow.model_map(  # noqa: E731
            model, params, xs, layers=c["L"]).values
        with parallel.batch_devices("all"):
            split = lambda xs=xs: gradflow.model_map(  # noqa: E731
                model, params, xs, layers=c["L"], couples_batch=False).values
            t = timed({"split": split, "one_device": one}, cfg["repeats"])
            err = rel_err(split(), one())
            used = len(parallel.devices_for(B)) or 1
        rows.append({"B": B, "times": t, "devices": used,
                     "split_over_one": ratio(t["split"], t["one_device"]),
                     "checks": {"split_vs_one_rel_err": err}})
    return {"config": {**c, "devices": len(jax.devices())}, "rows": rows}
