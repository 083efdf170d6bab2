r"""Gradient maps for many cells x many seeds, the seeds vectorised and sharded over devices.

For each cell, the per-seed problem of :func:`gradflow.problem` (parameters from ``key(seed)``,
inputs ``input_scale * N(0, 1)`` from ``key(seed + 1)``) and its gradient map
(:func:`gradflow.gradient_map`) are built inside one compiled program whose seed axis is split
over the devices with ``jax.shard_map`` on ``Mesh(devices, ("seeds",))``: device ``d`` builds
its own seeds' problems and measures them (``jax.vmap`` over its seeds); nothing but the
``(S,)`` seed vector goes in and the ``(S, L, T)`` maps come out.

The problems are built with ``lax.map`` (one seed after another) rather than ``vmap``: under
``vmap`` the orthogonal inits of several layers (batched QR decompositions) deadlock XLA's CPU
runtime (jax/jaxlib 0.10.2; two LSTM layers of H = 64 suffice: jaxlib's batched LAPACK kernels
wait for XLA's thread pool from inside it, :func:`gradflow.parallel.lapack_stalls`), and
building parameters is a negligible part of the work. One QR at a time runs inline. A
program that still hands LAPACK a batch (a cell solving each example's own system per step)
runs on one CPU device instead of stalling split.

The seed count is padded (repeating the last seed) to a multiple of the device count and the
padding dropped afterwards. On CPU, several devices can be simulated with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before JAX starts).
"""
from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gradflow import cells as _cells
from gradflow import checks
from gradflow import jacobian as _jac
from gradflow import parallel
from gradflow import cost as _cost
from gradflow.problem import check_input_scale, dtype_of, gaussian_inputs
from gradflow.results import NonFiniteForwardWarning, Result, make_result
from gradflow.checks import positive_int as _positive_int
from gradflow.stack import Stack
from gradflow.views import seed_result  # noqa: F401  (NumPy only: drawing needs no JAX)
from gradflow.xla import jit

AXIS = "seeds"


def check_seeds(seeds) -> tuple[int, ...]:
    """``seeds`` validated (:func:`gradflow.checks.seed_list`), as a tuple."""
    return tuple(checks.seed_list(seeds))


def _iterable(x):
    try:
        return list(x)
    except TypeError:
        return [None]  # not a device


def device_mesh(devices) -> Mesh:
    """A one-axis mesh over ``devices`` (default all of ``jax.devices()``)."""
    if devices is not None and (isinstance(devices, (str, bytes, jax.Device)) or not all(
            isinstance(d, jax.Device) for d in _iterable(devices))):
        raise TypeError(f"devices must be a list of JAX devices (e.g. jax.devices()), got "
                        f"{devices!r}")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must name at least one device")
    return Mesh(np.array(devices), (AXIS,))


def seed_problem(stack: Stack, seed, *, steps: int, batch: int, dtype, input_scale: float = 1.0):
    """``(params, xs)`` for one seed exactly as :func:`gradflow.problem` builds them.

    ``seed`` may be traced (a scalar inside ``vmap``). Returns params at init and
    ``xs: (batch, steps, input_size)``.
    """
    params = stack.init(jax.random.key(seed), dtype)
    xs = gaussian_inputs(seed, (batch, steps, stack.input_size), dtype, input_scale)
    return params, xs


def _map_fn(stack: Stack, *, steps, batch, dtype, input_scale, loss, wrt, readout_seed):
    """``seeds: (S,) -> (loss values (S,), maps (S, L, T))`` on one device."""
    if callable(loss):
        loss_fn = loss
    else:
        loss_fn = _jac.readout_loss(loss, stack.widths[-1], steps, batch, readout_seed, dtype)

    def build(seed):
        return seed_problem(stack, seed, steps=steps, batch=batch, dtype=dtype,
                            input_scale=input_scale)

    def measure(params, xs):
        return _jac.map_arrays(stack, params, xs, loss_fn, wrt)

    def local(seeds):
        params, xs = lax.map(build, seeds)  # not vmap: see the module docstring
        return jax.vmap(measure)(params, xs)

    return local


@functools.lru_cache(maxsize=64)
def _sharded_map(stack, mesh, steps, batch, dtype, input_scale, loss, wrt, readout_seed):
    """The jitted ``seeds: (S,) -> (values (S,), maps (S, L, T))``, each device computing its
    own seeds, built once per configuration (all arguments hashable) so repeated sweeps reuse
    one compiled program per seed count."""
    local = _map_fn(stack, steps=steps, batch=batch, dtype=dtype, input_scale=input_scale,
                    loss=loss, wrt=wrt, readout_seed=readout_seed)
    spec = PartitionSpec(AXIS)
    # check_vma=False: no collectives here, each device's seeds are independent; the check
    # would otherwise ask every zero initial state inside the stack to be marked per-device.
    return jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=(spec, spec),
                                 check_vma=False))


def sweep_arrays(stack: Stack, seeds, *, steps: int, batch: int, dtype=jnp.float32,
                 input_scale: float = 1.0, loss="last", wrt: str = "hidden",
                 readout_seed: int = 0, devices=None):
    r"""The sharded computation behind :func:`sweep`, for one stack.

    Returns:
      ``(loss_values: (S,), maps: (S, L, T))`` as ``jax.Array`` s sharded over the seed axis of
      the device mesh where the seeds fill its devices evenly (``maps.sharding.device_set``
      names the devices that computed them); otherwise (the seeds padded to fill them) gathered
      on its first device and the padding dropped there: a slice of a sharded array is a
      program XLA partitions over the devices, with collectives where it needs them, and
      gradflow runs none (:mod:`gradflow.parallel`).
    """
    return _sweep_arrays(stack, seeds, steps=steps, batch=batch, dtype=dtype,
                         input_scale=input_scale, loss=loss, wrt=wrt,
                         readout_seed=readout_seed, devices=devices)[:2]


def _sweep_arrays(stack, seeds, *, steps, batch, dtype, input_scale, loss, wrt, readout_seed,
                  devices):
    """:func:`sweep_arrays` and how many devices computed them."""
    seeds = check_seeds(seeds)
    mesh = device_mesh(devices)
    config = (int(steps), int(batch), jnp.dtype(dtype), float(input_scale), loss, wrt,
              int(readout_seed))
    with parallel.outside_mesh():  # (a mesh the caller set)
        run, placed = _placed(stack, mesh, seeds, config)
        if parallel.lapack_stalls(run, (placed,), mesh):  # a cell solving each example's system
            mesh = device_mesh(list(mesh.devices.flat)[:1])
            run, placed = _placed(stack, mesh, seeds, config)
        values, maps = run(placed)
        n = len(seeds)
        if values.shape[0] != n:
            values, maps = jax.device_put((values, maps), mesh.devices.flat[0])
            values, maps = values[:n], maps[:n]
    return values, maps, mesh.devices.size


def _placed(stack, mesh, seeds, config):
    """``(program, seed vector)``: the sharded program of ``config`` on ``mesh`` and the seeds
    padded (repeating the last) to a multiple of its devices, placed over them."""
    n_dev = mesh.devices.size
    padded = math.ceil(len(seeds) / n_dev) * n_dev
    seed_vec = np.array(seeds + (seeds[-1],) * (padded - len(seeds)), np.int32)
    return (_sharded_map(stack, mesh, *config),
            jax.device_put(seed_vec, NamedSharding(mesh, PartitionSpec(AXIS))))


def sweep(cells, seeds, *, layers: int = 10, steps: int = 10, hidden: int = 128,
          batch: int = 16, loss="last", wrt: str = "hidden", input_size: int | None = None,
          dtype: str = "float32", input_scale: float = 1.0, readout_seed: int = 0,
          stack_options: dict | None = None, cell_options: dict | None = None,
          devices=None) -> dict[str, Result]:
    r"""Gradient maps of every cell for every seed, seeds vectorised and sharded over devices.

    For cell ``c`` and seed ``s`` the map equals
    ``gradient_map(*problem(c, seed=s, ...)[:3], loss=loss, wrt=wrt)`` (see
    :func:`gradflow.gradient_map` for :math:`G[l,t]` and :math:`P[l,t]`).

    Args:
      cells: cell names (or one name), names with options (``"lstm:forget_bias=1.0"``, the
        syntax of :func:`gradflow.cells.parse_spec`; the written options win over
        ``cell_options``, which apply to every named cell) or built cells; each result is
        keyed by the text given (a built cell: its name), and keys must be distinct.
      seeds: integers in ``[0, 2**31 - 1)``; ``S = len(seeds)``.
      layers, steps, hidden, batch, input_size, dtype, input_scale, stack_options: as
        :func:`gradflow.problem`.
      loss, wrt, readout_seed: as :func:`gradflow.gradient_map`.
      devices: the devices to shard the seeds over (default ``jax.devices()``); one CPU
        device where the program hands LAPACK a batch of matrices
        (:func:`gradflow.parallel.lapack_stalls`).
    Returns:
      ``{cell: Result}``, each ``kind="gradient_map"`` with ``values: (S, L, T)``,
      ``loss_value: (S,)`` and config ``seeds`` (the list) and ``devices`` (how many devices the
      result was computed on).
    """
    names = (cells,) if isinstance(cells, str) else tuple(cells)
    if not names:
        raise ValueError("cells must name at least one cell; valid cells: "
                         + ", ".join(_cells.names()))
    seeds = check_seeds(seeds)
    if wrt not in _jac.WRTS:
        raise ValueError(f"unknown wrt {wrt!r}; valid: {', '.join(_jac.WRTS)}")
    if not callable(loss) and loss not in _jac.LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(_jac.LOSSES)} or a callable "
                         "loss(outputs: (B, T, H)) -> scalar")
    steps, batch, hidden = (_positive_int(k, v) for k, v in
                            (("steps", steps), ("batch", batch), ("hidden", hidden)))
    D = hidden if input_size is None else _positive_int("input_size", input_size)
    dt = dtype_of(dtype)
    check_input_scale(input_scale, dt)
    readout_seed = checks.seed("readout_seed", readout_seed)  # (1.5 was run as 1, recorded 1.5)
    stacks = {}  # every cell and stack built and checked before any map is computed
    for entry in names:
        if isinstance(entry, str):  # (options written in entry win over cell_options)
            cell = _cells.for_length(entry, steps, **(cell_options or {}))
        else:
            cell = _cells.get(entry)
        label = entry if isinstance(entry, str) else cell.name
        if label in stacks:
            raise ValueError(f"cells: {label!r} is given twice; each result is keyed by its "
                             "cell (a built cell by its name): give each one once")
        stacks[label] = Stack(cell, layers, D, hidden, **(stack_options or {}))
        _jac.check_wrt(stacks[label], wrt)
        # the seeds' maps in one program: S x batch examples (it compiled, then ran out)
        _cost.check_need(_cost.at_once(_cost.estimate(stacks[label], batch * len(seeds),
                                                      steps, dt, wrt, calibrate=False),
                                       len(seeds)),
                         f"the sweep of {label} ({len(seeds)} seed{'s' * (len(seeds) > 1)} x "
                         f"batch {batch}, "
                         f"{layers} layers x {steps} steps, H={hidden})",
                         "give fewer seeds, a smaller batch or hidden size, or fewer steps")
    out = {}
    for label, stack in stacks.items():
        values, maps, used = _sweep_arrays(stack, seeds, steps=steps, batch=batch, dtype=dt,
                                           input_scale=input_scale, loss=loss, wrt=wrt,
                                           readout_seed=readout_seed, devices=devices)
        config = {**stack.config, "steps": steps, "batch": batch, "dtype": str(dt),
                  "input_scale": float(input_scale), "seeds": list(seeds),
                  "loss": loss if isinstance(loss, str) else getattr(loss, "__name__", "callable"),
                  "wrt": wrt, "readout_seed": readout_seed,
                  "devices": used}
        bad = [str(s) for s, v in zip(seeds, np.asarray(values)) if not np.isfinite(v)]
        if bad:
            which = ("seed " + bad[0] + "'s map" if len(bad) == 1
                     else "the maps of seeds " + ", ".join(bad))
            warnings.warn(f"sweep: {label}: the loss is not finite for {len(bad)} of "
                          f"{len(seeds)} seeds (the forward pass overflowed): every entry of "
                          f"{which} is NaN (gradflow.gradient_map on one seed's problem says "
                          "where the states are not finite)", NonFiniteForwardWarning,
                          stacklevel=2)
        out[label] = make_result("gradient_map", {"values": maps, "loss_value": values},
                                 config, positive=_jac.expected_positive(loss, wrt, steps))
    return out


__all__ = ["sweep", "sweep_arrays", "seed_problem", "seed_result", "check_seeds", "device_mesh"]
