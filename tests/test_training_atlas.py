"""Training claims under conditions (issue 14): a learning-rate factor in the seeds' vmapped
program (each (lr, seed) row equals the run ``train`` makes alone), the training atlases'
claims (named predicates on one seed's runs) evaluated over lr x difficulty x seeds, and the
verdicts on the committed atlases."""
import numpy as np
import pytest

from gradflow import tasks
from gradflow.problem import task_stack
from gradflow.seeds import train_lr_seeds
from gradflow.train import train


def test_lr_seed_rows_equal_each_run_alone():
    task = tasks.make("adding", steps=5)
    stack = task_stack("lstm", task, layers=1, hidden=6)
    kw = dict(steps=6, batch=4, eval_every=3, eval_batch=8)
    runs = train_lr_seeds(stack, task, [1e-2, 3e-3], [3, 5], **kw)
    assert [[h.curve.config["lr"] for h in per] for per in runs] == [[1e-2, 1e-2], [3e-3, 3e-3]]
    assert [[h.curve.config["seed"] for h in per] for per in runs] == [[3, 5], [3, 5]]
    for lr, per in zip((1e-2, 3e-3), runs):
        for seed, h in zip((3, 5), per):
            ref = train(stack, task, lr=lr, seed=seed, progress=False, **kw)
            assert h.curve.config == ref.curve.config
            for k, v in ref.curve.arrays.items():
                np.testing.assert_allclose(h.curve[k], v, rtol=2e-5, atol=1e-7,
                                           err_msg=f"lr {lr} seed {seed} {k}")
    # the rates differ: same seed, other lr, other curve (same first-step loss: same init, batch)
    a, b = runs[0][0].curve["loss"], runs[1][0].curve["loss"]
    assert a[0] == pytest.approx(b[0], rel=1e-6) and not np.allclose(a[1:], b[1:])


@pytest.mark.parametrize("lrs,match", [([], "lrs is empty"), ([1e-3, 1e-3], "lrs repeat"),
                                       ([-1.0], ">= 0"), (1e-3, "list of learning rates")])
def test_bad_lr_lists_are_refused(lrs, match):
    task = tasks.make("adding", steps=3)
    stack = task_stack("lstm", task, layers=1, hidden=2)
    with pytest.raises((ValueError, TypeError), match=match):
        train_lr_seeds(stack, task, lrs, [0], steps=1, batch=2, eval_batch=2)


# ---------------------------------------------------------------------------------------------
# The training atlas on a tiny grid: claims evaluated by the atlas equal the same predicates
# computed from train() run by run; a rerun resumes from the cache; reproduce regenerates it.

from gradflow import atlas_training as at  # noqa: E402
from gradflow import reproduce  # noqa: E402

TINY = {"task": "adding", "task_options": {"steps": 4}, "layers": 1, "hidden": 4, "steps": 6,
        "batch": 4, "eval_every": 3, "eval_batch": 8, "lrs": [1e-2, 3e-3], "seeds": [0, 2],
        "factor": {"name": "steps", "where": "task", "values": [4]},
        "runs": [["star", "star", {}], ["lstm, forget bias 1", "lstm", {"forget_bias": 1.0}]],
        "claims": ["deep_star_trains", "deep_star_over_lstm"]}


@pytest.fixture(scope="module")
def tiny_atlas(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return at.training_atlas(TINY, cache_dir=cache), cache


def test_atlas_claims_equal_predicates_on_direct_runs(tiny_atlas):
    data, _ = tiny_atlas
    for T in (4,):
        task = tasks.make("adding", steps=T)
        finals = {}
        for label, opts in (("star", {}), ("lstm, forget bias 1", {"forget_bias": 1.0})):
            stack = task_stack(label.split(",")[0], task, layers=1, hidden=4, options=opts)
            for i, lr in enumerate(TINY["lrs"]):
                for s, seed in enumerate(TINY["seeds"]):
                    h = train(stack, task, steps=6, batch=4, lr=lr, seed=seed, eval_every=3,
                              eval_batch=8, progress=False)
                    finals[label, i, s] = float(h.curve["eval_metric"][-1])
                    got = at.run_arrays(data, label, T)["eval_metric"][i, s]
                    np.testing.assert_allclose(got, h.curve["eval_metric"], rtol=2e-5, atol=1e-7)
        f = TINY["factor"]["values"].index(T)
        c = at.claim_arrays(data, "deep_star_over_lstm")
        for i in range(2):
            for s in range(2):
                st, ls = finals["star", i, s], finals["lstm, forget bias 1", i, s]
                assert c["statistic"][f, i, s] == pytest.approx(ls / st, rel=1e-4)
                assert c["holds"][f, i, s] == (st < 0.01 <= ls)
        assert c["fraction"].shape == (1, 2)
        # fair: each run at the lr with the lowest median final MSE over seeds
        best = {lab: TINY["lrs"][int(np.argmin([np.median([finals[lab, i, s] for s in range(2)])
                                                for i in range(2)]))]
                for lab in ("star", "lstm, forget bias 1")}
        assert c["best_lr"][str(T)] == best
        bi = {lab: TINY["lrs"].index(best[lab]) for lab in best}
        for s in range(2):
            st, ls = finals["star", bi["star"], s], finals["lstm, forget bias 1", bi[
                "lstm, forget bias 1"], s]
            assert c["fair_statistic"][f, s] == pytest.approx(ls / st, rel=1e-4)


def test_rerun_resumes_from_the_cache(tiny_atlas, monkeypatch):
    data, cache = tiny_atlas
    monkeypatch.setattr(at, "train_spec", lambda spec: pytest.fail("retrained a cached run"))
    again = at.training_atlas(TINY, cache_dir=cache)
    assert set(again.arrays) == set(data.arrays)
    for k, v in data.arrays.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_an_entry_damaged_or_of_another_run_is_trained_again(tiny_atlas, tmp_path, monkeypatch):
    """A cached run is reused only where it is this run's, trained by this code: a damaged
    entry stopped the atlas, one copied over another's was served as it."""
    import shutil
    import warnings
    data, cache = tiny_atlas
    mine = shutil.copytree(cache, tmp_path / "cache")
    first, second = sorted(mine.glob("*.npz"))[:2]
    trained = []
    real = at.train_spec
    monkeypatch.setattr(at, "train_spec", lambda spec: trained.append(spec) or real(spec))
    first.write_bytes(first.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match=r"training atlas cache entry .* cannot be reused \(it is "
                                            r"damaged"):
        healed = at.training_atlas(TINY, cache_dir=mine)
    shutil.copyfile(second, first)
    with pytest.warns(RuntimeWarning, match=r"cannot be reused \(it holds other settings"):
        swapped = at.training_atlas(TINY, cache_dir=mine)
    assert len(trained) == 2 and trained[0] == trained[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = at.training_atlas(TINY, cache_dir=mine)  # all this run's now: reused
    assert len(trained) == 2
    for k, v in data.arrays.items():
        for res in (healed, swapped, again):
            np.testing.assert_array_equal(res[k], v, err_msg=k)


def test_factor_on_training_options_trains_independent_runs_once(tmp_path):
    cfg = {**TINY, "lrs": [1e-2], "seeds": [0], "steps": 2, "eval_every": 1, "layers": 1,
           "factor": {"name": "budget", "where": "training", "values": [0.1, 1.0]},
           "runs": [["LSTM", "lstm", {}], ["g-LSTM, budget", "g_lstm", {}, {"budget": 0.0}]],
           "claims": ["g_lstm_budget_10x"]}
    specs = [at.run_spec(at.check(cfg), r, v) for r in at.parse_runs(cfg["runs"])
             for v in (0.1, 1.0)]
    assert specs[0] == specs[1] and specs[2]["training"] == {"budget": 0.1}
    assert specs[3]["training"] == {"budget": 1.0}
    said = []
    data = at.training_atlas(cfg, cache_dir=tmp_path, progress=said.append)
    assert len(said) == 3 and len(list(tmp_path.glob("*.npz"))) == 3
    u = at.run_arrays(data, "g-LSTM, budget", 1.0)["eval_updates"]
    c = at.claim_arrays(data, "g_lstm_budget_10x")
    np.testing.assert_allclose(c["statistic"][1, 0, 0], 1 / u[0, 0, -1], rtol=1e-6)


def test_predicates_on_hand_made_runs():
    step = np.array([0, 50, 100, 150])

    def run(metric, **kw):
        return {"step": step, "metric": np.array(metric, float), **kw}

    earlier = at.CLAIMS["refined_gru_earlier"]
    assert earlier.evaluate({"refined_gru": run([1, .1, .005, .001]),
                             "gru": run([1, .1, .1, .005])}) == (50.0, True)
    assert earlier.evaluate({"refined_gru": run([1, .1, .1, .005]),
                             "gru": run([1, .1, .1, .005])}) == (0.0, False)
    # the vanilla never gets there: a never counts as one evaluation past the end
    assert earlier.evaluate({"refined_gru": run([1, .1, .1, .005]),
                             "gru": run([1, .1, .1, .1])}) == (50.0, True)
    assert not earlier.evaluate({"refined_gru": run([1, 1, 1, 1]), "gru": run([1, 1, 1, 1])})[1]
    budget = at.CLAIMS["g_lstm_budget_10x"]
    lstm = run([1, .1, .01, .004])
    s, ok = budget.evaluate({"g-LSTM, budget": run([1, .1, .01, .008], updates=[1, .5, .1, .08]),
                             "LSTM": lstm})
    assert s == pytest.approx(12.5) and ok
    assert not budget.evaluate({"g-LSTM, budget": run([1, 1, 1, .02], updates=[1, .1, .1, .05]),
                                "LSTM": lstm})[1]  # 5x the LSTM's MSE: not comparable
    rec = at.CLAIMS["ur_lstm_binary_recall"]
    assert rec.evaluate({"UR-LSTM": run([.1, .2, .3, .3], saturated={"g": .6})}) == (0.6, True)
    assert not rec.evaluate({"UR-LSTM": run([.1, .2, .2, .2], saturated={"g": .9})})[1]


@pytest.mark.parametrize("change,match", [
    ({"lrs": []}, "lrs is empty"),
    ({"factor": {"name": "steps", "values": [4]}}, "factor is"),
    ({"claims": ["nope"]}, "unknown training claim 'nope'; valid: deep_star_trains"),
    ({"claims": ["ur_lstm_beats_baselines"]}, "reads run.*UR-LSTM"),
    ({"runs": [["a", "lstm"]]}, "runs are"),
    ({"eval_batch": 4, "record_batch": 5}, "record_batch 5 is more than eval_batch 4"),
    ({"layer": 3}, r"unknown key\(s\) layer; valid: "),
    ({"factor": {"name": "budjet", "where": "training", "values": [0.1]}},
     "factor 'budjet' is no training option; valid: budget, curriculum, cell_steps$"),
    # lr as a factor or per run: every run trains at each of "lrs" (it was dropped silently)
    ({"factor": {"name": "lr", "where": "training", "values": [1e-4, 0.5]}},
     "factor 'lr' is no training option; .*; the learning rates are the atlas's 'lrs'"),
    ({"runs": [["a", "lstm", {}, {"lr": 1e-4}]]},
     r"run 'a': a training atlas trains every run at each of its 'lrs' \(0.01, 0.003\); give "
     "no 'lr'"),
    # a bad gate crashed with KeyError after all the training
    ({"gates": {"b": "f"}}, "gates names run 'b'; the atlas runs: star, lstm, forget bias 1$"),
    ({"gates": {"lstm, forget bias 1": "zz"}},
     r"gates\['lstm, forget bias 1'\]: lstm reports no gate 'zz'; its gates: i, f, o, g$"),
    ({"runs": [["a", "lstm", {}, {"budjet": 0.1}]]},
     r"run 'a': unknown training option\(s\) budjet"),
])
def test_bad_atlas_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        at.check({**TINY, **change})


def test_a_gate_of_a_run_written_with_its_options_is_checked_as_the_run_builds_it():
    c = at.check({**TINY, "runs": [["a", "lstm:forget_bias=1.0", {}]], "claims": [],
                  "gates": {"a": "f"}})
    assert c["gates"] == {"a": "f"}


def test_the_default_record_batch_is_bounded_by_the_evaluation_batch():
    # the default (64) would otherwise enter the cache key and the saved config, larger than
    # the evaluation batch the records are taken on
    assert at.check({**TINY, "eval_batch": 8})["record_batch"] == 8
    assert at.check({**TINY, "eval_batch": 100})["record_batch"] == 64
    assert at.check({**TINY, "eval_batch": 8, "record_batch": 3})["record_batch"] == 3


def test_reproduce_regenerates_a_tiny_training_atlas(tiny_atlas, tmp_path):
    import json

    import gradflow

    fig = reproduce.BUILDERS["training_atlas"].draw({"title": "t"}, tiny_atlas[0])
    assert len([a for a in fig.axes if a.axison]) == 2 + 2  # 2 runs x 1 value + 2 claims
    cfg = {**TINY, "figure": "training_atlas", "runs": TINY["runs"][:1], "steps": 2,
           "eval_every": 1, "lrs": [1e-2], "claims": ["deep_star_trains"]}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "cfg" / "tiny.json").write_text(json.dumps(cfg))
    written = reproduce.reproduce("tiny", tmp_path / "out", config_dir=tmp_path / "cfg",
                                  log=lambda s: None, progress=lambda s: None)
    assert sorted(p.rsplit(".", 1)[1] for p in written) == ["npz", "png"]
    data = gradflow.load(tmp_path / "out" / "tiny.npz")
    c = at.claim_arrays(data, "deep_star_trains")
    final = at.run_arrays(data, "star", 4)["eval_metric"][0, :, -1]
    np.testing.assert_allclose(c["statistic"][0, 0], final)
    assert c["fair_fraction"][0] == np.mean(final < 0.01)


# ---------------------------------------------------------------------------------------------
# The committed training atlases (figures/train_atlas_*.npz, from their configs): the verdicts
# the README states, asserted as fractions of seeds per condition.

ATLASES = ("train_atlas_deep_adding", "train_atlas_g_lstm", "train_atlas_gu_copy",
           "train_atlas_cheng_refined")


def committed(name):
    import gradflow

    path = reproduce.FIGURES_DIR / f"{name}.npz"
    if not path.exists():
        pytest.fail(f"{name}: committed data missing")
    return gradflow.load(path)


def frac(data, claim):
    """``(F, n_lr)`` fractions of seeds holding and ``(F,)`` fair fractions."""
    c = at.claim_arrays(data, claim)
    return c["fraction"], c["fair_fraction"], c["best_lr"]


def finals(data, label, value):
    """``(n_lr, S)`` final evaluation metric."""
    return at.run_arrays(data, label, value)["eval_metric"][:, :, -1]


@pytest.mark.parametrize("name", [a for a in ATLASES
                                  if (reproduce.FIGURES_DIR / f"{a}.npz").exists()])
def test_committed_atlas_matches_its_config(name):
    config, data = reproduce.load_config(name), committed(name)
    assert (reproduce.FIGURES_DIR / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data.kind == "training_atlas" and data.total_nonfinite == 0
    for key, value in config.items():
        if key != "claims":  # the data hold each claim's description and best lrs
            assert data.config[key] == value, key
    assert len(config["seeds"]) >= 5 and len(config["lrs"]) >= 3
    assert sorted(data.config["claims"]) == sorted(config["claims"])
    for label, *_ in config["runs"]:
        for v in config["factor"]["values"]:
            m = finals(data, label, v)
            assert m.shape == (len(config["lrs"]), len(config["seeds"]))
            # every (lr, seed) row is its own run
            loss = at.run_arrays(data, label, v)["eval_loss"]
            rows = loss.reshape(-1, loss.shape[-1])
            assert len({tuple(np.round(r, 7)) for r in rows}) == m.size, (label, v)


def test_deep_adding_atlas():
    d = committed("train_atlas_deep_adding")
    trains, fair, best = frac(d, "deep_star_trains")
    # STAR trains (MSE < 0.01) in 5/5 seeds at lr 1e-3, in none at 3e-3 or 1e-2 (8 layers)
    assert fair[0] == 1 and best["10"]["star"] == 1e-3
    assert trains[0].tolist() == [1.0, 0.0, 0.0]
    # the fair LSTM baseline (forget bias 1, its best lr 1e-3) trains too, in >= 2 of 5 seeds,
    # so "STAR trains where the LSTM does not" holds in a minority of seeds (0.4)
    over, fair_over, best = frac(d, "deep_star_over_lstm")
    assert best["10"]["lstm, forget bias 1"] == 1e-3
    assert share(finals(d, "lstm, forget bias 1", 10)[0] < 0.01) >= 0.4
    assert 0 < fair_over[0] <= 0.6
    # but STAR's MSE is lower than that LSTM's in every seed at the fair setting
    assert (at.claim_arrays(d, "deep_star_over_lstm")["fair_statistic"][0] > 1).all()


def share(mask) -> float:
    return float(np.mean(mask))


def test_g_lstm_atlas():
    d = committed("train_atlas_g_lstm")
    lam = d.config["factor"]["values"]
    assert lam == [0.1, 1.0, 10.0]
    upd = {v: at.run_arrays(d, "g-LSTM, budget", v)["eval_updates"][:, :, -1] for v in lam}
    # the update fraction falls with lambda at every lr, in every seed
    assert (upd[1.0] < upd[0.1]).all() and (upd[10.0] < upd[1.0]).all()
    # lambda 0.1: < 4x fewer updates than an LSTM in every seed, at every lr
    assert (1 / upd[0.1] < 4).all()
    frac_, fair, best = frac(d, "g_lstm_budget_10x")
    # the fair LSTM (its best lr, 1e-2) reaches MSE < 0.01 in every seed
    assert best["1.0"]["LSTM"] == 1e-2 and (finals(d, "LSTM", 0.1)[2] < 0.01).all()
    # ">= 10x fewer at comparable MSE": only at lambda 1 and lr 1e-2 (>= 15x in every seed, the
    # MSE comparable in 2 of 5); at lambda 10 the fraction is tiny but the MSE is the constant's
    assert fair[0] == 0 and fair[2] == 0 and 0.2 <= fair[1] <= 0.6
    assert (1 / upd[1.0][2] >= 10).all()
    assert frac_[1].tolist()[:2] == [0.0, 0.0] and frac_[0].max() == 0 and frac_[2].max() == 0
    assert (finals(d, "g-LSTM, budget", 10.0)[2] > 0.1).all()
    # the curriculum never reaches MSE 0.01 earlier (at lr 1e-2 both get there, it later)
    cur, fair_cur, _ = frac(d, "g_lstm_curriculum_faster")
    assert cur.max() == 0 and fair_cur.max() == 0
    assert (finals(d, "g-LSTM, curriculum", 0.1)[2] < 0.01).all()


def test_readme_training_atlas_example_runs(run_readme_block):
    ns = run_readme_block('figure_data("train_atlas_deep_adding")')
    assert ns["c"]["fraction"].tolist() == [[1.0, 0.0, 0.0]]
    assert ns["c"]["fair_fraction"].tolist() == [1.0]
    assert ns["c"]["best_lr"] == {"10": {"star": 0.001}}


def test_cheng_refined_atlas():
    d = committed("train_atlas_cheng_refined")
    f = {name: frac(d, name) for name in d.config["claims"]}
    # every run does best at lr 1e-2 (lowest median final MSE): the fair comparison is there
    for name, (_, _, best) in f.items():
        assert set(best["30"].values()) == {1e-2}, name
    # refined earlier than vanilla (MSE < 0.01 at an earlier evaluation, 50 steps apart):
    # additive refined LSTM in every seed at every lr; multiplicative at 3e-3 and 1e-2 (at 1e-3
    # neither gets there); MGU in every seed at 1e-3 / 3e-3 and 3 of 5 at 1e-2 (the other two
    # tied; 4 of 5 with the code of 2026-12-02: a seed, not a verdict); GRU in most seeds at
    # 1e-3 / 3e-3, fewer at its best lr 1e-2 (both reach 0.01 within 100-300 steps, ties in 3)
    assert f["refined_lstm_add_earlier"][0].min() == 1 and f["refined_lstm_add_earlier"][1][0] == 1
    assert f["refined_lstm_earlier"][0].tolist() == [[0.0, 1.0, 1.0]]
    assert f["refined_lstm_earlier"][1][0] == 1
    mgu, fair_mgu = f["refined_mgu_earlier"][:2]
    assert mgu[0, :2].min() == 1 and mgu[0, 2] >= 0.6 and fair_mgu[0] >= 0.6
    # never later
    assert (at.claim_arrays(d, "refined_mgu_earlier")["fair_statistic"][0] >= 0).all()
    g = f["refined_gru_earlier"]
    assert g[0][0, 0] >= 0.8 and g[0][0, 1] >= 0.6 and g[1][0] <= 0.6
    # the plain LSTM is the one that depends on lr: < 0.01 in 0 / 2 / 5 of 5 seeds
    assert [share(m < 0.01) for m in finals(d, "lstm", 30)] == [0.0, 0.4, 1.0]


def test_gu_copy_atlas():
    d = committed("train_atlas_gu_copy")
    chance = 1 / 8
    rec, fair_rec, best = frac(d, "ur_lstm_binary_recall")
    beats, fair_beats, best_b = frac(d, "ur_lstm_beats_baselines")
    assert best["40"]["UR-LSTM"] == 1e-2 and best["10"]["UR-LSTM"] == 1e-2
    # lag 40: the fair baselines (each at its best lr) stay near chance in >= 4 of 5 seeds at
    # every lr; the UR-LSTM beats them by >= 0.05 in >= 4 of 5 seeds at 3e-3 and 1e-2
    for label in ("LSTM+UGI", "LSTM, forget bias 1"):
        assert (np.mean(finals(d, label, 40) < 1.3 * chance, axis=1) >= 0.8).all(), label
    assert beats[1].tolist()[1:] == [0.8, 1.0] and fair_beats[1] == 1.0  # 0.8 before
    # lag 10: every model learns at lr 1e-2, the LSTM with forget bias 1 best (> 0.95 in every
    # seed): the UR-LSTM's advantage is gone (0 of 5 at every lr)
    assert (finals(d, "LSTM, forget bias 1", 10)[2] > 0.95).all()
    assert beats[0].max() == 0 and fair_beats[0] == 0
    # gates nearly binary (>= 50% saturated) and recall >= 2x chance at lr 1e-2: 2 of 5 seeds at
    # lag 10, 4 of 5 at lag 40 (3 and 3 with the code of 2026-12-02: seeds on the line move);
    # none at 3e-3 (one seed on the line, 0.4997); never at lr 1e-3
    assert rec[:, 2].tolist() == [0.4, 0.8] and rec[:, 1].max() == 0 and rec[:, 0].max() == 0
    assert fair_rec.tolist() == [0.4, 0.8]  # the UR-LSTM's best lr is 1e-2 at both lags
    # ... and at lag 10 the LSTM with forget bias 1 saturates its forget gate as much
    sat = at.run_arrays(d, "LSTM, forget bias 1", 10)["saturated/f"][2]
    assert (sat > 0.5).all()
    # "solves the copy task" (accuracy > 0.9) at lag 40: in no seed at any lr
    assert (finals(d, "UR-LSTM", 40) < 0.9).all()


@pytest.mark.parametrize("name", [a for a in ("train_atlas_g_lstm", "train_atlas_gu_copy")
                                  if (reproduce.FIGURES_DIR / f"{a}.npz").exists()])
def test_training_atlas_figure_draws_baselines_once_on_one_scale_per_row(name):
    """Runs the factor does not change (g-LSTM's baselines at every budget) are drawn once,
    titled "any <factor>"; accuracy panels share the scale 0..1, MSE panels one per row."""
    from gradflow import plot

    d = committed(name)
    fig = plot.draw_training_atlas(d)
    values = d.config["factor"]["values"]
    curves = [ax for ax in fig.axes if ax.lines and not ax.images]  # not the claim panels
    titles = [ax.get_title() for ax in curves]
    for label, *_ in d.config["runs"]:
        fixed = all(np.array_equal(at.run_arrays(d, label, v)["eval_metric"],
                                   at.run_arrays(d, label, values[0])["eval_metric"])
                    for v in values[1:])
        f = {"steps": "T"}.get(d.config["factor"]["name"], d.config["factor"]["name"])
        mine = [t for t in titles if t == f"{label}, any {f}" or t.startswith(f"{label}, {f} = ")]
        assert len(mine) == (1 if fixed else len(values)), (label, mine)
        assert fixed == any(" any " in t for t in mine)
    if d.config["task"] == "copy":
        assert {ax.get_ylim() for ax in curves} == {(0.0, 1.0)}
    else:  # one MSE scale for every panel (a row of its own read 0.17 -> 0.11 as learning)
        assert len({ax.get_ylim() for ax in curves}) == 1
    if name == "train_atlas_g_lstm":  # the LSTM and both plain g-LSTMs do not depend on lambda
        assert sum(" any " in t for t in titles) == 3
