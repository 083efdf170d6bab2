"""gradflow as it was when issue 13 was filed: the map the issue's goals are ratios to.

Issue 13 asks for "hidden map <= 0.5x of today's map time in the same process", "today" being the
code the issue measured. The bench's other reference, today's code with the lean path switched
off (``suite._autodiff_hidden``), is a proxy that moved: work for the issue also made the
autodiff path faster (the recurrent matmuls' backward against a materialised ``U^T``,
``cells.base.matmul``), so it times 0.87-1.0x of the filing-day map. This module extracts the
package at :data:`COMMIT` (the last commit before the issue's speed work: its state map is the
one the issue timed; the batch split, added just before, is switched off when it runs) from
this checkout's git history into a temporary folder, renamed ``gradflow_then``, so that both
versions run in one process on the same problem (same parameters; the maps agree to ~1e-8).
"""
from __future__ import annotations

import atexit
import functools
import importlib
import io
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

COMMIT = "3b8837da5e8e2712e65528c242dccf2dde3fee95"
NAME = "gradflow_then"
_ROOT = pathlib.Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def load():
    """The filing-day package, imported as ``gradflow_then``; a RuntimeError saying why when
    this checkout cannot provide it (no git, or a history without :data:`COMMIT`, e.g. a
    shallow clone or a source archive) or it does not import with this JAX."""
    try:
        tar = subprocess.run(["git", "-C", str(_ROOT), "archive", COMMIT, "gradflow"],
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        raise RuntimeError(f"the filing-day gradflow (git archive {COMMIT[:7]}) is not "
                           f"available in this checkout: {e} {detail.decode()[:200]}") from e
    folder = pathlib.Path(tempfile.mkdtemp(prefix="gradflow_then_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # read lazily until then
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(folder, filter="data")
    package = folder / NAME
    (folder / "gradflow").rename(package)
    word = re.compile(r"\bgradflow\b")  # gradflow_then is one word: \b keeps it whole
    for f in package.rglob("*.py"):
        f.write_text(word.sub(NAME, f.read_text()))
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(NAME)
    except Exception as e:  # noqa: BLE001  (old code under a newer JAX, ...: say so, go on)
        raise RuntimeError(f"the filing-day gradflow ({COMMIT[:7]}) does not import here: "
                           f"{e!r}"[:400]) from e
    finally:
        sys.path.remove(str(folder))


def hidden_map(then, cell, size: dict, loss: str = "last"):
    """A zero-argument callable: the filing-day ``gradient_map(wrt="hidden")`` on one device
    (its batch split off) for ``cell`` (a name, or a cell built by ``then``) at ``size``
    (``L, T, H, B``), on ``problem(..., seed=0)`` as the bench's other maps; returns the
    values as a NumPy array."""
    import numpy as np
    pr = then.problem(cell, layers=size["L"], steps=size["T"], hidden=size["H"],
                      batch=size["B"], seed=0)
    parallel = importlib.import_module(f"{NAME}.parallel")

    def f():
        with parallel.batch_devices(None):
            return np.asarray(then.gradient_map(pr.stack, pr.params, pr.xs, loss=loss,
                                                wrt="hidden").values)
    return f
