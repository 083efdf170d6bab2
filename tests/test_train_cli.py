"""``gradflow train``: a tiny run writes the learning curve and the recorded maps, and they
hold the numbers of the same run made through :func:`gradflow.train.train`; bad input exits 2
with one line."""
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import runs, tasks
from gradflow.problem import precision, task_stack
from gradflow.cli import main
from gradflow.jacobian import gradient_map
from gradflow.train import train

pytestmark = pytest.mark.child  # in-process work: the child lane runs it (tests/conftest.py)

TINY = ["train", "--task", "adding", "--seq-len", "6", "--cell", "star", "--layers", "3", "--hidden", "8",
        "--steps", "12", "--batch", "8", "--lr", "0.01", "--seed", "3", "--eval-every", "6",
        "--eval-batch", "16", "--record", "0,12", "--record-batch", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"  # created by the command
    code = main(TINY + ["--out", str(out)])
    return code, out


@pytest.fixture(scope="module")
def direct():
    """The same run through the library, in the CLI's 32-bit mode."""
    task = tasks.make("adding", steps=6)
    stack = task_stack("star", task, layers=3, hidden=8)
    record = {"gradient_map": lambda s, p, x: gradient_map(s, p, x, loss="last", wrt="hidden")}
    with precision("float32"):
        return train(stack, task, steps=12, batch=8, lr=0.01, seed=3, eval_every=6,
                     eval_batch=16, record_at=(0, 12), record=record, record_batch=4,
                     progress=False)


def test_tiny_run_writes_curve_and_maps(run, capsys):
    code, out = run
    assert code == 0
    for name in ("curve.npz", "curve.png", "map_step000000.npz", "map_step000012.npz",
                 "maps.png", "state.npz"):
        assert (out / name).is_file(), name
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_curve_equals_the_library_run(run, direct):
    _, out = run
    curve = gradflow.load(out / "curve.npz")
    assert curve.kind == "training"
    for key in ("step", "loss", "metric", "eval_step", "eval_loss", "eval_metric"):
        np.testing.assert_allclose(curve[key], direct.curve[key], rtol=1e-6, err_msg=key)
    assert curve["step"].tolist() == list(range(12))
    assert curve["eval_step"].tolist() == [0, 6, 12]
    c = curve.config
    assert (c["cell"], c["layers"], c["hidden_size"], c["train_steps"], c["lr"], c["seed"]) == (
        "star", 3, 8, 12, 0.01, 3)
    assert c["task"] == {"task": "adding", "steps": 6}
    # the evaluation loss at step 0 is mean(y^2): the zero head outputs 0 (independent check)
    from gradflow.train import eval_batch_of
    import jax
    import jax.numpy as jnp
    with precision("float32"):
        ys = np.asarray(eval_batch_of(tasks.make("adding", steps=6),
                                      jax.random.split(jax.random.key(3), 3)[2], 16, 8,
                                      jnp.float32)[1])
    assert curve["eval_loss"][0] == pytest.approx(np.mean(ys[:, -1, 0] ** 2), rel=1e-5)


def test_recorded_maps_are_the_maps_of_the_trained_params(run, direct):
    _, out = run
    for i, step in enumerate((0, 12)):
        m = gradflow.load(out / f"map_step{step:06d}.npz")
        assert m.kind == "gradient_map" and m.config["train_step"] == step
        assert m.values.shape == (3, 6)
        np.testing.assert_allclose(m.values, direct.records["gradient_map"][i].values,
                                   rtol=1e-5)
    # the final map, recomputed from the final params on the first 4 evaluation sequences
    from gradflow.train import eval_batch_of
    import jax
    import jax.numpy as jnp
    with precision("float32"):
        xs = eval_batch_of(tasks.make("adding", steps=6), jax.random.split(
            jax.random.key(3), 3)[2], 16, 8, jnp.float32)[0][:4]
        again = gradient_map(direct.stack, direct.params["stack"], xs, loss="last")
    np.testing.assert_allclose(gradflow.load(out / "map_step000012.npz").values, again.values,
                               rtol=1e-5)
    # training moved the map: the params changed between step 0 and step 12
    m0 = gradflow.load(out / "map_step000000.npz").values
    m12 = gradflow.load(out / "map_step000012.npz").values
    assert not np.allclose(m0, m12)


@pytest.mark.parametrize("extra,message", [
    (["--task", "nope"], "invalid choice: 'nope'"),
    (["--cell", "nope"], "unknown cell"),
    (["--steps", "0"], "positive"),
    (["--steps", "5", "--record", "0,6"], "--record steps must lie in 0..5"),
    (["--record", "a,b"], "comma-separated step numbers"),
    (["--lr", "-1"], "--lr and --clip must be positive"),
    (["--budget", "inf"], "argument --budget: must be a finite number, got 'inf'"),
    (["--task-option", "nope=3"], "unknown option"),
    (["--cell", "lstm", "--budget", "0.1"], "time gate"),
    (["--layers", "2", "--hidden", "4,4,4"], "got 3 widths for 2 layers"),
    (["--wrt", "cell"], "--wrt sets the maps that --record records; give --record STEPS"),
    (["--record-batch", "4", "--readout-seed", "3"],
     "--record-batch, --readout-seed set the maps that --record records"),
    (["--record", "2", "--record-batch", "8"],  # (it recorded on the 4, silently)
     "--record-batch 8 is more than the --eval-batch 4 sequences the maps are recorded on"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, message):
    code = main(["train", "--out", str(tmp_path / "x"), "--steps", "2", "--eval-batch", "4",
                 "--batch", "2", "--layers", "1", "--hidden", "4"] + extra)
    out, err = capsys.readouterr()
    assert code == 2
    assert message in err and err.count("\n") == 1, err
    # refused before anything starts: no header on stdout, no run folder made
    assert out == "" and not (tmp_path / "x").exists(), out


def test_a_run_too_large_for_memory_is_refused_before_its_folder(tmp_path, capsys,
                                                                   monkeypatch):
    """The memory check comes with the other checks: no header, no empty run folder."""
    from gradflow import cost

    monkeypatch.setattr(cost, "available_memory", lambda: 1000)
    code = main(["train", "--out", str(tmp_path / "x"), "--steps", "2", "--eval-batch", "4",
                 "--batch", "2", "--layers", "1", "--hidden", "4", "--seq-len", "4"])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("gradflow train: error: training (lstm, 1 layer, H=4, batch 2, eval "
                          "batch 4, sequences of 4 steps) needs about "), err
    assert out == "" and not (tmp_path / "x").exists()


def test_one_width_per_layer_trains_that_stack(tmp_path, capsys):
    out = tmp_path / "w"
    code = main(["train", "--out", str(out), "--steps", "2", "--eval-batch", "4", "--batch", "2",
                 "--seq-len", "4", "--layers", "2", "--hidden", "6,4"])
    assert code == 0, capsys.readouterr().err
    assert "H=6,4," in capsys.readouterr().out
    stack, params = runs.load_params(out)
    assert list(stack.widths) == [6, 4]
    assert stack.cells[0].name == "lstm"  # train's default cell
    assert params["layers"][1]["f"]["W"].shape == (6, 4)  # layer 1 reads layer 0's 6 units
    assert params["layers"][1]["f"]["U"].shape == (4, 4)


def test_one_cell_per_layer_trains_that_stack(tmp_path, capsys):
    """``--cell 'gru*2,star'`` trains the GRU/GRU/STAR stack: the library's run of that stack,
    saved with each layer's cell, which heatmap --params measures."""
    out = tmp_path / "mixed"
    code = main(["train", "--out", str(out), "--cell", "gru*2,star", "--layers", "3",
                 "--hidden", "6", "--steps", "3", "--batch", "4", "--seq-len", "5",
                 "--eval-every", "3", "--eval-batch", "4", "--seed", "2"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.startswith("gradflow train: gru x2 / star, 3 layers, H=6, on adding")
    assert "; 3 steps of batch 4," in printed.out.splitlines()[0]
    stack, params = runs.load_params(out)
    assert stack.config["cell"] == ["gru", "gru", "star"]
    task = tasks.make("adding", steps=5)
    with precision("float32"):
        want = train(task_stack(["gru", "gru", "star"], task, layers=3, hidden=6), task,
                     steps=3, batch=4, seed=2, eval_every=3, eval_batch=4, progress=False)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        want.params["stack"])
    for a, b in zip(jax.tree_util.tree_leaves(params),
                    jax.tree_util.tree_leaves(want.params["stack"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    code = main(["heatmap", "--params", str(out), "--out", str(tmp_path / "h.png")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.startswith("gradflow heatmap: gru x2 / star, 3 layers"), printed.out
    assert main(["heatmap", "--params", str(out), "--cell", "lstm"]) == 2  # named whole
    assert "the saved run fixes the stack (of 'gru x2 / star')" in capsys.readouterr().err
    code = main(["gains", "--params", str(out), "--out", str(tmp_path / "g.png")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.splitlines()[1] == f"trained parameters from {out} (step 3)"
    gains = gradflow.load(tmp_path / "g.npz")
    assert gains.config["train_step"] == 3 and gains["vertical_rms"].shape == (3, 5)
    from gradflow.train import run_eval_batch
    with precision("float32"):  # the trained stack on the run's own evaluation sequences
        xs = run_eval_batch(out, batch=gains.config["batch"])[0]
        want = gradflow.local_gains(stack, params, xs)
    for key in want.arrays:
        np.testing.assert_array_equal(gains[key], want[key], err_msg=key)


def test_a_new_run_in_a_used_folder_leaves_none_of_the_old_runs_maps(tmp_path, capsys):
    out = tmp_path / "d"
    small = ["--steps", "2", "--eval-batch", "4", "--batch", "2", "--seq-len", "4",
             "--layers", "2", "--hidden", "4", "--out", str(out)]
    assert main(["train", "--cell", "lstm", "--record", "0,2", *small]) == 0
    assert (out / "map_step000002.npz").is_file() and (out / "maps.png").is_file()
    assert main(["train", "--cell", "gru", *small]) == 2  # the run is not replaced unasked
    assert (f"{str(out)!r} holds a training run (saved at step 2); give --resume to continue "
            "it, --overwrite to replace it, or another --out") in capsys.readouterr().err
    assert runs.load_params(out)[0].cells[0].name == "lstm"
    assert main(["train", "--cell", "gru", *small, "--overwrite"]) == 0  # records nothing
    capsys.readouterr()
    assert not list(out.glob("map_step*")) and not (out / "maps.png").exists()
    assert runs.load_params(out)[0].cells[0].name == "gru"


def test_an_interrupted_run_resumes_to_the_uninterrupted_one(run, tmp_path, monkeypatch,
                                                             capsys):
    """`train --resume` goes on from the run's last save: its curve, recorded maps and trained
    parameters are those of the same run made in one go (the `run` fixture), bit for bit."""
    _, whole = run
    out = tmp_path / "run"
    real, calls = gradflow.jacobian.gradient_map, []

    def interrupted(*a, **k):  # the record at step 12 (after the save of step 6): Ctrl-C
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gradflow.jacobian, "gradient_map", interrupted)
    assert main(TINY + ["--out", str(out)]) == 130
    monkeypatch.undo()
    assert "interrupted" in capsys.readouterr().err
    assert runs.read_run(out)["step"] == 6 and not (out / "map_step000012.npz").exists()
    assert main(TINY + ["--out", str(out), "--resume"]) == 0
    assert "; resumed at step 6" in capsys.readouterr().out.splitlines()[0]
    for name in ("curve.npz", "map_step000000.npz", "map_step000012.npz"):
        a, b = gradflow.load(out / name), gradflow.load(whole / name)
        for key in a.arrays:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {key}")
    for a, b in zip(jax.tree_util.tree_leaves(runs.load_params(out)[1]),
                    jax.tree_util.tree_leaves(runs.load_params(whole)[1])):
        np.testing.assert_array_equal(a, b)
    # a finished run resumes to itself; other settings, or both flags, are refused
    assert main(TINY + ["--out", str(out), "--resume"]) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(gradflow.load(out / "curve.npz").loss,
                                  gradflow.load(whole / "curve.npz").loss)
    for extra, msg in (
            (["--resume", "--lr", "0.02"], f"cannot resume from {str(out)!r}: it was made with "
             "other settings: --lr (lr: the run's 0.01, now 0.02); give the run's, or "
             "--overwrite for a new run"),
            (["--resume", "--cell", "gru", "--seq-len", "5"], "settings: --cell (cell: the "
             "run's \"star\", now \"gru\"); --task, --seq-len, --task-option (eval_task: "),
            (["--resume", "--wrt", "params"], "with --wrt params: its maps were recorded with "
             "--wrt hidden, and a resumed run records as it did"),
            (["--resume", "--readout-seed", "2"], "recorded with --readout-seed 0"),
            (["--resume", "--overwrite"], "not allowed with argument")):
        assert main(TINY + ["--out", str(out), *extra]) == 2
        captured = capsys.readouterr()
        err = captured.err
        assert msg in err and len(err.strip().splitlines()) == 1, err
        assert captured.out == ""  # refused before the header (it said "resumed at step 12")
    # --resume where nothing is saved starts the run; a damaged state is named
    fresh = tmp_path / "fresh"
    small = ["train", "--steps", "2", "--eval-batch", "4", "--batch", "2", "--seq-len", "4",
             "--layers", "1", "--hidden", "4", "--out", str(fresh)]
    assert main(small + ["--resume"]) == 0
    assert "resumed" not in capsys.readouterr().out
    # the recorded maps' settings are the run's where not given (--record-batch 2 could not
    # be given without --record, and was refused as another record_batch without it)
    part = tmp_path / "part"
    assert main(small + ["--out", str(part), "--record", "0,2", "--record-batch", "2",
                         "--wrt", "cell"]) == 0
    assert main(small + ["--out", str(part), "--resume", "--steps", "4"]) == 0
    assert "; resumed at step 2" in capsys.readouterr().out
    # refused before the header, as the options given: another cell (not the maps' wrt=cell
    # it cannot have), another --eval-batch (not the --record-batch that follows from it),
    # --steps below the steps done (it said so after "resumed at step 4", as steps=)
    for extra, msg in (
            (["--cell", "gru"], "other settings: --cell (cell: the run's \"lstm\", now "
                                "\"gru\"); give"),
            (["--eval-batch", "1", "--record", "6"], "other settings: --eval-batch "
                                                     "(eval_batch: the run's 4, now 1); give"),
            (["--steps", "3"], "with --steps 3: the run has done 4; give --steps 4 or more")):
        assert main(small + ["--out", str(part), "--resume", "--steps", "6", *extra]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and msg in captured.err, captured.err
    # a damaged recorded map of the run is named (a stray record file is not the run's)
    damaged = tmp_path / "damaged"
    shutil.copytree(part, damaged)
    (damaged / "record-00099.npz").write_text("stray")
    assert main(small + ["--out", str(damaged), "--resume", "--steps", "4"]) == 0
    (damaged / "record-00000.npz").write_text("junk")
    assert main(small + ["--out", str(damaged), "--resume", "--steps", "4"]) == 2
    assert "its recorded map record-00000.npz cannot be read" in capsys.readouterr().err
    assert main(small + ["--out", str(part), "--resume", "--steps", "6", "--record",
                         "1,6"]) == 2
    assert ("--record asks for step(s) 1 before the run's saved step 4, which it did not "
            "record") in capsys.readouterr().err
    assert main(small + ["--out", str(part), "--resume", "--steps", "6", "--record",
                         "0,2,6"]) == 0
    capsys.readouterr()
    maps = [gradflow.load(part / f"map_step00000{s}.npz") for s in (0, 2, 6)]
    assert [(m.config["wrt"], m.config["batch"], m.config["train_step"]) for m in maps] == [
        ("cell", 2, 0), ("cell", 2, 2), ("cell", 2, 6)]
    # a run without maps: the maps' options still need --record
    assert main(small + ["--resume", "--steps", "4", "--wrt", "cell"]) == 2
    assert "--wrt sets the maps that --record records" in capsys.readouterr().err
    # a state.npz that is no run's: torn, a params file, a folder; --out a file
    (fresh / "state.npz").write_text("torn")
    for extra, msg in (([], "holds a state.npz that is no training run (its state.npz cannot "
                            "be read ("),
                       (["--resume"], "cannot resume from")):
        assert main(small + extra) == 2
        assert msg in capsys.readouterr().err
    assert main(small + ["--overwrite"]) == 0
    assert runs.read_run(fresh)["step"] == 2
    runs.save_params(fresh / "state.npz", *runs.load_params(fresh))
    assert main(small + ["--resume"]) == 2
    assert ("its state.npz is not a training run's (a params file, gradflow.runs.save_params?)"
            "; give --overwrite") in capsys.readouterr().err
    (fresh / "state.npz").unlink()
    (fresh / "state.npz").mkdir()
    for extra in ([], ["--overwrite"]):  # (--overwrite: an IsADirectoryError, status 1)
        assert main(small + extra) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and ("(its state.npz is not a file); remove it, or give "
                                       "another --out") in captured.err
    assert main(small[:-1] + [str(fresh / "state.npz" / ".." / ".." / "part" / "curve.npz")]
                ) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_a_resume_refuses_a_curve_not_saved_with_its_state(tmp_path, capsys):
    """`train --resume` restored whatever curve.npz lay beside the state: another seed's
    became the run's (saved again under its seed), an earlier save's left a gap in the steps.
    Refused in one line naming the file and what differs, before the header."""
    small = ["train", "--steps", "4", "--eval-every", "2", "--eval-batch", "4", "--batch",
             "2", "--seq-len", "4", "--layers", "2", "--hidden", "8", "--seed", "3"]
    for name, extra in (("run", []), ("seed4", ["--seed", "4"]), ("step2", ["--steps", "2"])):
        assert main(small + extra + ["--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    for source, msg in (
            ("seed4", "its curve.npz is another run's: it differs from its state.npz in seed "
                      "(the state's 3, the file's 4); a run is resumed from all its files"),
            ("step2", "its curve.npz holds steps 0..1, where its state.npz, saved at step 4, "
                      "needs steps 0..3")):
        mixed = tmp_path / f"run_{source}"
        shutil.copytree(tmp_path / "run", mixed)
        shutil.copyfile(tmp_path / source / "curve.npz", mixed / "curve.npz")
        assert main(small + ["--steps", "6", "--out", str(mixed), "--resume"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured
        assert f"gradflow train: error: cannot resume from {str(mixed)!r}: {msg}" in captured.err


def test_help_lists_train(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Trained weights back in: the run folder holds the stack and its parameters


def test_loaded_params_give_the_map_recorded_at_the_end_of_training(run, direct):
    """runs.load_params rebuilds the trained stack; its map on the run's first 4 evaluation
    sequences is the map recorded at the last step (12), and so is `heatmap --params`."""
    _, out = run
    recorded = gradflow.load(out / "map_step000012.npz")
    stack, params = runs.load_params(out)
    assert stack.config == direct.stack.config
    for a, b in zip(jax.tree_util.tree_leaves(params),
                    jax.tree_util.tree_leaves(direct.params["stack"])):
        np.testing.assert_array_equal(a, b)
    from gradflow.train import eval_batch_of, keys
    with precision("float32"):
        xs = eval_batch_of(tasks.make("adding", steps=6), keys(3)[2], 16, 8, jnp.float32)[0][:4]
        again = gradient_map(stack, params, xs, loss="last", wrt="hidden")
    np.testing.assert_array_equal(again.values, recorded.values)
    # the same through the command line, from the folder and from its state file
    for source, batch in ((out, ["--batch", "4"]), (out / "state.npz", [])):
        # (without --batch: the run's record batch, 4 here, so the same numbers)
        target = out.parent / f"trained_{source.name}.png"
        assert main(["heatmap", "--params", str(source), *batch, "--out", str(target)]) == 0
        measured = gradflow.load(target.with_suffix(".npz"))
        np.testing.assert_array_equal(measured.values, recorded.values)
        assert measured.config["train_step"] == 12 and measured.config["cell"] == "star"
        # the run's settings travel with the result, as with the recorded maps
        assert measured.config["training"] == recorded.config["training"]
        assert measured.config["training"]["lr"] == 0.01


def test_gates_of_the_trained_params(run, capsys):
    """`gradflow gates --params RUN`: the statistics of the trained gates on the run's first
    record-batch evaluation sequences, as gates.saturation gives them from load_params."""
    from gradflow import gates
    from gradflow.train import eval_batch_of, keys

    _, out = run
    stack, params = runs.load_params(out)
    with precision("float32"):
        xs = eval_batch_of(tasks.make("adding", steps=6), keys(3)[2], 16, 8, jnp.float32)[0][:4]
        expect = gates.saturation(stack, params, xs)
    target = out.parent / "gates_trained.png"
    capsys.readouterr()
    assert main(["gates", "--params", str(out), "--out", str(target)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"trained parameters from {out} (step 12)"
    stats = gradflow.load(target.with_suffix(".npz"))
    assert stats.config["train_step"] == 12 and stats.config["batch"] == 4
    for key in ("mean/k", "saturated/k", "slope/k", "timescale/k/unit", "hist/k"):
        np.testing.assert_array_equal(stats[key], expect[key])
    # the saved stack's cell is checked as --cell's is
    capsys.readouterr()
    assert main(["gates", "--params", str(out), "--gate", "f", "--dry-run"]) == 2
    assert "has no gate 'f'; its gates: k" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--layers", "5"], "--layers cannot be used with --params"),
    (["--cell", "gru", "--residual"], "--cell, --residual cannot be used with --params"),
    (["--cell", "lstm"], "--cell cannot be used with --params: the saved run fixes the stack "
                         "(of 'star')"),  # the default's name, given: not ignored
    (["--steps", "9"], "--steps cannot be used with a training run's --params"),
    (["--batch", "17"], "more than the 16 evaluation sequences of the run at"),
])
def test_params_conflicts_exit_2(run, capsys, extra, message):
    _, out = run
    capsys.readouterr()
    code = main(["heatmap", "--params", str(out), "--no-data", "--out",
                 str(out.parent / "x.png")] + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_params_that_are_not_there_exit_2(tmp_path, capsys):
    assert main(["heatmap", "--params", str(tmp_path / "nothing")]) == 2
    assert "no trained parameters at" in capsys.readouterr().err
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert main(["heatmap", "--params", str(tmp_path / "bad.npz")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_the_task_option_steps_sets_the_sequence_length(tmp_path, capsys):
    """--task-option steps=7 (the adding task's one option) failed on every call: the option
    collided with tasks.for_length's own steps argument."""
    out = tmp_path / "s"
    code = main(["train", "--task", "adding", "--task-option", "steps=7", "--out", str(out),
                 "--steps", "2", "--eval-batch", "4", "--batch", "2", "--layers", "1",
                 "--hidden", "4"])
    assert code == 0, capsys.readouterr().err
    config = gradflow.load(out / "curve.npz").config
    assert config["task"] == {"task": "adding", "steps": 7} == dict(config["eval_task"])
    assert tasks.for_length("adding", None, steps=7) == tasks.make("adding", steps=7)
    with pytest.raises(ValueError, match="give only one of the two, or two that agree"):
        tasks.for_length("adding", 6, steps=7)


def test_every_file_the_run_writes_is_listed(tmp_path, capsys):
    out = tmp_path / "run"
    small = [a if a not in ("12", "0,12") else {"12": "4", "0,12": "0,4"}[a] for a in TINY]
    assert main(small + ["--eval-every", "2", "--out", str(out)]) == 0
    wrote = {Path(line.split(" ", 1)[1]).name
             for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")}
    assert wrote == {p.name for p in out.iterdir()}
    assert {"record-00000.npz", "record-00001.npz", "state.npz"} <= wrote


def test_the_cost_of_a_trained_run_is_estimated_at_its_own_sizes(run, capsys):
    """`--dry-run --params RUN` estimates the run's sequence length and batch (here T = 6,
    B = 4), not the command's defaults (T = 32: an over- or underestimate by the ratio)."""
    from gradflow import cost

    _, out = run
    stack, _ = runs.load_params(out)
    capsys.readouterr()
    assert main(["heatmap", "--params", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    expect = cost.estimate(stack, 4, 6, "float32", "hidden", calibrate=False)
    assert f"memory:  {cost.size(expect.total)} at the peak" in printed
    assert cost.size(expect.total) != cost.size(
        cost.estimate(stack, 4, 32, "float32", "hidden", calibrate=False).total)


def test_compare_trained_runs_side_by_side(run, tmp_path, capsys):
    """`compare --params A,B --losses task,last`: each run's maps on its own evaluation
    sequences, as `heatmap --params` gives them (the probe loss of one run, the run's own loss
    of the other); a params file (Gaussian inputs at --steps) beside a run, noted; the table
    names each run's source."""
    _, out = run
    other = tmp_path / "lstm_run"
    assert main([*TINY[:6], "lstm", *TINY[7:-4], "--out", str(other)]) == 0
    capsys.readouterr()
    fig = tmp_path / "both.png"
    assert main(["compare", "--params", f"{out},{other}", "--losses", "task,last", "--wrt",
                 "hidden", "--out", str(fig)]) == 0
    printed = capsys.readouterr().out
    assert f"  run: star, 3 layers x 6 steps, H=8, B=4, seed 3, trained (step 12 of {out})" \
        in printed.replace(f"{out.name}: ", "run: ")
    assert printed.count("; loss task: adding: regression (mse) at the last step") == 2
    # each run's own record batch: 4 and 16 sequences, said (inputs alike: no other note)
    assert (f"note: the maps are over different numbers of sequences ({out.name}: B=4, "
            f"{other.name}: B=16)") in printed and printed.count("note:") == 1
    both = gradflow.load(fig.with_suffix(".npz"))
    assert both.config["cells"] == [out.name, other.name] and both.config["init"] is None
    assert both.config["losses"] == ["task", "last"]
    assert both.config["maps"][f"task/{other.name}"]["loss"] == "task"
    assert fig.read_bytes()[:4] == b"\x89PNG"
    for loss, label, source in (("last", out.name, out), ("task", other.name, other)):
        one = tmp_path / f"{label}_{loss}.png"
        assert main(["heatmap", "--params", str(source), "--loss", loss, "--out",
                     str(one)]) == 0
        np.testing.assert_array_equal(both[f"values/{loss}/{label}"],
                                      gradflow.load(one.with_suffix(".npz")).values)
    # a params file beside a run: Gaussian inputs at compare's --steps (default 10)
    stack, params = runs.load_params(out)
    saved = runs.save_params(tmp_path / "star_params.npz", stack, params)
    assert main(["compare", "--params", f"{saved},{other}", "--losses", "last", "--wrt",
                 "hidden", "--out", str(tmp_path / "mixed.png")]) == 0
    assert ("note: star_params is a params file measured on Gaussian inputs, the runs on "
            "their tasks' evaluation sequences") in capsys.readouterr().out
    mixed = gradflow.load(tmp_path / "mixed.npz")
    assert mixed["values/last/star_params"].shape == (3, 10)
    assert mixed.config["steps"] is None and mixed.config["layers"] == 3
    assert mixed[f"values/last/{other.name}"].shape == (3, 6)


@pytest.mark.parametrize("extra,message", [
    (["--cells", "lstm,gru"], "--cells cannot be used with --params"),
    (["--layers", "5"], "--layers cannot be used with --params"),
])
def test_compare_params_conflicts_exit_2(run, capsys, extra, message):
    _, out = run
    capsys.readouterr()
    code = main(["compare", "--params", str(out), "--dry-run"] + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_the_task_loss_map_of_a_trained_run(run, tmp_path, capsys):
    """`heatmap --params RUN --loss task`: the gradient of the run's own loss (MSE of its
    trained readout on the evaluation targets). Independent checks: over the whole evaluation
    batch its value is the curve's last evaluation loss (computed by training), and its
    top-last entry is the closed form mean_b 2 |o_b - y_b| ||W|| / B of the MSE on the last
    step."""
    from gradflow.train import eval_batch_of, keys

    _, out = run
    curve = gradflow.load(out / "curve.npz")
    fig = tmp_path / "task.png"
    capsys.readouterr()
    assert main(["heatmap", "--params", str(out), "--loss", "task", "--batch", "16", "--out",
                 str(fig)]) == 0
    printed = capsys.readouterr().out
    assert "loss task (value " in printed and ("adding: regression (mse) at the last step, "
                                               "trained readout, on the first 16 of the run's "
                                               "16 evaluation sequences") in printed
    res = gradflow.load(fig.with_suffix(".npz"))
    assert res.config["loss"] == "task" and res.config["train_step"] == 12
    assert float(res.loss_value) == pytest.approx(float(curve["eval_loss"][-1]), rel=1e-5)
    stack, params = runs.load_params(out)
    head = runs.load_head(out)
    with precision("float32"):
        xs, ys, _ = eval_batch_of(tasks.make("adding", steps=6), keys(3)[2], 16, 8, jnp.float32)
        top = np.asarray(stack.apply(params, xs).states["h"][-1, :, -1])
    o = top @ head["W"][:, 0] + head["b"][0]
    closed = np.mean(2 * np.abs(o - np.asarray(ys)[:, -1, 0]) * np.linalg.norm(head["W"]) / 16)
    assert float(res.values[-1, -1]) == pytest.approx(closed, rel=1e-5)
    # not a random probe: a readout seed has nothing to set (refused, not ignored)
    capsys.readouterr()
    assert main(["heatmap", "--params", str(out), "--loss", "task", "--readout-seed", "5",
                 "--dry-run"]) == 2
    assert "--loss task reads through the run's trained readout" in capsys.readouterr().err


def test_the_task_loss_needs_a_training_run(run, tmp_path, capsys):
    _, out = run
    stack, params = runs.load_params(out)
    saved = runs.save_params(tmp_path / "p.npz", stack, params)
    for extra, message in (([], "--loss task is a training run's own loss: give the run with "
                                "--params RUN"),
                           (["--params", saved], "is a params file, with no readout")):
        capsys.readouterr()
        assert main(["heatmap", "--loss", "task", "--dry-run", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(gradflow.errors.InputError, match="holds no trained readout"):
        runs.load_head(saved)


def test_the_task_loss_of_a_copy_run_enters_at_its_recall_steps(tmp_path, capsys):
    """A copy run (its saved task has a derived length: every --params command failed on
    it) measured under its own loss, cross-entropy on the recall steps: the value over the
    whole evaluation batch is the run's last evaluation loss; the summary starts at the first
    recall step (the gradient carried back across the lag), and wrt c nothing counts as
    underflow that is 0 by construction."""
    out = tmp_path / "copy"
    assert main(["train", "--task", "copy", "--seq-len", "9", "--task-option", "symbols=3",
                 "--cell", "lstm", "--layers",
                 "2", "--hidden", "8", "--steps", "4", "--batch", "8", "--eval-every", "4",
                 "--eval-batch", "16", "--out", str(out)]) == 0
    task = tasks.make("copy", lag=2, symbols=3)  # T = 2 * 3 + 2 + 1 = 9: recall t 6..8
    curve = gradflow.load(out / "curve.npz")
    assert curve.config["task"] == task.config
    capsys.readouterr()
    fig = tmp_path / "copy_task.png"
    assert main(["heatmap", "--params", str(out), "--loss", "task", "--batch", "16", "--out",
                 str(fig)]) == 0
    printed = capsys.readouterr().out
    assert "copy: classification (accuracy) at t 6..8 (3 scored steps)" in printed
    assert ("from where the loss enters: layer 1, t 6 (top layer, the first step the loss "
            "scores; it enters at later steps too)") in printed
    res = gradflow.load(fig.with_suffix(".npz"))
    assert float(res.loss_value) == pytest.approx(float(curve["eval_loss"][-1]), rel=1e-5)
    capsys.readouterr()
    assert main(["gates", "--params", str(out), "--out", str(tmp_path / "x.png")]) == 0
    assert main(["heatmap", "--params", str(out), "--loss", "task", "--wrt", "cell", "--out",
                 str(tmp_path / "c.png")]) == 0
    assert "underflow entries: 0 of 18" in capsys.readouterr().out


def test_the_readme_api_recipe_for_a_runs_own_loss(run, tmp_path):
    """The README's API recipe: run_eval_batch, load_params, load_head, task_loss; over the
    whole evaluation batch the loss is the run's last evaluation loss (computed by training),
    and the map equals heatmap --params RUN --loss task --batch 16."""
    _, out = run
    with precision("float32"):
        xs, ys, mask, task = gradflow.train.run_eval_batch(out)
        res = gradflow.gradient_map(*runs.load_params(out), xs, loss=gradflow.train.task_loss(
            runs.load_head(out), task, ys, mask))
    curve = gradflow.load(out / "curve.npz")
    assert xs.shape[0] == 16 and task.name == "adding"
    assert float(res.loss_value) == pytest.approx(float(curve["eval_loss"][-1]), rel=1e-5)
    fig = tmp_path / "cli.png"
    assert main(["heatmap", "--params", str(out), "--loss", "task", "--batch", "16", "--out",
                 str(fig)]) == 0
    np.testing.assert_allclose(gradflow.load(fig.with_suffix(".npz")).values, res.values,
                               rtol=1e-6)
    stack, params = runs.load_params(out)
    saved = runs.save_params(tmp_path / "p.npz", stack, params)
    for bad, message in (((saved,), "is a params file"), ((out, None, 17), "in 1..16")):
        with pytest.raises(gradflow.errors.InputError, match=message):
            gradflow.train.run_eval_batch(*bad)
    # a grid of the trained weights titled by their source, given as meta
    from gradflow import experiments, plot

    grid = experiments.map_grid({"run": (stack, params, xs)}, "last",
                                meta={"params": str(out), "train_step": 12})
    assert f"trained (step 12 of {out})" in plot.draw_grid(grid).get_suptitle()


def test_a_trained_run_on_your_own_sequences(run, tmp_path, capsys):
    """``heatmap --params RUN --inputs xs.npy``: the run's trained stack on those sequences
    instead of its evaluation batch; its own loss needs its targets (refused)."""
    _, out = run
    stack, params = runs.load_params(out)
    xs = np.random.default_rng(0).uniform(size=(3, 5, stack.input_size)).astype(np.float32)
    np.save(tmp_path / "xs.npy", xs)
    with precision("float32"):
        expect = gradient_map(stack, params, xs, loss="last", wrt="hidden").values
    target = tmp_path / "mine.png"
    assert main(["heatmap", "--params", str(out), "--inputs", str(tmp_path / "xs.npy"),
                 "--out", str(target)]) == 0
    measured = gradflow.load(target.with_suffix(".npz"))
    np.testing.assert_array_equal(measured.values, expect)
    assert measured.config["train_step"] == 12 and measured.config["steps"] == 5
    capsys.readouterr()
    assert main(["heatmap", "--params", str(out), "--inputs", str(tmp_path / "xs.npy"),
                 "--loss", "task"]) == 2
    assert "--loss task reads a training run's own targets" in capsys.readouterr().err


def test_float64_from_a_32_bit_process(tmp_path, capsys):
    """``--dtype float64`` runs in 64-bit JAX without the caller enabling it (the API asks the
    caller; the command line cannot), leaves the process's mode as it was, and equals the
    library's float64 run."""
    assert not jax.config.jax_enable_x64
    argv = TINY[:-4] + ["--record", "12", "--dtype", "float64", "--out", str(tmp_path / "r64")]
    assert main(argv) == 0, capsys.readouterr().err
    assert not jax.config.jax_enable_x64
    curve = gradflow.load(tmp_path / "r64" / "curve.npz")
    task = tasks.make("adding", steps=6)
    with precision("float64"):
        want = train(task_stack("star", task, layers=3, hidden=8), task, steps=12, batch=8,
                     lr=0.01, seed=3, eval_every=6, eval_batch=16, dtype="float64",
                     progress=False)
    assert curve["loss"].dtype == np.float64
    np.testing.assert_allclose(curve["loss"], want.curve["loss"], rtol=1e-12)
    # the command train suggests measures the run in its own dtype: its last recorded map
    out = capsys.readouterr().out
    follow = out.strip().splitlines()[-1].split(": ", 1)[1].split()
    assert follow[:3] == ["gradflow", "heatmap", "--params"], out
    assert main(follow[1:] + ["--out", str(tmp_path)]) == 0, capsys.readouterr().err
    assert "float64" in capsys.readouterr().out
    res = gradflow.load(next(tmp_path.glob("heatmap_*.npz")))
    recorded = gradflow.load(tmp_path / "r64" / "map_step000012.npz")
    assert res.values.dtype == np.float64
    np.testing.assert_array_equal(res.values, recorded.values)


def test_the_suggested_command_repeats_the_recorded_maps_settings(tmp_path, capsys):
    """train's closing line measures what it recorded: the maps' --wrt, loss and readout seed
    (a heatmap with the defaults measured another map), with a folder name quoted for a
    shell; --out '' (an unset variable) is refused: it wrote into the current folder and
    deleted its maps."""
    out_dir = tmp_path / "my run"
    argv = ["train", "--task", "adding", "--seq-len", "5", "--cell", "lstm", "--layers", "2",
            "--hidden", "4", "--steps", "3", "--batch", "4", "--eval-batch", "4", "--record",
            "3", "--wrt", "cell", "--record-loss", "all", "--readout-seed", "2"]
    assert main(argv + ["--out", str(out_dir)]) == 0, capsys.readouterr().err
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(f"--params '{out_dir}' --wrt cell --loss all --readout-seed 2"), last
    assert main(["heatmap", "--params", str(out_dir), "--wrt", "cell", "--loss", "all",
                 "--readout-seed", "2", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(gradflow.load(next(tmp_path.glob("heatmap_*.npz"))).values,
                                  gradflow.load(out_dir / "map_step000003.npz").values)
    assert main(argv + ["--out", ""]) == 2
    assert "argument --out: is empty" in capsys.readouterr().err


def test_a_damaged_curve_is_named_on_resume(run, tmp_path, capsys):
    """A run whose curve is gone or damaged cannot be resumed: one line naming the file (it
    was reported as a bug in gradflow)."""
    _, out = run
    for damage in ("remove", "junk"):
        copy = tmp_path / damage
        shutil.copytree(out, copy)
        if damage == "remove":
            (copy / "curve.npz").unlink()
        else:
            (copy / "curve.npz").write_text("junk")
        argv = TINY[:TINY.index("--steps")] + ["--steps", "14"] + TINY[TINY.index("--steps") + 2:]
        assert main(argv + ["--out", str(copy), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "cannot resume from" in err and "curve.npz" in err and "internal" not in err, err


def test_a_diverged_run_says_so_below_its_table(tmp_path, capsys):
    """The table of a run whose loss left the finite numbers read nan with nothing said (the
    command exits 0: the numbers are data); one line now counts them and names the remedy."""
    code = main(["train", "--task", "adding", "--seq-len", "4", "--cell", "lstm", "--layers",
                 "1", "--hidden", "4", "--steps", "3", "--batch", "4", "--eval-batch", "4",
                 "--lr", "1e30", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    curve = gradflow.load(tmp_path / "run" / "curve.npz")
    n, m = int(np.sum(~np.isfinite(curve["loss"]))), int(np.sum(~np.isfinite(curve["eval_loss"])))
    assert code == 0 and n >= 1 and m >= 1
    first = int(np.flatnonzero(~np.isfinite(curve["loss"]))[0])
    assert (f"non-finite losses: {n} of 3 training losses, {m} of 4 evaluation losses (first "
            f"at step {first}): the run diverged; a smaller --lr or --clip may hold it") in out


def test_a_cells_options_are_named_as_given_either_way(tmp_path, capsys):
    """``--cell lstm --option forget_bias=1.0`` was headed (and its curve titled) ``lstm``,
    as the default cell's run; both spellings now say ``lstm:forget_bias=1.0``."""
    lines = []
    for i, cell in enumerate((["--cell", "lstm", "--option", "forget_bias=1.0"],
                              ["--cell", "lstm:forget_bias=1.0"])):
        assert main(["train", "--out", str(tmp_path / str(i)), *cell, "--steps", "1",
                     "--eval-batch", "4", "--batch", "2", "--layers", "1", "--hidden", "4",
                     "--seq-len", "4"]) == 0
        lines.append(capsys.readouterr().out.splitlines()[0])
    assert lines[0] == lines[1] and lines[0].startswith(
        "gradflow train: lstm:forget_bias=1.0 x 1 layer, H=4, on adding (T=4, mse); 1 step of")
