"""gradflow.atlas: claims read from maps equal the same reading of gradient_map run seed by seed,
an interrupted atlas resumes to the same table, and the boundaries of the committed atlas."""
import os

import numpy as np
import pytest

import gradflow
from gradflow import atlas as A
from gradflow.problem import cell_problem

FIG = os.path.join(os.path.dirname(__file__), "..", "figures", "atlas_star_fig2")

SMALL = dict(cells=("rnn", "lstm:forget_bias=1.0"), inits=("orthogonal", "torch"),
             input_scales=(0.1, 1.0), hidden=(4,), sizes=((3, 4),), losses=("last", "all"),
             wrts=("params", "hidden"), seeds=(0, 3), batch=2)
CLAIMS = ["rnn_amplified", "lstm_collapses"]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The small atlas computed in one go, without a cache."""
    return A.atlas(CLAIMS, A.Grid(**SMALL), progress=False)


def test_claims_read_by_hand():
    v = np.array([[4.0, 1.0], [0.5, 0.2], [3.0, 2.0]])  # (L=3, T=2), top-last 2
    assert A.bottom_first(v) == 2.0
    assert A.median_below_top2(v) == np.median([2.0, 0.5])
    assert A.share_within_decade(v) == 1.0
    assert A.share_within_decade(np.array([[100.0, 0.01], [1.0, 1.0]])) == 0.5
    nan_map = np.array([[1.0, 1.0], [1.0, 0.0]])  # top-last 0: no reading, never holds
    assert np.isnan(A.bottom_first(nan_map))
    assert A.CLAIMS["rnn_amplified"].evaluate(nan_map) == (pytest.approx(np.nan, nan_ok=True),
                                                          False)
    assert A.CLAIMS["rnn_amplified"].evaluate(v) == (2.0, True)
    assert A.CLAIMS["rnn_amplified_decade"].evaluate(v) == (2.0, False)


def test_atlas_equals_gradient_map_seed_by_seed(full):
    """Every map of the vectorised atlas equals gradient_map on problem(seed) one seed at a
    time (the torch-init cells included), and so does each claim's statistic."""
    for name in CLAIMS:
        claim, res = A.CLAIMS[name], full[name]
        assert res.statistic.shape == (len(res.config["conditions"]), 2)
        picks = [i for i, c in enumerate(res.config["conditions"])
                 if (c["init"], c["input_scale"], c["loss"], c["wrt"]) in
                 {("torch", 0.1, "last", "params"), ("orthogonal", 1.0, "all", "hidden"),
                  ("torch", 1.0, "all", "hidden")}]
        assert len(picks) == 3
        for i in picks:
            c = res.config["conditions"][i]
            cell_name, options = A.parse_cell(c["cell"])
            for j, seed in enumerate(c["seeds"]):
                init = A.cell_for(c["cell"], c["init"], c["steps"]).config["init"]
                p = cell_problem(cell_name, layers=c["layers"], steps=c["steps"],
                                          hidden=c["hidden"], batch=c["batch"], seed=seed,
                                          init=init, input_scale=c["input_scale"],
                                          options=options)
                g = gradflow.gradient_map(p.stack, p.params, p.xs, loss=c["loss"], wrt=c["wrt"])
                s, h = claim.evaluate(g.values)
                np.testing.assert_allclose(res.statistic[i, j], s, rtol=2e-5)
                assert res.holds[i, j] == h
        np.testing.assert_array_equal(res.fraction, res.holds.mean(axis=1))


def test_resume_after_interruption_gives_the_same_table(full, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    partial = A.atlas(CLAIMS, A.Grid(**{**SMALL, "input_scales": (0.1,)}), cache_dir=cache,
                      progress=False)
    assert len(list(cache.glob("*.npz"))) == len(partial["rnn_amplified"].fraction) * 2
    resumed = A.atlas(CLAIMS, A.Grid(**SMALL), cache_dir=cache, progress=False)
    for name in CLAIMS:
        np.testing.assert_allclose(resumed[name].statistic, full[name].statistic, rtol=2e-5)
        np.testing.assert_array_equal(resumed[name].holds, full[name].holds)
        assert resumed[name].config["conditions"] == full[name].config["conditions"]
    assert A.table(resumed) == A.table(full)

    def fail(*a, **k):
        raise AssertionError("a cached condition was measured again")

    monkeypatch.setattr(A, "measure_group", fail)
    again = A.atlas(CLAIMS, A.Grid(**SMALL), cache_dir=cache, progress=False)
    for name in CLAIMS:
        np.testing.assert_array_equal(again[name].statistic, resumed[name].statistic)
    stem = str(tmp_path / "saved")
    A.save(again, stem)
    back = A.load(stem)
    assert back.keys() == again.keys()
    np.testing.assert_array_equal(back["lstm_collapses"].holds, again["lstm_collapses"].holds)


@pytest.mark.parametrize("call, match", [
    (lambda: A.get_claims(["nope"]), "unknown claim 'nope'; valid: rnn_amplified"),
    (lambda: A.Grid(cells=("rnn",), losses=("first",)), "unknown loss 'first'; valid: last"),
    (lambda: A.Grid(cells=("rnn",), wrts=("cell",)), "unknown wrt 'cell'; valid: params"),
    (lambda: A.Grid.from_dict({"cell": ["rnn"]}), "unknown grid key 'cell'; valid:"),
    (lambda: A.Grid(cells=("rnn",), sizes=((3,),)), "sizes are"),
    (lambda: A.Grid(cells=("rnn:init",)), "option=value"),
    (lambda: A.cell_for("rnn:init=torch", "orthogonal", 3), "use the grid's init"),
    (lambda: A.atlas(["lstm_collapses"], A.Grid(cells=("rnn",))), "no condition"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cell_for_keeps_the_cells_own_bias_scheme():
    assert A.cell_for("star:variant=official", "torch", 10).config["init"] == "torch+chrono"
    assert A.cell_for("star", "torch", 10).config["init"] == "torch"
    assert A.cell_for("lstm:forget_bias=1.0", "orthogonal", 10).config["forget_bias"] == 1.0
