"""The ``training_runs`` figure kind (SPEC section 4 items 3-5 after training).

A tiny config is checked against the independent path a user would write by hand: ``train``
called directly, ``gradient_map`` and ``gates.saturation`` on the trained parameters and the
fixed evaluation batch rebuilt from the seed. Bad configs are refused with a clear message.
"""
import jax
import numpy as np
import pytest

import gradflow
from gradflow import experiments, gates, reproduce, tasks
from gradflow.problem import task_stack
from gradflow.jacobian import gradient_map
from gradflow.results import make_result
from gradflow.train import eval_batch_of, train

# in-process work: the child lane runs it (tests/conftest.py)
pytestmark = pytest.mark.child

TINY = dict(task="adding", task_options={"steps": 5}, layers=2, hidden=6, steps=6, batch=4,
            lr=1e-2, eval_every=3, eval_batch=8, record_batch=4, seed=3)


@pytest.fixture(scope="module")
def tiny():
    runs = [["LSTM", "lstm", {}], ["g", "g_lstm", {}, {"budget": 0.05}]]
    return experiments.training_runs(runs, record=["map", "gates"], **TINY)


def test_the_record_batch_is_the_one_recorded_on():
    # None: min(64, eval_batch), saved as such; more than the evaluation batch is refused
    # before anything is trained
    plan = {**TINY, "steps": 0, "record_batch": None}
    res = experiments.training_runs([["LSTM", "lstm", {}]], **plan)
    assert res.config["record_batch"] == 8
    with pytest.raises(ValueError, match="record_batch 9 is more than eval_batch 8"):
        experiments.training_runs([["LSTM", "lstm", {}]], **{**plan, "record_batch": 9})


def test_curves_equal_a_direct_training_run(tiny):
    task = tasks.make("adding", steps=5)
    for label, cell, budget in (("LSTM", "lstm", 0.0), ("g", "g_lstm", 0.05)):
        stack = task_stack(cell, task, layers=2, hidden=6)
        hist = train(stack, task, steps=6, batch=4, lr=1e-2, seed=3, eval_every=3,
                     eval_batch=8, budget=budget, progress=False)
        curve = experiments.run_curve(tiny, label)
        assert set(curve.arrays) == set(hist.curve.arrays)
        for k, v in hist.curve.arrays.items():
            np.testing.assert_allclose(curve[k], v, rtol=1e-5, err_msg=f"{label} {k}")
        assert curve.config["budget"] == budget


def test_recorded_maps_and_gates_equal_direct_measurements(tiny):
    task = tasks.make("adding", steps=5)
    stack = task_stack("lstm", task, layers=2, hidden=6)
    hist = train(stack, task, steps=6, batch=4, lr=1e-2, seed=3, eval_every=3, eval_batch=8,
                 progress=False)
    _, _, k_eval = jax.random.split(jax.random.key(3), 3)
    xs = eval_batch_of(task, k_eval, 8, 4, np.float32)[0][:4]
    trained = hist.params["stack"]
    expect = gradient_map(stack, trained, xs, loss="last", wrt="hidden")
    got = experiments.run_record(tiny, "LSTM", "map", "last")
    np.testing.assert_allclose(got.values, expect.values, rtol=1e-5)
    assert got.config["train_step"] == 6
    expect = gates.saturation(stack, trained, xs, 0.05, bins=20)
    got = experiments.run_record(tiny, "LSTM", "gates", 6)
    for k in ("mean/f/pooled", "saturated/f/pooled", "hist/f/pooled", "timescale/f/pooled"):
        np.testing.assert_allclose(got[k], expect[k], rtol=1e-5, err_msg=k)
    init = experiments.run_record(tiny, "LSTM", "map", "first")
    assert init.config["train_step"] == 0
    assert not np.allclose(init.values, experiments.run_record(tiny, "LSTM", "map").values)


def test_recorded_maps_read_back_count_underflow_and_say_their_step(tiny):
    """A map read back out of training_runs lost its underflow count (zeros read as "<= 0")
    and was titled as an untrained map ("init orthogonal") at every step."""
    from gradflow import plot

    for which, step in (("first", 0), ("last", TINY["steps"])):
        rec = experiments.run_record(tiny, "LSTM", "map", which)
        assert rec.underflow == {"values": 0}
        title = plot.heatmap(rec).axes[0].get_title()
        assert f"step {step} of training from init orthogonal" in title
    zeroed = gradflow.results.make_result("training_runs", {
        k: (np.zeros_like(v) if k == "LSTM/map@6/values" else v)
        for k, v in tiny.arrays.items()}, tiny.config, warn=False)
    rec = experiments.run_record(zeroed, "LSTM", "map", "last")
    assert rec.underflow == {"values": rec.values.size}


def test_time_gated_run_reports_updates_and_the_figure_draws(tiny):
    c = experiments.run_curve(tiny, "g")
    assert 0 < c["eval_updates"][-1] <= 1
    assert "eval_updates" not in experiments.run_curve(tiny, "LSTM").arrays
    fig = reproduce.BUILDERS["training_runs"].draw({"gates": {"g": "k"}, "title": "t"}, tiny)
    # curves (2 axes) + updates (1) + gate histograms (2 steps x 2 runs)
    assert len(fig.axes) == 2 + 1 + 4


# ---------------------------------------------------------------------------------------------
# Several seeds in one program (gradflow.seeds): each seed's run is the run train() makes alone.


@pytest.fixture(scope="module")
def tiny_seeds():
    runs = [["LSTM", "lstm", {}], ["g", "g_lstm", {}, {"budget": 0.05}]]
    kw = {k: v for k, v in TINY.items() if k != "seed"}
    return experiments.training_runs(runs, record=["map", "gates"], seeds=[3, 5], **kw)


def test_seeded_runs_equal_each_seed_run_alone(tiny, tiny_seeds):
    assert tiny_seeds.config["seeds"] == [3, 5] and tiny_seeds.config["seed"] is None
    for label in ("LSTM", "g"):
        both = experiments.run_curve(tiny_seeds, label)
        assert both["loss"].shape == (2, 6) and both.config["seeds"] == [3, 5]
        alone, seed3 = experiments.run_curve(tiny, label), experiments.run_curve(tiny_seeds, label, 3)
        assert set(seed3.arrays) == set(alone.arrays) and seed3.config["seed"] == 3
        for k, v in alone.arrays.items():
            np.testing.assert_allclose(seed3[k], v, rtol=2e-5, atol=1e-7, err_msg=f"{label} {k}")
        for rec, step in (("map", "first"), ("map", "last"), ("gates", "last")):
            one = experiments.run_record(tiny, label, rec, step)
            got = experiments.run_record(tiny_seeds, label, rec, step, seed=3)
            assert experiments.run_record(tiny_seeds, label, rec, step)[
                next(iter(one.arrays))].shape[0] == 2
            for k, v in one.arrays.items():
                np.testing.assert_allclose(got[k], v, rtol=2e-4, atol=1e-7, err_msg=f"{rec} {k}")
    # seed 5 is another run: its own init and batches
    five = experiments.run_curve(tiny_seeds, "LSTM", 5)
    assert not np.allclose(five["loss"], experiments.run_curve(tiny, "LSTM")["loss"])
    with pytest.raises(ValueError, match=r"no seed 4; seeds: \[3, 5\]"):
        experiments.run_curve(tiny_seeds, "LSTM", 4)


def test_seeded_curriculum_run_equals_train_alone():
    """The g-LSTM's time parameters are rescaled at the stage change, seed by seed."""
    from gradflow.seeds import train_seeds

    task = tasks.make("adding", steps=6)
    stack = task_stack("g_lstm", task, layers=1, hidden=4, cell_steps=3)
    def mark(stack, params, xs):  # a record: its config says which run and inputs it is of
        return make_result("mark", {"n": np.float32(len(xs))}, {})

    kw = dict(steps=5, batch=4, lr=1e-2, eval_every=2, eval_batch=8, budget=0.1,
              curriculum=[[3, 3]], record={"mark": mark}, record_at=(5,), record_batch=4)
    hists = train_seeds(stack, task, [1, 2], **kw)
    for seed, h in zip((1, 2), hists):
        ref = train(stack, task, seed=seed, progress=False, **kw)
        assert list(h.curve["seq_len"]) == [3, 3, 3, 6, 6]
        assert h.curve.config == ref.curve.config
        # as train's: the run's settings and the inputs (train_seeds' had neither)
        assert h.records["mark"][0].config == ref.records["mark"][0].config
        assert h.records["mark"][0].config["training"]["seed"] == seed
        for k, v in ref.curve.arrays.items():
            np.testing.assert_allclose(h.curve[k], v, rtol=2e-5, atol=1e-7, err_msg=k)
        for a, b in zip(jax.tree_util.tree_leaves(h.params), jax.tree_util.tree_leaves(ref.params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seeds,match", [([], "seeds is empty"), ([1, 1], "seeds repeat"),
                                         ([-1], "seed"), (3, "list of integers")])
def test_bad_seed_lists_are_refused(seeds, match):
    with pytest.raises((ValueError, TypeError), match=match):
        experiments.training_runs([["a", "lstm", {}]], seeds=seeds,
                              **{**TINY, "steps": 1, "seed": 0})


@pytest.mark.parametrize("runs,kw,match", [
    ([["a", "lstm"]], {}, "training runs are"),
    ([["a", "lstm", {}, {"bogus": 1}]], {}, "unknown training option.*bogus"),
    ([["a", "lstm", {}], ["a", "gru", {}]], {}, "labels must be unique"),
    ([["a", "lstm", {}]], {"record": ["weights"]}, "record"),
    ([["a", "nocell", {}]], {}, "unknown cell 'nocell'"),
])
def test_bad_configs_are_refused(runs, kw, match):
    with pytest.raises(ValueError, match=match):
        experiments.training_runs(runs, **{**TINY, "steps": 1, **kw})


def test_run_accessors_name_what_exists(tiny):
    with pytest.raises(ValueError, match="valid: LSTM, g"):
        experiments.run_curve(tiny, "GRU")
    with pytest.raises(ValueError, match="no 'map' at step 5; steps: \\[0, 6\\]"):
        experiments.run_record(tiny, "LSTM", "map", 5)
    with pytest.raises(ValueError, match="recorded no 'weights'"):
        experiments.run_record(tiny, "LSTM", "weights")


def test_figure_data_loads_committed_data_or_recomputes_with_overrides():
    committed = reproduce.figure_data("vertical_gain")
    assert committed.kind == "vertical_gain" and committed.config["layers"] == 64
    small = reproduce.figure_data("vertical_gain", layers=3, cells=["lstm"])
    np.testing.assert_allclose(small["vertical_rms/lstm"], committed["vertical_rms/lstm"][:3],
                               rtol=1e-5)
    with pytest.raises(ValueError, match="unknown figure 'nope'; valid: .*star_fig2"):
        reproduce.figure_data("nope")


# ---------------------------------------------------------------------------------------------
# The committed training figures: made from their configs, 5 seeds each, and the README's
# readings of them hold on the committed data ACROSS SEEDS. Each claim is a fraction of seeds or
# a median with a margin, never one seed's exact step or value, so that a run on another CPU
# (other float rounding, so other trajectories after a few hundred steps) passes too.
# Unreproduced claims are asserted as such.

TRAINED = ("deep_adding", "gu_copy_gates", "cheng_refined_adding", "g_lstm_budget")
CONSTANT = 1 / 6  # the adding task's MSE of the constant prediction 1


def committed(name):
    import gradflow

    return gradflow.load(reproduce.FIGURES_DIR / f"{name}.npz")


def curve(data, label):
    return experiments.run_curve(data, label)


def finals(data, label) -> np.ndarray:
    """``(S,)``: each seed's final evaluation metric."""
    return np.atleast_2d(curve(data, label)["eval_metric"])[:, -1]


def share(mask) -> float:
    """The fraction of seeds where ``mask`` holds."""
    return float(np.mean(mask))


def first_below(data, label, target=0.01) -> np.ndarray:
    """``(S,)``: each seed's first evaluation step with MSE < target (inf if never)."""
    c = curve(data, label)
    steps, m = np.atleast_2d(c["eval_step"]), np.atleast_2d(c["eval_metric"])
    return np.array([s[v < target][0] if (v < target).any() else np.inf for s, v in zip(steps, m)])


def bottom_over_top(data, label, step) -> np.ndarray:
    """``(S,)``: the probe-loss gradient reaching the bottom layer over the top layer's (mean
    over steps) per seed, from the recorded hidden-state maps ``(S, L, T)``."""
    v = np.asarray(experiments.run_record(data, label, "map", step).values, float)
    return v[:, 0].mean(-1) / v[:, -1].mean(-1)


def saturated(data, label, gate, step) -> np.ndarray:
    """``(S,)``: the pooled saturated share of ``gate`` per seed."""
    return np.atleast_1d(experiments.run_record(data, label, "gates", step)[f"saturated/{gate}/pooled"])


@pytest.mark.parametrize("name", TRAINED)
def test_committed_training_data_match_their_config(name):
    config = reproduce.load_config(name)
    data = committed(name)
    assert (reproduce.FIGURES_DIR / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data.kind == "training_runs" and data.total_nonfinite == 0
    assert [r[0] for r in config["runs"]] == list(data.config["runs"])
    for key, value in config.items():
        if key != "runs":
            assert data.config[key] == value, key
    seeds = config["seeds"]
    assert len(seeds) >= 5 and data.config["seed"] is None
    for label, run in data.config["runs"].items():
        assert run["train_steps"] == config["steps"] and run["seeds"] == seeds
        c = curve(data, label)
        assert c["loss"].shape == (len(seeds), config["steps"])
        # the seeds are different runs, not one run five times
        assert len({tuple(np.round(v, 6)) for v in c["loss"]}) == len(seeds)


def test_readme_training_figures_example_runs(run_readme_block):
    ns = run_readme_block('figure_data("deep_adding"')
    assert experiments.run_curve(ns["data"], "star")["eval_metric"].shape == (2, 5)
    assert experiments.run_record(ns["data"], "lstm", "map", "last").values.shape == (2, 3, 10)


def test_reproduce_regenerates_a_small_seeded_training_figure(tmp_path):
    """The reproduce machinery, run on the committed deep_adding config at a tiny size with 2
    seeds, writes a figure of the committed one's structure (runs, array names, a leading seed
    axis, config keys) on which the claim quantities of the tests below compute per seed."""
    import json

    from gradflow import reproduce

    config = reproduce.load_config("deep_adding")
    runs = [r for r in config["runs"] if r[0] in ("lstm", "star")]
    small = {**config, "runs": runs, "task_options": {"steps": 4}, "layers": 2, "hidden": 6,
             "steps": 8, "batch": 8, "eval_every": 4, "eval_batch": 16, "record_batch": 4,
             "seeds": [0, 1]}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "cfg" / "deep_adding.json").write_text(json.dumps(small))
    said = []
    written = reproduce.reproduce("deep_adding", tmp_path / "out", config_dir=tmp_path / "cfg",
                                  log=said.append, progress=said.append)
    assert sorted(p.rsplit(".", 1)[1] for p in written) == ["npz", "png"]
    assert any("done in" in s for s in said)
    import gradflow

    new, old = gradflow.load(tmp_path / "out" / "deep_adding.npz"), committed("deep_adding")
    assert set(new.config) == set(old.config) and new.config["seeds"] == [0, 1]
    import re

    def named(data, label):  # array names with the last step written as "end"
        return {re.sub(r"@(?!0/)\d+/", "@end/", k): v for k, v in data.arrays.items()
                if k.startswith(f"{label}/")}

    for label in ("lstm", "star"):
        got, want = named(new, label), named(old, label)
        assert set(got) == set(want), label
        for k, v in want.items():
            assert got[k].ndim == v.ndim and got[k].shape[0] == 2, k
        assert finals(new, label).shape == (2,) and np.isfinite(finals(new, label)).all()
        # what holds at any size: the evaluation loss falls from its value at init in every seed
        c = experiments.run_curve(new, label)
        assert (c["eval_loss"][:, -1] < c["eval_loss"][:, 0]).all()
    # and the init-time claim of the committed figure holds here too, seed by seed
    assert (bottom_over_top(new, "lstm", "first") < bottom_over_top(new, "star", "first")).all()


def test_deep_adding_across_seeds():
    d = committed("deep_adding")
    # LSTM (zero or forget bias 1) never leaves the constant prediction at 8 layers: 5/5 seeds
    assert share(finals(d, "lstm") > 0.8 * CONSTANT) == 1
    assert share(finals(d, "lstm, forget bias 1") > 0.8 * CONSTANT) >= 0.8
    # STAR gets below MSE 0.01 in 3 of 5 seeds within 1000 steps, the GRU in 1 of 5
    star, gru = share(finals(d, "star") < 0.01), share(finals(d, "gru") < 0.01)
    assert star >= 0.4 and star >= gru
    # at init (no training: the same on every machine) the gradient reaching the bottom layer is
    # < 1% of the top's for the LSTM (< 10% with forget bias 1), > 10% for GRU and STAR
    assert (bottom_over_top(d, "lstm", "first") < 0.01).all()
    assert (bottom_over_top(d, "lstm, forget bias 1", "first") < 0.1).all()
    for label in ("gru", "star"):
        assert (bottom_over_top(d, label, "first") > 0.1).all(), label
    # and training makes the LSTM's worse in every seed
    assert (bottom_over_top(d, "lstm", "last") < bottom_over_top(d, "lstm", "first")).all()
    # seed by seed, a STAR or GRU run that trained kept its bottom layer's gradient (> 10% of
    # the top's) and one left at the constant prediction lost it (< 5%)
    for label in ("star", "gru"):
        f, r = finals(d, label), bottom_over_top(d, label, "last")
        assert (r[f < 0.01] > 0.1).all() and (r[f > 0.8 * CONSTANT] < 0.05).all(), label


def test_gu_copy_across_seeds():
    d = committed("gu_copy_gates")
    chance = 1 / 8
    # the UR-LSTM learns beyond chance in (at least 4 of) 5 seeds, LSTM and LSTM+UGI do not
    assert share(finals(d, "UR-LSTM") > 2.5 * chance) >= 0.8
    for label in ("LSTM", "LSTM+UGI"):
        assert share(finals(d, label) < 1.3 * chance) >= 0.8, label
    # "solves the copy task": not tested at paper scale; here no seed gets near it in 1000 steps
    assert share(finals(d, "UR-LSTM") > 0.9) <= 0.2
    # the UR-LSTM's effective gate: unsaturated at init (every seed), about half saturated after
    assert (saturated(d, "UR-LSTM", "g", "first") < 0.01).all()
    assert share(saturated(d, "UR-LSTM", "g", "last") > 0.3) >= 0.8
    assert (saturated(d, "LSTM", "f", "last") < 0.05).all()
    assert np.median(saturated(d, "LSTM+UGI", "f", "last")) < np.median(
        saturated(d, "UR-LSTM", "g", "last"))


def test_cheng_across_seeds():
    d = committed("cheng_refined_adding")
    others = [label for label in d.config["runs"] if label != "lstm"]
    # every cell but the plain LSTM gets below MSE 0.02 in (at least 4 of) 5 seeds; the plain
    # LSTM is the least reliable (3 of 5 below 0.01 within 800 steps)
    for label in others:
        assert share(finals(d, label) < 0.02) >= 0.8, label
        assert share(finals(d, label) < 0.01) >= share(finals(d, "lstm") < 0.01), label
    # the refined gates get below MSE 0.01 earlier: median over seeds of the first step
    med = {label: float(np.median(first_below(d, label))) for label in d.config["runs"]}
    assert med["refined_gru"] <= med["gru"]
    assert med["refined_mgu"] < med["mgu"]
    assert med["refined_lstm (add)"] < med["lstm"]


def test_g_lstm_budget_across_seeds():
    d = committed("g_lstm_budget")
    upd = {label: curve(d, label)["eval_updates"][:, -1] for label in d.config["runs"]
           if label != "LSTM"}
    # seed by seed: the budget lowers the update fraction, monotonically in lambda
    assert (upd["g-LSTM, budget 0.1"] < upd["g-LSTM"]).all()
    assert (upd["g-LSTM, budget 1"] < upd["g-LSTM, budget 0.1"]).all()
    assert (upd["g-LSTM, budget 1"] < 0.6 * upd["g-LSTM"]).all()
    # the paper's ">= 10x fewer updates": not tested at paper scale; here never (at most ~4x)
    assert min(float(v.min()) for v in upd.values()) > 0.1
    # fewer updates cost accuracy: the median final MSE at lambda = 1 is > 2x the g-LSTM's
    assert np.median(finals(d, "g-LSTM, budget 1")) > 2 * np.median(finals(d, "g-LSTM"))
    # within 800 steps the g-LSTM gets below MSE 0.03 in (at least 4 of) 5 seeds
    assert share(finals(d, "g-LSTM") < 0.03) >= 0.8
    # the curriculum is ahead at step 600 (median) but not better at the end
    c, g = curve(d, "g-LSTM, curriculum"), curve(d, "g-LSTM")
    at = list(c["eval_step"][0]).index(600)
    assert np.median(c["eval_metric"][:, at]) < np.median(g["eval_metric"][:, at])
    assert np.median(finals(d, "g-LSTM, curriculum")) > 0.7 * np.median(finals(d, "g-LSTM"))


def test_the_final_eval_median_leaves_out_a_diverged_seed():
    """The gate panel's "final eval (median)" was NaN as soon as one seed diverged (the
    curves leave such seeds out): the median of the others, and how many diverged."""
    import dataclasses

    from gradflow import plot

    data = gradflow.load(reproduce.data_path("gu_copy_gates"))
    arrays = dict(data.arrays)
    metric = np.array(arrays["LSTM/curve/eval_metric"], float)
    metric[2, -1] = np.nan
    arrays["LSTM/curve/eval_metric"] = metric
    fig = plot.draw_training(dataclasses.replace(data, arrays=arrays), {"LSTM": "f"})
    from matplotlib.text import Text

    titles = " ".join(t.get_text() for t in fig.findobj(Text))
    want = f"LSTM: {np.median(np.delete(metric[:, -1], 2)):.3g} (1 of 5 seeds diverged)"
    assert want in titles, titles
