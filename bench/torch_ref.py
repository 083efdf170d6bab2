"""The same measurements written the way a PyTorch user would, on weights ported from gradflow.

gradflow's LSTM stores per-gate blocks ``params[g] = {"W": (in, H), "U": (H, H), "b": (H,)}``
for ``g in (i, f, g, o)`` with ``z_g = x @ W_g + h @ U_g + b_g``; ``torch.nn.LSTMCell`` computes
``x @ weight_ih^T + bias_ih + h @ weight_hh^T + bias_hh`` and chunks it in the same gate order
``i, f, g, o``, so ``weight_ih = concat_g(W_g^T)``, ``weight_hh = concat_g(U_g^T)``,
``bias_ih = concat_g(b_g)``, ``bias_hh = 0``. The loss is gradflow's default readout
(:class:`gradflow.jacobian.ReadoutLoss`): its readout matrix and labels are taken from the
arrays it draws.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

GATES = ("i", "f", "g", "o")


def port_lstm(params) -> list[torch.nn.LSTMCell]:
    """gradflow LSTM stack params -> one ``nn.LSTMCell`` per layer with the same weights."""
    cells = []
    for p in params["layers"]:
        w = np.concatenate([np.asarray(p[g]["W"], np.float32).T for g in GATES])
        u = np.concatenate([np.asarray(p[g]["U"], np.float32).T for g in GATES])
        b = np.concatenate([np.asarray(p[g]["b"], np.float32) for g in GATES])
        cell = torch.nn.LSTMCell(w.shape[1], u.shape[1])
        with torch.no_grad():
            cell.weight_ih.copy_(torch.from_numpy(w))
            cell.weight_hh.copy_(torch.from_numpy(u))
            cell.bias_ih.copy_(torch.from_numpy(b))
            cell.bias_hh.zero_()
        cells.append(cell)
    return cells


def readout(loss_fn):
    """``(W_r: (H, C) tensor, labels: (B, T) int64 tensor)`` of a gradflow ReadoutLoss."""
    w, labels = loss_fn.readout()
    return (torch.from_numpy(np.array(w, np.float32)),
            torch.from_numpy(np.array(labels, np.int64)))


def readout_loss(top, w, labels, loss: str):
    """gradflow's readout loss on the top layer's outputs ``top``: a list of T ``(B, H)``."""
    if loss == "last":
        return F.cross_entropy(top[-1] @ w, labels[:, -1])
    logits = torch.stack(top, 1) @ w  # (B, T, C)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def hidden_map(cells, xs: torch.Tensor, w, labels, loss: str = "last",
               weight_grads: bool = True) -> torch.Tensor:
    """``G[l, t] = mean_b ||dL/dh^l_t[b]||``: an eager ``LSTMCell`` loop, ``retain_grad`` on
    every hidden state, one ``backward()``.

    ``weight_grads=True`` is the stock setup (parameters require grad, so ``backward`` also
    accumulates weight gradients); ``False`` freezes the parameters and differentiates the
    inputs instead, which spares the weight-gradient matmuls.
    """
    for c in cells:
        for q in c.parameters():
            q.requires_grad_(weight_grads)
            q.grad = None
    xs = xs.detach().requires_grad_(not weight_grads)
    B, T, _ = xs.shape
    inp = list(xs.unbind(1))
    hs = []
    for cell in cells:
        H = cell.hidden_size
        h = xs.new_zeros(B, H)
        c = xs.new_zeros(B, H)
        out = []
        for t in range(T):
            h, c = cell(inp[t], (h, c))
            h.retain_grad()
            out.append(h)
        hs.append(out)
        inp = out
    readout_loss(inp, w, labels, loss).backward()
    return torch.stack([torch.stack([h.grad.norm(dim=-1).mean() if h.grad is not None
                                     else xs.new_zeros(()) for h in row]) for row in hs])


def stacked_weights(cells):
    """``(W_ih: (L, 4H, in), W_hh: (L, 4H, H), b: (L, 4H))`` (needs all layers of one shape)."""
    return (torch.stack([c.weight_ih.detach() for c in cells]),
            torch.stack([c.weight_hh.detach() for c in cells]),
            torch.stack([(c.bias_ih + c.bias_hh).detach() for c in cells]))


def jacobian_map(cells, xs: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """``J[l, t] = mean_b ||dh^{L-1}_{T-1}[b] / dh^l_t[b]||_F / sqrt(H)`` with
    ``torch.func.jacrev`` (w.r.t. zero perturbations added to every hidden state) ``vmap``-ed
    over the batch: the ``torch.func`` way.
    """
    from torch.func import jacrev, vmap
    wih, whh, bias = stacked_weights(cells)
    L, H = whh.shape[0], whh.shape[2]
    T = xs.shape[1]

    def top_last(eps, x):  # one example: eps (L, T, H), x (T, D) -> h^{L-1}_{T-1}: (H,)
        inp = list(x.unbind(0))
        for l in range(L):
            h = x.new_zeros(H)
            c = x.new_zeros(H)
            out = []
            for t in range(T):
                z = inp[t] @ wih[l].T + h @ whh[l].T + bias[l]
                i, f, g, o = z.chunk(4)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c) + eps[l, t]
                out.append(h)
            inp = out
        return inp[-1]

    eps = xs.new_zeros(xs.shape[0], L, T, H)
    jac = vmap(jacrev(top_last, chunk_size=chunk_size))(eps, xs)  # (B, H, L, T, H)
    return torch.sqrt(jac.pow(2).sum(dim=(1, 4)) / H).mean(0)
