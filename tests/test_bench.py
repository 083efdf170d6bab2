"""The benchmark harness at a tiny size: its correctness cross-checks, not its timings.

The benchmarks (``python -m bench``) only compare the speed of implementations that compute the
same numbers; these tests check that they do: the PyTorch ``retain_grad`` loop and
``torch.func.jacrev`` on weights ported from gradflow against gradflow's maps, H separate VJPs
against the exact Jacobian map, the analytic FLOP counts against a hand count and XLA's cost
analysis. Nothing here is timed. The torch parts are skipped when torch (the ``bench`` extra) is
not installed.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from bench import flops, harness, report, run

# the in-process tests: the child lane runs them (those with a background job stay here)
pytestmark = pytest.mark.child

TINY = {
    "std": {"L": 2, "T": 5, "H": 8, "B": 3},
    "jac": {"L": 2, "T": 4, "H": 6, "B": 2},
    "repeats": 1, "jac_repeats": 1, "scaling_repeats": 1,
    "scaling": {"L": [1, 2]}, "memory": {"L": 2, "T": 20, "H": 4, "B": 1},
    "sweep": {"cells": ["lstm"], "seeds": 2, "L": 1, "T": 3, "H": 4, "B": 1},
    "matmul": 64, "orders": ("layer", "wavefront"),
}


def test_flop_formulas_by_hand():
    L, T, H, B, D, G = 2, 3, 4, 5, 6, 4
    per = 2 * B * T * G * H  # one (in or H) column of the weights, times 2 for multiply-add
    assert flops.forward(L, T, H, B, D, G) == per * (D + H) + per * (H + H)
    # no weight gradients, no gradient w.r.t. the data: dz @ U^T everywhere, dz @ W^T above 0
    assert flops.backward_inputs(L, T, H, B, D, G) == per * H + per * (H + H)
    assert flops.hidden_map(L, T, H, B, D, G) == (flops.forward(L, T, H, B, D, G)
                                                  + flops.backward_inputs(L, T, H, B, D, G))


def test_cpu_description_tells_machines_with_one_model_name_apart():
    zen1 = ("processor : 0\nvendor_id : AuthenticAMD\ncpu family : 23\nmodel : 1\n"
            "model name : AMD EPYC\nflags : fpu sse avx avx2 fma\n"
            "processor : 1\nvendor_id : AuthenticAMD\ncpu family : 99\n")
    zen5 = zen1.replace("family : 23", "family : 26").replace("avx2", "avx2 avx512f")
    xeon = ("vendor_id : GenuineIntel\ncpu family : 6\nmodel : 143\n"
            "model name : Intel(R) Xeon(R) Processor\nflags : sse avx\n")
    one, five, intel = (harness.cpu_description(c).split("; L")[0] for c in (zen1, zen5, xeon))
    assert one == "AMD EPYC (family 23 model 1: Zen 1; AVX2"  # the first processor's lines
    for family, model, arch in ((25, 1, "Zen 3"), (25, 17, "Zen 4"), (25, 97, "Zen 4"),
                                (25, 33, "Zen 3"), (23, 49, "Zen 2")):
        text = zen1.replace("family : 23", f"family : {family}").replace("model : 1",
                                                                         f"model : {model}")
        assert f"model {model}: {arch};" in harness.cpu_description(text)
    assert five == "AMD EPYC (family 26 model 1: Zen 5; AVX-512"
    assert intel == "Intel(R) Xeon(R) Processor (family 6 model 143; no AVX2"
    assert harness.machine()["cpu"] == harness.cpu_description()


def test_forward_flops_match_xla_cost_analysis():
    """One unrolled step of a 2-layer LSTM (no loop, so XLA counts every op): the matmul count
    is XLA's count minus the element-wise work, which is small at this size."""
    L, H, B, D = 2, 64, 8, 32
    stack = gradflow.Stack("lstm", L, D, H)
    params = stack.init(jax.random.key(0), jnp.float32)
    xs = jnp.ones((B, 1, D), jnp.float32)

    def fwd(p, x):
        inp = x[:, 0]
        for lp in p["layers"]:
            s = stack.cell.initial_state((B,), H, jnp.float32)
            s, inp, _ = stack.cell.step(lp, s, inp, 0)
        return inp

    ca = jax.jit(fwd).lower(params, xs).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    if not ca or "flops" not in ca:
        pytest.skip("no XLA cost analysis on this backend")
    n = flops.forward(L, 1, H, B, D, flops.gate_blocks("lstm"))
    assert n <= ca["flops"] <= 1.1 * n


def test_torch_retain_grad_map_equals_gradflow_hidden_map():
    torch = pytest.importorskip("torch")
    from bench import torch_ref as TR
    pr = gradflow.problem("lstm", layers=3, steps=5, hidden=8, batch=2, input_size=5, seed=1,
                          dtype="float32")
    cells = TR.port_lstm(pr.params)
    xs = torch.from_numpy(np.array(pr.xs, np.float32))
    for loss in ("last", "all"):
        ref = gradflow.gradient_map(pr.stack, pr.params, pr.xs, loss=loss, wrt="hidden").values
        w, labels = TR.readout(gradflow.jacobian.readout_loss(loss, 8, 5, 2))
        for weight_grads in (True, False):
            got = TR.hidden_map(cells, xs, w, labels, loss, weight_grads).numpy()
            assert got.shape == ref.shape
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_torch_wavefront_peer_equals_gradflow_hidden_map():
    """The hand-written PyTorch forward/backward over the wavefront (no autograd): every layer
    count against the ramp of the diagonals (L < T, L = T, L > T), both losses."""
    torch = pytest.importorskip("torch")
    from bench import torch_ref as TR
    for L, T in ((3, 5), (4, 4), (5, 2), (1, 3)):
        pr = gradflow.problem("lstm", layers=L, steps=T, hidden=6, batch=3, seed=L,
                              dtype="float32")
        cells = TR.port_lstm(pr.params)
        xs = torch.from_numpy(np.array(pr.xs, np.float32))
        for loss in ("last", "all"):
            ref = gradflow.gradient_map(pr.stack, pr.params, pr.xs, loss=loss).values
            w, labels = TR.readout(gradflow.jacobian.readout_loss(loss, 6, T, 3))
            got = TR.hidden_map_wavefront(cells, xs, w, labels, loss).numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_torch_jacrev_map_equals_gradflow_exact_jacobian_map():
    torch = pytest.importorskip("torch")
    from bench import torch_ref as TR
    pr = gradflow.problem("lstm", layers=3, steps=4, hidden=6, batch=2, seed=2,
                          dtype="float32")
    ref = gradflow.jacobian_map(pr.stack, pr.params, pr.xs).values
    got = TR.jacobian_map(TR.port_lstm(pr.params), torch.from_numpy(np.array(pr.xs))).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def _markdown_of(name: str, result: dict) -> str:
    """``report.markdown`` of a results file holding the one benchmark ``name``."""
    return report.markdown({"machine": {"cpu": "-", "cores": 2, "memory_gib": 1, "platform": "-",
                                        "jax": "-", "jaxlib": "-", "devices": ["cpu:0"],
                                        "backend": "cpu"},
                            "config": TINY, "started": "-", "benchmarks": {name: result},
                            "errors": {}, "goals": []})


ROOT = Path(__file__).resolve().parents[1]
HARNESS = ["floor", "torch_hidden", "jacobian", "flop_rate", "scaling"]


def _child(code: str, env, *args):
    """Run ``code`` in a fresh Python at the repository root (as ``python -m bench`` runs);
    returns the JSON its last line of output prints."""
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def _harness(env):
    out = tempfile.mkdtemp(prefix="gradflow-bench-")
    code = ("import json, sys; from bench import run; "
            "res = run.run(json.loads(sys.argv[1]), json.loads(sys.argv[2])); "
            "run.write(res, sys.argv[3]); print(json.dumps(res, default=float))")
    return _child(code, env, json.dumps(TINY), json.dumps(HARNESS), out), Path(out)


@pytest.mark.background(job=_harness)  # its work is the benchmark harness in its own process
def test_harness_runs_and_its_cross_checks_hold(background):
    res, tmp_path = background
    try:
        _check_harness(res, tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _check_harness(res, tmp_path):
    try:
        import torch  # noqa: F401
        assert not res["errors"], res["errors"]
    except ImportError:
        assert set(res["errors"]) == {"torch_hidden"}
    b = res["benchmarks"]
    assert b["floor"]["checks"]["wavefront_vs_layer_rel_err"] < 1e-5
    for o in b["floor"]["orders"].values():
        assert o["checks"]["loss_value_rel_err"] < 1e-6
    ch = b["jacobian"]["checks"]
    assert ch["separate_vjps_vs_exact_rel_err"] < 1e-5
    assert 0 <= ch["probe_k16"]["share_within_2_stderr"] <= 1
    if "torch_hidden" in b:
        assert all(v < 1e-4 for v in b["torch_hidden"]["checks"].values())
        assert ch["torch_jacrev_vs_exact_rel_err"] < 1e-4
    assert {g["name"] for g in res["goals"]} >= {"1. hidden map / jax.grad(params)",
                                                 "4. hidden map FLOP/s / dense matmul FLOP/s"}
    assert json.loads((tmp_path / "results.json").read_text())["benchmarks"]
    md = (tmp_path / "results.md").read_text()
    assert "## Goals" in md and "## 1." in md
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert json.loads(json.dumps(report.goals(res), default=float)) == res["goals"]


def _split_floor(env):
    code = ("import json, sys; from bench import suite; "
            "print(json.dumps(suite.split_floor(json.loads(sys.argv[1])), default=float))")
    return _child(code, env, json.dumps({**TINY, "std": {"L": 1, "T": 3, "H": 4, "B": 2},
                                         "floor_processes": 2}))


@pytest.mark.background(job=_split_floor)  # its work is processes: the benchmark's and its own
def test_split_floor_runs_pinned_halves_and_reports_them(background):
    """Two pinned processes of half the batch (each one device, its own core), at a tiny size;
    where the machine has one core the benchmark says it does not apply."""
    r = background
    md = _markdown_of("split_floor", r)
    if "not_applicable" in r:
        assert len(os.sched_getaffinity(0)) < 2 and "Not measured" in md
        return
    together = r["times"]["halves_together"]
    assert [h["affinity"] for h in together] == [[c] for c in r["config"]["cores"]]
    assert all(h["devices"] == 1 and h["batch"] == 1 for h in together)
    assert r["halves_together_s"] == max(h["median_s"] for h in together) > 0
    assert r["split_over_halves"] == r["split_s"] / r["halves_together_s"]
    assert "pinned to its own core" in md


def test_lean_benchmark_cross_checks():
    """The hidden map vs today's map: gradient_map (split, lean), the lean map, autodiff, the
    filing-day code (gradflow as issue 13 measured it, from this checkout's git history) and
    the torch peers compute one map, for registered cells and a user's from_function cell."""
    from bench import filing_day
    res = run.run({**TINY, "lean_cells": ("lstm", "star", "user_gru")}, ["lean"])
    assert not res["errors"], res["errors"]
    lean = res["benchmarks"]["lean"]
    rows = lean["rows"]
    try:
        filing_day.load()
        have_then = True
    except RuntimeError as e:  # a checkout without the history: said, not silently dropped
        have_then = False
        assert lean["filing_day_error"] == str(e)
    for name in ("lstm", "star", "user_gru"):
        assert rows[name]["checks"]["lean_vs_autodiff_rel_err"] < 1e-5
        assert rows[name]["checks"]["split_vs_autodiff_rel_err"] < 1e-5
        t = rows[name]["times"]
        assert rows[name]["split_over_autodiff"] == (t["split"]["median_s"]
                                                    / t["autodiff"]["median_s"])
        if have_then:
            assert rows[name]["checks"]["filing_day_vs_autodiff_rel_err"] < 1e-5
            assert rows[name]["split_over_filing_day"] == (t["split"]["median_s"]
                                                          / t["filing_day"]["median_s"])
    assert all(v < 1e-4 for k, v in rows["lstm"]["checks"].items() if k.endswith("rel_err"))
    names = [g["name"] for g in res["goals"]]
    for ref in ["today's code with the lean path off"] + ["the filing-day map"] * have_then:
        assert any(n.startswith("13. hidden map (gradient_map") and ref in n for n in names)
        assert any(n.startswith("13. speed-up of star, user_gru over " + ref) for n in names)
    md = report.markdown(res)
    assert "## The hidden map vs today's map" in md
    assert ("the code issue 13 timed" if have_then else "not measured: ") in md


def test_wavefront_benchmark_compares_equal_maps():
    """Layer vs wavefront order at several shapes: the two orders compute one map, and the
    report's section lists every shape."""
    res = run.run({**TINY, "order_shapes": ((2, 6), (3, 3))}, ["wavefront"])
    assert not res["errors"], res["errors"]
    rows = res["benchmarks"]["wavefront"]["rows"]
    assert [(r["L"], r["T"]) for r in rows] == [(2, 6), (3, 3)]
    for r in rows:
        assert r["checks"]["rel_err"] < 1e-5
        t = r["times"]
        assert r["wavefront_over_layer"] == t["wavefront"]["median_s"] / t["layer"]["median_s"]
    md = report.markdown(res)
    assert "## Evaluation order" in md and "| 3 x 3 |" in md


def test_accelerator_benchmark_runs_here_with_cross_checks():
    """The GPU run's section (``bench/gpu.sh``), on this CPU at a tiny size: both orders, the
    autodiff path, the fast-matmul mode and the torch peers compute one map; the ratios are
    the times' and the report names the backend."""
    res = run.run({**TINY, "accelerator": {"L": 2, "T": 5, "H": 4, "B": 2}}, ["accelerator"])
    assert not res["errors"], res["errors"]
    r = res["benchmarks"]["accelerator"]
    assert r["config"]["backend"] == jax.default_backend()
    assert all(v < 1e-5 for v in r["checks"].values()), r["checks"]
    t = r["times"]
    assert {"layer", "wavefront", "layer_autodiff", "layer_fast_matmul"} <= set(t)
    assert r["ratios"]["wavefront/layer"] == t["wavefront"]["median_s"] / t["layer"]["median_s"]
    try:
        import torch  # noqa: F401
        assert {"torch_stock", "torch_wavefront"} <= set(t) and r["torch"]["device"] == "cpu"
    except ImportError:
        assert "error" in r["torch"]
    assert "## The hidden map on cpu (LSTM 2 x 5 x 4" in report.markdown(res)


def _cli_start():
    from bench import suite
    return suite.cli_start(run.QUICK)


@pytest.mark.background(job=_cli_start)  # its work is fresh CLI processes
def test_cli_start_benchmark_runs_the_cli_fresh_with_and_without_the_cache(background):
    r = background
    assert r["checks"]["maps_vs_primed_rel_err"] == 0  # a cached program computes the same
    assert r["cache_files"] > 0
    assert {k: len(v) for k, v in r["walls_s"].items()} == {"no_cache": 1, "cache_warm": 1}
    assert "--layers 2" in r["config"]["command"]
    md = _markdown_of("cli_start", r)
    assert "## The CLI's main job from a fresh process" in md and "programs already in it" in md


def test_model_split_benchmark_reports_a_user_model_split_and_unsplit():
    from bench import suite
    r = suite.model_split(run.QUICK)
    assert [x["B"] for x in r["rows"]] == [4]
    for x in r["rows"]:
        assert x["checks"]["split_vs_one_rel_err"] <= 1e-6
        assert x["devices"] == len(jax.devices())  # this process: one device, nothing split
    md = _markdown_of("model_split", r)
    assert "## A user's model split over the devices" in md and "| 4 |" in md


def test_split_sizes_benchmark_reports_the_split_and_the_auto_choice():
    from bench import suite
    r = suite.split_sizes(run.QUICK)
    assert [(x["B"], x["H"]) for x in r["rows"]] == [(2, 8), (4, 8)]
    for x in r["rows"]:
        assert x["checks"]["split_vs_unsplit_rel_err"] <= 1e-6
        assert x["auto_devices"] == 0  # 1 or 2 examples x 8 per device: never worth a split
    md = _markdown_of("split_sizes", r)
    assert "## Where the batch split pays" in md and "| 4 x 8 |" in md


def test_spectral_benchmark_compares_equal_singular_values():
    """``spectral``: the per-matrix singular values (what gradflow runs) equal the batched
    call's, and both are timed; local gains timed; the report renders its table."""
    from bench import suite
    r = suite.spectral(run.QUICK)
    (n, count), = run.QUICK["spectral"]["matrices"]
    assert r["checks"][f"{n}x{n}_rel_err"] <= 1e-6
    assert set(r["times"][f"{count}x{n}x{n}"]) == {"per_matrix", "batched"}
    assert r["times"]["local_gains"]["median_s"] > 0
    assert "one matrix per LAPACK call" in _markdown_of("spectral", r)
