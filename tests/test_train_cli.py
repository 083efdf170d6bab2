"""``gradflow train``: a tiny run writes the learning curve and the recorded maps, and they
hold the numbers of the same run made through :func:`gradflow.train.train`; bad input exits 2
with one line."""
import numpy as np
import pytest

import gradflow
from gradflow import figures, tasks
from gradflow.cli import main
from gradflow.jacobian import gradient_map
from gradflow.train import train

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
    stack = figures.task_stack("star", task, layers=3, hidden=8)
    record = {"gradient_map": lambda s, p, x: gradient_map(s, p, x, loss="last", wrt="hidden")}
    with figures.precision("float32"):
        return train(stack, task, steps=12, batch=8, lr=0.01, seed=3, eval_every=6,
                     eval_batch=16, record_at=(0, 12), record=record, record_batch=4,
                     progress=False)


def test_tiny_run_writes_curve_and_maps(run, capsys):
    code, out = run
    assert code == 0
    for name in ("curve.npz", "curve.png", "map_step000000.npz", "map_step000012.npz",
                 "maps.png"):
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
    with figures.precision("float32"):
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
    with figures.precision("float32"):
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
    (["--task-option", "nope=3"], "unknown option"),
    (["--cell", "lstm", "--budget", "0.1"], "time gate"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, message):
    code = main(["train", "--out", str(tmp_path / "x"), "--steps", "2", "--eval-batch", "4",
                 "--batch", "2", "--layers", "1", "--hidden", "4"] + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1, err


def test_help_lists_train(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
