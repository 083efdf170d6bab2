"""Tests for gradflow.experiments (and the problem rules it builds on, gradflow.problem): each
packed Result holds exactly what the measurement gives when run by hand on the same problem,
the unpacking functions give it back, bad input is named, and nothing here draws."""
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import cells, experiments, gates, jacobian, tasks
from gradflow.problem import cell_problem, precision, task_stack
from gradflow.results import make_result

SMALL = dict(layers=2, steps=3, hidden=6, batch=2)


# --- problem rules ------------------------------------------------------------------------------


def test_cell_problem_passes_options_to_the_cell_and_sizes_time_gates():
    def options(prob):
        return dict(prob.stack.cell.options)

    prob = cell_problem("g_lstm", layers=1, steps=7, hidden=4, init="glorot")
    assert (options(prob)["steps"], options(prob)["init"]) == (7, "glorot")  # cell's steps = T
    mu = np.asarray(prob.params["layers"][0]["time"]["mu"])
    assert 0.0 <= mu.min() and mu.max() < 7.0  # mu ~ U[0, T)
    prob = cell_problem("g_lstm", layers=1, steps=7, hidden=4, options={"steps": 20})
    assert options(prob)["steps"] == 20  # an explicit option wins
    prob = cell_problem("refined_lstm", layers=1, steps=2, hidden=4, input_size=3)
    assert prob.stack.input_projection  # refined cells need D == H: projected automatically


def test_task_stack_reads_the_task_and_sizes_time_gates():
    task = tasks.make("adding", steps=12)
    stack = task_stack("g_lstm", task, layers=3, hidden=5, init="glorot")
    assert (stack.layers, stack.input_size, stack.hidden_size) == (3, task.input_size, 5)
    assert (stack.cell.config["steps"], stack.cell.config["init"]) == (12, "glorot")
    assert task_stack("g_lstm", task, layers=1, hidden=5, cell_steps=4).cell.config["steps"] == 4
    assert task_stack("lstm", "adding", layers=1, hidden=5).input_size == task.input_size
    with pytest.raises(ValueError, match="unknown cell 'nope'"):
        task_stack("nope", task, layers=1, hidden=5)


def test_problem_module_shows_the_functions_signature_and_docstring():
    """Importing the submodule (``from gradflow.problem import ...``, ``gradflow.Problem``)
    rebinds ``gradflow.problem`` to the module: it still shows the function's signature and
    docstring to ``inspect``, ``help()`` and IDEs, calls it, and keeps its own names."""
    import inspect
    import pydoc

    import gradflow.problem  # noqa: F401
    gradflow.Problem
    module = sys.modules["gradflow.problem"]
    function = module.problem
    for obj in (module, gradflow.problem):
        sig = inspect.signature(obj)
        assert list(sig.parameters)[:6] == ["cell", "layers", "steps", "hidden", "batch",
                                            "input_size"]
        assert sig == inspect.signature(function)
        assert obj.__doc__ == function.__doc__ and "input_scale:" in obj.__doc__
    assert "Build a measurement problem." in pydoc.render_doc(module)
    assert module.cell_problem is cell_problem and isinstance(module, type(sys))
    np.testing.assert_array_equal(module("lstm", **SMALL).xs, function("lstm", **SMALL).xs)


_IMPORT_ORDERS = (
    "import gradflow\nfrom gradflow import problem\nimport gradflow.problem as P",
    "import gradflow.problem as P\nimport gradflow\nfrom gradflow import problem",
    "from gradflow import problem\nimport gradflow.gates\nimport gradflow.problem as P")


def _import_orders():
    check = ("\nassert P is problem is gradflow.problem, (P, problem)\n"
             "assert P.cell_problem and problem('lstm', layers=1, steps=2, hidden=3, "
             "batch=1).xs.shape == (1, 2, 3)\n")
    return [subprocess.run([sys.executable, "-c", order + check], capture_output=True,
                           text=True, timeout=120) for order in _IMPORT_ORDERS]


@pytest.mark.background(job=_import_orders)  # each order needs a fresh interpreter
def test_gradflow_problem_is_one_object_whatever_is_imported_first(background):
    """``gradflow.problem`` was the function or the module depending on what was imported
    first (``import gradflow.problem as P; P.cell_problem`` failed after ``from gradflow
    import problem``): it is now always the callable module."""
    for order, proc in zip(_IMPORT_ORDERS, background):
        assert proc.returncode == 0, (order, proc.stderr)


def test_precision_pins_the_mode_and_restores_it():
    before = jax.config.jax_enable_x64
    for dtype, mode in (("float64", True), ("float32", False)):
        with precision(dtype):
            assert jax.config.jax_enable_x64 is mode
        assert jax.config.jax_enable_x64 is before


# --- gradient grids -----------------------------------------------------------------------------


def test_gradient_grid_panels_are_the_maps_of_gradient_map_on_the_same_problem():
    grid = experiments.gradient_grid(["rnn", "gru"], ["last", "all"], wrt="hidden",
                                     readout_seed=3, seed=1, input_scale=0.5, **SMALL)
    assert grid.config["cells"] == ["rnn", "gru"] and grid.config["losses"] == ["last", "all"]
    for cell in ("rnn", "gru"):
        prob = gradflow.problem(cell, seed=1, input_scale=0.5, init="orthogonal", **SMALL)
        for loss in ("last", "all"):
            ref = gradflow.gradient_map(prob.stack, prob.params, prob.xs, loss=loss,
                                        wrt="hidden", readout_seed=3)
            got = experiments.panel(grid, loss, cell)
            assert got.kind == "gradient_map" and got.config["loss"] == loss
            np.testing.assert_allclose(got.values, ref.values, rtol=1e-6)
            np.testing.assert_allclose(got.loss_value, ref.loss_value, rtol=1e-6)


def test_gradient_grid_takes_a_users_cell():
    """A built Cell (here a user's plain function) sits in the grid under its name, on the same
    problem (its own initialisation); init and cell_options are for named cells."""
    def step(p, h, x):
        h = jnp.tanh(x @ p["W"] + h @ p["U"])
        return h, h

    def init(key, n_in, n_h, dtype):
        k1, k2 = jax.random.split(key)
        return {"W": jax.random.normal(k1, (n_in, n_h), dtype) / np.sqrt(n_in),
                "U": jax.nn.initializers.orthogonal()(k2, (n_h, n_h), dtype)}

    user = cells.from_function(step, init, name="tanh_rnn")
    grid = experiments.gradient_grid(["rnn", user], ["last"], wrt="hidden", seed=1, **SMALL)
    assert grid.config["cells"] == ["rnn", "tanh_rnn"]
    prob = gradflow.problem(user, seed=1, **SMALL)
    ref = gradflow.gradient_map(prob.stack, prob.params, prob.xs, loss="last", wrt="hidden")
    np.testing.assert_allclose(experiments.panel(grid, "last", "tanh_rnn").values, ref.values,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="not in the grid: tanh_rnn"):
        experiments.gradient_grid([user], cell_options={"tanh_rnn": {}}, **SMALL)
    with pytest.raises(ValueError, match="cells repeats tanh_rnn"):
        experiments.gradient_grid([user, user], **SMALL)
    with pytest.raises(TypeError, match=r"cells are names or gradflow Cells \(or a list of them, "
                                         r"one per layer\), got int"):
        experiments.gradient_grid(["rnn", 3], **SMALL)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cells=["nope"]), "unknown cell 'nope' in cells; valid: " + ", ".join(cells.names())),
    (dict(cells=[]), "cells is empty; give cell names (" + ", ".join(cells.names()) + ") or "
                     "gradflow Cells"),
    (dict(cells=["rnn", "rnn"]), "cells repeats rnn"),
    (dict(cells=["rnn"], losses=["bogus"]), "unknown loss 'bogus' in losses; valid: last, all"),
    (dict(cells=["rnn"], wrt="bogus"), "valid: hidden, cell, params"),
    (dict(cells=["rnn"], dtype="float16"), "gradflow measures in float32 or float64"),
    (dict(cells=["rnn"], cell_options={"lstm": {}}), "not in the grid: lstm"),
])
def test_gradient_grid_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        experiments.gradient_grid(**kwargs)


def test_panel_bad_input():
    grid = make_result("gradient_grid", {"values/last/rnn": np.ones((2, 3)),
                                         "loss_value/last/rnn": np.float64(1.0)},
                       {"cells": ["rnn"], "losses": ["last"], "maps": {"last/rnn": {}}})
    with pytest.raises(ValueError, match="no map for loss 'all' and cell 'mgu'; the grid has "
                                         "last/rnn"):
        experiments.panel(grid, "all", "mgu")


# --- vertical gains and gate saturation ---------------------------------------------------------


def test_vertical_gain_packs_local_gains_of_each_cell():
    data = experiments.vertical_gain(["lstm", "mgu", "ur_lstm"], layers=3, steps=2, hidden=4,
                                     batch=2)
    assert data.config["closed_form"] == {"lstm": 0.25, "mgu": 0.5}  # ur_lstm has none
    prob = gradflow.problem("mgu", layers=3, steps=2, hidden=4, batch=2, init="orthogonal",
                            input_scale=0.01)
    ref = jacobian.local_gains(prob.stack, prob.params, prob.xs)
    got = experiments.gain_panel(data, "mgu")
    assert got.kind == "local_gains" and got.config["cell"] == "mgu"
    for key in ref.arrays:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6)
    with pytest.raises(ValueError, match="no cell 'gru'; valid: lstm, mgu"):
        experiments.gain_panel(data, "gru")


def test_closed_form_vertical_gains_are_measured_and_are_the_atlas_claims():
    """Each closed form of VERTICAL_GAIN is what local_gains measures at its setting (median
    over layers 1.., H = 32; independent: the hand-derived products of sigma(0) = 1/2), and the
    atlas's *_vertical_* claims test the same cells at the same values."""
    from gradflow import atlas

    data = experiments.vertical_gain(list(experiments.VERTICAL_GAIN), layers=4, steps=2,
                                     hidden=32, batch=2)
    for cell, closed in experiments.VERTICAL_GAIN.items():
        measured = np.median(experiments.gain_panel(data, cell)["vertical_rms"][1:])
        assert abs(measured / closed - 1) < 0.01, cell
    claimed = {}
    for claim in atlas.CLAIMS.values():
        found = re.search(r"median vertical RMS gain within 10% of ([0-9.]+)", claim.description)
        if found:
            (cell,) = claim.cells
            claimed[cell] = float(found.group(1))
    assert claimed == experiments.VERTICAL_GAIN


def test_gate_saturation_packs_gate_stats_of_each_entry():
    entries = [["LSTM", "lstm", {}], ["UGI", "lstm", {"init": "ugi"}]]
    data = experiments.gate_saturation(entries, eps=0.1, bins=4, **SMALL)
    for label, options in (("LSTM", {}), ("UGI", {"init": "ugi"})):
        prob = gradflow.problem("lstm", **SMALL, **options)
        ref = gates.saturation(prob.stack, prob.params, prob.xs, 0.1, bins=4)
        got = experiments.stats_panel(data, label)
        assert got.kind == "gate_stats" and got.config["label"] == label
        assert set(got.arrays) == set(ref.arrays)
        for key in ref.arrays:
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, err_msg=key)
    with pytest.raises(ValueError, match="no entry 'GRU'; valid: LSTM, UGI"):
        experiments.stats_panel(data, "GRU")


def test_gate_saturation_takes_what_compare_takes():
    """Plain names and Cells (labelled by their names), as gates.compare takes them: the
    same statistics as the ``(label, cell, {})`` entry; the config records names."""
    by_name = experiments.gate_saturation(["lstm", cells.get("gru")], **SMALL)
    triple = experiments.gate_saturation([("lstm", "lstm", {}), ("gru", "gru", {})], **SMALL)
    assert by_name.config["entries"] == [["lstm", "lstm", {}], ["gru", "gru", {}]]
    for label in ("lstm", "gru"):
        got, ref = (experiments.stats_panel(d, label) for d in (by_name, triple))
        assert set(got.arrays) == set(ref.arrays)
        for key in ref.arrays:
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{label} {key}")
    with pytest.raises(ValueError, match="duplicate labels"):
        experiments.gate_saturation(["lstm", ("lstm", "gru", {})], **SMALL)
    with pytest.raises(TypeError, match="compare entries must be a cell name"):
        experiments.gate_saturation([3], **SMALL)


def test_experiments_draw_nothing():
    """experiments computes only: importing it (and running a grid) loads no matplotlib."""
    code = ("import sys; from gradflow import experiments; "
            "experiments.gradient_grid(['rnn'], ['last'], layers=1, steps=2, hidden=2, batch=1); "
            "print(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'gradflow.plot'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_gradient_grid_takes_a_cell_with_its_options_written_in():
    """``"lstm:forget_bias=1.0"`` beside ``"lstm"``: the same cell at another setting, labelled
    by its text, equal to a map built by hand from ``cells.get("lstm", forget_bias=1.0)``; the
    options written in win over ``cell_options`` for that label."""
    size = dict(layers=3, steps=6, hidden=8, batch=4, seed=1)
    grid = experiments.gradient_grid(["lstm", "lstm:forget_bias=1.0"], ["last"], wrt="hidden",
                                     **size, cell_options={"lstm:forget_bias=1.0": {
                                         "forget_bias": 5.0, "init": "glorot"}})
    assert grid.config["cells"] == ["lstm", "lstm:forget_bias=1.0"]
    by_hand = gradflow.problem(gradflow.cells.get("lstm", forget_bias=1.0, init="glorot"),
                               **size)
    ref = gradflow.gradient_map(by_hand.stack, by_hand.params, by_hand.xs, loss="last",
                                wrt="hidden")
    np.testing.assert_allclose(experiments.panel(grid, "last", "lstm:forget_bias=1.0").values,
                               ref.values, rtol=1e-6)
    assert not np.allclose(experiments.panel(grid, "last", "lstm").values, ref.values)
    with pytest.raises(ValueError, match="unknown cell 'lstmm' in cells; valid: g_lstm"):
        experiments.gradient_grid(["lstmm:forget_bias=1.0"], ["last"], **size)
    with pytest.raises(ValueError, match="unknown option\\(s\\) 'bogus' for cell 'lstm'"):
        experiments.gradient_grid(["lstm:bogus=1"], ["last"], **size)


def test_experiments_in_float64_need_no_64_bit_switch_from_the_caller():
    """They run their work in the dtype's mode (precision), their plan included."""
    import jax

    assert not jax.config.jax_enable_x64
    g = experiments.gradient_grid(["lstm"], ["last"], layers=2, steps=3, hidden=4, batch=2,
                                  dtype="float64")
    assert experiments.panel(g, "last", "lstm").values.dtype == np.float64
    v = experiments.vertical_gain(["lstm"], layers=2, steps=3, hidden=4, batch=2,
                                  dtype="float64")
    assert v.config["dtype"] == "float64"


def test_gradient_grid_takes_a_stack_of_different_cells_as_one_entry():
    """An entry that lists one cell per layer (names, a name with its options, built Cells) is
    that stack's map on the grid's problem, labelled as the CLI writes it; ``init`` and its
    label's ``cell_options`` apply to each named layer, a built Cell keeps its own."""
    from gradflow.problem import problem

    star = gradflow.cells.get("star", init="glorot")
    grid = experiments.gradient_grid(
        [["gru", "gru:init=glorot", star], ["gru"] * 3], "last", wrt="hidden", layers=3,
        steps=4, hidden=6, batch=2, seed=2, init="orthogonal",
        cell_options={"gru*3": {"init": "torch"}})
    assert grid.config["cells"] == ["gru/gru:init=glorot/star", "gru*3"]
    for label, layers in (("gru/gru:init=glorot/star", [gradflow.cells.get("gru", init=i)
                                                        for i in ("orthogonal", "glorot")]
                           + [star]),
                          ("gru*3", [gradflow.cells.get("gru", init="torch")] * 3)):
        prob = problem(layers, layers=3, steps=4, hidden=6, batch=2, seed=2)
        want = gradflow.gradient_map(prob.stack, prob.params, prob.xs, wrt="hidden")
        np.testing.assert_array_equal(experiments.panel(grid, "last", label).values,
                                      want.values)
    with pytest.raises(ValueError, match="one cell per layer: got 2 cells for 3 layers"):
        experiments.gradient_grid([["gru", "star"]], layers=3, steps=2, hidden=4)
    with pytest.raises(ValueError, match="unknown cell 'stir'"):
        experiments.gradient_grid([["gru", "stir", "gru"]], layers=3, steps=2, hidden=4)
    with pytest.raises(ValueError, match="is empty"):
        experiments.gradient_grid([[]], layers=3, steps=2, hidden=4)


def test_map_grid_of_problems_you_built():
    """map_grid over your own problems (other sizes, weights that are not an init, a residual
    normalised stack, a bare (stack, params, xs) triple): each panel is gradient_map of that
    problem, the config records what all maps share (and None where they differ), and
    draw_grid draws it."""
    from gradflow import plot
    from gradflow.problem import problem

    a = problem("lstm", layers=3, steps=5, hidden=6, batch=2, seed=1)
    shifted = jax.tree_util.tree_map(lambda p: p + 0.3, a.params)  # not an initialisation
    stack = gradflow.Stack("gru", 3, 4, 6, residual=True, norm="layer")
    params = stack.init(jax.random.key(2))
    xs = jax.random.normal(jax.random.key(3), (2, 8, 4))
    grid = experiments.map_grid({"lstm": a, "shifted": a._replace(params=shifted),
                                 "res-gru": (stack, params, xs)}, ["last", "all"], wrt="hidden",
                                readout_seed=4)
    for label, (s, p, x) in {"lstm": a[:3], "shifted": (a.stack, shifted, a.xs),
                             "res-gru": (stack, params, xs)}.items():
        for loss in ("last", "all"):
            want = gradflow.gradient_map(s, p, x, loss=loss, wrt="hidden", readout_seed=4)
            got = experiments.panel(grid, loss, label)
            np.testing.assert_array_equal(got.values, want.values)
            assert float(got.loss_value) == float(want.loss_value)
    assert not np.allclose(grid["values/last/lstm"], grid["values/last/shifted"])
    assert grid.config["cells"] == ["lstm", "shifted", "res-gru"]
    assert (grid.config["layers"], grid.config["hidden"], grid.config["batch"]) == (3, 6, 2)
    assert grid.config["steps"] is None  # 5 and 8
    assert grid.config["maps"]["last/res-gru"]["norm"] == "layer"
    plot.draw_grid(grid)


def test_map_grid_rows_of_each_problems_own_loss():
    """A ``(name, make)`` loss: a row of each problem's own loss (here a readout drawn per
    label), equal to gradient_map with that loss; names are checked."""
    from gradflow.problem import problem

    probs = {"a": problem("lstm", layers=2, steps=4, hidden=5, batch=2, seed=1),
             "b": problem("gru", layers=2, steps=4, hidden=5, batch=2, seed=2)}
    made = {}

    def make(label, prob):
        w = jax.random.normal(jax.random.key(len(label) + ord(label)), (5,))
        made[label] = lambda top: jnp.mean(top[:, -1] @ w)
        return made[label]

    grid = experiments.map_grid(probs, ["last", ("own", make)], wrt="hidden")
    assert grid.config["losses"] == ["last", "own"]
    for label, prob in probs.items():
        want = gradflow.gradient_map(prob.stack, prob.params, prob.xs, loss=made[label])
        np.testing.assert_array_equal(experiments.panel(grid, "own", label).values, want.values)
        assert grid.config["maps"][f"own/{label}"]["loss"] == "own"
    for bad, error in ((["last", ("last", make)], TypeError), ([("x", 3)], TypeError),
                       ([("x", make), ("x", make)], ValueError), (["nope"], ValueError)):
        with pytest.raises(error):
            experiments.map_grid(probs, bad)


@pytest.mark.parametrize("problems,error,message", [
    ({}, ValueError, "problems is empty"),
    (["lstm"], TypeError, "problems must be a mapping"),
    ({"a": "lstm"}, TypeError, "problem 'a' must be a gradflow Problem or a (stack, params, xs)"),
    ({"a": (1, 2, 3)}, TypeError, "problem 'a': its stack must be a gradflow Stack, got int"),
])
def test_map_grid_bad_input(problems, error, message):
    with pytest.raises(error, match=re.escape(message)):
        experiments.map_grid(problems)
