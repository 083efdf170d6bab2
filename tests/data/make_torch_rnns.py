"""Write tests/data/torch_rnns.npz: PyTorch's own numbers for tests/test_pytorch.py.

Run with PyTorch installed (``pip install "gradflow[bench]"``): ``python
tests/data/make_torch_rnns.py``. For each case, a PyTorch recurrent model at its default
(random) init, float32 weights as ``state_dict()`` gives them (``{case}/{key}``), and, computed
in float64 by PyTorch: inputs ``xs`` (batch, steps, features), the model's top-layer outputs
``out`` and final states ``h_n`` (and ``c_n``), a readout ``v`` and the hidden gradient map
``G[l, t] = mean_b ||dL/dh^l_t[b]||`` of ``L = sum_b out[b, T-1] . v`` by autograd
(``retain_grad`` on every layer's state, the layers run by PyTorch's ``*Cell`` modules holding
the same weights, checked equal to the whole model's outputs first; a bidirectional model's
rows are (layer, direction), the forward direction first).
"""
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).with_name("torch_rnns.npz")
B, T, D = 3, 6, 4


def cases():
    torch.manual_seed(0)
    return {
        "lstm": torch.nn.LSTM(D, 5, num_layers=3, batch_first=True),
        "gru": torch.nn.GRU(D, 5, num_layers=3),  # (steps, batch, features)
        "rnn_tanh": torch.nn.RNN(D, 5, num_layers=2, batch_first=True),
        "rnn_relu": torch.nn.RNN(D, 5, num_layers=2, nonlinearity="relu", batch_first=True),
        "lstm_nobias": torch.nn.LSTM(D, 4, num_layers=2, bias=False, batch_first=True),
        "cells": torch.nn.ModuleList([torch.nn.GRUCell(D, 6), torch.nn.GRUCell(6, 3)]),
        "bilstm": torch.nn.LSTM(D, 5, num_layers=2, bidirectional=True, batch_first=True),
        "bigru": torch.nn.GRU(D, 4, num_layers=2, bidirectional=True, batch_first=True),
        "lstmp": torch.nn.LSTM(D, 6, num_layers=2, proj_size=3, bidirectional=True,
                               batch_first=True),
    }


class ProjectedCell:
    """One direction of an LSTM layer with ``proj_size``, its equations written out in
    PyTorch (``nn.LSTMCell`` has no projection): ``h = W_hr (o * tanh(c))``."""

    def __init__(self, model, name):
        self.w = {k: getattr(model, f"{k}{name}").double()  # (requires grad: h does)
                  for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")}
        self.hidden_size = model.proj_size

    def __call__(self, x, state=None):
        w = self.w
        if state is None:
            state = (x.new_zeros(x.shape[0], w["weight_hr"].shape[0]),
                     x.new_zeros(x.shape[0], w["weight_hr"].shape[1]))
        h, c = state
        z = x @ w["weight_ih"].T + w["bias_ih"] + h @ w["weight_hh"].T + w["bias_hh"]
        i, f, g, o = z.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return (torch.sigmoid(o) * torch.tanh(c)) @ w["weight_hr"].T, c


def layer_cells(model):
    """The model's layers as PyTorch ``*Cell`` modules with the same weights (float64): one
    list per direction (the reverse one empty unless the model is bidirectional)."""
    if isinstance(model, torch.nn.ModuleList):
        return [m.double() for m in model], []
    kind = {"LSTM": torch.nn.LSTMCell, "GRU": torch.nn.GRUCell, "RNN": torch.nn.RNNCell}
    cls = kind[type(model).__name__]
    out = ([], [])
    dirs = ("", "_reverse") if model.bidirectional else ("",)
    for l in range(model.num_layers):
        extra = {"nonlinearity": model.nonlinearity} if cls is torch.nn.RNNCell else {}
        ins = model.input_size if l == 0 else model.hidden_size * len(dirs)
        for d, suffix in enumerate(dirs):
            if getattr(model, "proj_size", 0):
                out[d].append(ProjectedCell(model, f"_l{l}{suffix}"))
                continue
            cell = cls(ins, model.hidden_size, bias=model.bias, **extra).double()
            with torch.no_grad():
                for name in ("weight_ih", "weight_hh") + (
                        ("bias_ih", "bias_hh") if model.bias else ()):
                    getattr(cell, name).copy_(getattr(model, f"{name}_l{l}{suffix}"))
            out[d].append(cell)
    return out


def loop(cells, xs, v):
    """Top outputs (B, T, H), the map G (L, T) by autograd, the final states. Bidirectional
    (``cells[1]`` not empty): each layer runs forward, then its reverse direction from the
    last step back, and passes both directions' h up, concatenated; G's rows are (layer,
    direction), the forward direction first."""
    fwd, bwd = cells
    rows = []  # (L or 2L) lists of T states
    inputs = [xs[:, t] for t in range(T)]
    states = [None] * len(fwd)
    for l in range(len(fwd)):
        dirs = [(fwd[l], range(T))] + ([(bwd[l], range(T - 1, -1, -1))] if bwd else [])
        outs = []
        for cell, order in dirs:
            hs, state = [None] * T, None
            for t in order:
                new = cell(inputs[t], state) if state is not None else cell(inputs[t])
                h = new[0] if isinstance(new, tuple) else new
                h.retain_grad()
                hs[t], state = h, new
            rows.append(hs)
            outs.append(hs)
            states[l] = state
        inputs = [torch.cat([o[t] for o in outs], -1) for t in range(T)]
    top = torch.stack(inputs, 1)
    (top[:, -1] @ v).sum().backward()
    G = np.array([[h.grad.norm(dim=1).mean().item() for h in row] for row in rows])
    return top, G, states


def main():
    arrays = {}
    gen = torch.Generator().manual_seed(1)
    for case, model in cases().items():
        for k, w in model.state_dict().items():
            arrays[f"{case}/{k}"] = w.numpy().copy()  # float32, as trained weights are
        xs = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
        cells = layer_cells(model)
        width = cells[0][-1].hidden_size * (2 if cells[1] else 1)
        v = torch.randn(width, generator=gen, dtype=torch.float64)
        top, G, states = loop(cells, xs, v)
        if not isinstance(model, torch.nn.ModuleList):  # the whole model agrees with the loop
            m = model.double()
            with torch.no_grad():
                out, fin = m(xs if m.batch_first else xs.transpose(0, 1))
            out = out if m.batch_first else out.transpose(0, 1)
            assert torch.allclose(out, top.detach(), rtol=1e-12, atol=1e-14), case
            h_n = fin[0] if isinstance(fin, tuple) else fin
            arrays[f"{case}/h_n"] = h_n.numpy()  # (layers x directions, B, H)
            if isinstance(fin, tuple):
                arrays[f"{case}/c_n"] = fin[1].numpy()
        arrays[f"{case}/xs"] = xs.numpy()
        arrays[f"{case}/v"] = v.numpy()
        arrays[f"{case}/out"] = top.detach().numpy()
        arrays[f"{case}/G"] = G
    arrays["torch_version"] = np.array(torch.__version__)
    np.savez_compressed(OUT, **arrays)
    print(f"{OUT}: {len(arrays)} arrays, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
