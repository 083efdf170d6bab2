"""Where the time of the standard hidden map goes: ``python -m bench.profile_lstm``.

Times sub-parts and alternative formulations of the same LSTM computation (L=16, T=64, H=128,
B=32 unless ``--quick``), each checked to give the same gradient, and writes
``bench/results/profile.json``:

* gradflow's forward alone, its hidden map, and ``jax.grad`` w.r.t. the inputs (the same
  backward work: state cotangents only, no weight gradients);
* a minimal JAX LSTM stack (pre-fused ``(H, 4H)`` weights, only the top layer returned) under
  plain autodiff: what gradflow's generic stack costs over the leanest autodiff formulation;
* the same stack with a hand-written backward (``jax.custom_vjp`` per layer: a reverse scan
  computing the gate cotangents ``dz_t`` and ``dh_{t-1} = dz_t U^T``, then ``dX = dZ W^T`` as
  one matmul after the scan): the ceiling for a hand-fused LSTM in JAX on this CPU;
* the per-step cost floor: a scan of ``L*T`` steps doing only the ``(B, H) x (H, 4H)`` matmul,
  and the same FLOPs as one batched matmul.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import gradflow
from gradflow import jacobian as J
from bench.harness import block, machine, timed


def _cell(U, state, xp):
    c, h = state
    i, f, g, o = jnp.split(xp + h @ U, 4, -1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return c, jax.nn.sigmoid(o) * jnp.tanh(c)


def _layer_plain(W, U, b, x):
    B, H = x.shape[1], U.shape[0]
    z = jnp.zeros((B, H), x.dtype)

    def body(s, xp_t):
        s = _cell(U, s, xp_t)
        return s, s[1]
    return lax.scan(body, (z, z), x @ W + b)[1]


@jax.custom_vjp
def _layer_fused(W, U, b, x):
    return _layer_plain(W, U, b, x)


def _fwd(W, U, b, x):
    B, H = x.shape[1], U.shape[0]
    z = jnp.zeros((B, H), x.dtype)

    def body(s, xp_t):
        c, h = s
        i, f, g, o = jnp.split(xp_t + h @ U, 4, -1)
        i, f, o, g = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jax.nn.sigmoid(o), jnp.tanh(g)
        c2 = f * c + i * g
        tc = jnp.tanh(c2)
        h2 = o * tc
        return (c2, h2), (h2, (i, f, g, o, c, tc))
    _, (hs, res) = lax.scan(body, (z, z), x @ W + b)
    return hs, (W, U, b, res)


def _bwd(r, dhs):
    W, U, b, (i, f, g, o, cprev, tc) = r
    UT = U.T
    z = jnp.zeros_like(cprev[0])

    def body(carry, inp):
        dh_next, dc_next = carry
        dh_out, i, f, g, o, cp, tc = inp
        dh = dh_out + dh_next
        do = dh * tc
        dc = dc_next + dh * o * (1 - tc * tc)
        dz = jnp.concatenate([dc * g * i * (1 - i), dc * cp * f * (1 - f), dc * i * (1 - g * g),
                              do * o * (1 - o)], -1)
        return (dz @ UT, dc * f), dz
    _, dz = lax.scan(body, (z, z), (dhs, i, f, g, o, cprev, tc), reverse=True)
    # the weight cotangents are not formed: this variant serves input/state gradients only
    return jnp.zeros_like(W), jnp.zeros_like(U), jnp.zeros_like(b), dz @ W.T


_layer_fused.defvjp(_fwd, _bwd)


def _stack(layer):
    def f(Ws, Us, bs, x):
        return lax.scan(lambda x, p: (layer(*p, x), None), x, (Ws, Us, bs))[0]
    return f


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    L, T, H, B = (2, 8, 16, 4) if args.quick else (16, 64, 128, 32)
    pr = gradflow.problem("lstm", layers=L, steps=T, hidden=H, batch=B, seed=0)
    lf = J.readout_loss("last", H, T, B)
    gates = ("i", "f", "g", "o")
    Ws = jnp.stack([jnp.concatenate([p[g]["W"] for g in gates], 1) for p in pr.params["layers"]])
    Us = jnp.stack([jnp.concatenate([p[g]["U"] for g in gates], 1) for p in pr.params["layers"]])
    bs = jnp.stack([jnp.concatenate([p[g]["b"] for g in gates]) for p in pr.params["layers"]])
    x_tm = jnp.swapaxes(pr.xs, 0, 1)

    def loss_tm(top_tm):  # (T, B, H) -> gradflow's readout loss
        return lf(jnp.swapaxes(top_tm, 0, 1))

    gf_fwd = jax.jit(lambda p, x: pr.stack.apply(p, x).top)
    gf_gx = jax.jit(jax.grad(lambda p, x: lf(pr.stack.apply(p, x).top), argnums=1))
    plain_fwd = jax.jit(_stack(_layer_plain))
    plain_gx = jax.jit(jax.grad(lambda x: loss_tm(_stack(_layer_plain)(Ws, Us, bs, x))))
    fused_gx = jax.jit(jax.grad(lambda x: loss_tm(_stack(_layer_fused)(Ws, Us, bs, x))))
    hid = jax.jit(lambda p, x: J._state_map(pr.stack, p, x, lf, "h"))

    g_ref = np.asarray(gf_gx(pr.params, pr.xs))
    checks = {
        "plain_forward_vs_gradflow": float(np.max(np.abs(
            np.swapaxes(np.asarray(plain_fwd(Ws, Us, bs, x_tm)), 0, 1)
            - np.asarray(gf_fwd(pr.params, pr.xs))))),
        "plain_grad_inputs_vs_gradflow": float(np.max(np.abs(
            np.swapaxes(np.asarray(plain_gx(x_tm)), 0, 1) - g_ref)) / np.max(np.abs(g_ref))),
        "fused_grad_inputs_vs_gradflow": float(np.max(np.abs(
            np.swapaxes(np.asarray(fused_gx(x_tm)), 0, 1) - g_ref)) / np.max(np.abs(g_ref)))}

    a = jnp.ones((B, H), jnp.float32)
    u = jnp.ones((H, 4 * H), jnp.float32) / H
    steps = jax.jit(lambda a, u: lax.scan(lambda c, _: (jnp.tanh(c @ u)[:, :H], None), a, None,
                                          length=L * T)[0])
    big = jnp.ones((L * T * B, H), jnp.float32)
    batched = jax.jit(lambda a, u: a @ u)
    fns = {
        "gradflow_forward": lambda: block(gf_fwd(pr.params, pr.xs)),
        "gradflow_hidden_map_core": lambda: block(hid(pr.params, pr.xs)),
        "gradflow_grad_inputs": lambda: block(gf_gx(pr.params, pr.xs)),
        "plain_forward": lambda: block(plain_fwd(Ws, Us, bs, x_tm)),
        "plain_grad_inputs": lambda: block(plain_gx(x_tm)),
        "handwritten_bwd_grad_inputs": lambda: block(fused_gx(x_tm)),
        "LT_step_matmul_scan": lambda: block(steps(a, u)),
        "same_flops_one_matmul": lambda: block(batched(big, u)),
    }
    t = timed(fns, args.repeats)
    per_step_mm = 2 * B * H * 4 * H
    res = {"machine": machine(), "config": {"L": L, "T": T, "H": H, "B": B},
           "checks": checks, "times": t,
           "per_step_matmul_flops": per_step_mm,
           "step_matmul_gflop_s": {
               "scan_of_LT_steps": L * T * per_step_mm / t["LT_step_matmul_scan"]["median_s"] / 1e9,
               "one_batched_matmul": L * T * per_step_mm / t["same_flops_one_matmul"]["median_s"]
               / 1e9}}
    out = os.path.join(os.path.dirname(__file__), "results",
                       "quick" if args.quick else "", "profile.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    for k, v in t.items():
        print(f"{k:32s} {1e3 * v['median_s']:9.2f} ms")
    print(json.dumps(checks), json.dumps(res["step_matmul_gflop_s"]))


if __name__ == "__main__":
    main()
