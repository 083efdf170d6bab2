"""Goals, the Markdown tables and the scaling plot from a results dict."""
from __future__ import annotations


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def goals(res: dict) -> list[dict]:
    """``[{"name", "value", "goal", "met"}]`` for every goal of the issue that was measured."""
    b = res["benchmarks"]
    rows = []

    def add(name, value, op, target, unit="x"):
        if value is None:
            return
        met = value <= target if op == "<=" else value >= target
        rows.append({"name": name, "value": value, "goal": f"{op} {target}{unit}", "met": met})

    add("1. hidden map / jax.grad(params)", _get(b, "floor", "orders", "layer", "ratios",
                                                 "hidden_map/grad_params"), "<=", 1.15)
    add("1. params map / jax.grad(params)", _get(b, "floor", "orders", "layer", "ratios",
                                                 "params_map/grad_params"), "<=", 1.15)
    add("2. speedup vs torch retain_grad loop (stock, weight grads on)",
        _get(b, "torch_hidden", "speedup", "vs_weight_grads"), ">=", 3)
    add("2. speedup vs torch retain_grad loop (parameters frozen)",
        _get(b, "torch_hidden", "speedup", "vs_frozen"), ">=", 3)
    add("3. exact Jacobian map: speedup vs torch.func jacrev+vmap",
        _get(b, "jacobian", "ratios", "speedup_vs_torch_jacrev"), ">=", 3)
    add("3. exact Jacobian map / H separate VJPs",
        _get(b, "jacobian", "ratios", "exact/H_separate_vjps"), "<=", 1.5)
    add("4. hidden map FLOP/s / dense matmul FLOP/s",
        _get(b, "flop_rate", "fraction_of_matmul", "hidden_map"), ">=", 0.5, "")
    peak = _get(b, "memory", "checkpoint_auto", "peak_rss_mib")
    if peak is not None:
        add("5. peak RSS, checkpointed long map (GiB)", peak / 1024, "<=", 2, " GiB")
    t = _get(b, "floor", "orders", "layer", "times", "hidden_map", "median_s")
    add("issue 3: standard hidden map on CPU (s)", t, "<=", 10, " s")
    ln = _get(b, "lean", "rows")
    commit = (_get(b, "lean", "config", "filing_day_commit") or "")[:7]
    for key, label in (("split_over_filing_day", f"the filing-day map (gradflow at {commit}, "
                        "the code the issue timed, one device)"),
                       ("split_over_autodiff", "today's code with the lean path off (autodiff, "
                        "one device)")):
        if not ln or key not in ln.get("lstm", {}):
            continue
        add(f"13. hidden map (gradient_map: batch split, lean) / {label}, LSTM, same process",
            ln["lstm"][key], "<=", 0.5)
        f = {k: 1 / v[key] for k, v in ln.items() if key in v}
        if len(f) > 1:
            add("13. speed-up of " + ", ".join(k for k in f if k != "lstm") + f" over {label} "
                "within 20% of LSTM's (max relative deviation)",
                max(abs(v / f["lstm"] - 1) for v in f.values()), "<=", 0.2, "")
    th = _get(b, "torch_hidden")
    if th:
        add("13. speedup vs torch retain_grad loop (stock)",
            _get(th, "speedup", "vs_weight_grads"), ">=", 3.5)
        add(f"13. speedup vs the strongest torch peer ({th.get('strongest_peer')})",
            _get(th, "speedup", "vs_strongest_peer"), ">=", 1.2)
        for k in ("wavefront", "wavefront_compiled"):
            add(f"13. speedup vs torch manual {k.replace('_', ' ')} (bmm)",
                _get(th, "speedup", f"vs_{k}"), ">=", 1.2)
    add("13. hidden map (batch split) FLOP/s / dense matmul FLOP/s",
        _get(b, "flop_rate", "fraction_of_matmul", "hidden_map_split"), ">=", 0.55, "")
    return rows


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _f(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, (int, float)):
        if abs(v) >= 1e4 or (0 < abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{nd}g}"
    return str(v)


def _ms(t):
    return _f(1e3 * t["median_s"]) if isinstance(t, dict) and "median_s" in t else "-"


def markdown(res: dict) -> str:
    m, b = res["machine"], res["benchmarks"]
    lines = [f"# gradflow benchmarks ({res.get('mode', '')} run, {res['started']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['platform']};"
             f" JAX {m['jax']} / jaxlib {m['jaxlib']} ({m['backend']}, devices "
             f"{', '.join(m['devices'])}); torch {m.get('torch')} "
             f"({m.get('torch_threads')} threads). Times are medians of repeated runs after "
             "warm-up and compilation (interleaved with what they are compared to); compile "
             "times separately. Everything in `results.json`.", "",
             "Other processes share the cores: 1-minute load average before/after each "
             "benchmark (machine per benchmark when merged from runs on different machines): "
             + "; ".join(f"{k} {v['machine']['loadavg_1min_before_after']}"
                         + ("" if v["machine"]["cpu"] == m["cpu"] else
                            f" ({v['machine']['cpu']}, {v['machine']['cores']} cores)")
                         for k, v in b.items() if "machine" in v) + ".", "",
             "## Goals", "", "| goal | measured | target | met |", "|---|---|---|---|"]
    for g in res.get("goals", []):
        lines.append(f"| {g['name']} | {_f(g['value'])} | {g['goal']} | {_f(g['met'])} |")
    if "floor" in b:
        r = b["floor"]
        c = r["config"]
        lines += ["", f"## 1. Maps vs plain `jax.grad` (LSTM, L={c['L']}, T={c['T']}, "
                  f"H={c['H']}, B={c['B']}, loss last)", "",
                  "| order | hidden map ms | params map ms | grad(params) ms | grad(inputs) ms |"
                  " hidden/grad(params) | params/grad(params) | hidden/grad(inputs) | "
                  "compile s (hidden, params, grad) |", "|---|---|---|---|---|---|---|---|---|"]
        for order, o in r["orders"].items():
            t, q, cs = o["times"], o["ratios"], o["compile_s"]
            lines.append(f"| {order} | {_ms(t['hidden_map'])} | {_ms(t['params_map'])} | "
                         f"{_ms(t['grad_params'])} | {_ms(t['grad_inputs'])} | "
                         f"{_f(q['hidden_map/grad_params'])} | {_f(q['params_map/grad_params'])}"
                         f" | {_f(q['hidden_map/grad_inputs'])} | {_f(cs['hidden_map'], 2)}, "
                         f"{_f(cs['params_map'], 2)}, {_f(cs['grad_params'], 2)} |")
        w = r.get("order_ratio_wavefront/layer", {})
        lines += [] if not w else ["", "wavefront / layer time: " + ", ".join(f"{k} {_f(v)}" for k, v in
                                                             w.items())
                  + f"; maps agree to {_f(r['checks']['wavefront_vs_layer_rel_err'])}."]
    if "torch_hidden" in b:
        r = b["torch_hidden"]
        t, c, sp, ch = r["times"], r["config"], r["speedup"], r["checks"]
        names = {"torch_weight_grads": "torch eager `nn.LSTMCell` loop, `retain_grad`, stock "
                                       "(weight grads on)",
                 "torch_frozen": "same, parameters frozen (input grads only)",
                 "torch_wavefront": "torch manual forward/backward over the wavefront, `bmm` "
                                    "(no autograd)",
                 "torch_wavefront_compiled": "same, gate code `torch.compile`-d (inductor)"}
        lines += ["", "## 2. Hidden map vs PyTorch (same problem, interleaved; torch "
                  f"{c.get('torch_threads')} thread(s))", "",
                  "| implementation | ms | gradflow speedup (split / unsplit) | "
                  "max rel. diff to gradflow |", "|---|---|---|---|",
                  f"| gradflow `gradient_map(wrt='hidden')`, batch split over "
                  f"{c.get('split_devices', 1)} devices | {_ms(t['gradflow'])} | 1 | "
                  f"{_f(ch.get('gradflow_split_vs_unsplit_rel_err'))} |",
                  f"| gradflow, split off (lean, one device) | {_ms(t.get('gradflow_unsplit'))} | "
                  f"{_f(r.get('split_over_unsplit'))} | 0 |"]
        for k, label in names.items():
            if k in t:
                q = k[len("torch_"):]
                lines.append(f"| {label} | {_ms(t[k])} | {_f(sp.get('vs_' + q))} / "
                             f"{_f(sp.get('unsplit_vs_' + q))} | "
                             f"{_f(ch.get(k + '_vs_gradflow_rel_err'))} |")
        tc = r.get("torch_compile")
        if tc:
            lines.append("\n`torch.compile`: " + (f"first call {_f(tc['compile_s'], 3)} s"
                                                    if "compile_s" in tc else tc["error"]))
    if "cells_split" in b:
        r = b["cells_split"]
        c = r["config"]
        lines += ["", f"## Batch split over {c['devices']} devices, per cell (L={c['L']}, "
                  f"T={c['T']}, H={c['H']}, B={c['B']}, float32)", "",
                  "| cell | split ms | unsplit ms | split / unsplit | max rel. diff |",
                  "|---|---|---|---|---|"]
        for k, v in r["rows"].items():
            lines.append(f"| {k} | {_ms(v['times']['split'])} | {_ms(v['times']['unsplit'])} |"
                         f" {_f(v['split_over_unsplit'])} | "
                         f"{_f(v['checks']['split_vs_unsplit_rel_err'])} |")
    if "split_floor" in b:
        r = b["split_floor"]
        c = r["config"]
        lines += ["", f"## Batch split vs independent halves (LSTM L={c['L']}, T={c['T']}, "
                  f"H={c['H']}, B={c['B']})", ""]
        if "not_applicable" in r:
            lines.append(f"Not measured: {r['not_applicable']}.")
        else:
            n = c["processes"]
            lines += ["| run | ms |", "|---|---|",
                      f"| split map over {c['devices']} devices, this process | "
                      f"{_f(1e3 * r['split_s'])} |",
                      f"| {n} processes of B/{n} examples, each pinned to its own core, at once "
                      f"(slowest) | {_f(1e3 * r['halves_together_s'])} |",
                      f"| one such process alone | {_f(1e3 * r['half_alone_s'])} |", "",
                      f"Split / independent halves: {_f(r['split_over_halves'])} (1 would be "
                      "perfectly independent devices)."]
    if "lean" in b:
        r = b["lean"]
        c = r["config"]
        peers = ("torch_stock", "torch_wavefront", "torch_wavefront_compiled")
        fd = c.get("filing_day_commit")
        lines += ["", f"## The hidden map vs today's map, per cell "
                  f"(L={c['L']}, T={c['T']}, H={c['H']}, B={c['B']}, float32, torch threads "
                  f"{c.get('torch_threads', '-')})", "",
                  f"`gradient_map` (batch split over {c.get('split_devices', '-')} device(s), "
                  "runs of layers through `lean_layers`), the same unsplit, today's code with "
                  "the lean path off (autodiff, one device) and the filing-day map ("
                  + (f"gradflow at {fd[:7]}, the code issue 13 timed, one device; "
                     "`bench/filing_day.py`)" if fd else "not measured: "
                     f"{r.get('filing_day_error', 'switched off')})")
                  + ", same process, interleaved; user_gru is a `from_function` cell (no "
                  "hand-written step: its steps are made by autodiff, "
                  "`stack.autodiff_step`).", "",
                  "| cell | split ms | lean ms | autodiff ms | filing-day ms | split / "
                  "filing day | split / autodiff | lean / autodiff | autodiff / filing day | "
                  "torch stock ms | torch wavefront ms | wavefront compiled ms | "
                  "split speedup vs stock, wavefront, compiled | max rel. diff to autodiff "
                  "(split, lean, filing day) |", "|---" * 14 + "|"]
        for k, v in r["rows"].items():
            t, sp, ch = v["times"], v["speedup"], v["checks"]
            lines.append(f"| {k} | {_ms(t.get('split'))} | {_ms(t['lean'])} | "
                         f"{_ms(t['autodiff'])} | {_ms(t.get('filing_day'))} | "
                         f"{_f(v.get('split_over_filing_day'))} | "
                         f"{_f(v.get('split_over_autodiff'))} | "
                         f"{_f(v['lean_over_autodiff'])} | "
                         f"{_f(v.get('autodiff_over_filing_day'))} | "
                         + " | ".join(_ms(t.get(p)) for p in peers) + " | "
                         + ", ".join(_f(sp.get(f"split_vs_{p}")) for p in peers) + " | "
                         f"{_f(ch.get('split_vs_autodiff_rel_err'))}, "
                         f"{_f(ch['lean_vs_autodiff_rel_err'])}, "
                         f"{_f(ch.get('filing_day_vs_autodiff_rel_err'))} |")
    if "wavefront" in b:
        r = b["wavefront"]
        c = r["config"]
        lines += ["", f"## Evaluation order: layer vs wavefront (LSTM, H={c['H']}, B={c['B']}, "
                  "`gradient_map`, batch split)", "",
                  "| layers x steps | layer ms | wavefront ms | wavefront / layer | max rel. diff |",
                  "|---|---|---|---|---|"]
        for row in r["rows"]:
            t = row["times"]
            lines.append(f"| {row['L']} x {row['T']} | {_ms(t['layer'])} | "
                         f"{_ms(t['wavefront'])} | {_f(row['wavefront_over_layer'])} | "
                         f"{_f(row['checks']['rel_err'])} |")
    if "accelerator" in b:
        r = b["accelerator"]
        c, t, ch, rt = r["config"], r["times"], r["checks"], r["ratios"]
        tor = r.get("torch", {})
        lines += ["", f"## The hidden map on {c['backend']} (LSTM {c['L']} x {c['T']} x {c['H']}, "
                  f"B={c['B']}; {', '.join(c['devices'])}; torch on "
                  f"{tor.get('device', tor.get('error', '-'))})", "",
                  "| map | ms | / best gradflow map | max rel. diff to layer autodiff |",
                  "|---|---|---|---|"]
        best = t[r["best_gradflow"]]["median_s"]
        for k, v in t.items():
            lines.append(f"| {k} | {_ms(v)} | {_f(v['median_s'] / best)} | "
                         f"{_f(ch.get(f'{k}_vs_layer_autodiff_rel_err'))} |")
        lines += ["", f"wavefront / layer {_f(rt['wavefront/layer'])}; layer (lean) / layer "
                  f"autodiff {_f(rt['layer/layer_autodiff'])}; fast matmul mode / float32 "
                  f"{_f(rt['layer_fast_matmul/layer'])} (its error: "
                  f"{_f(ch['layer_fast_matmul_vs_layer_autodiff_rel_err'])})."]
    if "glibc" in b:
        r = b["glibc"]
        med, over = r.get("median_s", {}), r.get("over_default", {})
        lines += ["", "## C allocator (fresh processes, alternating; median over processes of "
                  "each process's median)", "",
                  f"`GLIBC_TUNABLES={r['config']['tunables']}` at process start, or the same "
                  "settings by `mallopt` at run time (`gradflow.parallel.tune_malloc()`, what "
                  "the `gradflow` CLI does), vs the default allocator.", "",
                  "| process | split map ms | unsplit map ms | / default (split, unsplit) | "
                  "CPU ms per call, all threads (split, unsplit) |", "|---|---|---|---|---|"]
        for k, v in med.items():
            q = over.get(k)
            cpu = [_median([x.get(m) for x in r["runs"][k]]) for m in ("split_cpu_s",
                                                                      "unsplit_cpu_s")]
            lines.append(f"| {k} | {_f(1e3 * v['split_s'])} | {_f(1e3 * v['unsplit_s'])} | "
                         + (f"{_f(q['split_s'])}, {_f(q['unsplit_s'])}" if q else "1")
                         + " | " + ", ".join("-" if c is None else _f(1e3 * c) for c in cpu)
                         + " |")
    if "split_sizes" in b:
        r = b["split_sizes"]
        c = r["config"]
        lines += ["", f"## Where the batch split pays (LSTM {c['L']} layers x {c['T']} steps, "
                  f"{c['devices']} devices; `\"auto\"` splits where examples x H per device >= "
                  f"{c['min_rows_x_width']})", "",
                  "| B x H | split ms | one device ms | split / one device | auto uses | auto "
                  "chose the faster |", "|---|---|---|---|---|---|"]
        for x in r["rows"]:
            lines.append(f"| {x['B']} x {x['H']} | {_ms(x['times']['split'])} | "
                         f"{_ms(x['times']['unsplit'])} | {_f(x['split_over_unsplit'])} | "
                         f"{x['auto_devices'] or 1} | "
                         f"{'yes' if x['auto_chose_faster'] else 'no'} |")
    if "model_split" in b:
        r = b["model_split"]
        c = r["config"]
        lines += ["", f"## A user's model split over the devices (`model_map(couples_batch=False)`"
                  f"; `bench.suite.dense_rnn`, {c['L']} tanh layers reading the inputs too, "
                  f"{c['T']} steps, H = {c['H']}, {c['devices']} devices)", "",
                  "| B | split ms | one device ms | split / one device | devices used | max rel. "
                  "diff |", "|---|---|---|---|---|---|"]
        for x in r["rows"]:
            lines.append(f"| {x['B']} | {_ms(x['times']['split'])} | "
                         f"{_ms(x['times']['one_device'])} | {_f(x['split_over_one'])} | "
                         f"{x['devices']} | {_f(x['checks']['split_vs_one_rel_err'])} |")
    if "spectral" in b:
        r = b["spectral"]
        c = r["config"]
        lines += ["", "## Singular values: one matrix per LAPACK call (what gradflow runs) "
                  "against jaxlib's batched call", "",
                  "| matrices | one per call ms | batched ms | one per call / batched | max rel. "
                  "diff |", "|---|---|---|---|---|"]
        for n, count in c["matrices"]:
            t = r["times"][f"{count}x{n}x{n}"]
            lines.append(f"| {count} x {n} x {n} | {_ms(t['per_matrix'])} | "
                         f"{_ms(t['batched'])} | "
                         f"{_f(r['ratios'][f'per_matrix/batched {count}x{n}x{n}'])} | "
                         f"{_f(r['checks'][f'{n}x{n}_rel_err'])} |")
        lines.append(f"\nLocal gains with spectral norms ({c['cell']}, {c['L']} layers x "
                     f"{c['T']} steps, H = {c['H']}, B = {c['B']}): "
                     f"{_ms(r['times']['local_gains'])} ms.")
    if "cli_start" in b:
        r = b["cli_start"]
        med = r["median_s"]
        lines += ["", f"## The CLI's main job from a fresh process (`{r['config']['command']}`; "
                  f"{r['config']['rounds']} alternating rounds, wall time with Python's start)",
                  "", "| compilation cache | s (median) | runs, s |", "|---|---|---|"]
        for k, label in (("no_cache", "off (`GRADFLOW_COMPILE_CACHE=off`)"),
                         ("cache_warm", "programs already in it (the CLI's default)")):
            lines.append(f"| {label} | {_f(med[k])} | "
                         f"{', '.join(_f(w) for w in r['walls_s'][k])} |")
        lines += ["", f"cached / uncached {_f(r['ratios']['cache_warm/no_cache'])}; the run "
                  f"that filled the cache took {_f(r['prime_s'])} s and left "
                  f"{r['cache_files']} programs; maps equal to "
                  f"{_f(r['checks']['maps_vs_primed_rel_err'])} (relative)."]
    if "jacobian" in b:
        r = b["jacobian"]
        c, t, ch = r["config"], r["times"], r["checks"]
        lines += ["", f"## 3. Jacobian maps (L={c['L']}, T={c['T']}, H={c['H']}, B={c['B']}, "
                  "target top layer / last step, rms)", "",
                  "| method | ms | relative to exact | check |", "|---|---|---|---|",
                  f"| gradflow exact (vmapped VJPs, chunk {c['exact_chunk']}) | "
                  f"{_ms(t['exact'])} | 1 | - |"]
        if "torch_jacrev_vmap" in t:
            lines.append(f"| torch.func `vmap(jacrev)` | {_ms(t['torch_jacrev_vmap'])} | "
                         f"{_f(t['torch_jacrev_vmap']['median_s'] / t['exact']['median_s'])} | "
                         f"max rel. diff {_f(ch.get('torch_jacrev_vs_exact_rel_err'))} |")
        p = ch["probe_k16"]
        lines += [f"| {c['H']} separate jitted VJPs ({c['H']} x one) | "
                  f"{_ms(t['H_separate_vjps'])} | "
                  f"{_f(t['H_separate_vjps']['median_s'] / t['exact']['median_s'])} | "
                  f"max rel. diff {_f(ch['separate_vjps_vs_exact_rel_err'])} |",
                  f"| gradflow probe estimate, k=16 | {_ms(t['probe_k16'])} | "
                  f"{_f(r['ratios']['probe_k16/exact'])} | median rel. error "
                  f"{_f(p['median_rel_err'])}, max {_f(p['max_rel_err'])}; "
                  f"{_f(100 * p['share_within_2_stderr'], 3)}% within 2 stderr |"]
    if "flop_rate" in b:
        r = b["flop_rate"]
        fl, fs = r["flops"], r["flop_s"]
        lines += ["", "## 4. Achieved FLOP/s", "",
                  "| computation | GFLOP | ms | GFLOP/s | of dense matmul |",
                  "|---|---|---|---|---|",
                  f"| hidden map (forward + input-gradient backward) | "
                  f"{_f(fl['hidden_map'] / 1e9)} | {_ms(r['times']['hidden_map'])} | "
                  f"{_f(fs['hidden_map'] / 1e9)} | "
                  f"{_f(r['fraction_of_matmul']['hidden_map'])} |",
                  f"| forward only | {_f(fl['forward'] / 1e9)} | {_ms(r['times']['forward'])} |"
                  f" {_f(fs['forward'] / 1e9)} | {_f(r['fraction_of_matmul']['forward'])} |",
                  f"| dense matmul {r['matmul']['n']}^2 float32 | "
                  f"{_f(r['matmul']['flops'] / 1e9)} | {_ms(r['matmul']['time'])} | "
                  f"{_f(fs['matmul'] / 1e9)} | 1 |", "",
                  f"XLA `cost_analysis()` of the compiled hidden map: "
                  f"{_f(fl['xla_cost_analysis_hidden_map'])} FLOPs ({fl['note']})."]
    if "scaling" in b:
        r = b["scaling"]
        lines += ["", "## 5. Scaling (hidden map; one size varied at a time from "
                  f"{r['config']['base']})", "", "![scaling](scaling.png)", "",
                  "| varied | L | T | H | B | ms | GFLOP/s | compile s |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in r["rows"]:
            lines.append(f"| {x['vary']} | {x['L']} | {x['T']} | {x['H']} | {x['B']} | "
                         f"{_f(1e3 * x['median_s'])} | {_f(x['flop_s'] / 1e9)} | "
                         f"{_f(x['compile_s'], 2)} |")
    if "memory" in b:
        r = b["memory"]
        c, a, n = r["config"], r["checkpoint_auto"], r["no_checkpoint_compile_only"]
        lines += ["", f"### Memory: L={c['L']}, T={c['T']}, H={c['H']}, B={c['B']} hidden map",
                  "", "| checkpoint | XLA memory analysis (temp+args+out) GiB | peak RSS MiB | "
                  "run s | compile s |", "|---|---|---|---|---|",
                  f"| auto (sqrt T chunks) | {_f(a.get('memory_analysis_total_gib'))} | "
                  f"{_f(a.get('peak_rss_mib'))} | {_f(a.get('run_s'))} | "
                  f"{_f(a.get('compile_s'))} |",
                  f"| none (compile only) | {_f(n.get('memory_analysis_total_gib'))} | - | - | "
                  f"{_f(n.get('compile_s'))} |"]
        if "error" in a or "error" in n:
            lines.append(f"\nerrors: {a.get('error', '')} {n.get('error', '')}")
    if "sweep" in b:
        r = b["sweep"]
        c = r["config"]
        lines += ["", f"## Sweep (cells {', '.join(c['cells'])} x {c['seeds']} seeds, L={c['L']},"
                  f" T={c['T']}, H={c['H']}, B={c['B']}), seeds sharded over simulated CPU "
                  "devices", "", "| devices | ms | compile s (first call - median) |",
                  "|---|---|---|"]
        for k, v in r["rows"].items():
            if "error" in v:
                lines.append(f"| {k} | error | - |")
            else:
                lines.append(f"| {v['devices']} | {_f(1e3 * v['median_s'])} | "
                             f"{_f(v['compile_s_estimate'], 2)} |")
        if "speedup_2_vs_1" in r:
            lines.append(f"\n2 vs 1 device speedup: {_f(r['speedup_2_vs_1'])} (on 2 physical "
                         "cores, one device already uses both; maps agree to "
                         f"{_f(r['checks']['2_vs_1_device_rel_err'])}).")
    if "atlas" in b and "rows" in b["atlas"]:
        r = b["atlas"]
        c, m = r["config"], r.get("machine", {})
        lines += ["", f"## Atlas throughput (`gradflow.atlas.measure`: cells {', '.join(c['cells'])}"
                  f" x 2 inits x 2 input scales x 2 losses x 2 wrt x {c['seeds']} seeds, "
                  f"L={c['L']}, T={c['T']}, H={c['H']}, B={c['B']}; one program per cell), "
                  f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, 1-min load "
                  f"{m.get('loadavg_1min_before_after', '?')}", "",
                  "| devices | maps | maps/s warm | maps/s cold (with compiling) | warm s | "
                  "first call s |", "|---|---|---|---|---|---|"]
        for v in r["rows"].values():
            lines.append(f"| {v['devices']} | {v['maps']} | {_f(v['maps_per_s'])} | "
                         f"{_f(v['maps_per_s_cold'])} | {_f(v['median_s'])} | "
                         f"{_f(v['first_call_s'])} |")
        a2 = r["all_vs_1_device"]
        lines.append(f"\nall / 1 device, same run, fresh processes alternating: "
                     f"{_f(a2['warm'])}x warm, {_f(a2['cold'])}x cold; maps agree to "
                     f"{_f(r['checks']['all_vs_1_device_rel_err'])} (relative).")
    if res.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {k}: `{v.strip().splitlines()[-1]}`"
                                          for k, v in res["errors"].items()]
    return "\n".join(lines) + "\n"


def plot_scaling(r: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dims = list(dict.fromkeys(x["vary"] for x in r["rows"]))
    fig, axes = plt.subplots(1, len(dims), figsize=(3.2 * len(dims), 3.0), squeeze=False)
    for ax, d in zip(axes[0], dims):
        rows = [x for x in r["rows"] if x["vary"] == d]
        xs = [x[d] for x in rows]
        ax.loglog(xs, [1e3 * x["median_s"] for x in rows], "o-", label="time (ms)")
        ax.set_xlabel(d)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(v) for v in xs])
        ax2 = ax.twinx()
        ax2.semilogx(xs, [x["flop_s"] / 1e9 for x in rows], "s--", color="C1")
        ax2.set_ylabel("GFLOP/s", color="C1")
        ax.set_ylabel("ms")
        ax.set_title(f"hidden map vs {d}")
    fig.suptitle(f"LSTM hidden map, base {r['config']['base']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
