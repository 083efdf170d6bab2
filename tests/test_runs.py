"""Run folders (gradflow.runs): leaves named by their pytree path, the first format still
read, and trained weights back in as (stack, params) equal to what was trained or saved."""
import dataclasses
import json

import jax
import numpy as np
import pytest

import gradflow
from gradflow import cells, runs, tasks
from gradflow.errors import InputError
from gradflow.train import train

ADDING = tasks.make("adding", steps=5)
STACK = gradflow.Stack("lstm", layers=2, input_size=2, hidden_size=4)
OPTS = dict(steps=4, batch=4, eval_batch=8, eval_every=2, lr=1e-2, progress=False)


def _equal_trees(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, train(STACK, ADDING, run_dir=run_dir, **OPTS)


def test_state_leaves_are_named_by_their_pytree_path(finished):
    run_dir, hist = finished
    with np.load(run_dir / "state.npz") as f:
        names = set(f.files)
        meta = json.loads(str(f["__meta__"]))
        w = f["['params']['stack']['layers'][1]['f']['U']"]
    assert "['params']['head']['W']" in names
    assert any(n.startswith("['opt_state']") and n.endswith(".mu") for n in names)
    assert not any(n.startswith("leaf") for n in names)
    np.testing.assert_array_equal(w, hist.params["stack"]["layers"][1]["f"]["U"])
    assert meta["step"] == 4 and meta["format"] == runs.FORMAT
    assert meta["stack"] == json.loads(json.dumps(STACK.config)) and meta["config"]["train_steps"] == 4


def test_load_params_gives_the_trained_stack_and_params(finished):
    run_dir, hist = finished
    stack, params = runs.load_params(run_dir)
    assert stack.config == STACK.config
    _equal_trees(params, hist.params["stack"])
    assert jax.tree_util.tree_leaves(params)[0].dtype == np.float32


def test_a_first_format_state_is_still_read(finished, tmp_path):
    """leaf00000 = every parameter raveled into one vector, then the optimiser's leaves in
    order: a finished run in that format resumes to the same parameters."""
    run_dir, hist = finished
    old = tmp_path / "old"
    old.mkdir()
    meta, arrays = runs.read_state(run_dir)
    params = {"stack": hist.params["stack"], "head": hist.params["head"]}
    theta = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(params)])
    opt = [v for k, v in arrays.items() if k.startswith("['opt_state']")]
    legacy = {f"leaf{i:05d}": a for i, a in enumerate([theta] + opt)}
    np.savez(old / "state.npz", __meta__=np.array(json.dumps(
        {k: v for k, v in meta.items() if k in ("step", "config", "records")})), **legacy)
    (old / "curve.npz").write_bytes((run_dir / "curve.npz").read_bytes())
    again = train(STACK, ADDING, run_dir=old, resume=True, **OPTS)
    _equal_trees(again.params, hist.params)
    np.testing.assert_array_equal(again.curve.loss, hist.curve.loss)


def test_save_params_round_trip_with_residual_norm_and_projection(tmp_path):
    stack = gradflow.Stack("refined_lstm", layers=3, input_size=3, hidden_size=4,
                           residual=True, norm="layer", input_projection=True)
    params = stack.init(jax.random.key(1))
    path = runs.save_params(tmp_path / "p.npz", stack, params)
    with np.load(path) as f:
        assert "['norm'][2]['bias']" in f.files and "['input']['W']" in f.files
    loaded_stack, loaded = runs.load_params(path)
    assert loaded_stack == stack  # options back as tuples: the very same registered cell
    _equal_trees(loaded, params)
    # a path without .npz is written as path.npz (np.savez added it to the temporary file,
    # and the rename failed, leaving it behind); a path that cannot be written: one line
    plain = runs.save_params(tmp_path / "weights", stack, params)
    assert plain == str(tmp_path / "weights.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npz", "weights.npz"]
    _equal_trees(runs.load_params(plain)[1], params)
    with pytest.raises(ValueError, match="cannot write '/proc/nope/w.npz'"):
        runs.save_params("/proc/nope/w.npz", stack, params)


def test_stacks_of_several_cells_and_users_cells(tmp_path):
    mixed = gradflow.Stack(["gru", "mgu"], layers=2, input_size=4, hidden_size=4)
    assert runs.stack_from_config(mixed.config).config == mixed.config
    mine = dataclasses.replace(cells.get("rnn"), name="my_rnn")
    stack = gradflow.Stack(mine, layers=2, input_size=3, hidden_size=4)
    path = runs.save_params(tmp_path / "mine.npz", stack, stack.init(jax.random.key(0)))
    with pytest.raises(InputError, match="'my_rnn' is not a registered cell.*cell="):
        runs.load_params(path)
    again, params = runs.load_params(path, cell=mine)
    assert again == stack


def test_arrays_that_do_not_fit_are_named(tmp_path):
    small = gradflow.Stack("lstm", layers=1, input_size=2, hidden_size=3)
    big = gradflow.Stack("lstm", layers=1, input_size=2, hidden_size=5)
    arrays = runs.named_leaves(small.init(jax.random.key(0)))
    template = jax.eval_shape(big.init, jax.random.key(0))
    with pytest.raises(InputError, match=r"\['layers'\]\[0\]\['[a-z]+'\]\['[A-Za-z]+'\] has shape"):
        runs.unflatten_named(template, arrays)
    with pytest.raises(InputError, match="no trained parameters at"):
        runs.load_params(tmp_path / "missing")


def test_a_file_that_is_not_an_npz_is_named_as_such(tmp_path):
    """A file of other bytes was reported in NumPy's words about pickled data."""
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    with pytest.raises(InputError, match=r"junk.npz': it is not an .npz \(zip\) file; a run "
                                         r"state or params file is what gradflow train"):
        runs.load_params(junk)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.ones(3))
    with pytest.raises(InputError, match="is not a gradflow run state or params file"):
        runs.load_params(other)


def test_a_result_of_g_lstm_at_another_length_rebuilds_its_cell(tmp_path):
    """g-LSTM's own option `steps` (its time gates' range) is not the measured sequence length
    that a result's config records under `steps`: it is kept under cell_options too, so the
    config rebuilds the very cell (it rebuilt one over 10 steps: maps off by up to 110%)."""
    cell = gradflow.cells.get("g_lstm", steps=50)
    pr = gradflow.problem(cell, layers=2, steps=10, hidden=8, batch=2, seed=1)
    res = gradflow.gradient_map(pr.stack, pr.params, pr.xs, meta=pr.config)
    assert res.config["steps"] == 10 and res.config["cell_options"]["steps"] == 50
    again = gradflow.load(res.save(tmp_path / "g.npz"))  # through JSON
    assert runs.stack_from_config(again.config) == pr.stack
    # a cell without such an option keeps its flat config
    assert "cell_options" not in gradflow.Stack("lstm", 2, 3, 4).config


def test_a_results_config_rebuilds_the_stack_it_measured():
    """stack_from_config reads a result's config too: the cell's own options among its keys
    (it refused the sizes and the measurement's settings as unknown cell options)."""
    from gradflow import gates

    pr = gradflow.problem("lstm", layers=2, steps=3, hidden=4, batch=2, forget_bias=1.0,
                          stack_options={"residual": True, "norm": "rms"})
    for res in (gradflow.gradient_map(*pr[:3], meta=pr.config),
                gradflow.jacobian_map(*pr[:3], meta=pr.config),
                gates.saturation(*pr[:3], meta=pr.config)):
        assert runs.stack_from_config(res.config) == pr.stack, res.kind


def test_the_cells_given_must_be_the_saved_ones_layer_by_layer(tmp_path):
    """load_params(cell=...) with a user's cell of another name measured that cell silently
    (its parameters fit); a per-layer stack is checked layer by layer, a lone cell for each."""
    from gradflow.cells import Cell

    rnn = gradflow.cells.get("rnn")
    a, b = (Cell(name=n, init_fn=rnn.init_fn, recur_fn=rnn.recur_fn) for n in ("user", "other"))
    both = gradflow.Stack([a, b], 2, 3, 4)
    runs.save_params(tmp_path / "both.npz", both, both.init(jax.random.key(0)))
    assert runs.load_params(tmp_path / "both.npz", cell=[a, b])[0].config == both.config
    for cell, given in (([b, a], "cells are 'other', 'user'"), (b, "cell is 'other'"),
                        ([a, a], "cell is 'user'")):
        with pytest.raises(InputError, match=f"the saved stack's cells are 'user', 'other', "
                                             f"the given {given}:"):
            runs.load_params(tmp_path / "both.npz", cell=cell)
    one = gradflow.Stack(a, 2, 3, 4)
    runs.save_params(tmp_path / "one.npz", one, one.init(jax.random.key(0)))
    assert runs.load_params(tmp_path / "one.npz", cell=[a, a])[0].cells == (a, a)
    with pytest.raises(InputError, match="the saved stack's cell is 'user', the given cell is 'other'"
                                         ": give the cell it was saved with"):
        runs.load_params(tmp_path / "one.npz", cell=b)


def test_a_torch_files_biases_are_read_at_the_dtype_asked(tmp_path, x64):
    """float64 from a float32 state dict: the two biases, kept apart (``biases=2``), each cast
    exactly, so the step adds them in float64 (summed first, they were rounded to float32 and
    cast: 3.6e-10 from torch's float64); a gradflow file is cast."""
    rng = np.random.default_rng(0)
    H = 3
    sd = {"weight_ih_l0": rng.normal(size=(4 * H, 2)), "weight_hh_l0": rng.normal(size=(4 * H, H)),
          "bias_ih_l0": rng.normal(size=4 * H), "bias_hh_l0": rng.normal(size=4 * H)}
    np.savez(tmp_path / "torch.npz", **{k: v.astype(np.float32) for k, v in sd.items()})
    _, p = runs.load_params(tmp_path / "torch.npz", dtype=np.float64)
    f = p["layers"][0]["f"]
    for name, key in (("b", "bias_ih_l0"), ("b_hh", "bias_hh_l0")):
        want = sd[key].astype(np.float32).astype(np.float64)[H:2 * H]
        assert f[name].dtype == np.float64 and np.array_equal(f[name], want)
    assert runs.load_params(tmp_path / "torch.npz")[1]["layers"][0]["f"]["b"].dtype == np.float32
    stack = gradflow.Stack("gru", 1, 2, H)
    runs.save_params(tmp_path / "ours.npz", stack, stack.init(jax.random.key(0)))
    _, p = runs.load_params(tmp_path / "ours.npz", dtype=np.float64)
    assert {a.dtype for a in jax.tree_util.tree_leaves(p)} == {np.dtype(np.float64)}
