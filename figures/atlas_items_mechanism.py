"""The per-layer quantities behind the boundaries of atlas_vertical_gain and atlas_cheng_refined.

Writes figures/atlas_vertical_gain_mechanism.json and figures/atlas_cheng_refined_mechanism.json
(seed 0; ``python figures/atlas_items_mechanism.py``, about 3 minutes on 2 cores):
``{"cell|init|LxT": {input_scale: {quantity: [per layer]}}}`` with the quantities of
:func:`gradflow.atlas.mechanism` (``vertical_rms``, ``temporal_rms``, ``one_minus_h2``,
``rms_h``, means over steps) plus each reported gate's mean per layer (``gate_mean/<g>``,
:func:`gradflow.gates.saturation`), and for the refined cells the mean |h| per layer and the
share of non-finite entries of the hidden-state map (``loss="all"``).
"""
import json
import os

import jax.numpy as jnp
import numpy as np

import gradflow
from gradflow import atlas, gates, sweep
from gradflow.stack import Stack

HERE = os.path.dirname(os.path.abspath(__file__))


def gate_means(cell, init, scale, layers, steps, hidden, batch, seed=0):
    stack = Stack(atlas.cell_for(cell, init, steps), layers, hidden, hidden)
    params, xs = sweep.seed_problem(stack, seed, steps=steps, batch=batch, dtype=jnp.float32,
                                    input_scale=scale)
    out = {}
    if any(c.gate_kinds for c in stack.cells):
        st = gates.saturation(stack, params, xs)
        out = {f"gate_mean/{g}": np.asarray(st[f"mean/{g}/layer"]).tolist()
               for g in st.config["gates"]}
    return stack, params, xs, out


def vertical(path):
    res = {}
    for cell in ("rnn", "lstm", "gru", "mgu", "star", "star:variant=official"):
        for layers in (8, 64):
            key = f"{cell}|orthogonal|{layers}x4"
            m = atlas.mechanism(cell, "orthogonal", (0.01, 1.0), layers=layers, steps=4,
                                hidden=64, batch=4)
            for scale in m:
                m[scale].update(gate_means(cell, "orthogonal", scale, layers, 4, 64, 4)[3])
            res[key] = {str(k): v for k, v in m.items()}
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


def refined(path):
    res = {}
    for cell in ("lstm", "refined_lstm", "refined_lstm:mode=add", "gru", "refined_gru",
                 "refined_gru:mode=add", "mgu", "refined_mgu", "refined_mgu:mode=add"):
        for layers in (2, 8):
            per = {}
            for scale in (0.1, 1.0):
                stack, params, xs, g = gate_means(cell, "orthogonal", scale, layers, 10, 32, 8)
                h = np.asarray(stack.apply(params, xs).states["h"], np.float64)
                hm = gradflow.gradient_map(stack, params, xs, loss="all", wrt="hidden").values
                per[str(scale)] = {**g, "mean_abs_h": np.abs(h).mean(axis=(1, 2, 3)).tolist(),
                                   "hidden_map_nonfinite": float(np.mean(~np.isfinite(hm))),
                                   "hidden_map_zero": float(np.mean(np.asarray(hm) == 0))}
            res[f"{cell}|orthogonal|{layers}x10"] = per
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    vertical(os.path.join(HERE, "atlas_vertical_gain_mechanism.json"))
    refined(os.path.join(HERE, "atlas_cheng_refined_mechanism.json"))
