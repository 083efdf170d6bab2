"""Training: the loss falls on every task, and the budget, curriculum, callbacks and checkpoints
do what they say.

Runs share their configuration (stack, task, batch sizes) wherever the test allows, so the jitted
update step and evaluation compile once for several tests.
"""
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import tasks
from gradflow.results import Result, make_result
from gradflow.train import History, TrainConfig, eval_batch_of, train

F32 = jnp.float32
H = 32
ADDING = tasks.make("adding", steps=10)
LSTM = gradflow.Stack("lstm", layers=2, input_size=2, hidden_size=H)
GLSTM = gradflow.Stack("g_lstm", layers=2, input_size=2, hidden_size=16, cell_options={"steps": 10})
COMMON = dict(batch=32, eval_batch=64, progress=False)


def keys(seed):
    """The documented key scheme: ``split(key(seed), 3) = (init, data, eval)``."""
    return jax.random.split(jax.random.key(seed), 3)


def fake_record(log=None):
    """A record function that logs what it was given and returns a Result of the first layer's
    recurrent weights' mean |U_i|."""
    def fn(stack, params, xs):
        if log is not None:
            log.append(xs.shape)
        return make_result("fake", {"u": np.mean(np.abs(params["layers"][0]["i"]["U"]))},
                           {"cell": stack.cell.name})
    return fn


# ---------------------------------------------------------------------------------------------
# Training reduces the loss on every task (fixed seeds, loose bounds)


def test_adding_learns():
    h = train(LSTM, ADDING, steps=200, lr=1e-2, eval_every=50, **COMMON)
    assert isinstance(h, History)
    c = h.curve
    assert c.kind == "training" and c.step.tolist() == list(range(200))
    assert c.eval_step.tolist() == [0, 50, 100, 150, 200]
    # the zero head outputs 0 at init: the evaluation loss is mean(y^2) of the evaluation batch
    ys = np.asarray(eval_batch_of(ADDING, keys(0)[2], 64, 32, F32)[1])
    assert c.eval_loss[0] == pytest.approx(np.mean(ys[:, -1, 0] ** 2), rel=1e-6)
    # the best constant guess scores Var(v1 + v2) = 1/6: beat half of it
    assert c.eval_loss[-1] < 0.5 / 6 and c.eval_loss[-1] < 0.7 * c.eval_loss[0]
    assert c.loss[-20:].mean() < 0.5 / 6
    assert c.config["cell"] == "lstm" and c.config["task"] == {"task": "adding", "steps": 10}
    assert c.config["lr"] == 1e-2 and c.config["train_steps"] == 200
    assert c.total_nonfinite == 0


def test_copy_learns():
    task = tasks.make("copy", lag=2, symbols=3, alphabet=4)
    stack = gradflow.Stack("lstm", layers=2, input_size=task.input_size, hidden_size=H)
    h = train(stack, task, steps=200, lr=1e-2, eval_every=200, **COMMON).curve
    chance = tasks.chance(task)  # log 4
    assert h.eval_loss[0] == pytest.approx(math.log(task.output_size), rel=1e-6)  # zero head
    assert h.eval_loss[-1] < 0.5 * chance and h.eval_metric[-1] > 0.6  # chance accuracy 1/4


def test_counting_learns():
    task = tasks.make("counting", steps=8, alphabet=2)
    stack = gradflow.Stack("lstm", layers=2, input_size=task.input_size, hidden_size=H)
    h = train(stack, task, steps=300, lr=1e-2, seed=1, eval_every=300, **COMMON).curve
    # the best constant guess scores the variance of the evaluation targets: beat half of it
    ys = np.asarray(eval_batch_of(task, keys(1)[2], 64, 32, F32)[1])[:, -1, 0]
    assert h.eval_loss[-1] < 0.5 * ys.var() and h.eval_loss[-1] < 0.7 * h.eval_loss[0]


def test_digits_format_learns():
    """Ten noisy 8x8 prototypes read pixel by pixel; evaluated on the held-out split."""
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 2, (10, 8, 8)) * 16
    labels = np.arange(300) % 10
    images = np.clip(protos[labels] + rng.normal(0, 3, (300, 8, 8)), 0, 16).round()
    train_task = tasks.make("digits", images=images, labels=labels, split="train")
    test_task = tasks.make("digits", images=images, labels=labels, split="test")
    stack = gradflow.Stack("lstm", layers=2, input_size=1, hidden_size=H)
    h = train(stack, train_task, eval_task=test_task, steps=60, lr=1e-2, eval_every=60,
              **COMMON).curve
    assert h.eval_loss[-1] < 0.7 * h.eval_loss[0] and h.eval_metric[-1] > 0.5  # chance 0.1
    assert h.config["eval_task"]["split"] == "test"


def test_update_is_clipped_adam():
    """Three steps of train() equal optax's clip_by_global_norm + adam on the params pytree,
    with the batches drawn from the documented keys."""
    import optax

    stack = LSTM
    lr, clip, seed = 0.05, 0.02, 3
    h = train(stack, ADDING, steps=3, lr=lr, clip=clip, seed=seed, eval_every=3, **COMMON)
    k_init, k_data, _ = keys(seed)
    params = {"stack": stack.init(k_init, F32),
              "head": {"W": jnp.zeros((H, 1), F32), "b": jnp.zeros((1,), F32)}}
    opt = optax.chain(optax.clip_by_global_norm(clip), optax.adam(lr))
    state = opt.init(params)

    @jax.jit
    def reference_step(p, state, xs, ys):
        def loss(p):
            out = stack.apply(p["stack"], xs).top[:, -1] @ p["head"]["W"] + p["head"]["b"]
            return jnp.mean((out[:, 0] - ys[:, -1, 0]) ** 2)
        value, g = jax.value_and_grad(loss)(p)
        u, state = opt.update(g, state, p)
        return optax.apply_updates(p, u), state, value, optax.tree.norm(g)

    for step in range(3):
        xs, ys, _ = tasks.sample(ADDING, jax.random.fold_in(k_data, step), 32, F32)
        params, state, value, norm = reference_step(params, state, xs, ys)
        assert h.curve.loss[step] == pytest.approx(float(value), rel=1e-5)
        assert norm > clip  # the clip is active
    for a, b in zip(jax.tree_util.tree_leaves(h.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Budget loss and curriculum (g-LSTM)


def test_budget_lowers_the_time_gate():
    runs = {b: train(GLSTM, ADDING, steps=60, lr=1e-2, budget=b, eval_every=60, **COMMON).curve
            for b in (0.0, 1.0)}
    free, thrifty = runs[0.0], runs[1.0]
    # same start, then the budget pushes mean(k) (and the fraction of updates) down
    assert free.eval_mean_k[0] == thrifty.eval_mean_k[0]
    assert thrifty.eval_mean_k[-1] < 0.8 * free.eval_mean_k[-1]
    assert thrifty.eval_mean_k[-1] < thrifty.eval_mean_k[0]
    assert thrifty.eval_updates[-1] <= free.eval_updates[-1]
    assert 0 < free.eval_updates[0] <= 1


def test_the_time_gate_means_count_real_neurons_only(tmp_path):
    """Layers of different widths pad their gates to the widest: the padding's zeros are no
    neurons, so mean(k), the update fraction and the budget term leave them out (they made
    eval_mean_k 3/4 of the real mean in a [8, 4] stack, and the budget 3/4 as strong)."""
    from gradflow import gates
    from gradflow.runs import load_params
    from gradflow.train import run_eval_batch

    stack = gradflow.Stack("g_lstm", layers=2, input_size=2, hidden_size=[8, 4],
                           cell_options={"steps": 10})
    curve = train(stack, ADDING, steps=0, run_dir=tmp_path, batch=4, eval_batch=8,
                  progress=False).curve
    xs = run_eval_batch(tmp_path)[0]
    k = np.asarray(gates.activations(stack, load_params(tmp_path)[1], xs)["k"])
    real = np.concatenate([k[0, ..., :8].ravel(), k[1, ..., :4].ravel()])
    assert np.all(k[1, ..., 4:] == 0)  # the padding, which the old mean counted
    np.testing.assert_allclose(curve.eval_mean_k[0], real.mean(), rtol=1e-5)
    np.testing.assert_allclose(curve.eval_updates[0], (real > 1e-3).mean(), rtol=1e-5)
    assert curve.eval_mean_k[0] > k.mean() * 1.2


def test_seeds_a_key_would_wrap_are_refused():
    """A key takes its seed modulo 2**32: seed 2**32 trained seed 0's run again, and
    train_seeds([0, 2**32]) passed the distinct-seeds check with one run twice."""
    from gradflow.seeds import seed_list

    for seed in (2**32, 2**31 - 1, -1):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*31 - 1\)"):
            TrainConfig(seed=seed)
    with pytest.raises(ValueError, match=r"seeds\[1\] must be an integer"):
        seed_list([0, 2**32])
    assert seed_list([0, 2**31 - 2]) == [0, 2**31 - 2]
    with pytest.raises(TypeError, match="seeds must be a list of integers .* got None"):
        seed_list(None)  # (was "'NoneType' object is not iterable")


def test_budget_needs_a_time_gate():
    with pytest.raises(ValueError, match="time gate"):
        train(LSTM, ADDING, steps=1, budget=0.1, **COMMON)
    # STAR's gate is also named k, but it is no time gate: no budget, no update fraction
    star = gradflow.Stack("star", layers=1, input_size=ADDING.input_size, hidden_size=4)
    with pytest.raises(ValueError, match="time gate.*'star' has none"):
        train(star, ADDING, steps=1, budget=0.1, **COMMON)
    curve = train(star, ADDING, steps=1, **COMMON).curve
    assert "eval_updates" not in curve.arrays and "eval_mean_k" not in curve.arrays


def test_a_stack_of_different_cells_trains_and_one_of_different_time_gates_is_refused():
    """Measurements take stacks of different cells per layer; training does too (it read
    ``stack.cell``, which refuses them, with advice for developers)."""
    mixed = gradflow.Stack(["lstm", "ur_lstm"], layers=2, input_size=2, hidden_size=16)
    h = train(mixed, ADDING, steps=60, lr=1e-2, eval_every=30, **COMMON)
    ys = np.asarray(eval_batch_of(ADDING, keys(0)[2], 64, 32, F32)[1])
    assert h.curve.eval_loss[0] == pytest.approx(np.mean(ys[:, -1, 0] ** 2), rel=1e-6)
    assert h.curve.eval_loss[-1] < 0.3 * h.curve.eval_loss[0]  # toward the best constant, 1/6
    assert repr(h).startswith("History(lstm+ur_lstm on adding")
    timed = gradflow.Stack(["g_lstm", "lstm"], layers=2, input_size=2, hidden_size=4)
    with pytest.raises(ValueError, match="one time gate in every layer or none: this stack's "
                                         "layers have 'k', None \\(g_lstm\\+lstm\\)"):
        train(timed, ADDING, steps=1, **COMMON)


def test_curriculum_switches_length_and_scales_mu_sigma():
    """With lr = 0 the parameters only change by the g-LSTM rescaling at the switch, and each
    step's loss can be recomputed from the documented batch keys at the expected length."""
    seed = 4
    h = train(GLSTM, ADDING, steps=6, lr=0.0, seed=seed, curriculum=[(3, 5)], eval_every=6,
              **COMMON)
    assert h.curve.seq_len.tolist() == [5, 5, 5, 10, 10, 10]
    assert h.curve.config["curriculum"] == [[3, 5]]
    k_init, k_data, _ = keys(seed)
    init = GLSTM.init(k_init, F32)
    for l in range(2):
        for name in ("mu", "sigma"):
            np.testing.assert_array_equal(h.params["stack"]["layers"][l]["time"][name],
                                          2.0 * init["layers"][l]["time"][name])
        np.testing.assert_array_equal(h.params["stack"]["layers"][l]["i"]["U"],
                                      init["layers"][l]["i"]["U"])
    # lr = 0 keeps the zero head, so the loss of every step is mean(y^2) of its batch: recompute
    # it from the batch drawn at the expected length
    np.testing.assert_array_equal(h.params["head"]["W"], 0.0)

    def loss_at(step, length):
        ys = tasks.sample(tasks.resize(ADDING, length), jax.random.fold_in(k_data, step), 32, F32)[1]
        return float(np.mean(np.asarray(ys)[:, -1, 0] ** 2))

    for step in range(6):
        assert h.curve.loss[step] == pytest.approx(loss_at(step, 5 if step < 3 else 10), rel=1e-6)
    assert h.curve.loss[3] != pytest.approx(loss_at(3, 5), rel=1e-3)


def test_bad_curriculum():
    with pytest.raises(ValueError, match="increase"):
        train(LSTM, ADDING, steps=4, curriculum=[(3, 5), (2, 6)], **COMMON)
    images = np.zeros((4, 64))
    digits = tasks.make("digits", images=images, labels=np.arange(4))
    stack = gradflow.Stack("lstm", layers=1, input_size=1, hidden_size=4)
    with pytest.raises(ValueError, match="fixed length"):
        train(stack, digits, steps=4, curriculum=[(2, 32)], **COMMON)


# ---------------------------------------------------------------------------------------------
# Callbacks, checkpoints, resume


def test_record_batch_above_the_evaluation_batch_is_refused():
    # the records are taken on the evaluation batch: more sequences than it has cannot be given
    # (it was clipped in silence, and the run's config claimed the larger number)
    with pytest.raises(ValueError, match="record_batch 9 is more than eval_batch 8.*<= 8"):
        TrainConfig(eval_batch=8, record_batch=9)
    assert TrainConfig(eval_batch=8).record_batch == 8
    assert TrainConfig(eval_batch=8, record_batch=8).record_batch == 8


def test_record_callbacks_at_chosen_steps():
    log = []
    h = train(LSTM, ADDING, steps=20, lr=1e-2, eval_every=10, record_at=[0, 7, 20],
              record={"u": fake_record(log)}, record_batch=8, **COMMON)
    assert h.record_steps == (0, 7, 20)
    assert log == [(8, 10, 2)] * 3  # the first record_batch sequences of the evaluation batch
    got = [float(r.u) for r in h.records["u"]]
    assert [r.config["train_step"] for r in h.records["u"]] == [0, 7, 20]
    # each record says which run it is of: the run's settings beyond the stack's
    run = h.curve.config
    for r in h.records["u"]:
        t = r.config["training"]
        assert t == {k: v for k, v in run.items() if k not in LSTM.config}
        assert (t["task"]["task"], t["seed"], t["lr"], t["train_steps"]) == (
            "adding", run["seed"], 1e-2, 20)
        assert r.config["inputs"] == "the first 8 sequences of the run's evaluation batch"
    # the callback saw the initial and the final parameters
    init = LSTM.init(keys(0)[0], F32)
    assert got[0] == pytest.approx(float(np.mean(np.abs(init["layers"][0]["i"]["U"]))))
    final = h.params["stack"]["layers"][0]["i"]["U"]
    assert got[2] == pytest.approx(float(np.mean(np.abs(final))))
    assert got[0] != got[2]


def test_record_must_return_a_result():
    with pytest.raises(TypeError, match="not a gradflow Result"):
        train(LSTM, ADDING, steps=2, record_at=[1], record={"bad": lambda s, p, x: 1.0},
              **COMMON)
    with pytest.raises(ValueError, match="0..2"):
        train(LSTM, ADDING, steps=2, record_at=[3], record={"u": fake_record()}, **COMMON)


def test_checkpoint_written_loadable_and_resumable(tmp_path):
    """An interrupted run resumed from its checkpoint equals the uninterrupted run."""
    opts = dict(steps=20, lr=1e-2, eval_every=5, record_at=[0, 10, 20], **COMMON)
    full = train(LSTM, ADDING, record={"u": fake_record()}, **opts)

    calls = []

    def interrupt(stack, params, xs):
        calls.append(1)
        if len(calls) == 2:  # at step 10, after the checkpoint of step 5
            raise KeyboardInterrupt
        return fake_record()(stack, params, xs)

    ck = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(LSTM, ADDING, record={"u": interrupt}, run_dir=ck, **opts)
    saved = gradflow.results.load(ck / "curve.npz")
    assert saved.step.tolist() == list(range(5)) and saved.eval_step.tolist() == [0, 5]
    assert saved.config["task"]["task"] == "adding"

    resumed = train(LSTM, ADDING, record={"u": fake_record()}, run_dir=ck, resume=True,
                    **opts)
    for name in ("step", "loss", "metric", "eval_step", "eval_loss", "eval_metric"):
        np.testing.assert_array_equal(resumed.curve[name], full.curve[name])
    assert resumed.record_steps == full.record_steps == (0, 10, 20)
    assert [float(r.u) for r in resumed.records["u"]] == [float(r.u) for r in full.records["u"]]
    for a, b in zip(jax.tree_util.tree_leaves(resumed.params),
                    jax.tree_util.tree_leaves(full.params)):
        np.testing.assert_array_equal(a, b)
    # the files on disk hold the whole run
    final = Result.load(ck / "curve.npz")
    np.testing.assert_array_equal(final.loss, full.curve.loss)
    records = sorted(f for f in os.listdir(ck) if f.startswith("record-"))
    assert len(records) == 3
    assert [Result.load(ck / f).config["train_step"] for f in records] == [0, 10, 20]
    # a finished run resumes to itself; a changed configuration is refused
    again = train(LSTM, ADDING, record={"u": fake_record()}, run_dir=ck, resume=True, **opts)
    np.testing.assert_array_equal(again.curve.loss, full.curve.loss)
    with pytest.raises(ValueError, match="differs in lr"):
        train(LSTM, ADDING, record={"u": fake_record()}, run_dir=ck, resume=True,
              **{**opts, "lr": 1e-3})
    # fewer steps than it has done: refused (it returned the whole run under the new config)
    with pytest.raises(ValueError, match="it has done 20 steps, more than steps=10; give "
                                         "steps >= 20"):
        train(LSTM, ADDING, record={"u": fake_record()}, run_dir=ck, resume=True,
              **{**opts, "steps": 10, "record_at": [0, 10]})
    # a run that does not resume starts the directory afresh
    train(LSTM, ADDING, run_dir=ck, **{**opts, "steps": 2, "record_at": ()})
    assert sorted(os.listdir(ck)) == ["curve.npz", "state.npz"]
    assert Result.load(ck / "curve.npz").step.tolist() == [0, 1]


def test_a_resumed_run_records_at_its_first_step_when_asked(tmp_path):
    """A record asked for at the step a run resumes from was skipped (that step was measured
    before the save, under the old schedule); one asked for before it cannot be made."""
    opts = dict(lr=1e-2, eval_every=4, **COMMON)
    full = train(LSTM, ADDING, steps=8, record={"u": fake_record()}, record_at=(0, 4, 8),
                 **opts)
    ck = tmp_path / "run"
    train(LSTM, ADDING, steps=4, record={"u": fake_record()}, record_at=(0,), run_dir=ck,
          **opts)
    with pytest.raises(ValueError, match=r"record_at asks for step\(s\) 2 before its saved "
                                         "step 4, which it did not record"):
        train(LSTM, ADDING, steps=8, record={"u": fake_record()}, record_at=(0, 2, 8),
              run_dir=ck, resume=True, **opts)
    resumed = train(LSTM, ADDING, steps=8, record={"u": fake_record()}, record_at=(0, 4, 8),
                    run_dir=ck, resume=True, **opts)
    assert resumed.record_steps == (0, 4, 8)
    assert [float(r.u) for r in resumed.records["u"]] == [float(r.u) for r in full.records["u"]]
    np.testing.assert_array_equal(resumed.curve.eval_step, full.curve.eval_step)


SMALL = gradflow.Stack("lstm", layers=2, input_size=2, hidden_size=8)


def test_a_resume_restores_only_the_curve_and_records_saved_with_its_state(tmp_path,
                                                                           monkeypatch):
    """A run folder's curve.npz and records were restored without a look at its state:
    another seed's curve became the resumed run's (and was saved again under the state's
    seed), an earlier save's left a gap in the steps ([0, 1, 4, 5, ...]), a longer run's of
    another schedule mixed two schedules' evaluations, a record of another run or step was
    kept as the run's. Each is refused, naming the file and what differs; a curve that goes
    further than its state (a run stopped between writing the two) is cut there, and the run
    ends as the uninterrupted one, bit for bit."""
    from gradflow import runs
    from gradflow.errors import InputError

    opts = dict(lr=1e-2, eval_every=2, batch=4, eval_batch=4, progress=False)
    rec = {"u": fake_record()}
    full = train(SMALL, ADDING, steps=8, record=rec, record_at=(0, 4), **opts)

    def resume(d):
        return train(SMALL, ADDING, steps=8, record=rec, record_at=(0, 4), run_dir=d,
                     resume=True, **opts)

    # stopped after writing the curve of step 6, before its state: the state is step 4's
    cut, real = tmp_path / "cut", runs.save_state

    def stopped(run_dir, step, *a, **k):
        if step == 6:
            raise KeyboardInterrupt
        return real(run_dir, step, *a, **k)

    monkeypatch.setattr(runs, "save_state", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(SMALL, ADDING, steps=8, record=rec, record_at=(0, 4), run_dir=cut, **opts)
    monkeypatch.undo()
    assert runs.read_run(cut)["step"] == 4
    assert Result.load(cut / "curve.npz").step.tolist() == list(range(6))
    resumed = resume(cut)
    for name in full.curve.arrays:
        np.testing.assert_array_equal(resumed.curve[name], full.curve[name], err_msg=name)
    assert [float(r.u) for r in resumed.records["u"]] == [float(r.u) for r in full.records["u"]]
    for a, b in zip(jax.tree_util.tree_leaves(resumed.params),
                    jax.tree_util.tree_leaves(full.params)):
        np.testing.assert_array_equal(a, b)

    def run(name, steps, record_at=(0,), **kw):
        train(SMALL, ADDING, steps=steps, record=rec, record_at=record_at,
              run_dir=tmp_path / name, **{**opts, **kw})
        return tmp_path / name

    state4 = run("state4", 4, record_at=(0, 4))  # records 00000 (step 0), 00001 (step 4)
    seed1, step2, every4 = run("seed1", 4, seed=1), run("step2", 2), run("every4", 8,
                                                                         eval_every=4)
    for name, fname, source, msg in (
            ("seed", "curve.npz", seed1 / "curve.npz", "curve.npz is another run's: it "
             "differs from its state.npz in seed (the state's 0, the file's 1); a run is "
             "resumed from all its files"),
            ("short", "curve.npz", step2 / "curve.npz", "curve.npz holds steps 0..1, where "
             "its state.npz, saved at step 4, needs steps 0..3"),
            ("long", "curve.npz", every4 / "curve.npz", "curve.npz is not the one saved "
             "with its state.npz: its losses or evaluations up to step 4 are not those"),
            ("record_seed", "record-00000.npz", seed1 / "record-00000.npz",
             "record-00000.npz is another run's: it differs from its state.npz in seed "
             "(the state's 0, the file's 1)"),
            ("record_step", "record-00000.npz", state4 / "record-00001.npz",
             "record-00000.npz is a record of step 4, its state.npz lists it as the record "
             "'u' of step 0")):
        mixed = tmp_path / name
        shutil.copytree(state4, mixed)
        shutil.copyfile(source, mixed / fname)
        with pytest.raises(InputError, match=re.escape(f"cannot resume from {str(mixed)!r}: "
                                                        f"its {msg}")):
            resume(mixed)
    # the folder the files came from resumes to the uninterrupted run
    np.testing.assert_array_equal(resume(state4).curve.loss, full.curve.loss)


def test_a_run_from_given_params_says_so_in_its_config(tmp_path):
    """train(params=...) left no trace: its config was the seed's own run's."""
    opts = dict(steps=2, lr=1e-2, eval_every=2, **COMMON)
    own = train(LSTM, ADDING, **opts)
    assert own.curve.config["initial_params"] is None
    fresh = LSTM.init(jax.random.key(9))
    given = train(LSTM, ADDING, params=fresh, run_dir=tmp_path, **opts)
    mark = given.curve.config["initial_params"]
    assert mark.startswith("sha256:") and len(mark) == 7 + 16
    assert not np.array_equal(given.curve.loss, own.curve.loss)
    again = train(LSTM, ADDING, params=fresh, **opts)  # the same start, the same mark
    assert again.curve.config["initial_params"] == mark
    np.testing.assert_array_equal(again.curve.loss, given.curve.loss)
    other = jax.tree_util.tree_map(lambda a: a * 0.5, fresh)
    assert train(LSTM, ADDING, params=other, **opts).curve.config["initial_params"] != mark
    with pytest.raises(ValueError, match="differs in initial_params"):  # another start
        train(LSTM, ADDING, params=other, run_dir=tmp_path, resume=True, **opts)


def test_progress_bar_only_when_asked(capsys):
    train(LSTM, ADDING, steps=3, eval_every=3, **COMMON)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    train(LSTM, ADDING, steps=3, eval_every=3, **{**COMMON, "progress": True})
    assert "3/3" in capsys.readouterr().err


def test_argument_checks():
    with pytest.raises(ValueError, match="input_size=10"):
        train(LSTM, tasks.make("copy", lag=1, symbols=2, alphabet=8), steps=1, **COMMON)
    with pytest.raises(ValueError, match="unknown task"):
        train(LSTM, "adder", steps=1, **COMMON)
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        train(LSTM, ADDING, steps=-1, **COMMON)
    with pytest.raises(ValueError, match="float64"):
        train(LSTM, ADDING, steps=1, dtype="float16", **COMMON)
    with pytest.raises(ValueError, match="checkpoint directory"):
        train(LSTM, ADDING, steps=1, resume=True, **COMMON)
    for bad in ({"lr": math.inf}, {"budget": math.inf}, {"lr": math.nan}):  # NaN losses else
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a finite number"):
            train(LSTM, ADDING, steps=1, **bad, **COMMON)
    h = train(LSTM, ADDING, steps=0, **COMMON)  # evaluation at init only
    assert h.curve.loss.shape == (0,) and h.curve.eval_step.tolist() == [0]
    assert math.isfinite(float(h.curve.eval_loss[0]))


def test_a_diverged_run_warns_and_keeps_its_losses():
    """Non-finite losses are data (counted in the curve), and now said: a run whose loss left
    the finite numbers returned a curve of NaNs without a word."""
    from gradflow.results import NonFiniteWarning
    from gradflow.seeds import train_seeds

    opts = dict(steps=3, lr=1e30, clip=None, eval_every=3, **COMMON)
    with pytest.warns(NonFiniteWarning, match=r"train: non-finite entries \(inf/NaN\) in "):
        h = train(LSTM, ADDING, **opts)
    assert h.curve.nonfinite["eval_loss"] >= 1 and not np.isfinite(h.curve.eval_loss[-1])
    with pytest.warns(NonFiniteWarning, match=r"train_seeds \(seed 1\): non-finite"):
        train_seeds(LSTM, ADDING, [1], **{k: v for k, v in opts.items() if k != "progress"})


def test_a_run_folder_that_cannot_be_made_is_one_clear_error(tmp_path):
    """A run_dir naming a file, or one below a file, was Python's FileExistsError /
    NotADirectoryError; resume=True into a missing folder failed at the first save, after
    compiling (the docstring says it is created). Both now checked before anything runs."""
    from gradflow.errors import InputError

    (tmp_path / "f").write_text("")
    for where in (tmp_path / "f", tmp_path / "f" / "run"):
        for resume in (False, True):
            with pytest.raises(InputError, match=f"run_dir {re.escape(repr(str(where)))} "
                                                 "cannot be made: "):
                train(LSTM, ADDING, steps=1, run_dir=where, resume=resume, **COMMON)
    h = train(LSTM, ADDING, steps=1, run_dir=tmp_path / "new" / "run", resume=True, **COMMON)
    assert (tmp_path / "new" / "run" / "state.npz").is_file() and h.curve.loss.shape == (1,)


def test_a_curriculum_stage_with_more_classes_than_the_head_is_refused():
    """Counting's classes grow with the length: a stage longer than the task has labels the
    head has no output for (it trained to NaN, reported as divergence)."""
    task = tasks.make("counting", steps=4, alphabet=2, target="classification")
    stack = gradflow.Stack("lstm", 1, task.input_size, 4)
    with pytest.raises(ValueError, match=r"curriculum stage of 12 steps: task 'counting' then "
                                         r"has 12 outputs \(classes\), more than the 4"):
        train(stack, task, steps=2, curriculum=[(1, 12)], **COMMON)


def test_stacked_seeds_say_their_seeds():
    """A stacked History's curve and records hold every seed's arrays: their configs name the
    seeds, not the first one's alone."""
    from gradflow import seeds

    hists = seeds.train_seeds(LSTM, ADDING, [0, 4], steps=2, batch=4, eval_batch=4,
                              record_at=(2,), record={"map": lambda s, p, x:
                                                      gradflow.gradient_map(s, p, x)})
    both = seeds.stacked(hists)
    rec = both.records["map"][0]
    assert rec.values.shape[0] == 2 and both.curve.config["seeds"] == [0, 4]
    assert rec.config["training"]["seeds"] == [0, 4] and "seed" not in rec.config["training"]


def test_a_run_that_cannot_fit_is_refused_before_compiling(monkeypatch):
    """Training and the atlas check their memory as measurements do (a run too large was a C++
    abort or "a bug in gradflow"): parameters with Adam's moments plus the larger of a step and
    an evaluation, against the memory available (here 4 MiB)."""
    from gradflow import atlas, cost

    monkeypatch.setattr(cost, "available_memory", lambda device=None: 4 << 20)
    stack = gradflow.Stack("lstm", 2, 2, 256)  # 2.1 MiB of parameters, 6.3 MiB with Adam's
    with pytest.raises(ValueError, match=r"training \(lstm, 2 layers, H=256, batch 8, eval "
                                         r"batch 16, sequences of 20 steps\) needs about .* "
                                         r"more than the 4 MiB available: use a smaller hidden "
                                         r"size"):
        train(stack, tasks.make("adding", steps=20), steps=1, batch=8, eval_batch=16,
              progress=False)
    small = gradflow.Stack("lstm", 1, 2, 64)  # one run fits; six at once (2 rates x 3
    opts = dict(steps=1, batch=8, eval_batch=16, progress=False)  # seeds) do not
    train(small, tasks.make("adding", steps=20), **opts)
    from gradflow import seeds

    with pytest.raises(ValueError, match=r"training \(6 runs at once, lstm, 1 layer,"):
        seeds.train_lr_seeds(small, tasks.make("adding", steps=20), [1e-3, 1e-2], [0, 1, 2],
                             **opts)
    with pytest.raises(ValueError, match=r"measuring the atlas's lstm conditions at 3 layers x "
                                         r"3 steps, H=512, batch 2 \(seeds x inits: 2 problems"):
        atlas.atlas(["lstm_collapses"], atlas.Grid(cells=("lstm",), sizes=((3, 3),),
                                                   hidden=(512,), seeds=(0, 1), batch=2),
                    progress=False)


def test_the_atlas_checks_local_gains_by_their_own_estimate(monkeypatch):
    """A local-gains condition is checked by local gains' estimate (its batch of one-step
    Jacobians), not a gradient map's: a limit between the two refuses it before compiling."""
    from gradflow import atlas, cost

    grid = atlas.Grid(cells=("lstm",), sizes=((2, 6),), hidden=(64,), seeds=(0, 1), batch=4,
                      measure="local_gains")
    stack = gradflow.Stack("lstm", 2, 64, 64)
    gains = cost.estimate(stack, 8, 6, method="gains", calibrate=False,
                          chunk=cost.gains_chunk(4, 6, 64)).total
    grad = cost.estimate(stack, 8, 6, calibrate=False).total
    assert grad < gains / 2  # the Jacobians: (2 + 4) x 64 x 64 per example and step
    monkeypatch.setattr(cost, "available_memory", lambda device=None: (grad + gains) // 2)
    with pytest.raises(ValueError, match=r"measuring the atlas's lstm conditions at 2 layers x "
                                         r"6 steps, H=64, batch 4 \(seeds x inits: 2 problems"):
        atlas.atlas(["lstm_vertical_quarter"], grid, progress=False)


def test_task_loss_is_the_training_loss_and_checks_what_it_is_given():
    """train.task_loss through a readout equals the task's loss of the readout's outputs (the
    loss training minimises, tasks.loss_fn), and says what does not fit."""
    from gradflow.train import readout, task_loss

    xs, ys, mask = tasks.sample(ADDING, jax.random.key(1), 4)
    params = LSTM.init(jax.random.key(0))
    head = {"W": jax.random.normal(jax.random.key(2), (H, 1)), "b": jnp.ones(1)}
    top = LSTM.apply(params, xs).states["h"][-1]
    expect = tasks.loss_fn(ADDING)(readout(head, top), ys, mask)
    assert float(task_loss(head, ADDING, ys, mask)(top)) == pytest.approx(float(expect))
    res = gradflow.gradient_map(LSTM, params, xs, loss=task_loss(head, ADDING, ys, mask))
    assert float(res.loss_value) == pytest.approx(float(expect), rel=1e-6)
    for args, message in (((head["W"], ADDING, ys, mask), "head must be a readout"),
                          ((head, ADDING, ys[:2], mask), "must share their \\(batch, steps\\)"),
                          ((head, "classification", ys, mask), "integer labels")):
        with pytest.raises(ValueError, match=message):
            task_loss(*args)
    with pytest.raises(ValueError, match="do not fit the readout"):
        gradflow.gradient_map(LSTM, params, xs[:2], loss=task_loss(head, ADDING, ys, mask))


@pytest.mark.parametrize("fails", ["curve.tmp.npz", ".tmp-state.npz"])
def test_a_full_disk_leaves_no_torn_file_in_the_run_folder(tmp_path, monkeypatch, fails):
    """A save the disk does not take is one InputError, and the half-written temporary file is
    removed (curve.tmp.npz stayed beside the run)."""
    import errno

    real = np.savez

    def full(file, *a, **k):
        if os.path.basename(str(file)) == fails:
            with open(file, "wb") as f:
                f.write(b"PK\x03\x04 torn")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(file, *a, **k)

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(gradflow.errors.InputError, match="No space left on device"):
        train(LSTM, ADDING, steps=2, run_dir=tmp_path, **COMMON)
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_maps_recorded_in_training_keep_their_underflow_count():
    """A recorded map was rebuilt with its config and lost the underflow count its
    measurement made (a heatmap of it said '12 <= 0' for '12 underflow'); stacked seeds'
    records add their seeds' counts."""
    from gradflow import seeds
    from gradflow.results import make_result

    seen = []

    def measured(s, p, x):  # a map with one entry below the float range where it is expected
        seen.append(make_result("gradient_map", {"values": np.array([[0.0, 1.0], [2.0, 3.0]],
                                                                    np.float32)},
                                {"cell": "lstm"}, positive={"values": True}))
        return seen[-1]

    hist = train(LSTM, ADDING, steps=2, record_at=(0,), record={"map": measured}, **COMMON)
    rec = hist.records["map"][0]
    assert seen[0].underflow == {"values": 1} and rec.underflow == seen[0].underflow
    assert rec.config["train_step"] == 0 and rec.config["cell"] == "lstm"
    np.testing.assert_array_equal(rec.values, seen[0].values)
    both = seeds.stacked([hist, hist]).records["map"][0]
    assert both.underflow == {"values": 2} and both.values.shape == (2, 2, 2)


def test_a_cell_with_integer_parameters_is_not_trained():
    """A user's cell holding a fixed 0/1 mask among its params: training made it a float that
    Adam moved (0.977, 1.08), and a saved run read it back truncated to integers, other weights
    than the ones trained and recorded (maps 0.155 apart). Refused before anything runs."""
    def init(key, n_in, n_h, dtype):
        kw, ku = jax.random.split(key)
        return {"W": jax.random.normal(kw, (n_in, n_h), dtype) / 2,
                "U": jax.random.normal(ku, (n_h, n_h), dtype) / 4,
                "mask": (jnp.arange(n_h) % 2).astype(jnp.int32)}

    def step(p, h, x):
        h = jnp.tanh(x @ p["W"] + h @ p["U"]) * p["mask"]
        return h, h

    stack = gradflow.Stack(gradflow.cells.from_function(step, init, name="masked"), 2, 2, 4)
    with pytest.raises(ValueError, match=r"params\['layers'\]\[0\]\['mask'\] of the stack is "
                                         r"int32 \(a fixed mask or index of the cell\)"):
        train(stack, ADDING, steps=2, **COMMON)
