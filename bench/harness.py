"""Timing, compilation and machine description shared by every benchmark.

Times are wall-clock medians of ``repeats`` calls after a warm-up call; JAX results are waited
for with ``jax.block_until_ready``. Implementations compared in one ratio are timed interleaved
(A, B, A, B, ...), so a slow spell of the machine hits both sides alike.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import jax


def machine() -> dict:
    """Platform, CPU model, core count, memory, library versions and JAX devices."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    import jaxlib
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem,
            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def block(x):
    """Wait for every array in ``x`` (JAX arrays; other leaves pass through)."""
    return jax.block_until_ready(x)


def compile_jit(fn, *args, static_argnames=(), **kwargs):
    """``(compiled, seconds)``: ``jax.jit(fn).lower(*args, **kwargs).compile()`` and its time."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, static_argnames=static_argnames)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - t0


def timed(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict:
    """Median wall time of each zero-argument callable, interleaved over ``repeats`` rounds.

    Each callable must wait for its own result (``block_until_ready``). Returns
    ``{name: {"median_s", "min_s", "times_s", "first_s", "compile_s"}}``: ``first_s`` is the
    first (warm-up) call, ``compile_s = first_s - median_s`` the tracing and compilation it paid
    (about 0 when the function was compiled before).
    """
    first = {}
    for w in range(warmup):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if w == 0:
                first[k] = time.perf_counter() - t0
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    out = {}
    for k, v in times.items():
        med = statistics.median(v)
        out[k] = {"median_s": med, "min_s": min(v), "times_s": [round(t, 6) for t in v]}
        if k in first:
            out[k].update(first_s=first[k], compile_s=max(first[k] - med, 0.0))
    return out


def ratio(a: dict, b: dict) -> float:
    """Median time of ``a`` over median time of ``b``."""
    return a["median_s"] / b["median_s"]
