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


def port_lstm(params, device=None) -> list[torch.nn.LSTMCell]:
    """gradflow LSTM stack params -> one ``nn.LSTMCell`` per layer with the same weights, on
    ``device`` (torch's default if None)."""
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
        cells.append(cell.to(device))
    return cells


def readout(loss_fn, device=None):
    """``(W_r: (H, C) tensor, labels: (B, T) int64 tensor)`` of a gradflow ReadoutLoss, on
    ``device``."""
    w, labels = loss_fn.readout()
    return (torch.from_numpy(np.array(w, np.float32)).to(device),
            torch.from_numpy(np.array(labels, np.int64)).to(device))


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


# ---------------------------------------------------------------------------------------------
# The strongest PyTorch peer: a hand-written forward and backward over the wavefront.


def _wavefront_weights(cells):
    """``(Wcat: (L, 2H, 4H), b: (L, 1, 4H))`` with ``[x, h] @ Wcat = x W_ih^T + h W_hh^T``
    (needs every layer to read ``H`` features)."""
    wih, whh, bias = stacked_weights(cells)
    if wih.shape[2] != whh.shape[2]:
        raise ValueError("the wavefront peer needs every layer to read H features")
    return torch.cat([wih, whh], 2).transpose(1, 2).contiguous(), bias[:, None, :].contiguous()


def _gates_fwd(z, c):
    """LSTM gate non-linearities: ``z: (n, B, 4H)`` pre-activations, ``c: (n, B, H)``."""
    i, f, g, o = z.chunk(4, -1)
    i, f, o, g = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o), torch.tanh(g)
    c2 = f * c + i * g
    tc = torch.tanh(c2)
    return o * tc, c2, torch.cat([i, f, g, o], -1), tc


def _gates_bwd(dh, dc_in, a, tc, c):
    """Gate cotangent ``dz: (n, B, 4H)`` and ``dc_{t-1}`` from ``dh, dc`` and the stored
    activations ``a = [i, f, g, o]``, ``tc = tanh(c_t)``, ``c = c_{t-1}``."""
    i, f, g, o = a.chunk(4, -1)
    dc = dc_in + dh * o * (1 - tc * tc)
    dz = torch.cat([dc * g * i * (1 - i), dc * c * f * (1 - f), dc * i * (1 - g * g),
                    dh * tc * o * (1 - o)], -1)
    return dz, dc * f


_COMPILED = {}


def compiled_gates():
    """``(fwd, bwd)``: :func:`_gates_fwd` / :func:`_gates_bwd` under ``torch.compile``
    (inductor fuses each into one element-wise kernel; shapes vary with the wavefront's
    active layer count, so ``dynamic=True``)."""
    if not _COMPILED:
        _COMPILED["fwd"] = torch.compile(_gates_fwd, dynamic=True, fullgraph=True)
        _COMPILED["bwd"] = torch.compile(_gates_bwd, dynamic=True, fullgraph=True)
    return _COMPILED["fwd"], _COMPILED["bwd"]


def hidden_map_wavefront(cells, xs: torch.Tensor, w, labels, loss: str = "last",
                         compiled: bool = False) -> torch.Tensor:
    """``G[l, t] = mean_b ||dL/dh^l_t[b]||`` by hand: the way a strong PyTorch user writes it.

    No autograd. Forward along anti-diagonals ``s = l + t``: the active layers
    ``lo..hi`` of one diagonal run as ONE ``baddbmm`` of ``[x^l_t, h^l_{t-1}]: (n, B, 2H)`` with
    the stacked ``(n, 2H, 4H)`` weights, storing the gate activations. Backward along the
    diagonals in reverse: ``dh`` (readout term on the top layer plus what the diagonal above
    sent), the gate cotangents ``dz``, then ONE ``bmm`` ``dz @ Wcat^T: (n, B, 2H)`` whose halves
    go to ``h^{l-1}_t`` (input side) and ``h^l_{t-1}`` (recurrent side), both on diagonal
    ``s - 1``. The readout loss gradient is formed in closed form (softmax minus one-hot).
    ``compiled=True`` runs the element-wise gate code through ``torch.compile``.
    """
    gf, gb = compiled_gates() if compiled else (_gates_fwd, _gates_bwd)
    with torch.no_grad():
        Wc, b = _wavefront_weights(cells)
        L, H = Wc.shape[0], Wc.shape[1] // 2
        B, T, _ = xs.shape
        S = T + L - 1
        x = xs.transpose(0, 1).contiguous()  # (T, B, D)
        h = xs.new_zeros(L, B, H)
        c = xs.new_zeros(L, B, H)
        saved, top = [], [None] * T
        for s in range(S):
            lo, hi = max(0, s - T + 1), min(L - 1, s)
            n = hi - lo + 1
            hc = xs.new_empty(n, B, 2 * H)
            if lo == 0:
                hc[0, :, :H] = x[s]
                hc[1:, :, :H] = h[0:hi]
            else:
                hc[:, :, :H] = h[lo - 1:hi]
            hc[:, :, H:] = h[lo:hi + 1]
            z = torch.baddbmm(b[lo:hi + 1], hc, Wc[lo:hi + 1])
            cprev = c[lo:hi + 1].clone()
            hn, cn, a, tc = gf(z, cprev)
            h[lo:hi + 1] = hn
            c[lo:hi + 1] = cn
            saved.append((a, tc, cprev))
            if hi == L - 1:
                top[s - (L - 1)] = hn[-1]
        # readout loss gradient w.r.t. the top layer's outputs
        dtop = [None] * T
        ts = [T - 1] if loss == "last" else list(range(T))
        norm = B * len(ts)
        rows = torch.arange(B, device=xs.device)
        for t in ts:
            p = torch.softmax(top[t] @ w, -1)
            p[rows, labels[:, t]] -= 1
            dtop[t] = (p / norm) @ w.T
        G = xs.new_zeros(L, T)
        dh_in = xs.new_zeros(L, B, H)
        dc_in = xs.new_zeros(L, B, H)
        WcT = Wc.transpose(1, 2)
        for s in range(S - 1, -1, -1):
            lo, hi = max(0, s - T + 1), min(L - 1, s)
            a, tc, cprev = saved[s]
            dh = dh_in[lo:hi + 1]
            if hi == L - 1 and dtop[s - hi] is not None:
                dh[-1] += dtop[s - hi]
            ls = torch.arange(lo, hi + 1, device=xs.device)
            G[ls, s - ls] = dh.norm(dim=-1).mean(-1)
            dz, dcp = gb(dh, dc_in[lo:hi + 1], a, tc, cprev)
            dhc = torch.bmm(dz, WcT[lo:hi + 1])  # (n, B, 2H)
            dh_in = xs.new_zeros(L, B, H)
            dh_in[lo:hi + 1] = dhc[:, :, H:]  # to h^l_{t-1}
            if hi >= 1:
                dh_in[max(lo - 1, 0):hi] += dhc[(1 if lo == 0 else 0):, :, :H]  # to h^{l-1}_t
            dc_in = xs.new_zeros(L, B, H)
            dc_in[lo:hi + 1] = dcp
        return G
