"""Subprocess entry points: peak memory of a long checkpointed map, and sweep timing on N devices.

``python -m bench.probes memory L T H B auto|none run|compile`` prints one JSON line: the compiled
program's memory analysis and, with ``run``, the time of one map and the process peak RSS.
``python -m bench.probes hidden L T H B REPEATS [default|mallopt]`` times the hidden map split
over the CPU's cores and unsplit (for the allocator comparison, which needs fresh processes).
``python -m bench.probes half L T H B REPEATS CORE`` times the unsplit hidden map of ``B``
examples on one device, pinned to CPU core ``CORE``, starting when a line arrives on stdin (so
several such processes run at once: :func:`bench.suite.split_floor`).
``python -m bench.probes sweep CELLS SEEDS L T H B REPEATS`` times ``gradflow.sweep`` on the
devices this process sees (set ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` first).
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time


def _rss_mib() -> float:
    """This process's peak resident set size in MiB.

    Linux's ``VmHWM`` belongs to the address space that ``execve`` creates, whereas
    ``getrusage().ru_maxrss`` survives ``execve`` and so reports the parent's peak (the bench
    process, torch and JAX loaded) for a child started from it; ``ru_maxrss`` only where there
    is no ``/proc``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def memory(L, T, H, B, checkpoint, mode):
    import jax
    import gradflow
    from gradflow import jacobian as J
    base_rss = _rss_mib()
    pr = gradflow.problem("lstm", layers=L, steps=T, hidden=H, batch=B, seed=0,
                          stack_options={"checkpoint": None if checkpoint == "none"
                                         else checkpoint})
    lf = J.readout_loss("last", H, T, B)
    t0 = time.perf_counter()
    compiled = J._state_map_local.lower(pr.stack, pr.params, pr.xs, lf, "h").compile()
    out = {"checkpoint": checkpoint, "compile_s": time.perf_counter() - t0,
           "rss_before_compile_mib": base_rss}
    try:
        ma = compiled.memory_analysis()
        out["memory_analysis_bytes"] = {k: int(getattr(ma, k)) for k in (
            "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
            "generated_code_size_in_bytes")}
        out["memory_analysis_total_gib"] = sum(
            v for k, v in out["memory_analysis_bytes"].items() if "generated" not in k) / 2**30
    except Exception as e:  # noqa: BLE001
        out["memory_analysis_bytes"] = repr(e)
    if mode == "run":
        rss0 = _rss_mib()
        t0 = time.perf_counter()
        vals = jax.block_until_ready(compiled(pr.params, pr.xs))
        out["run_s"] = time.perf_counter() - t0
        out["rss_before_run_mib"] = rss0
        out["peak_rss_mib"] = _rss_mib()
        out["map_finite"] = bool(jax.numpy.all(jax.numpy.isfinite(vals[1])))
    print(json.dumps(out))


def sweep(cells, seeds, L, T, H, B, repeats):
    """Time ``gradflow.sweep_arrays`` (cells x seeds, the seeds sharded over all devices).

    The first call compiles (``sweep`` caches the jitted program per configuration), later
    calls reuse it; the maps are checked against ``gradflow.sweep``'s results.
    """
    import jax
    import numpy as np
    from gradflow import sweep as S
    from gradflow.stack import Stack
    cells = cells.split(",")
    stacks = [Stack(c, L, H, H) for c in cells]
    go = lambda: jax.block_until_ready(  # noqa: E731
        [S.sweep_arrays(st, range(seeds), steps=T, batch=B)[1] for st in stacks])
    t0 = time.perf_counter()
    out = go()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = go()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    res = S.sweep(cells, range(seeds), layers=L, steps=T, hidden=H, batch=B)
    err = max(float(np.max(np.abs(np.asarray(o) - r.values))) for o, r in
              zip(out, res.values()))
    print(json.dumps({"devices": len(jax.devices()), "median_s": med, "times_s": times,
                      "first_call_s": first, "compile_s_estimate": first - med,
                      "api_vs_timed_max_abs_diff": err,
                      "result_devices": {c: r.config["devices"] for c, r in res.items()},
                      "checksum": [float(np.sum(np.asarray(o))) for o in out]}))


def atlas(cells, seeds, L, T, H, B, repeats):
    """Throughput of ``gradflow.atlas.measure`` in maps per second on this process's devices.

    The grid: ``cells`` x inits (orthogonal, torch) x input scales (0.1, 1) x losses (last,
    all) x wrt (params, hidden), ``seeds`` seeds, one size (one compiled program per cell).
    The first call compiles and measures (cold); later calls reuse the programs (warm: the
    problems are rebuilt each call, as an atlas does per group). One JSON line.
    """
    import jax
    import numpy as np
    from gradflow import atlas as A
    grid = A.Grid(cells=tuple(cells.split(",")), inits=("orthogonal", "torch"),
                  input_scales=(0.1, 1.0), hidden=(H,), sizes=((L, T),), losses=("last", "all"),
                  wrts=("params", "hidden"), seeds=tuple(range(seeds)), batch=B)
    conds = grid.conditions()
    n_maps = len(conds) * seeds
    t0 = time.perf_counter()
    out = A.measure(conds, progress=False)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = A.measure(conds, progress=False)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({"devices": len(jax.devices()), "maps": n_maps, "median_s": med,
                      "times_s": times, "first_call_s": first,
                      "maps_per_s": n_maps / med, "maps_per_s_cold": n_maps / first,
                      "result_devices": sorted({r.config["devices"] for r in out.values()}),
                      "checksum": [float(np.nansum(out[A.condition_key(c)].values))
                                   for c in conds]}))


def hidden(L, T, H, B, repeats, mode="default"):
    """Median time of the hidden map split over this process's devices and unsplit (one JSON
    line); the process's devices: one per CPU core unless ``XLA_FLAGS`` says otherwise.
    ``mode="mallopt"`` first calls :func:`gradflow.parallel.tune_malloc`."""
    import os
    from gradflow import parallel
    tuned = parallel.tune_malloc() if mode == "mallopt" else False
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        parallel.use_cpu_devices(os.cpu_count() or 1)
    import jax
    import gradflow
    pr = gradflow.problem("lstm", layers=L, steps=T, hidden=H, batch=B, seed=0)

    def split():
        return jax.block_until_ready(gradflow.gradient_map(*pr[:3]).values)

    def unsplit():
        with parallel.batch_devices(None):
            return jax.block_until_ready(gradflow.gradient_map(*pr[:3]).values)
    split(), unsplit()
    times = {"split_s": [], "unsplit_s": []}
    cpu = {"split_cpu_s": [], "unsplit_cpu_s": []}  # CPU time of all threads: load-independent
    for _ in range(repeats):
        for k, f in (("split_s", split), ("unsplit_s", unsplit)):
            c0 = time.process_time()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
            cpu[k.replace("_s", "_cpu_s")].append(time.process_time() - c0)
    print(json.dumps({**{k: statistics.median(v) for k, v in {**times, **cpu}.items()},
                      "times": times, "cpu_times": cpu, "devices": len(jax.devices()),
                      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                      "mode": mode, "mallopt_applied": tuned,
                      "peak_rss_mib": _rss_mib()}))


def half(L, T, H, B, repeats, core):
    """One JSON line: the median of ``repeats`` unsplit hidden maps of ``B`` examples, this
    process pinned to CPU core ``core`` before JAX starts (so XLA's pool has one thread). Prints
    ``ready`` after compiling and warming up, then waits for a line on stdin before timing."""
    import os
    os.sched_setaffinity(0, {core})
    from gradflow import parallel
    parallel.use_cpu_devices(1)
    import jax
    import gradflow
    pr = gradflow.problem("lstm", layers=L, steps=T, hidden=H, batch=B, seed=0)

    def f():
        return jax.block_until_ready(gradflow.gradient_map(*pr[:3]).values)
    f(), f()
    print("ready", flush=True)
    sys.stdin.readline()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times), "times": times, "batch": B,
                      "core": core, "affinity": sorted(os.sched_getaffinity(0)),
                      "devices": len(jax.devices())}), flush=True)


if __name__ == "__main__":
    cmd, *a = sys.argv[1:]
    if cmd == "memory":
        memory(int(a[0]), int(a[1]), int(a[2]), int(a[3]), a[4] if a[4] in ("auto", "none")
               else int(a[4]), a[5])
    elif cmd == "hidden":
        hidden(*map(int, a[:5]), *a[5:])
    elif cmd == "half":
        half(*map(int, a[:7]))
    elif cmd == "sweep":
        sweep(a[0], int(a[1]), *map(int, a[2:]))
    elif cmd == "atlas":
        atlas(a[0], int(a[1]), *map(int, a[2:]))
    else:
        raise SystemExit(f"unknown probe {cmd!r}")
