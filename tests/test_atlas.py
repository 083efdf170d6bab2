"""gradflow.atlas: claims read from maps equal the same reading of gradient_map run seed by seed,
an interrupted atlas resumes to the same table, and the boundaries of the committed atlas."""
import dataclasses
import os
import shutil

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


def test_each_seed_may_draw_its_own_readout():
    """Grid(readout_seed="seed"): seed s's maps are gradient_map(problem(seed=s),
    readout_seed=s), so agreement over seeds covers the probe loss too (with readout_seed=0
    every seed shared one readout, which moves the statistics as much as a seed does)."""
    grid = A.Grid(cells=("rnn",), input_scales=(0.5,), hidden=(8,), sizes=((3, 4),),
                  losses=("last", "all"), seeds=(0, 2), readout_seed="seed", batch=4)
    res = A.measure(grid.conditions(), progress=False)
    for c in grid.conditions():
        assert c["readout_seed"] == "seed"
        r = res[A.condition_key(c)]
        for j, seed in enumerate(c["seeds"]):
            p = gradflow.problem("rnn", layers=3, steps=4, hidden=8, batch=4, seed=seed,
                                 input_scale=0.5)
            for ro, same in ((seed, True), (1 - seed // 2, False)):  # its own, another
                g = gradflow.gradient_map(*p[:3], loss=c["loss"], wrt="params",
                                          readout_seed=ro).values
                close = np.allclose(r["values"][j], g, rtol=2e-6, atol=0)
                assert close == same, (c["loss"], seed, ro)
    with pytest.raises(ValueError, match=r"readout_seed must be an integer in \[0, 2\*\*31 - 1\), "
                                         r"got 'each', or 'seed'"):
        A.Grid(cells=("rnn",), readout_seed="each")


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
    # a damaged entry (a full disk, a killed run elsewhere) is measured again, with a word (it
    # was a gradflow "bug" that stopped the atlas)
    monkeypatch.undo()
    damaged = sorted(os.listdir(cache))[0]
    with open(os.path.join(cache, damaged), "w") as f:
        f.write("not an npz")
    with pytest.warns(RuntimeWarning, match=f"1 atlas cache entry cannot be reused; measuring "
                                            f"again .*{damaged}: it is damaged"):
        healed = A.atlas(CLAIMS, A.Grid(**SMALL), cache_dir=cache, progress=False)
    for name in CLAIMS:  # measured alone, not in its group: equal to rounding (module doc)
        np.testing.assert_allclose(healed[name].statistic, again[name].statistic, rtol=1e-6)
        np.testing.assert_array_equal(healed[name].holds, again[name].holds)
    gradflow.load(os.path.join(cache, damaged))  # rewritten whole
    # an entry computed by other code (gradflow edited: its float64 fix once moved a statistic
    # 2%, and the old entry was served) and one holding another condition (a file copied over
    # it) are measured again, each with a word, to the same numbers
    first, second = (os.path.join(cache, f) for f in sorted(os.listdir(cache))[:2])
    old = gradflow.load(first)
    dataclasses.replace(old, provenance={**old.provenance, "source": "0" * 16}).save(first)
    with pytest.warns(RuntimeWarning, match=r"1 atlas cache entry .*: it was computed by other "
                                            r"code \(source 0000000000000000, now [0-9a-f]{16}\)"):
        fresh = A.atlas(CLAIMS, A.Grid(**SMALL), cache_dir=cache, progress=False)
    shutil.copyfile(second, first)
    with pytest.warns(RuntimeWarning, match=r"1 atlas cache entry .*: it holds other settings"):
        swapped = A.atlas(CLAIMS, A.Grid(**SMALL), cache_dir=cache, progress=False)
    for name in CLAIMS:
        for res in (fresh, swapped):
            np.testing.assert_allclose(res[name].statistic, again[name].statistic, rtol=1e-6)
            np.testing.assert_array_equal(res[name].holds, again[name].holds)
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
    # a map's factors given to another measure: recorded in the grid, never used
    (lambda: A.Grid(cells=("rnn",), measure="gates", losses=("all",), wrts=("hidden",)),
     "losses, wrts set the gradient maps' conditions; measure 'gates' has none: leave them"),
    (lambda: A.Grid(cells=("rnn",), measure="local_gains", readout_seed=7),
     "readout_seed sets the gradient maps' conditions; measure 'local_gains' has none"),
    (lambda: A.Grid(cells=("rnn",), sizes=((3,),)), "sizes are"),
    (lambda: A.Grid.from_dict({"cells": ["rnn"], "sizes": [3, 4]}),
     r"sizes are \(layers, steps\) pairs .* got \[3, 4\]"),
    (lambda: A.Grid(cells=("rnn:init",)), "option=value"),
    (lambda: A.cell_for("rnn:init=torch", "orthogonal", 3), "use the grid's init"),
    (lambda: A.atlas(["lstm_collapses"], A.Grid(cells=("rnn",))), "no condition"),
    # read as 3 steps and 1 layer; a dtype or scale that failed later, or measured inf inputs
    (lambda: A.Grid(cells=("rnn",), sizes=((3, 3.7),)), "sizes' steps must be a positive "
                                                        "integer, got 3.7"),
    (lambda: A.Grid(cells=("rnn",), sizes=((True, 3),)), "sizes' layers must be a positive"),
    (lambda: A.Grid(cells=("rnn",), dtype="bogus"), "unknown dtype 'bogus'; valid: float32"),
    (lambda: A.Grid(cells=("rnn",), input_scales=("1",)), "input_scale must be a finite "
                                                          "number below 2.1e\\+37"),
    (lambda: A.Grid(cells=("rnn",), input_scales=(3e38,)), "finite number below 2.1e\\+37"),
    # claims keyed by name: a repeated one was dropped, one with '/' lost when saved
    (lambda: A.plan(["rnn_amplified", A.Claim("rnn_amplified", "x", ("rnn",), A.bottom_first,
                                              bool)], A.Grid(cells=("rnn",))),
     "claims repeat a name: rnn_amplified"),
    (lambda: A.Claim("x/y", "x", ("rnn",), A.bottom_first, bool), "hold no '/', got 'x/y'"),
    (lambda: gradflow.gates.compare([]), "compare: name at least one cell"),
    # the mechanism takes a Grid's checks, and its memory check (it ran into the allocator)
    (lambda: A.mechanism("rnn", "orthogonal", seed=-1), r"seeds\[0\] must be an integer"),
    (lambda: A.mechanism("rnn", "orthogonal", layers=10**6, hidden=64),
     "measuring the atlas's rnn conditions at 1000000 layers .* more than the"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_float64_grid_is_described_in_32_bit_mode():
    """The atlas measures a float64 grid in 64-bit mode itself: the grid is built without it."""
    g = A.Grid(cells=("rnn",), dtype=np.float64, input_scales=(3e38,))
    assert g.dtype == "float64" and g.input_scales == (3e38,)


def test_cell_for_keeps_the_cells_own_bias_scheme():
    assert A.cell_for("star:variant=official", "torch", 10).config["init"] == "torch+chrono"
    assert A.cell_for("star", "torch", 10).config["init"] == "torch"
    assert A.cell_for("lstm:forget_bias=1.0", "orthogonal", 10).config["forget_bias"] == 1.0


# ---------------------------------------------------------------------------------------------
# The committed atlas (figures/atlas_star_fig2.*, made from figures/atlas_star_fig2_grid.json by
# `gradflow atlas --grid figures/atlas_star_fig2_grid.json --out figures --name atlas_star_fig2`)


@pytest.fixture(scope="module")
def committed():
    return A.load(FIG)


def _where(res, **match):
    """Rows of ``res`` whose condition matches every ``factor=value`` (size as 'LxT')."""
    rows = []
    for i, c in enumerate(res.config["conditions"]):
        c = {**c, "size": f"{c['layers']}x{c['steps']}"}
        if all(c[k] == v for k, v in match.items()):
            rows.append(i)
    assert rows, match
    return rows


def test_committed_grid_size_and_seeds(committed):
    assert list(committed) == ["rnn_amplified", "rnn_amplified_decade", "lstm_collapses",
                               "star_preserved"]
    n = sum(len(r.config["conditions"]) for r in committed.values())
    assert n == 36 + 36 + 72 + 72
    assert all(r.statistic.shape[1] == 4 for r in committed.values())
    # each seed draws its own probe readout too
    assert {c["readout_seed"] for r in committed.values() for c in r.config["conditions"]} \
        == {"seed"}


def test_committed_rnn_amplified_boundaries(committed):
    r = committed["rnn_amplified"]
    # never under torch init: r[bottom, first] < 0.2 (the gain per step is about 0.55)
    rows = _where(r, init="torch")
    assert r.holds[rows].sum() == 0 and r.statistic[rows].max() < 0.2
    # orthogonal, sequence loss: amplified at every input scale, both maps, both sizes
    assert r.fraction[_where(r, init="orthogonal", loss="all")].min() == 1.0
    # orthogonal, final-output loss, params map, 10x10: only at input scale 0.01 (2.1-2.5x;
    # 3 of 4 seeds when every seed shared readout 0)
    pl = dict(init="orthogonal", loss="last", wrt="params", size="10x10")
    assert r.fraction[_where(r, input_scale=0.01, **pl)].tolist() == [1.0]
    assert r.fraction[_where(r, input_scale=0.1, **pl)].max() == 0.0
    assert r.fraction[_where(r, input_scale=1.0, **pl)].max() == 0.0
    assert r.fraction[_where(r, init="orthogonal", loss="last", size="20x20")].min() == 1.0
    # hidden map, final-output loss: holds at 0.01-0.1, fails at 1.0 (tanh saturates)
    hl = dict(init="orthogonal", loss="last", wrt="hidden")
    small = _where(r, input_scale=0.01, **hl) + _where(r, input_scale=0.1, **hl)
    assert r.fraction[small].min() == 1.0
    assert r.fraction[_where(r, input_scale=1.0, **hl)].max() == 0.0
    # on the figure's own scale (10x10, params): a small factor, 0.89-4.8x
    s = r.statistic[_where(r, init="orthogonal", wrt="params", size="10x10")]
    assert 0.85 < s.min() and s.max() < 5.0


def test_committed_orders_of_magnitude_only_in_four_settings(committed):
    r = committed["rnn_amplified_decade"]
    held = {(c["wrt"], c["layers"], c["input_scale"], c["loss"])
            for c, f in zip(r.config["conditions"], r.fraction) if f > 0}
    assert held == {("hidden", 10, 0.01, "last"), ("hidden", 10, 0.01, "all"),
                    ("hidden", 10, 0.1, "all"), ("params", 20, 0.01, "all")}


def test_committed_lstm_collapses_almost_everywhere(committed):
    r = committed["lstm_collapses"]
    failed = [c for c, f in zip(r.config["conditions"], r.fraction) if f < 1]
    assert [(c["cell"], c["init"], c["input_scale"], c["layers"], c["wrt"]) for c in failed] \
        == [("lstm:forget_bias=1.0", "orthogonal", 1.0, 10, "params")] * 2
    assert r.fraction[_where(r, cell="lstm")].min() == 1.0
    fails = np.median(r.statistic[[r.config["conditions"].index(c) for c in failed]], axis=1)
    assert 0.1 < fails.min() and fails.max() < 0.15  # medians 0.11 (last), 0.14 (all)
    assert r.fraction[[r.config["conditions"].index(c) for c in failed]].tolist() == [0.25, 0.0]


def test_committed_star_preserved_only_at_10x10_sequence_loss_orthogonal(committed):
    r = committed["star_preserved"]
    held = [c for c, f in zip(r.config["conditions"], r.fraction) if f > 0]
    assert {(c["cell"], c["init"], c["layers"], c["loss"]) for c in held} == \
        {("star", "orthogonal", 10, "all")}
    assert len(held) == 6 and r.fraction[_where(r, cell="star", init="orthogonal", size="10x10",
                                                loss="all")].min() == 1.0
    # the authors' released variant (chrono bias, T_max = 784): never, at most 18% in a decade
    assert r.statistic[_where(r, cell="star:variant=official")].max() <= 0.18
    assert r.statistic[_where(r, cell="star", size="20x20")].max() < 0.8


def test_committed_mechanism():
    import json

    with open(FIG + "_mechanism.json") as f:
        m = json.load(f)
    rnn = m["rnn|orthogonal"]
    # near-linear at small inputs: every step passes the gradient almost whole ...
    assert min(rnn["0.01"]["vertical_rms"][:3]) > 0.95
    # ... saturated at N(0, 1) inputs: tanh' ~ 0.54 in the bottom layer
    assert rnn["1.0"]["one_minus_h2"][0] < 0.6 and rnn["1.0"]["vertical_rms"][0] < 0.7
    # README: the RMS gain (the RMS of tanh') 0.63, 0.71-0.75 (layers 1-2), 0.76-0.78 above;
    # the mean tanh' 0.54, 0.65-0.69, 0.72-0.74
    for key, quoted in (("vertical_rms", [(0.63, 0.63), (0.71, 0.75), (0.76, 0.78)]),
                        ("one_minus_h2", [(0.54, 0.54), (0.65, 0.69), (0.72, 0.74)])):
        g = np.round(rnn["1.0"][key], 2)
        assert [(g[p].min(), g[p].max()) for p in (slice(0, 1), slice(1, 3), slice(3, None))] \
            == quoted, (key, g)
    # torch init: U(-1/sqrt(H), 1/sqrt(H)) weights, an RMS gain ~ 1/sqrt(3) per step
    for scale in ("0.01", "1.0"):
        g = m["rnn|torch"][scale]
        assert max(g["vertical_rms"] + g["temporal_rms"]) < 0.6
    # released STAR: the chrono bias shuts the input (vertical gain <= 0.1), time kept (~0.99)
    off = m["star:variant=official|orthogonal"]["0.1"]
    assert max(off["vertical_rms"]) < 0.1 and min(off["temporal_rms"]) > 0.98
    # LSTM: sigma(0)^2 = 0.25 per layer, forget bias 1 or not
    for key in ("lstm|orthogonal", "lstm:forget_bias=1.0|orthogonal"):
        assert abs(m[key]["0.01"]["vertical_rms"][5] - 0.25) < 1e-3


def test_draw_atlas_and_cli(committed, tmp_path, capsys):
    from gradflow import cli, plot

    fig = plot.draw_atlas(committed)
    # one band per (claim, cell), six panels each (2 sizes x 2 losses for params, 2 for hidden)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6 * 6
    n = next(iter(committed.values())).statistic.shape[1]  # the colour bar says of how many
    assert any(ax.get_ylabel() == f"fraction of the {n} seeds where the claim holds"
               for ax in fig.axes)
    with pytest.raises(ValueError, match="unknown rows factor 'seed'; valid: input_scale"):
        plot.draw_atlas(committed, rows="seed")
    # a bare number in a panel title is named by its factor, and a given title keeps the
    # legend of the panel titles ("0.1, orthogonal" named no factor)
    fig = plot.draw_atlas(committed, rows="size", cols="init", title="mine")
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert all("scale " in t for t in titles) and any("scale 0.01" in t for t in titles)
    assert fig.get_suptitle().startswith("mine\n(panel titles: ")
    assert "input scale" in fig.get_suptitle()
    grid = tmp_path / "grid.json"
    grid.write_text('{"cells": ["rnn"], "hidden": [4], "sizes": [[3, 3]], "losses": ["last"],'
                    ' "input_scales": [0.1, 1.0], "seeds": [0, 1], "batch": 2}')
    assert cli.main(["atlas", "--grid", str(grid), "--out", str(tmp_path), "--no-progress",
                     "--claims", "rnn_amplified"]) == 0
    out = capsys.readouterr().out
    assert "rnn_amplified: holds for all 2 seeds in" in out and "atlas.png" in out
    res = A.load(tmp_path / "atlas")["rnn_amplified"]
    assert res.statistic.shape == (2, 2)
    # the conditions short of every seed, named by what varies (input_scale here), each with
    # its median and share (the summary said only how many)
    short = [i for i, f in enumerate(res.fraction) if f < 1]
    lines = [l for l in out.splitlines() if l.startswith(("  fails: ", "  split: "))]
    assert len(lines) == len(short) > 0
    for i, line in zip(short, lines):
        c = res.config["conditions"][i]
        assert line == (f"  {'fails' if res.fraction[i] == 0 else 'split'}: cell rnn, "
                        f"input_scale {c['input_scale']}: median "
                        f"{np.median(res.statistic[i]):.3g}, holds for "
                        f"{round(2 * res.fraction[i])} of 2 seeds")
    assert A.table({"r": res}).splitlines()[0] == \
        "| claim | cell | input_scale | median statistic | holds (seeds) |"
    for argv, msg in [(["--grid", str(grid), "--out", str(tmp_path / "no")], "not an existing"),
                      (["--grid", str(grid), "--out", str(tmp_path), "--claims", "x"],
                       "unknown claim 'x'"),
                      (["--grid", str(grid), "--out", str(tmp_path), "--claims",
                        "lstm_collapses"], "no condition of the grid"),
                      (["--grid", str(tmp_path / "none.json"), "--out", str(tmp_path)],
                       "cannot read grid"),
                      (["--grid", str(tmp_path / "atlas.npz"), "--out", str(tmp_path)],
                       f"grid {str(tmp_path / 'atlas.npz')!r} is not JSON")]:  # binary
        assert cli.main(["atlas", *argv]) == 2
        assert msg in capsys.readouterr().err
    # the same grid from flags (measured again, its own cache): the same statistics
    flags = ["--cells", "rnn", "--hidden", "4", "--sizes", "3x3", "--losses", "last",
             "--input-scales", "0.1", "1", "--seeds", "0", "1", "--batch", "2"]
    assert cli.main(["atlas", *flags, "--out", str(tmp_path), "--name", "flags",
                     "--no-progress", "--claims", "rnn_amplified"]) == 0
    capsys.readouterr()
    again = A.load(tmp_path / "flags")["rnn_amplified"]
    np.testing.assert_array_equal(again.statistic, res.statistic)
    for argv, msg in [(["--sizes", "3"], "--sizes '3': give layers x steps"),
                      (["--hidden", "x"], "--hidden x: give integers"),
                      (["--hidden", "0"], "hidden must be a positive integer"),
                      (["--batch", "0"], "batch must be a positive integer"),
                      (["--cells", "nope"], "unknown cell 'nope' in the grid; valid:"),
                      (["--inits", "nope"], "unknown init 'nope'"),
                      (["--grid", str(grid), "--cells", "rnn"], "not both"),
                      # checked before anything is measured (were internal errors, exit 1)
                      (["--cells", "lstm:nosuch=1", "--sizes", "3x3"],
                       "unknown option(s) 'nosuch' for cell 'lstm'"),
                      (["--cells", "lstm:forget_bias=abc", "--sizes", "3x3"],
                       "forget_bias='abc' of cell 'lstm' takes a number"),
                      (["--cells", "lstm", "--sizes", "2x3", "--claims", "lstm_collapses"],
                       "layers >= 3"),
                      (["--cells", "lstm", "--sizes", "3x3", "--claims",
                        "star_preserved,lstm_collapses"],
                       "claim 'star_preserved' reads no condition of the grid"),
                      (["--cells", "lstm", "--input-scales", "nan"],
                       "input_scale must be a finite number below 2.1e+37 (scale * N(0, 1) "
                       "in float32), got nan")]:
        assert cli.main(["atlas", *argv, "--out", str(tmp_path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err


def test_cli_atlas_grid_flags_take_commas_as_the_other_commands_lists():
    """The atlas's grid flags read ``--seeds 0,1`` as ``--seeds 0 1`` (the other commands'
    lists are comma-separated), a cell's options staying that cell's."""
    from gradflow import cli

    parser = cli.build_parser()

    def grid(*argv):
        return cli._grid_from_flags(parser.parse_args(["atlas", "--out", ".", *argv]))

    spaced = grid("--cells", "lstm", "lstm:forget_bias=1.0,forget_bias_init=0.5", "--seeds",
                  "0", "1", "--input-scales", "0.1", "1", "--sizes", "3x3", "4x5")
    commas = grid("--cells", "lstm,lstm:forget_bias=1.0,forget_bias_init=0.5", "--seeds",
                  "0,1", "--input-scales", "0.1,1", "--sizes", "3x3,4x5")
    assert commas == spaced == {
        "cells": ["lstm", "lstm:forget_bias=1.0,forget_bias_init=0.5"], "seeds": [0, 1],
        "input_scales": [0.1, 1.0], "sizes": [(3, 3), (4, 5)]}
    with pytest.raises(ValueError, match="an empty entry"):
        grid("--seeds", "0,,1")


def test_reproduce_builds_an_atlas_figure_kind(tmp_path):
    """`gradflow reproduce` regenerates atlas figures: the registered kind packs every claim
    into one Result that unpacks to what atlas() returns, and draws it."""
    from gradflow import reproduce

    config = {"figure": "atlas", "claims": ["rnn_amplified"], "rows": "input_scale",
              "cols": "init", "grid": {"cells": ["rnn"], "sizes": [[3, 3]], "hidden": [4],
                                       "input_scales": [0.1, 1.0], "seeds": [0, 1], "batch": 2}}
    builder = reproduce.BUILDERS["atlas"]
    data = builder.compute(config)
    direct = A.atlas(["rnn_amplified"], config["grid"], progress=False)["rnn_amplified"]
    got = A.unpack(data)["rnn_amplified"]
    np.testing.assert_array_equal(got.statistic, direct.statistic)
    np.testing.assert_array_equal(got.holds, direct.holds)
    assert got.config["conditions"] == direct.config["conditions"]
    path = data.save(tmp_path / "a.npz")
    np.testing.assert_array_equal(A.load(path)["rnn_amplified"].fraction, direct.fraction)
    assert builder.draw(config, data).axes


def test_the_cli_takes_the_grids_readout_seed(tmp_path, capsys):
    """An atlas from the grid flags had the readout of seed 0 for every seed, with no flag to
    let each seed draw its own (the committed atlases' rule)."""
    from gradflow import cli

    flags = ["atlas", "--claims", "rnn_amplified", "--cells", "rnn", "--hidden", "4", "--sizes",
             "3x3", "--seeds", "0", "1", "--batch", "2", "--losses", "last", "--wrts", "hidden",
             "--no-progress", "--out", str(tmp_path)]
    assert cli.main(flags + ["--readout-seed", "seed"]) == 0
    got = A.load(tmp_path / "atlas")["rnn_amplified"]
    assert got.config["grid"][0]["readout_seed"] == "seed"
    want = A.atlas(["rnn_amplified"], A.Grid(cells=("rnn",), hidden=(4,), sizes=((3, 3),),
                                             seeds=(0, 1), batch=2, losses=("last",),
                                             wrts=("hidden",), readout_seed="seed"),
                   progress=False)["rnn_amplified"]
    np.testing.assert_array_equal(got.statistic, want.statistic)
    assert cli.main(flags + ["--readout-seed", "x"]) == 2
    assert "readout_seed must be an integer in [0, 2**31 - 1), got 'x', or 'seed'" in \
        capsys.readouterr().err


def test_draw_atlas_gives_conditions_apart_in_other_settings_their_own_panels():
    """Two grids that differ only in batch made two conditions drawn on one square (the last
    one's fraction shown, the other's hidden)."""
    from gradflow import plot
    from gradflow.results import make_result

    grids = [A.Grid(cells=("rnn",), hidden=(4,), sizes=((3, 3),), seeds=(0, 1), batch=b,
                    losses=("last",), wrts=("hidden",)) for b in (2, 3)]
    _, gs, needed = A.plan(["rnn_amplified"], grids)
    res = {"rnn_amplified": make_result(
        "atlas", {"statistic": np.array([[3., 3.], [1., 1.]]),
                  "holds": np.array([[True, True], [False, False]]),
                  "fraction": np.array([1.0, 0.0])},
        {"claim": "rnn_amplified", "description": "", "reads": "gradient_map",
         "conditions": needed, "seeds": [0, 1], "grid": [g.to_dict() for g in gs]},
        warn=False)}
    fig = plot.draw_atlas(res)
    panels = [ax for ax in fig.axes if ax.images]
    assert sorted(t.get_text() for ax in panels for t in ax.texts) == ["0", "1"]
    assert sorted(ax.get_title().split("\n")[-1].split(", ")[-1] for ax in panels) == [
        "batch 2", "batch 3"]


def test_the_cli_refuses_a_maps_flags_for_another_measure(tmp_path, capsys):
    """``--measure gates --losses all`` ran, the losses recorded in the grid and never used:
    refused by the flags as typed (also at their default values)."""
    from gradflow import cli

    flags = ["atlas", "--measure", "gates", "--cells", "lstm", "--hidden", "4", "--sizes",
             "2x3", "--seeds", "0", "--batch", "2", "--no-progress", "--out", str(tmp_path)]
    for extra, said in ((["--losses", "last", "all"], "--losses sets"),
                        (["--wrts", "hidden", "--readout-seed", "seed"],
                         "--wrts, --readout-seed set")):
        assert cli.main(flags + extra) == 2
        err = capsys.readouterr().err
        assert f"{said} the gradient maps' conditions; --measure gates has none" in err, err
    assert not any(tmp_path.iterdir())  # refused before anything was written
    flags[flags.index("gates")] = "gradient_maps"  # a misspelt measure: named as such
    assert cli.main(flags + ["--losses", "last"]) == 2
    assert "unknown measure 'gradient_maps'; valid: gradient_map" in capsys.readouterr().err


def test_the_table_says_when_its_median_leaves_out_nan_seeds():
    """A condition whose statistic is NaN on 3 of 4 seeds shows the remaining seed's value as
    its median: the row says how many seeds were left out."""
    from gradflow.results import make_result

    res = make_result("atlas", {"statistic": np.array([[np.nan, 0.645, np.nan, np.nan],
                                                       [0.1, 0.2, 0.3, 0.4]]),
                                "fraction": np.array([0.25, 1.0])},
                      {"conditions": [{"cell": "rnn"}, {"cell": "lstm"}]}, warn=False)
    rows = A.table({"c": res}, factors=("cell",)).splitlines()[2:]
    assert rows == ["| c | rnn | 0.645 (NaN 3/4) | 0.25 |", "| c | lstm | 0.25 | 1.00 |"]
