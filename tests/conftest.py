"""Shared test setup: 64-bit JAX (tests pass explicit dtypes everywhere), headless matplotlib."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
