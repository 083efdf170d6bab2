"""``python -m bench [--quick] [--only NAMES] [--out DIR]``: run the suite, write the results.

Writes ``results.json`` (everything: machine, config, checks, every timing), ``results.md`` (the
tables) and ``scaling.png`` into ``--out`` (default ``bench/results/``; ``--quick`` writes to
``bench/results/quick/`` unless ``--out`` is given).
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback

FULL = {
    "std": {"L": 16, "T": 64, "H": 128, "B": 32},
    "jac": {"L": 8, "T": 32, "H": 128, "B": 4},
    "repeats": 5, "jac_repeats": 3, "scaling_repeats": 5,
    "scaling": {"L": [4, 8, 16, 32], "T": [16, 32, 64, 128], "H": [64, 128, 256],
                "B": [8, 32, 128]},
    "memory": {"L": 16, "T": 10000, "H": 128, "B": 4},
    "sweep": {"cells": ["lstm", "star"], "seeds": 8, "L": 8, "T": 32, "H": 64, "B": 8},
    "atlas": {"cells": ["lstm"], "seeds": 4, "L": 10, "T": 10, "H": 32, "B": 16, "devices": 2,
              "rounds": 3},
    "matmul": 4096,
    "torch_compile": True, "split_cells": ("lstm", "gru", "star", "user_gru"),
    "glibc_rounds": 3, "lean_cells": ("lstm", "gru", "star", "user_gru"),
    "order_shapes": ((16, 64), (32, 32), (64, 16)),
    "accelerator": {"L": 16, "T": 1000, "H": 256, "B": 32},
    "cli": ["--layers", "16"], "cli_rounds": 3,
    "model_split": {"L": 8, "T": 64, "H": 128, "D": 16, "B": (32, 128)},
    "spectral": {"matrices": ((32, 4096), (128, 512)), "cell": "lstm", "L": 8, "T": 32,
                 "H": 64, "B": 8},
    "split_sizes": ((8, 64), (16, 64), (32, 32), (8, 128), (8, 256), (64, 32), (32, 64),
                    (16, 128), (16, 256), (64, 64), (32, 128)), "split_layers": 8,
}

QUICK = {
    "std": {"L": 2, "T": 8, "H": 16, "B": 4},
    "jac": {"L": 2, "T": 6, "H": 8, "B": 2},
    "repeats": 3, "jac_repeats": 3, "scaling_repeats": 3,
    "scaling": {"L": [1, 2], "T": [4, 8], "H": [8, 16], "B": [2, 4]},
    "memory": {"L": 2, "T": 100, "H": 8, "B": 2},
    "sweep": {"cells": ["lstm"], "seeds": 2, "L": 2, "T": 4, "H": 8, "B": 2},
    "atlas": {"cells": ["lstm"], "seeds": 2, "L": 2, "T": 3, "H": 4, "B": 2},
    "matmul": 256,
    "orders": ("layer",), "split_cells": ("lstm", "user_gru"),
    "glibc_rounds": 1, "lean_cells": ("lstm", "gru"), "lean_torch": False,
    "order_shapes": ((2, 8), (4, 4)),
    "accelerator": {"L": 2, "T": 8, "H": 8, "B": 4},
    "cli": ["--layers", "2", "--steps", "4", "--hidden", "8", "--batch", "2"], "cli_rounds": 1,
    "split_sizes": ((2, 8), (4, 8)), "split_layers": 1,
    "model_split": {"L": 2, "T": 4, "H": 8, "D": 3, "B": (4,)},
    "spectral": {"matrices": ((8, 16),), "cell": "lstm", "L": 2, "T": 4, "H": 8, "B": 4},
    "default": ("floor", "torch_hidden", "cells_split", "jacobian", "flop_rate", "scaling",
                "memory"),
}

BENCHMARKS = ("floor", "torch_hidden", "cells_split", "split_floor", "lean", "wavefront",
              "accelerator", "jacobian", "flop_rate", "scaling", "memory", "sweep", "glibc",
              "atlas", "cli_start", "split_sizes", "model_split", "spectral")
# A full run leaves out the accelerator's size (16 x 1000 x 256) unless asked for by name
# (--only accelerator; bench/gpu.sh runs it where a GPU is lent).
FULL["default"] = tuple(b for b in BENCHMARKS if b != "accelerator")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (seconds)")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all "
                         "but accelerator; --quick leaves out sweep, which starts two JAX "
                         "processes)")
    ap.add_argument("--out", default=None, help="output folder")
    ap.add_argument("--devices", type=int, default=None,
                    help="simulated CPU devices the batch of a map is split over (default: one "
                         "per core, as the gradflow CLI; 1 = no split)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed rounds per comparison (default: 5 full, 3 quick)")
    ap.add_argument("--glibc-rounds", type=int, default=None,
                    help="fresh processes of each allocator kind (default: 3 full, 1 quick)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads for the PyTorch peers (default: torch's own; "
                         "1 avoids OpenMP barrier stalls when other processes load the cores)")
    ap.add_argument("--update", action="store_true",
                    help="merge into the results.json already in the output folder (re-run "
                         "some benchmarks, keep the others)")
    args = ap.parse_args(argv)
    from gradflow import parallel  # before JAX starts: the CPU devices the maps split over
    parallel.use_cpu_devices(args.devices or os.cpu_count() or 1)
    parallel.set_batch_devices("all")  # the split is what is measured, at every size
    cfg = dict(QUICK if args.quick else FULL)
    for key, v in (("repeats", args.repeats), ("glibc_rounds", args.glibc_rounds),
                   ("torch_threads", args.torch_threads)):
        if v is not None:
            cfg[key] = v
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   "quick" if args.quick else "")
    names = args.only.split(",") if args.only else cfg.get("default", BENCHMARKS)
    mode = "quick" if args.quick else "full"
    # saved after each benchmark, so a run stopped at a time limit keeps what it finished;
    # not with --update, where the merge below writes the old results and the new together
    results = run(cfg, [b for b in names if b],
                  save=None if args.update else (lambda res: write({**res, "mode": mode}, out)))
    results["mode"] = mode
    old = os.path.join(out, "results.json")
    if args.update and os.path.exists(old):
        with open(old) as f:
            prev = json.load(f)
        for r in prev["benchmarks"].values():  # kept results: say where they were measured
            r.setdefault("machine", {"cpu": prev["machine"]["cpu"],
                                     "cores": prev["machine"]["cores"],
                                     "devices": len(prev["machine"]["devices"]),
                                     "loadavg_1min_before_after": "not recorded"})
        prev["benchmarks"].update(results["benchmarks"])
        prev["errors"] = {k: v for k, v in prev.get("errors", {}).items() if k not in names}
        prev["errors"].update(results["errors"])
        prev["machine"], prev["started"] = results["machine"], results["started"]
        from bench.report import goals
        prev["goals"] = goals(prev)
        results = prev
    write(results, out)
    return results


def run(cfg: dict, names, save=None) -> dict:
    """Run the benchmarks ``names`` at ``cfg``; ``save(results so far)`` after each one."""
    from bench import harness, suite
    from bench.report import goals
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; valid: {', '.join(BENCHMARKS)}")
    res = {"machine": harness.machine(), "config": cfg, "started": time.strftime(
        "%Y-%m-%d %H:%M:%S"), "benchmarks": {}, "errors": {}}
    for name in BENCHMARKS:
        if name not in names:
            continue
        t0 = time.perf_counter()
        load0 = os.getloadavg()
        print(f"[bench] {name} ...", flush=True)
        try:
            if name == "torch_hidden":
                try:
                    import torch  # noqa: F401
                except ImportError:
                    res["errors"][name] = "torch not installed (pip install -e '.[bench]')"
                    continue
            r = getattr(suite, name)(cfg)
            r["wall_s"] = time.perf_counter() - t0
            # where and under what load it ran (other processes share the cores)
            r["machine"] = {"cpu": res["machine"]["cpu"], "cores": res["machine"]["cores"],
                            "devices": len(res["machine"]["devices"]),
                            "loadavg_1min_before_after": [round(load0[0], 2),
                                                          round(os.getloadavg()[0], 2)]}
            res["benchmarks"][name] = r
            print(f"[bench] {name} done in {r['wall_s']:.1f} s", flush=True)
        except Exception:  # noqa: BLE001  (one failed benchmark should not lose the others)
            res["errors"][name] = traceback.format_exc()
            print(res["errors"][name], flush=True)
        if save is not None:
            save({**res, "goals": goals(res)})
    res["goals"] = goals(res)
    return res


def write(results: dict, out: str):
    from bench import report
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report.markdown(results))
    if "scaling" in results["benchmarks"]:
        report.plot_scaling(results["benchmarks"]["scaling"], os.path.join(out, "scaling.png"))
    print(f"[bench] wrote {out}/results.json, results.md", flush=True)
