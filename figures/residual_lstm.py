"""Make ``figures/residual_lstm.png``: the hidden gradient map of a 16-layer LSTM at orthogonal
init, plain, with residual connections, and with residual connections and LayerNorm (README,
"Your own model"). Each panel is ``G[l, t] / G[top, last]`` on one log colour scale; the title
gives the bottom/top ratio at the last step; the maps are saved beside it
(``figures/residual_lstm.npz``: ``values/{label}``, the config). Run from the repository root::

    python figures/residual_lstm.py

The numbers are asserted (same configuration) by
``tests/test_adapters.py::test_deep_lstm_attenuates_residual_lstm_does_not``.
"""
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

import gradflow
from gradflow import plot
from gradflow.results import make_result

CONFIG = {"cell": "lstm", "layers": 16, "steps": 8, "hidden": 32, "batch": 8, "seed": 0,
          "dtype": "float32", "init": "orthogonal", "input_scale": 1.0, "loss": "last",
          "wrt": "hidden"}
STACKS = {"plain": {}, "residual": {"residual": True},
          "residual + LayerNorm": {"residual": True, "norm": "layer"}}


def maps(config=CONFIG, stacks=STACKS) -> dict:
    """``{label: Result}``: the hidden map of each stack topology on the same problem."""
    sizes = {k: config[k] for k in ("layers", "steps", "hidden", "batch", "seed", "dtype",
                                    "input_scale")}
    out = {}
    for label, opts in stacks.items():
        prob = gradflow.problem(config["cell"], init=config["init"], stack_options=opts, **sizes)
        out[label] = gradflow.gradient_map(prob.stack, prob.params, prob.xs, loss=config["loss"],
                                           wrt=config["wrt"], meta={**prob.config, "label": label})
    return out


def main(path=Path(__file__).with_suffix(".png")):
    found = maps()
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, len(found))
    for ax, (label, res) in zip(axes, found.items()):
        v = np.asarray(res.values)
        ratio = v[0, -1] / v[-1, -1]
        plot.heatmap(res, ax=ax, normalize=True, vmin=1e-10, vmax=1e10,
                     title=f"{label}: bottom/top at the last step {ratio:.2g}")
    fig.suptitle("16-layer LSTM, orthogonal init, H = 32, loss 'last': hidden-state gradient "
                 "relative to the top layer's last step")
    plot.save(fig, path)
    data = make_result("residual_lstm", {f"values/{k}": r.values for k, r in found.items()},
                       {**CONFIG, "stacks": STACKS}, warn=False)
    data.save(Path(path).with_suffix(".npz"))
    print(path, json.dumps({k: float(np.asarray(r.values)[0, -1] / np.asarray(r.values)[-1, -1])
                            for k, r in found.items()}))


if __name__ == "__main__":
    main()
