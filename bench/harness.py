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


# AMD's CPU families by microarchitecture ("AMD EPYC" names Zen 1 and Zen 5 alike); within
# family 23 and 25 the model tells the generations apart: ([(models, name)], otherwise)
_AMD_FAMILIES = {23: ([(range(0x00, 0x30), "Zen 1")], "Zen 2"),
                 25: ([(range(0x10, 0x20), "Zen 4"), (range(0x60, 0xB0), "Zen 4")], "Zen 3"),
                 26: ([], "Zen 5")}


def _amd_arch(family: int, model: int) -> str:
    """``"Zen 3"`` for family 25 model 1, ``"Zen 4"`` for model 17, ... ('' if unknown)."""
    ranges, other = _AMD_FAMILIES.get(family, ([], ""))
    return next((name for models, name in ranges if model in models), other)


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU as ``/proc/cpuinfo`` tells it apart: model name, family and model, the widest
    vector instructions and the last-level cache, e.g. ``"AMD EPYC (family 23 model 1: Zen
    1/2; AVX2; L3 8 MiB)"``. A VM's model name alone can hide machines 7x apart (a 2-core "AMD
    EPYC" ran a 4096^2 matmul at 54 GFLOP/s one day and 314-409 another).

    >>> cpu_description("vendor_id : AuthenticAMD\\ncpu family : 26\\nmodel : 2\\n"
    ...                 "model name : AMD EPYC\\nflags : fpu avx2 avx512f\\n").split("; L")[0]
    'AMD EPYC (family 26 model 2: Zen 5; AVX-512'
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return platform.processor() or ""
    info = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())  # the first processor's lines
    name = info.get("model name") or platform.processor() or ""
    flags = set(info.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    family, model = info.get("cpu family", "?"), info.get("model", "?")
    arch = (_amd_arch(int(family), int(model)) if info.get("vendor_id") == "AuthenticAMD"
            and family.isdigit() and model.isdigit() else "")
    detail = [f"family {family} model {model}" + (f": {arch}" if arch else ""), isa]
    llc = _last_level_cache()
    if llc:
        detail.append(llc)
    return f"{name} ({'; '.join(detail)})"


def _last_level_cache() -> str:
    """``"L3 8 MiB"`` from the first CPU's sysfs cache entries ('' where there are none)."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    best = None
    try:
        for entry in os.listdir(root):
            if entry.startswith("index"):
                with open(f"{root}/{entry}/level") as f:
                    level = int(f.read())
                with open(f"{root}/{entry}/size") as f:
                    size = f.read().strip()
                if best is None or level > best[0]:
                    best = (level, size)
    except (OSError, ValueError):
        return ""
    if best is None:
        return ""
    level, size = best
    if size.endswith("K") and size[:-1].isdigit() and int(size[:-1]) % 1024 == 0:
        size = f"{int(size[:-1]) // 1024} MiB"
    return f"L{level} {size}"


def machine() -> dict:
    """Platform, CPU (:func:`cpu_description`), core count, memory, library versions and JAX
    devices."""
    cpu = cpu_description()
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
