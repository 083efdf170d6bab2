r"""Split a map's batch over devices: the examples of a map are independent.

A stack treats every example on its own (every cell acts row by row on ``(B, H)`` states; a cell
whose step couples the examples, ``Cell.couples_batch`` as BN-STAR with batch statistics, is
never split), so the
per-example state cotangents :math:`\partial\mathcal L/\partial s^l_t[b]` of a state map need
only the loss gradient w.r.t. example ``b``'s own top-layer outputs. :func:`state_map` runs the
hidden/cell map as two ``jax.shard_map`` programs on a 1-d ``Mesh(devices, ("batch",))``
(:func:`_run_halves`): device ``k`` runs the forward pass of its ``B/n`` examples and keeps its
pullback; the ``(B, T, H)`` top-layer outputs are copied to the first device (1 MiB at ``B=32,
T=64, H=128``), which evaluates the (any) loss and its gradient
:math:`\bar y = \partial\mathcal L/\partial y` on the whole batch; each device pulls its own
slice of :math:`\bar y` back through its examples. The map is then combined exactly:

.. math:: G[l,t] = \frac1B \sum_b \|\partial\mathcal L/\partial s^l_t[b]\|_2
          = \frac1n \sum_k \frac{n}{B}\sum_{b \in k} \|\cdot\|_2

(each device's mean over its examples, averaged on the first device), so the split map equals
the unsplit one up to float summation order, for any loss (the batch mean of the default
readout loss, i.e. its ``1/B`` factor on each example's gradient, is carried by
:math:`\bar y`). The params map is not split: its per-step
:math:`\mathrm{mean}_\theta|\sum_b g_b|` does not decompose over examples. The Jacobian maps
of :func:`gradflow.jacobian_map` are per example, with no loss: :func:`example_map` runs each
device's examples and gathers their per-example norms (and spectra) on the first device,
averaged after.

No program of this module exchanges data between its devices (no collective: no all-reduce,
all-gather): what passes between them is copied between programs, and what they hand back
lies on the first device, so that nothing after them is partitioned over the devices either.
Until 2026-12-07 the batch's loss, norms and sums were reduced inside the split programs, and
XLA's CPU runtime (jaxlib 0.10.2) deadlocked in those all-reduces of simulated devices, rarely
and under load (about once in 17,000 split programs launched back to back by a stress script;
2 of 2 fresh-clone CI runs of the test suite on 2026-12-07): one device's half waiting in the
all-reduce's rendezvous, the other device's launch waiting for that device's budget of
programs in flight (``gdb``), until XLA aborted the process after 40 s. A program without a
collective waits for no other device.

Devices:

* CPU: XLA's host platform exposes one device unless told otherwise before JAX starts.
  :func:`use_cpu_devices` ``(n)`` sets it (``jax_num_cpu_devices``; the same as
  ``XLA_FLAGS=--xla_force_host_platform_device_count=n``) and raises if JAX has already
  started with another count. The ``gradflow`` CLI does this before any computation
  (``--devices``, default one per CPU core).
* GPU/TPU: the real devices of the default backend.

Process settings for speed, which the ``gradflow`` CLI makes at start and a script or notebook
may make itself: :func:`use_cpu_devices`, :func:`tune_malloc` (the C allocator keeps freed
memory) and :func:`use_compile_cache` (compiled programs kept on disk for the next process).

Which devices a map uses is a process-wide setting, :func:`set_batch_devices`: ``"auto"``
(default: every device of the default backend where a map is large enough to gain, see
:func:`devices_for`; nothing changes while there is one device), ``"all"`` (every device,
whatever the size), ``None`` (never split), a count, or a list of devices. A batch of ``B``
examples is split over the largest number ``n <= len(devices)`` of devices that divides ``B``
(and, under ``"auto"`` on CPU devices, leaves each device enough work). Maps called inside a traced
computation (``jit``, ``vmap``, e.g. :func:`gradflow.sweep`, which shards seeds instead) are
never split.

Example::

  >>> import gradflow
  >>> from gradflow import parallel
  >>> pr = gradflow.problem("lstm", layers=2, steps=5, hidden=8, batch=4, seed=0)
  >>> split = gradflow.gradient_map(*pr[:3]).values  # split if the process has >1 devices
  >>> with parallel.batch_devices(None):
  ...     plain = gradflow.gradient_map(*pr[:3]).values
  >>> bool(abs(split - plain).max() <= 1e-6 * abs(plain).max())
  True
"""
from __future__ import annotations

import contextlib
import functools
import math
import operator
import os
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gradflow import checks
from gradflow import results as _results
from gradflow.cost import cache_home, compiled
from gradflow.stack import precision_scope, safe_mean
from gradflow.xla import jit

AXIS = "batch"
_SETTING = {"devices": "auto"}
# Under "auto", a CPU split needs MIN_ROWS_X_WIDTH examples x the stack's widest state per
# device (see devices_for).
MIN_ROWS_X_WIDTH = 1024


def use_cpu_devices(n: int) -> None:
    """Make XLA's CPU platform expose ``n`` devices (to split batches over the CPU's cores).

    Must run before JAX starts its backends (the first computation or ``jax.devices()``);
    afterwards it is a no-op if the CPU platform already has ``n`` devices and a RuntimeError
    otherwise (set ``XLA_FLAGS=--xla_force_host_platform_device_count=n`` before starting
    Python instead). A count already set in ``XLA_FLAGS`` stands: another ``n`` is a
    RuntimeError.
    """
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"n must be a positive integer, got {n!r}") from None
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    flag = re.search(r"--xla_force_host_platform_device_count=(\d+)",
                     os.environ.get("XLA_FLAGS", ""))
    if flag and int(flag.group(1)) != n:
        raise RuntimeError(f"XLA_FLAGS sets {flag.group(1)} CPU device(s); unset it to use {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX refuses once its backends have started (public API, no probe)
        have = len(jax.devices("cpu"))
        if have == n:
            return
        raise RuntimeError(
            f"JAX has already started with {have} CPU device(s); call "
            f"gradflow.parallel.use_cpu_devices({n}) before any JAX computation, or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting Python"
        ) from None


# glibc's mallopt parameters (malloc.h) and the values the gradflow launcher sets.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
MALLOC_SETTINGS = {"trim_threshold": 2**31 - 1, "mmap_max": 0, "arena_max": 1}
GLIBC_TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647:"
                  "glibc.malloc.arena_max=1")


def tune_malloc() -> bool:
    """Let the C allocator keep and reuse freed memory (glibc only); True if applied.

    XLA's CPU runtime takes and frees some 200 MB of buffers per map call at the standard size;
    by default glibc serves such blocks with fresh ``mmap`` pages (zero-filled by the kernel on
    first touch) and returns them on ``free``. ``mallopt`` with ``mmap_max = 0`` (no mmap'd
    blocks), ``trim_threshold = 2**31 - 1`` (never give the heap top back) and
    ``arena_max = 1`` (one heap for all threads, so a buffer freed on one thread is reused on
    another) has the same effect as starting the process with
    ``GLIBC_TUNABLES`` = :data:`GLIBC_TUNABLES`, without restarting it. The cost: the process
    keeps its peak heap until it exits. Does nothing (False) off glibc or when the process was
    started with ``GLIBC_TUNABLES`` set (the user's choice stands).
    """
    import ctypes
    import platform
    if os.environ.get("GLIBC_TUNABLES") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(k, v) == 1 for k, v in ((_M_MMAP_MAX, MALLOC_SETTINGS["mmap_max"]),
                                                (_M_TRIM_THRESHOLD,
                                                 MALLOC_SETTINGS["trim_threshold"]),
                                                (_M_ARENA_MAX, MALLOC_SETTINGS["arena_max"])))


COMPILE_CACHE_ENV = "GRADFLOW_COMPILE_CACHE"
COMPILE_CACHE_MAX_BYTES = 512 * 2**20


def default_compile_cache() -> str | None:
    """The folder :func:`use_compile_cache` uses by default: ``$GRADFLOW_COMPILE_CACHE`` if set
    (``off``, ``0`` or empty: ``None``, no cache), else ``$XDG_CACHE_HOME/gradflow/xla``
    (``~/.cache/gradflow/xla``; ``None`` where the home folder is unknown, rather than a
    folder relative to wherever the process runs)."""
    given = os.environ.get(COMPILE_CACHE_ENV)
    if given is not None:
        return None if given.strip().lower() in ("", "0", "off", "none", "false") else given
    home = cache_home()
    return os.path.join(home, "xla") if os.path.isabs(home) else None


def _host_key() -> str:
    """12 hex digits naming this host's CPU kind (architecture, model, feature flags).

    JAX's cache key names the program, the versions, the XLA flags and the devices, but an
    executable compiled for the CPU also depends on the host's instruction set: one cache folder
    shared by different machines (a home directory on a cluster's network file system) keeps a
    subfolder per CPU kind, so no machine loads code built for another's features."""
    import hashlib
    import platform
    text = f"{platform.system()} {platform.machine()} {platform.processor()}"
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
        text += "".join(line for line in first.splitlines()
                        if line.split(":")[0].strip() in ("vendor_id", "model name", "flags",
                                                          "Features", "CPU implementer",
                                                          "CPU part"))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _prune(path: str, max_bytes: int) -> int:
    """Delete the least recently used files of ``path`` until the rest take at most
    ``max_bytes``; returns how many were deleted. JAX does not mark an entry when it reads
    one, so "used" is the file's access time as the file system keeps it (Linux's default
    ``relatime``: at least once a day), its modification time where that is later."""
    files = []
    with os.scandir(path) as it:
        for e in it:
            if e.is_file(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
                files.append((max(st.st_atime, st.st_mtime), st.st_size, e.path))
    total = sum(f[1] for f in files)
    gone = 0
    for _, size, name in sorted(files):
        if total <= max_bytes:
            break
        try:
            os.remove(name)
        except OSError:
            continue
        total -= size
        gone += 1
    return gone


def use_compile_cache(directory=None, *, max_bytes: int = COMPILE_CACHE_MAX_BYTES):
    """Keep compiled programs on disk, so that a later process skips compiling them; returns the
    folder used, or ``None`` when caching is off.

    JAX's persistent compilation cache (``jax_compilation_cache_dir``) with every program kept,
    however fast it compiled (``jax_persistent_cache_min_compile_time_secs = 0`` unless
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` is set: the eager parameter initialisation's
    small programs count too). Compiling is most of a fresh process's time: the CLI's ``gradflow
    heatmap --cell lstm --layers 16`` takes 8.4-10.1 s without the cache and 3.9-5.1 s when its
    programs are in it (before its map stopped splitting over the 2 cores, :func:`devices_for`:
    8.6-12.7 s and 3.6-5.5 s, and 6.0-6.4 s caching only the programs that take over a second,
    JAX's default; 2-core AMD EPYC VM, processes alternating; ``python -m bench --only
    cli_start``). The ``gradflow`` CLI calls this at start; call it from Python (a notebook, a
    script) before or after computing: programs compiled after the call are kept.

    ``directory``: the cache's root (default :func:`default_compile_cache`). Entries go to a
    subfolder per CPU kind (:func:`_host_key`), so a root shared by machines is safe. At each
    call the least recently used entries beyond ``max_bytes`` (default 512 MiB) are deleted. A
    cache folder JAX already has (``JAX_COMPILATION_CACHE_DIR``, ``jax.config``) stands: it is
    returned unchanged. A folder that cannot be written is a ValueError when it was asked for
    (``directory`` or ``GRADFLOW_COMPILE_CACHE``) and quietly no cache (``None``) for the
    default one. The cache is trusted code: do not share its folder with users you do not trust.

    Example::

      >>> import os
      >>> from gradflow import parallel
      >>> folder = parallel.use_compile_cache()  # e.g. a notebook's first cell
      >>> folder is None or os.path.isdir(folder)
      True
    """
    import tempfile
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    asked = directory is not None or os.environ.get(COMPILE_CACHE_ENV) is not None
    root = os.fspath(directory) if directory is not None else default_compile_cache()
    if root is None:
        return None
    path = os.path.join(os.path.expanduser(root), _host_key())
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        if asked:
            raise ValueError(f"the compile cache folder {root!r} cannot be written "
                             f"({e.strerror or e}); give a writable folder, or "
                             f"{COMPILE_CACHE_ENV}=off for no cache") from None
        return None
    _prune(path, max_bytes)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def set_batch_devices(devices="auto"):
    """Choose the devices maps split their batch over; returns the previous setting.

    ``devices``: ``"auto"`` (every device of the default backend, for maps large enough to
    gain: :func:`devices_for`), ``"all"`` (every device of the default backend, any size),
    ``None`` (never split), a positive count (the first ``n`` devices, any size) or a sequence
    of ``jax.Device`` (any size).
    """
    if devices is None or devices in ("auto", "all"):
        pass
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"devices must be 'auto', 'all', None, a positive count or a "
                             f"list of devices, got {devices!r}")
    else:
        try:
            devices = tuple(devices)
        except TypeError:
            devices = ()
        if not devices or not all(isinstance(d, jax.Device) for d in devices):
            raise ValueError(f"devices must be 'auto', 'all', None, a positive count or a "
                             f"list of devices, got {devices!r}")
    return _store(devices)


def _store(devices):
    """Set the setting (checked) and the record of it every Result's provenance carries
    (a split map's last bits differ from one device's: the order of its sums)."""
    old = _SETTING["devices"]
    _SETTING["devices"] = devices
    _results.SETTINGS["batch_devices"] = len(devices) if isinstance(devices, tuple) else devices
    return old


@contextlib.contextmanager
def batch_devices(devices="auto"):
    """``with batch_devices(...)``: :func:`set_batch_devices` for the block only."""
    old = set_batch_devices(devices)
    try:
        yield
    finally:
        _store(old)


def devices_for(batch: int, width: int | None = None) -> tuple:
    """The devices a batch of ``batch`` examples is split over under the current setting:
    the largest divisor ``n`` of ``batch`` among the first devices; ``()`` for no split.

    Under ``"auto"`` with CPU devices and the stack's widest state ``width`` given, each device
    must also get ``batch / n * width >= MIN_ROWS_X_WIDTH`` (1024): a thinner split ran slower
    than one device on this project's 2-core AMD EPYC (Zen 5) VM, where each operation of the
    time loop has a fixed cost the devices do not share, and its program compiles about 1.3 s
    longer. Split / one device (LSTM, 8 or 16 layers x 32 steps, 2 devices, several runs;
    ``python -m bench --only split_sizes``, ``bench/results/NOTES.md``), ``B x H``: below the
    threshold 8 x 64: 1.39-1.59; 16 x 64 (the CLI's default size): 0.99-1.21; 32 x 32:
    1.05-1.33; 8 x 128: 0.96-1.14; from it up 64 x 32: 0.75-0.98; 32 x 64: 0.87-0.99; 16 x 128:
    0.79-0.96; 8 x 256: 0.77-1.08; 16 x 256: 0.82-1.01; 64 x 64: 0.59-0.85; 32 x 128: 0.63-0.80.
    Near the threshold either choice is within this VM's noise (and not splitting saves the
    compile); away from it the rule held in every run. Calibrated on the LSTM; GPUs and TPUs
    (real devices, not shared cores) split whatever the size.
    """
    d = _SETTING["devices"]
    if d is None:
        return ()
    if d in ("auto", "all") or isinstance(d, int):
        avail = jax.devices()
        d = tuple(avail[:d] if isinstance(d, int) else avail)
    # work each device needs (examples x width); none but "auto" on CPU devices asks for any
    need = MIN_ROWS_X_WIDTH if (_SETTING["devices"] == "auto" and width is not None
                                and all(x.platform == "cpu" for x in d)) else 0
    n = max([k for k in range(1, len(d) + 1)
             if batch % k == 0 and batch // k * (width or 0) >= need], default=1)
    return tuple(d[:n]) if n > 1 else ()


def should_split(xs, stack=None, params=None, rows: float = 1,
                 width: int | None = None) -> tuple:
    """:func:`devices_for` ``(B, widest state of stack x rows)`` for concrete ``xs: (B, T, D)``
    and ``params`` (``rows``: each example's work in state maps', e.g. the vmapped rows of a
    Jacobian map, or 0.5 for a forward pass alone; ``width`` in place of the widest state
    where no stack gives one, e.g. a user's model's); ``()`` inside a trace (``xs`` or a leaf
    of ``params`` traced: ``jax.grad`` of a map w.r.t. the parameters runs it on one device,
    where its derivatives are exact), under a mesh the caller set (``jax.set_mesh``: JAX refuses
    a program over gradflow's own mesh there, and the caller's placement is left as it is) or
    when a cell of ``stack`` couples the examples of a batch (``Cell.couples_batch``). Whatever it returns, the runners (:func:`state_map`,
    :func:`model_state_map`, :func:`example_map`) run a program that calls LAPACK on one CPU
    device (:func:`lapack_stalls`)."""
    if any(isinstance(a, jax.core.Tracer) for a in [xs, *jax.tree_util.tree_leaves(params)]):
        return ()
    if not jax.sharding.get_abstract_mesh().empty:  # the caller's mesh (jax.set_mesh) holds
        return ()
    if stack is not None and any(c.couples_batch for c in stack.cells):
        return ()
    if stack is not None:
        width = max(stack._widths)
    return devices_for(xs.shape[0], None if width is None else width * rows)


#: What the custom calls of jaxlib's CPU LAPACK kernels are named by (``lapack_sgesdd_ffi``,
#: ``lapack_sgetrf_ffi``, ...), with how many leading axes of their operands are a batch of
#: matrices (``num_batch_dims``): :func:`lapack_stalls` reads both in a lowered program.
LAPACK_CALL = re.compile(r"@lapack_\w+\(")
BATCH_DIMS = re.compile(r'num_batch_dims = "(\d+)"')


def lapack_stalls(program, args, mesh) -> bool:
    """Whether ``program`` (a ``jax.jit`` function of ``args``, placed on ``mesh``) would stall
    split over ``mesh``: it runs on several CPU devices and hands jaxlib's LAPACK kernels a
    *batch* of matrices (an SVD, QR, LU, Cholesky, eigen- or Schur decomposition, a linear or
    triangular solve of each example's or each step's own matrix: a user's model or cell).
    Each device's program then runs on one thread of XLA's intra-op pool (one thread per
    core), and in jaxlib 0.10.2 every batched LAPACK kernel
    (``objdump`` of ``jaxlib/cpu/_lapack.so``: all of them call ``jax::ParallelBatchMap``)
    hands its matrices to that same pool and blocks until they are done: with one such kernel
    per device and as many devices as threads, no thread is left to do the work and the
    process hangs with no thread running (``gdb``: every pool thread in
    ``BlockingCounter::Wait``). Seen here: an exact spectral Jacobian map (LSTM, 4 layers x 32
    steps, H 64, batch 8), local gains, and a user's model taking ``jnp.linalg.solve`` per
    example and step (2 layers x 32 steps, H 64, batch 8: ``model_map(...,
    couples_batch=False)``), all of which finish on one device in 2-4 s (on one device, two
    such kernels at once stall the same way: :func:`gradflow.linalg.singular_values`, which
    gradflow's spectral norms and spectra use, hands LAPACK one matrix per call for that
    reason). A single matrix (``num_batch_dims = "0"`` in the lowered call: one system shared
    by a batch's right-hand sides, a weight's QR at init, gradflow's singular values) never
    reaches the pool: ``ParallelBatchMap`` calls the kernel inline when one chunk covers the
    batch (its first comparison, in the same
    disassembly), so such a program is split as any other (tiny batches run inline too, but
    where the chunk ends is a cost model of jaxlib's: a batch is not split at any size). The
    runners of this module, :func:`gradflow.sweep` and the atlas then run a stalling program
    on one device instead: conservative (a newer jaxlib may not block; one device's kernel
    already spreads its matrices over the cores), but never a hang. Decided from the lowered
    program (lowering is what a call does first, and jax caches it): about 20 ms for a
    16-layer LSTM map, once per program and shapes. GPUs and TPUs are not affected."""
    if _copies(mesh) < 2:  # one device, or real ones
        return False
    leaves, treedef = jax.tree_util.tree_flatten(args)
    specs = tuple(jax.ShapeDtypeStruct(  # placed where committed, as a call would see them
        jnp.shape(a), jnp.result_type(a),
        sharding=a.sharding if getattr(a, "committed", False) else None) for a in leaves)
    return _calls_lapack(program, treedef, specs, jax.config.jax_default_matmul_precision)


@functools.lru_cache(maxsize=128)
def _calls_lapack(program, treedef, specs, precision) -> bool:
    """:func:`lapack_stalls`' cache (``precision`` only a key, as in
    :func:`gradflow.cost.compiled`)."""
    lowered = program.lower(*jax.tree_util.tree_unflatten(treedef, specs))
    return _batched_lapack(lowered.as_text())


def _batched_lapack(text: str) -> bool:
    """Whether lowered program ``text`` hands a LAPACK kernel a batch of matrices: a
    ``lapack_`` custom call whose ``num_batch_dims`` is not ``"0"`` (or is not stated)."""
    for line in text.splitlines():
        if LAPACK_CALL.search(line):
            dims = BATCH_DIMS.search(line)
            if dims is None or dims.group(1) != "0":
                return True
    return False


def _kinds(params):
    """``(leaves, treedef, where, kinds)``: each leaf's kind and row, ``where = ((kind, row),
    ...)`` in leaf order, and ``kinds = ((dtype name, rows, shape), ...)`` (:func:`_layout`)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return (leaves, treedef, *_layout(treedef, tuple((x.dtype, x.shape) for x in leaves)))


@functools.lru_cache(maxsize=64)
def _layout(treedef, specs):
    """``(where, kinds)`` of :func:`_kinds` for the leaves ``specs = ((dtype, shape), ...)``
    of ``treedef``. A kind is the leaf's place in the tree without its sequence indices, its
    dtype and its shape: the same parameter of consecutive layers of one shape
    (``params[l]["W"]``, ``l = 0, 1, ...``) are one kind's consecutive rows."""
    tree = jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for d, s in specs])
    kinds, where = {}, []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = tuple(k for k in path if not isinstance(k, jax.tree_util.SequenceKey))
        kind = kinds.setdefault((name, x.dtype, x.shape), [len(kinds), 0])
        where.append((kind[0], kind[1]))
        kind[1] += 1
    return tuple(where), tuple(  # the dtype's name as jit sees it (float64 in x32; a PRNG key's)
        (_canonical(dt).name, rows, shape) for (_, dt, shape), (_, rows) in kinds.items())


def _canonical(dtype):
    """``dtype`` as jit sees it (float64 in x32); an extended one (a PRNG key's) as it is."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        return dtype
    return jax.dtypes.canonicalize_dtype(dtype)


@functools.partial(jit, static_argnums=(1, 2))
def _pack(leaves, where, n):
    """One flat buffer per dtype: the leaves stacked by kind (:func:`_kinds`), kind after kind."""
    rows = [[] for _ in range(n)]
    for x, (k, _) in zip(leaves, where):
        rows[k].append(x)
    by_dtype = {}
    for r in rows:
        by_dtype.setdefault(r[0].dtype.name, []).append(jnp.ravel(jnp.stack(r)))
    return {k: jnp.concatenate(v) for k, v in by_dtype.items()}


def _unpack(bufs, layout):
    """Inverse of :func:`_pack`: ``layout = (treedef, where, kinds)``, ``kinds = ((dtype name,
    rows, shape), ...)``: a kind is one slice of its dtype's buffer, a leaf one of its rows.

    Where the stack stacks layers of one shape again for its scan over layers (rows ``a..b``
    of each kind), XLA folds the rows back into the kind's slice: a 16-layer LSTM's split map
    compiles a kernel per kind, not per leaf, in 2.7-2.9 s instead of 4.5 s."""
    treedef, where, kinds = layout
    at = dict.fromkeys(bufs, 0)
    stacked = []
    for dt, rows, shape in kinds:
        size = rows * math.prod(shape)
        stacked.append(lax.slice_in_dim(bufs[dt], at[dt], at[dt] + size).reshape(rows, *shape))
        at[dt] += size
    return jax.tree_util.tree_unflatten(treedef, [stacked[k][i] for k, i in where])


def _replicate(params, mesh):
    """``(buffers, layout)``: the parameters on every device of ``mesh`` as one flat buffer
    per dtype.

    Placing a pytree leaf by leaf costs about 40-100 us of Python per leaf (7-20 ms for a
    16-layer LSTM's 192 leaves); packing them in one compiled call and placing one buffer per
    dtype costs 0.4-0.7 ms on this project's 2-core test machine. The sharded program unpacks
    them (:func:`_unpack`)."""
    leaves, treedef, where, kinds = _kinds(params)
    if len({x.sharding for x in leaves if getattr(x, "committed", False)}) > 1:
        leaves = jax.device_put(leaves, mesh.devices.flat[0])  # leaves on several devices
    bufs = _pack(leaves, where, len(kinds))
    return (jax.device_put(bufs, NamedSharding(mesh, PartitionSpec())),
            (treedef, where, kinds))


class _Halves(NamedTuple):
    """A split state map's two programs over one mesh, neither with a collective.

    ``forward(bufs, xs)``: each device's forward pass of its examples, giving the top-layer
    outputs ``(B, T, K)`` (split over the devices) and the pullback to the taps, its residuals
    a row per device. ``backward(pullback, cotangent)``: each device pulls its examples' slice
    of the loss's cotangent back to its taps and returns its examples' mean norms ``(n, L, T)``,
    a row per device."""
    forward: Callable
    backward: Callable


def _halves(make, mean, mesh) -> _Halves:
    """:class:`_Halves` of ``make(bufs, xs_k) -> (forward of the taps, zero taps)`` (a device's
    share of the batch) and ``mean(taps' cotangent) -> (L, T)``, its examples' mean norms."""
    def forward(bufs, xs_k):
        f, taps = make(bufs, xs_k)
        out_k, pull = jax.vjp(f, taps)
        return out_k, jax.tree_util.tree_map(lambda r: r[None], pull)

    def backward(pull, g_k):
        (d_taps,) = jax.tree_util.tree_map(lambda r: r[0], pull)(g_k)
        return mean(d_taps)[None]

    # check_vma=False: the zero taps and states made inside the stack are not marked per-device;
    # every output is split over the devices (nothing is exchanged between them)
    spec = PartitionSpec(AXIS)
    return _Halves(
        jit(jax.shard_map(forward, mesh=mesh, in_specs=(PartitionSpec(), spec),
                          out_specs=(spec, spec), check_vma=False)),
        jit(jax.shard_map(backward, mesh=mesh, in_specs=(spec, spec), out_specs=spec,
                          check_vma=False)))


@functools.partial(jit, static_argnames=("loss_fn", "precision"))
def _loss_and_cotangent(loss_fn, precision, out):
    """``(loss value, its gradient w.r.t. out)`` on the whole batch's outputs, on one device."""
    with precision_scope(precision):
        return jax.value_and_grad(loss_fn)(out)


@jit
def _mean_over_devices(parts):
    """``(L, T)``: the devices' means ``(n, L, T)`` of equal shares of the batch, averaged."""
    return safe_mean(parts, axis=0)


def _run_halves(halves: _Halves, loss_fn, precision, mesh, bufs, xs_k, check=None):
    r"""``(loss value, G: (L, T))`` of a split state map, computed in four steps with nothing
    exchanged between the devices inside a program: the forward pass of each device's examples
    (:attr:`_Halves.forward`); their outputs copied to the first device, where the loss and its
    gradient :math:`\bar y` are taken on the whole batch (any loss, exact); :math:`\bar y`
    split back over the devices, each pulling its slice back to its taps
    (:attr:`_Halves.backward`); the devices' means averaged on the first device.

    ``check(program, args) -> program`` (or None): where the caller checks a compiled
    program (memory) or refuses it (``None``: run on one device instead), before each half runs;
    a half it refuses makes ``_run_halves`` return ``None``."""
    first = mesh.devices.flat[0]
    args = (bufs, xs_k)
    forward = check(halves.forward, args) if check else halves.forward
    if forward is None:
        return None
    out, pull = forward(*args)
    value, g = _loss_and_cotangent(loss_fn, precision, jax.device_put(out, first))
    args = (pull, jax.device_put(g, out.sharding))
    backward = check(halves.backward, args) if check else halves.backward
    if backward is None:
        return None
    parts = backward(*args)
    return value, _mean_over_devices(jax.device_put(parts, first))


@functools.lru_cache(maxsize=64)
def _sharded_state_map(stack, name, mesh, layout) -> _Halves:
    """:func:`state_map`'s programs."""
    def make(bufs, xs_k):
        params = _unpack(bufs, layout)
        b, T, _ = xs_k.shape
        zeros = {name: jnp.zeros((stack.layers, b, T), xs_k.dtype)}

        def forward(taps):  # parameters constant: runs of layers through lean_layers
            with precision_scope(stack.matmul_precision):
                return stack.apply(params, xs_k, taps=taps, constant_params=True).top
        return forward, zeros

    return _halves(make, lambda d_taps: safe_mean(d_taps[name], axis=1), mesh)  # (L, b, T)


def state_map(stack, params, xs, loss_fn, name: str, devices):
    r"""``(loss value, G: (L, T))``, :math:`G[l,t] = \mathrm{mean}_b\|\partial\mathcal L/
    \partial s^l_t[b]\|_2` for state ``name``, the batch of ``xs: (B, T, D)`` split over
    ``devices`` (a sequence whose length divides ``B``; see the module docstring and
    :func:`_run_halves`).

    ``stack`` and ``loss_fn`` (``(B, T, H) -> scalar``) must be hashable.
    """
    mesh, bufs, layout, (xs_k,) = _split(params, (xs,), (0,), devices)
    halves = _sharded_state_map(stack, name, mesh, layout)

    def check(program, args):  # a user's cell calling LAPACK: on one device
        return None if lapack_stalls(program, args, mesh) else program

    out = _run_halves(halves, loss_fn, stack.matmul_precision, mesh, bufs, xs_k, check)
    return out if out is not None else state_map(stack, params, xs, loss_fn, name, devices[:1])


def _split(params, args, axes, devices):
    """``(mesh, bufs, layout, args)`` of a split over ``devices``: their 1-d mesh, ``params``
    replicated as packed buffers (:func:`_replicate`), and ``args`` placed with their examples
    (on their axes in ``axes``) split over the devices; a ValueError where the number of
    examples (of ``args[0]``) is not divisible by the number of devices."""
    devices = tuple(devices)
    B = args[0].shape[axes[0]]
    if B % len(devices):
        raise ValueError(f"batch {B} does not split over {len(devices)} devices")
    mesh = Mesh(np.array(devices), (AXIS,))
    bufs, layout = _replicate(params, mesh)
    args = tuple(jax.device_put(a, NamedSharding(mesh, _examples_on(ax)))
                 for a, ax in zip(args, axes))
    return mesh, bufs, layout, args


def _examples_on(axis: int) -> PartitionSpec:
    """The partition of an array whose examples lie on ``axis``, split over the mesh."""
    return PartitionSpec(*[None] * axis, AXIS)


@functools.lru_cache(maxsize=64)
def _sharded_examples(fn, stack, static, mesh, layout, axes, summed=False):
    """:func:`example_map`'s program: ``fn`` on each device's share of the examples (``summed``:
    each device's sums a row of their own)."""
    def local(bufs, *args):
        out = fn(stack, _unpack(bufs, layout), *args, **dict(static))
        return jax.tree_util.tree_map(lambda o: o[None], out) if summed else out

    in_specs = (PartitionSpec(), *map(_examples_on, axes))
    # check_vma=False: arrays made inside the stack are not marked per-device; every output is
    # split over the devices (nothing is exchanged between them)
    return jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                             out_specs=PartitionSpec(AXIS), check_vma=False))


def example_map(fn, stack, params, args, axes, static, devices, what: str | None = None,
                smaller: str | None = None, summed: bool = False):
    """``fn(stack, params, *args, **dict(static))`` for a function of independent examples,
    each of ``args`` holding them on its axis in ``axes`` and every output on its first axis
    (per-example Jacobians), the examples split over ``devices`` (a sequence whose length
    divides their number; empty: one jitted call on the default device) and the outputs
    gathered on the first device; ``summed``: every output is a sum over the examples (gate
    statistics' sums and counts), the devices' sums added there instead. ``fn``, ``stack`` (a
    Stack, or whatever ``fn`` takes in its place, e.g. a user's model) and ``static`` must be
    hashable (one compile per them, the devices and the shapes). With ``what`` (and
    ``smaller``) the program goes through :func:`gradflow.cost.compiled`: compiled once, its
    memory checked."""
    if not devices:
        if what is None:
            return _jit_examples(fn, stack, static, params, *args)
        return examples_program(fn, stack, params, args, static, what, smaller)(params, *args)
    mesh, bufs, layout, split = _split(params, args, axes, devices)
    program = _sharded_examples(fn, stack, static, mesh, layout, tuple(axes), summed)
    if lapack_stalls(program, (bufs, *split), mesh):
        return example_map(fn, stack, params, args, axes, static, (), what, smaller)
    if what is not None:
        program = compiled(program, (), (bufs, *split), what, smaller, _copies(mesh))
    out = jax.device_put(program(bufs, *split), mesh.devices.flat[0])
    return _sum_over_devices(out) if summed else out


@jit
def _sum_over_devices(tree):
    """The devices' sums (a row each) added."""
    return jax.tree_util.tree_map(lambda o: jnp.sum(o, axis=0), tree)


def examples_program(fn, stack, params, args, static, what: str, smaller: str):
    """:func:`example_map`'s program on one device for these arguments' shapes, compiled
    once (:func:`gradflow.cost.compiled`: its memory checked, an InputError naming ``what``
    and ``smaller`` where it does not fit). A caller may ask before anything runs; the map
    then reuses it."""
    return compiled(_jit_examples, (fn, stack, static), (params, *args), what, smaller)


@functools.partial(jit, static_argnames=("fn", "stack", "static"))
def _jit_examples(fn, stack, static, params, *args):
    """:func:`example_map` on one device: ``fn`` on all the examples, one program."""
    return fn(stack, params, *args, **dict(static))


@functools.lru_cache(maxsize=32)
def _sharded_model_map(model, rest, layers, mesh, layout) -> _Halves:
    """:func:`model_state_map`'s programs: per device the model's forward on its share of the
    batch, as a Stack's split map (:func:`_run_halves`)."""
    model = checks.with_static(model, rest)

    def make(bufs, xs_k):
        arrays = _unpack(bufs, layout)
        b, T, _ = xs_k.shape
        return (lambda s: model(arrays, xs_k, s),
                jnp.zeros((layers, T, b), checks.tap_dtype(xs_k)))

    return _halves(make, lambda d_taps: safe_mean(d_taps, axis=2), mesh)  # (L, T, b)


def model_state_map(model, loss_fn, rest, arrays, xs, layers: int, devices, what: str,
                    smaller: str):
    r"""``(loss value, G: (L, T))`` of :func:`gradflow.model_map` (``model(params, xs, taps)``
    with ``params`` split by :func:`gradflow.checks.split_static` into ``arrays`` and
    ``rest``), the batch of ``xs: (B, T, D)`` split over ``devices`` (a sequence whose length
    divides ``B``), for a model that treats the examples of a batch independently. Each half
    is compiled once per shapes by :func:`gradflow.cost.compiled`, whose memory check
    (``what``, ``smaller``) counts every device of one memory."""
    mesh, bufs, layout, (xs_k,) = _split(arrays, (xs,), (0,), devices)
    halves = _sharded_model_map(model, rest, layers, mesh, layout)

    def check(program, args):  # a model calling LAPACK: on one device
        if lapack_stalls(program, args, mesh):
            return None
        return compiled(program, (), args, what, smaller, _copies(mesh))

    out = _run_halves(halves, loss_fn, None, mesh, bufs, xs_k, check)
    if out is None:
        return model_state_map(model, loss_fn, rest, arrays, xs, layers, devices[:1], what,
                               smaller)
    return out


@contextlib.contextmanager
def outside_mesh():
    """``with outside_mesh():`` programs over gradflow's own meshes and devices (the sweep's and
    the atlas's seeds), run outside any mesh the caller set (``jax.set_mesh``), under which JAX
    refuses them (``The context mesh ... should match the mesh passed to shard_map``); the
    caller's mesh holds again after the block."""
    if jax.sharding.get_abstract_mesh().empty:
        yield
        return
    with jax.set_mesh(None):
        yield


def _copies(mesh) -> int:
    """How many of ``mesh``'s devices share one memory: all of a CPU's simulated devices."""
    return mesh.devices.size if all(d.platform == "cpu" for d in mesh.devices.flat) else 1


__all__ = ["use_cpu_devices", "tune_malloc", "MALLOC_SETTINGS", "GLIBC_TUNABLES",
           "set_batch_devices", "batch_devices", "devices_for", "should_split", "lapack_stalls",
           "state_map", "model_state_map", "example_map", "examples_program",
           "use_compile_cache", "outside_mesh"]
