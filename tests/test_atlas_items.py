"""gradflow.atlas beyond gradient maps (SPEC 4 items 2-4): claims read from local gains and gate
statistics equal the same predicates on gradflow.local_gains / gradflow.gates.saturation run seed
by seed; non-finite maps give NaN ("does not hold"), not an error; and the boundaries of the
committed atlases (figures/atlas_vertical_gain, atlas_gu_gates_init, atlas_cheng_refined)."""
import os

import numpy as np
import pytest

import gradflow
from gradflow import atlas as A
from gradflow import gates
from gradflow.problem import cell_problem

FIGURES = os.path.join(os.path.dirname(__file__), "..", "figures")


def _problem(c, seed):
    name, options = A.parse_cell(c["cell"])
    init = A.cell_for(c["cell"], c["init"], c["steps"]).config["init"]
    return cell_problem(name, layers=c["layers"], steps=c["steps"], hidden=c["hidden"],
                        batch=c["batch"], seed=seed, init=init, input_scale=c["input_scale"],
                        options=options)


def _direct(res, claim, measure):
    """Every (condition, seed) statistic of ``res`` against ``claim.predicate`` on
    ``measure(problem)`` computed one seed at a time."""
    for i, c in enumerate(res.config["conditions"]):
        for j, seed in enumerate(c["seeds"]):
            s, h = claim.evaluate(measure(_problem(c, seed)))
            np.testing.assert_allclose(res.statistic[i, j], s, rtol=2e-5, equal_nan=True)
            assert res.holds[i, j] == h


def test_gain_claims_equal_local_gains_seed_by_seed():
    g = A.Grid(cells=("lstm:forget_bias=1.0",), inits=("orthogonal", "torch"),
               input_scales=(0.01, 1.0), hidden=(4,), sizes=((3, 2),), seeds=(0, 5), batch=2,
               measure="local_gains")
    out = A.atlas(["lstm_vertical_quarter"], g, progress=False)
    for name, res in out.items():
        assert res.statistic.shape == (4, 2) and res.config["reads"] == "local_gains"
        assert all("loss" not in c and c["measure"] == "local_gains"
                   for c in res.config["conditions"])
        _direct(res, A.CLAIMS[name],
                lambda p: gradflow.local_gains(p.stack, p.params, p.xs).arrays)


def test_gate_claims_equal_gate_statistics_seed_by_seed():
    g = A.Grid(cells=("ur_lstm", "refined_gru:mode=add"), inits=("torch+ugi",),
               input_scales=(0.1, 3.0), hidden=(4,), sizes=((2, 3),), seeds=(0, 2), batch=2,
               measure="gates")
    names = ["ugi_timescales_two_decades", "ur_effective_more_saturated",
             "gru_gates_outside_unit", "gru_gates_saturated"]
    out = A.atlas(names, g, progress=False)
    for name in names:
        _direct(out[name], A.CLAIMS[name],
                lambda p: gates.saturation(p.stack, p.params, p.xs).arrays)


def test_gate_predicates_by_hand():
    m = {"timescale/f/unit": np.array([[1.0, 10.0], [100.0, 2.0]]),
         "saturated/i/pooled": np.float64(0.2), "saturated/o/pooled": np.float64(0.6),
         "outside/i/pooled": np.array([3, 1, 0]), "hist/i/pooled": np.array([10, 6]),
         "outside/o/pooled": np.array([0, 0, 0]), "hist/o/pooled": np.array([20, 0]),
         **{f"nonfinite/{g}/pooled": np.int64(0) for g in "fio"}}
    assert A.timescale_decades("f")(m) == pytest.approx(2.0)
    assert A.saturated_share(("i", "o"))(m) == pytest.approx(0.4)
    assert A.outside_share(("i", "o"))(m) == pytest.approx(4 / 40)
    assert A.saturation_gain("o", "i")(m) == pytest.approx(0.4)
    # an overflowed forward pass (inf or NaN gate values, counted in nonfinite): no reading,
    # although gates.saturation's shares over the finite values are numbers
    for g, stats in (("o", [A.saturated_share(("i", "o")), A.outside_share(("i", "o")),
                            A.saturation_gain("o", "i")]), ("f", [A.timescale_decades("f")])):
        m[f"nonfinite/{g}/pooled"] = np.int64(1)
        assert all(np.isnan(stat(m)) for stat in stats)
        m[f"nonfinite/{g}/pooled"] = np.int64(0)
        assert not any(np.isnan(stat(m)) for stat in stats)
    m["timescale/f/unit"] = np.array([[1.0, np.inf]])  # a gate rounded to 1
    assert np.isnan(A.timescale_decades("f")(m))
    assert A.median_vertical_gain({"vertical_rms": np.array([[0.2, 0.3, 0.25]])}) == 0.25


def test_nonfinite_maps_read_nan_and_do_not_hold():
    """A map whose top-last entry is 0 or NaN (an underflowed or exploded stack) is data."""
    claim = A.CLAIMS["bottom_layer_kept"]
    for bad in (np.zeros((2, 3)), np.full((2, 3), np.nan),
                np.array([[1.0, np.inf, 1.0], [1.0, 1.0, np.inf]]),
                np.array([[1.0, np.inf, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])):  # median: 1
        s, h = claim.evaluate(bad)
        assert np.isnan(s) and h is False
    assert claim.evaluate(np.array([[0.5, 0.1, 0.2], [1.0, 1.0, 2.0]])) == (0.1, True)


def test_an_atlas_of_overflowing_conditions_says_so(monkeypatch, tmp_path, capsys):
    """Non-finite maps are data (the statistic NaN, not holding) and now said: the atlas
    warned nothing, and the CLI's summary read them as failing."""
    from gradflow import cli
    from gradflow.results import NonFiniteWarning

    g = A.Grid(cells=("indrnn:u_max=10000.0",), hidden=(4,), sizes=((3, 12),), seeds=(0, 1),
               batch=2, losses=("last",), wrts=("hidden",))
    claim = A.Claim("first_probe", "r[0, 0] > 0", ("indrnn",), A.bottom_first, lambda s: s > 0)
    with pytest.warns(NonFiniteWarning, match=r"atlas: the measurements of 1 of 1 conditions "
                                              r"hold non-finite entries \(e.g. indrnn"):
        res = A.atlas([claim], g, progress=False)["first_probe"]
    assert np.all(np.isnan(res.statistic)) and not res.holds.any()
    monkeypatch.setitem(A.CLAIMS, claim.name, claim)
    assert cli.main(["atlas", "--claims", "first_probe", "--cells", "indrnn:u_max=10000.0",
                     "--hidden", "4", "--sizes", "3x12", "--seeds", "0", "1", "--batch", "2",
                     "--losses", "last", "--wrts", "hidden", "--no-progress", "--out",
                     str(tmp_path)]) == 0
    assert ("first_probe: holds for all 2 seeds in 0 of 1 conditions, for at least one seed "
            "in 0 (r[0, "
            "0] > 0); not readable (NaN: a map not finite, or 0 where it is read) for 2 of 2 "
            "(condition, seed) pairs, counted as not holding") in capsys.readouterr().out


def test_claims_apply_by_measurement_and_factors():
    c = A.Grid(cells=("lstm",), measure="gates").conditions()[0]
    assert A.CLAIMS["lstm_forget_not_saturated"].applies(c)
    assert not A.CLAIMS["lstm_vertical_quarter"].applies(c)  # reads local_gains
    assert not A.CLAIMS["lstm_collapses"].applies(c)
    m = A.Grid(cells=("refined_lstm:mode=add",), wrts=("hidden",)).conditions()[0]
    assert A.CLAIMS["bottom_layer_kept"].applies(m) and "measure" not in m
    with pytest.raises(ValueError, match="unknown measure 'grads'; valid: gradient_map"):
        A.Grid(cells=("lstm",), measure="grads")
    with pytest.raises(ValueError, match="reads unknown measurement"):
        A.Claim("x", "x", ("lstm",), len, bool, reads="nope")
    with pytest.raises(ValueError, match="already registered"):
        A.register_claim(A.CLAIMS["lstm_collapses"])
    # a gate claim reads only cells that report its gates: a tied LSTM has no input gate
    # (the claim was applied, and failed after measuring with KeyError 'nonfinite/i/pooled')
    tied = A.Grid(cells=("lstm:aux=refine,tied=True",), measure="gates").conditions()[0]
    assert A.CLAIMS["lstm_forget_not_saturated"].applies(tied)
    assert not A.CLAIMS["lstm_gates_outside_unit"].applies(tied)
    assert "with gates i, o" in A.CLAIMS["lstm_gates_outside_unit"].scope()
    with pytest.raises(ValueError, match=r"no condition of the grid is read by the claims "
                                         r"lstm_gates_outside_unit \(reads gates, cells lstm, "
                                         r"refined_lstm, with gates i, o\)"):
        A.plan(["lstm_gates_outside_unit"], A.Grid(cells=("lstm:aux=refine,tied=True",),
                                                    measure="gates"))
    # a cell option that needs the grid's init (t_max: chrono's) is built under it
    chrono = A.cell_for("lstm:t_max=50", "chrono", 3)
    assert dict(chrono.options)["t_max"] == 50 and chrono.config["init"] == "orthogonal+chrono"


# ---------------------------------------------------------------------------------------------
# The committed atlases (regenerate with `gradflow reproduce --only NAME --out DIR`)


def _committed(name):
    return A.load(os.path.join(FIGURES, name))


def _rows(res, **match):
    """Indices of the conditions of ``res`` matching every ``factor=value`` (size as 'LxT')."""
    rows = [i for i, c in enumerate(res.config["conditions"])
            if all({**c, "size": f"{c['layers']}x{c['steps']}"}.get(k) == v
                   for k, v in match.items())]
    assert rows, match
    return rows


def _held(res, **match):
    """{condition tuple (cell, init, input_scale, hidden): fraction} where some seed holds."""
    return {(c["cell"], c["init"], c["input_scale"], c["hidden"]): f
            for c, f in zip(res.config["conditions"], res.fraction) if f > 0
            and all(c.get(k) == v for k, v in match.items())}


@pytest.fixture(scope="module")
def gu():
    return _committed("atlas_gu_gates_init")


def test_gu_grid(gu):
    assert sorted(gu) == sorted(["ugi_timescales_two_decades", "ur_effective_two_decades",
                                 "lstm_forget_not_saturated", "ur_effective_more_saturated"])
    assert all(r.statistic.shape[1] == 4 and r.config["reads"] == "gates" for r in gu.values())
    assert len(gu["ugi_timescales_two_decades"].fraction) == 3 * 4 * 3 * 3


def test_gu_ugi_spans_about_log10_H_decades(gu):
    r = gu["ugi_timescales_two_decades"]
    # without UGI biases the timescales all sit near 1/(1 - 1/2) = 2: at most 0.3 decades
    for cell in ("lstm", "lstm:forget_bias=1.0"):
        for init in ("orthogonal", "torch"):
            assert r.statistic[_rows(r, cell=cell, init=init)].max() < 0.35
    # UGI: the span is about log10(H) (u ~ U[1/H, 1 - 1/H]); never 2 decades at H = 32
    ugi = [i for i, c in enumerate(r.config["conditions"])
           if c["cell"] == "ur_lstm" or c["init"].endswith("+ugi")]
    h32 = [i for i in ugi if r.config["conditions"][i]["hidden"] == 32]
    med = np.median(r.statistic[h32], axis=1)  # over seeds
    assert r.fraction[h32].max() == 0 and 1.25 < med.min() and r.statistic[h32].max() < 1.9
    # plain UGI (no forget bias): every seed only at H = 256, input scale 0.1 (2.3 decades)
    plain = [i for i in ugi if r.config["conditions"][i]["cell"] != "lstm:forget_bias=1.0"]
    full = {r.config["conditions"][i]["hidden"] for i in plain if r.fraction[i] == 1}
    assert full == {256} and all(r.config["conditions"][i]["input_scale"] == 0.1
                                 for i in plain if r.fraction[i] == 1)
    s = np.median(r.statistic[_rows(r, cell="ur_lstm", init="orthogonal", hidden=256)], axis=1)
    assert 2.25 < s[0] < 2.4 and s[0] > s[1] > s[2]  # larger inputs shorten the longest
    # forget bias 1 on top of UGI: every seed at H >= 128, every input scale
    fb = _rows(r, cell="lstm:forget_bias=1.0")
    assert {(r.config["conditions"][i]["init"], r.config["conditions"][i]["hidden"])
            for i in fb if r.fraction[i] == 1} == {(i, h) for i in ("orthogonal+ugi",
                                                                    "torch+ugi")
                                                   for h in (128, 256)}


def test_gu_effective_gate_halves_the_longest_timescale(gu):
    g, f = gu["ur_effective_two_decades"], gu["ugi_timescales_two_decades"]
    gi, fi = _rows(g, cell="ur_lstm"), _rows(f, cell="ur_lstm")
    diff = np.median(f.statistic[fi], axis=1) - np.median(g.statistic[gi], axis=1)
    assert 0.2 < diff.min() and diff.max() < 0.45  # about log10(2) = 0.3 decades
    assert {k[3] for k in _held(g)} == {256}
    m = gu["ur_effective_more_saturated"]
    assert m.statistic.max() < 0.02 and np.median(m.statistic) < -0.04
    assert {(k[1], k[2], k[3]) for k in _held(m)} == {("orthogonal", 3.0, 32),
                                                       ("orthogonal", 3.0, 128),
                                                       ("orthogonal+ugi", 3.0, 32),
                                                       ("orthogonal+ugi", 3.0, 128)}


def test_gu_plain_lstm_forget_gate_not_saturated_below_input_scale_3(gu):
    r = gu["lstm_forget_not_saturated"]
    for cell in ("lstm", "lstm:forget_bias=1.0"):
        for init in ("orthogonal", "torch"):
            small = _rows(r, cell=cell, init=init, input_scale=0.1) + _rows(
                r, cell=cell, init=init, input_scale=1.0)
            assert r.fraction[small].min() == 1 and r.statistic[small].max() < 0.02
        big = _rows(r, cell=cell, init="orthogonal", input_scale=3.0)
        assert r.fraction[big].max() == 0 and r.statistic[big].min() > 0.15
        # torch's weights U(-1/sqrt(H), 1/sqrt(H)) have RMS 1/sqrt(3): not saturated at 3
        big = _rows(r, cell=cell, init="torch", input_scale=3.0)
        assert r.fraction[big].min() == 1 and r.statistic[big].max() < 0.08
    # UGI biases put about 10% of the units' f outside [0.05, 0.95] by construction
    ugi = _rows(r, cell="lstm", init="orthogonal+ugi", input_scale=0.1)
    assert 0.04 < r.statistic[ugi].min() and r.statistic[ugi].max() < 0.13


@pytest.fixture(scope="module")
def vertical():
    return _committed("atlas_vertical_gain")


def test_vertical_gains_hold_under_orthogonal_init_only(vertical):
    closed = {"rnn_vertical_one": 1.0, "lstm_vertical_quarter": 0.25,
              "gru_vertical_half": 0.5, "star_vertical_half": 0.5}
    assert sorted(vertical) == sorted(closed)
    for name, value in closed.items():
        r = vertical[name]
        assert r.statistic.shape == (len(r.fraction), 4) and r.config["reads"] == "local_gains"
        # torch init: U(-1/sqrt(H), 1/sqrt(H)) weights have RMS gain 1/sqrt(3) = 0.577
        paper = [i for i in _rows(r, init="torch")
                 if r.config["conditions"][i]["cell"] != "star:variant=official"]
        t = r.statistic[paper]
        assert r.fraction[_rows(r, init="torch")].max() == 0
        if name != "rnn_vertical_one":  # gated cells: the closed form times 1/sqrt(3)
            assert np.abs(np.median(t, axis=1) / (value / np.sqrt(3)) - 1).max() < 0.04
    rnn = vertical["rnn_vertical_one"]
    assert 0.53 < rnn.statistic[_rows(rnn, init="torch")].min()
    assert rnn.statistic[_rows(rnn, init="torch")].max() < 0.58
    # vRNN: tanh' at the actual pre-activations: holds at input scale <= 0.1, never at 1
    small = _rows(rnn, init="orthogonal", input_scale=0.01) + _rows(
        rnn, init="orthogonal", input_scale=0.1)
    assert rnn.fraction[small].min() == 1 and rnn.statistic[small].min() > 0.92
    big = rnn.statistic[_rows(rnn, init="orthogonal", input_scale=1.0)]
    assert rnn.fraction[_rows(rnn, init="orthogonal", input_scale=1.0)].max() == 0
    assert 0.74 < big.min() and big.max() < 0.86
    # gated cells under orthogonal init: every input scale, depth and width, every seed
    for name in ("lstm_vertical_quarter", "gru_vertical_half", "star_vertical_half"):
        r = vertical[name]
        rows = [i for i in _rows(r, init="orthogonal")
                if r.config["conditions"][i]["cell"] != "star:variant=official"]
        assert r.fraction[rows].min() == 1
        assert np.abs(r.statistic[rows] / closed[name] - 1).max() < 0.025
    # the authors' released STAR: its chrono bias shuts the input, 0.01-0.05 instead of 0.5
    off = vertical["star_vertical_half"]
    rows = _rows(off, cell="star:variant=official")
    assert off.fraction[rows].max() == 0 and off.statistic[rows].max() < 0.05


def test_vertical_mechanism():
    """The per-layer quantities behind it (seed 0, H = 64, figures/atlas_items_mechanism.py)."""
    import json

    with open(os.path.join(FIGURES, "atlas_vertical_gain_mechanism.json")) as f:
        m = json.load(f)
    for cell, value in (("lstm", 0.25), ("gru", 0.5), ("star", 0.5)):
        g = m[f"{cell}|orthogonal|64x4"]
        # gates at sigma(0) = 0.5 and tanh' = 1 at small inputs: the closed form per layer
        assert np.allclose(g["0.01"]["vertical_rms"], value, rtol=2e-3)
        # at N(0, 1) inputs only the bottom layers see large pre-activations: each layer
        # shrinks the state by the closed form, so the median over layers keeps it
        big = g["1.0"]
        assert big["vertical_rms"][0] < 0.85 * value and big["one_minus_h2"][0] < 0.97
        assert abs(np.median(big["vertical_rms"]) / value - 1) < 0.01
        assert big["rms_h"][-1] < 1e-3 < big["rms_h"][0]
    rnn = m["rnn|orthogonal|64x4"]["1.0"]  # no shrinking: tanh saturates in every layer
    assert max(rnn["vertical_rms"]) < 0.9 and min(rnn["rms_h"]) > 0.3
    # README: the gain is the RMS of tanh' (0.64 at the bottom, 0.83-0.89 at the top), the
    # mean tanh' lower (0.55, 0.81-0.88)
    tops = [m[f"rnn|orthogonal|{d}x4"]["1.0"] for d in (8, 64)]
    assert round(rnn["vertical_rms"][0], 2) == 0.64 and round(rnn["one_minus_h2"][0], 2) == 0.55
    assert [round(t["vertical_rms"][-1], 2) for t in tops] == [0.84, 0.89]
    assert 0.83 <= min(t["vertical_rms"][-1] for t in tops)
    assert [round(t["one_minus_h2"][-1], 2) for t in tops] == [0.82, 0.88]
    assert 0.805 <= min(min(t["one_minus_h2"][-2:]) for t in tops)
    np.testing.assert_allclose(rnn["vertical_rms"], rnn["one_minus_h2"], atol=0.1)
    off = m["star:variant=official|orthogonal|64x4"]["0.01"]
    assert min(off["gate_mean/k"]) > 0.98 and max(off["vertical_rms"]) < 0.1


@pytest.fixture(scope="module")
def cheng():
    return _committed("atlas_cheng_refined")


def _med(res, **match):
    return np.median(res.statistic[_rows(res, **match)], axis=1)


def test_cheng_vanilla_maps(cheng):
    b = cheng["bottom_layer_kept"]
    assert b.statistic.shape == (9 * 2 * 2 * 2 * 2, 4)
    # GRU and MGU keep the bottom layer everywhere (median r 0.15-1.5)
    for cell in ("gru", "mgu"):
        assert b.fraction[_rows(b, cell=cell)].min() == 1
    # LSTM: kept at 2 layers except the hidden map under the final-output loss (0.05-0.06);
    # collapsed at 8 layers (r ~ 1e-3 hidden, 0.01-0.08 params) but for params/all at scale 1
    lstm = {(c["layers"], c["input_scale"], c["loss"], c["wrt"]): f
            for c, f in zip(b.config["conditions"], b.fraction) if c["cell"] == "lstm"}
    assert {k for k, f in lstm.items() if f < 1} == (
        {(2, s, "last", "hidden") for s in (0.1, 1.0)}
        | {(8, s, loss, wrt) for s in (0.1, 1.0) for loss in ("last", "all")
           for wrt in ("params", "hidden")} - {(8, 1.0, "all", "params")})
    assert _med(b, cell="lstm", layers=8, wrt="hidden").max() < 0.002


def test_cheng_refined_maps_vanish_or_explode(cheng):
    b = cheng["bottom_layer_kept"]
    # non-finite maps are data: 72 of 576 (condition, seed) statistics are NaN, all refined,
    # all but one setting at 8 layers; none of them holds
    nan = np.isnan(b.statistic)
    assert nan.sum() == 72 and not b.holds[nan].any()
    bad = {b.config["conditions"][i]["cell"] for i in np.nonzero(nan.any(axis=1))[0]}
    assert bad == {"refined_lstm", "refined_mgu", "refined_gru:mode=add",
                   "refined_mgu:mode=add"}
    # multiplicative refined LSTM: the state underflows; at 8 layers the hidden map is exactly
    # 0 below the top layer and the params map NaN: never kept at 8 layers
    assert b.fraction[_rows(b, cell="refined_lstm", layers=8)].max() == 0
    assert _med(b, cell="refined_lstm", layers=8, wrt="hidden").max() == 0
    assert np.isnan(b.statistic[_rows(b, cell="refined_lstm", layers=8, wrt="params")]).all()
    # ... and at 2 layers it keeps less than the vanilla LSTM in every setting
    for wrt in ("params", "hidden"):
        for loss in ("last", "all"):
            for s in (0.1,):
                ref = _med(b, cell="refined_lstm", layers=2, wrt=wrt, loss=loss, input_scale=s)
                van = _med(b, cell="lstm", layers=2, wrt=wrt, loss=loss, input_scale=s)
                assert ref[0] < van[0]
    # multiplicative refined GRU at input scale 1, 8 layers: explodes (r 9 to 1e4)
    g = _rows(b, cell="refined_gru", layers=8, input_scale=1.0)
    assert np.median(b.statistic[g], axis=1).min() > 8 and b.statistic[g].max() > 1e3
    # ... at input scale 0.1 the final-output loss vanishes (r ~ 3e-5 at 2 layers)
    assert _med(b, cell="refined_gru", input_scale=0.1, loss="last").max() < 1e-3
    # additive GRU/MGU at input scale 1: explode (README: seeds 3.5e5 to 7.9e14, medians 6e6
    # to 4e14 at 2 layers; NaN at 8)
    two = np.concatenate([b.statistic[_rows(b, cell=c, layers=2, input_scale=1.0)] for c in (
        "refined_gru:mode=add", "refined_mgu:mode=add")])
    assert 3.5e5 <= np.nanmin(two) < 3.6e5 and 7.9e14 <= np.nanmax(two) < 8e14
    meds = np.nanmedian(two, axis=1)
    assert 6e6 <= meds.min() < 7e6 and 3.9e14 < meds.max() < 4e14
    # multiplicative MGU at 8 layers, scale 1: NaN in 3 of 4 seeds, the fourth exploding
    # (240 to 4.6e16)
    m = b.statistic[_rows(b, cell="refined_mgu", layers=8, input_scale=1.0)]
    assert np.isnan(m[:, :3]).all() and 239 < m[:, 3].min() and 4.5e16 < m[:, 3].max() < 4.6e16
    for cell in ("refined_gru:mode=add", "refined_mgu:mode=add"):
        assert np.nanmin(b.statistic[_rows(b, cell=cell, layers=2, input_scale=1.0)]) > 1e5
        assert np.isnan(b.statistic[_rows(b, cell=cell, layers=8, input_scale=1.0)]).mean() \
            > 0.7
        # at input scale 0.1 the additive cell is the vanilla one, nudged: kept like it
        assert b.fraction[_rows(b, cell=cell, input_scale=0.1)].min() == 1
    # additive LSTM at input scale 1, 8 layers: kept on the hidden map (1.5-2.7), exploding
    # on the params map (15-24)
    add = dict(cell="refined_lstm:mode=add", layers=8, input_scale=1.0)
    assert b.fraction[_rows(b, wrt="hidden", **add)].min() == 1
    assert _med(b, wrt="params", **add).min() > 10


def test_cheng_refined_keeps_more_than_vanilla_where_the_readme_says(cheng):
    """Every setting where a refined map holds in every seed and keeps more at the bottom than
    the vanilla cell's (README, refined gates), and no other holding setting is missed."""
    b = cheng["bottom_layer_kept"]
    more = [("refined_lstm:mode=add", "lstm", dict(layers=2, input_scale=1.0)),
            ("refined_lstm:mode=add", "lstm", dict(layers=8, input_scale=1.0, wrt="hidden")),
            ("refined_gru", "gru", dict(layers=2, input_scale=1.0)),
            ("refined_gru", "gru", dict(layers=8, input_scale=0.1, loss="all")),
            ("refined_gru", "gru", dict(layers=2, input_scale=0.1, loss="all", wrt="hidden")),
            ("refined_mgu", "mgu", dict(layers=2, input_scale=0.1, wrt="params", loss="last"))]
    for refined, vanilla, where in more:
        assert b.fraction[_rows(b, cell=refined, **where)].min() == 1, (refined, where)
        assert (_med(b, cell=refined, **where) > _med(b, cell=vanilla, **where)).all()
    # the multiplicative refined cells hold nowhere else but these (besides the GRU's params
    # map under the sequence loss at 2 layers, scale 0.1, below vanilla's, and the LSTM's params
    # map at 2 x scale 1)
    held = {(c["cell"], c["layers"], c["input_scale"], c["wrt"], c["loss"])
            for c, f in zip(b.config["conditions"], b.fraction) if f == 1
            and c["cell"] in ("refined_lstm", "refined_gru", "refined_mgu")}
    assert held == ({("refined_gru", 2, 1.0, w, l) for w in ("params", "hidden")
                     for l in ("last", "all")}
                    | {("refined_gru", n, 0.1, w, "all") for n in (2, 8)
                       for w in ("params", "hidden")}
                    | {("refined_lstm", 2, 1.0, "params", l) for l in ("last", "all")}
                    | {("refined_mgu", 2, 0.1, "params", l) for l in ("last", "all")})
    # the multiplicative MGU at 8 layers and scale 0.1 underflows: its hidden map is exactly 0
    assert _med(b, cell="refined_mgu", layers=8, input_scale=0.1, wrt="hidden").max() == 0


def test_nonfinite_conditions_are_marked_in_the_figure(cheng):
    """A condition whose map overflowed (NaN: does not hold) is drawn hatched with "NaN k/S",
    not as a plain red 0 like a measured failure; its panel titles name H."""
    from gradflow import plot

    b = {"bottom_layer_kept": cheng["bottom_layer_kept"]}
    fig = plot.draw_atlas(b, rows="input_scale", cols="size")
    marks = sorted(t.get_text() for ax in fig.axes for t in ax.texts if "NaN" in t.get_text())
    st = b["bottom_layer_kept"].statistic
    want = sorted(f"{f:.2g}\nNaN {k}/4" for f, k in zip(b["bottom_layer_kept"].fraction,
                                                       np.sum(~np.isfinite(st), axis=1)) if k)
    assert marks == want and len(marks) == 20
    hatched = sum(1 for ax in fig.axes for p in ax.patches if p.get_hatch())
    assert hatched == len(want)
    assert all("H=32" in ax.get_title() for ax in fig.axes if ax.images)


def test_bands_of_few_panels_share_rows(cheng):
    """The Cheng atlas has 9 bands of 4 map panels and 18 gate bands of one: drawn one band per
    row it was a strip 27 rows tall; bands now fill rows of 4 in order (9 + ceil(18 / 4) = 14
    rows), every panel drawn once, each band's panels side by side in one row."""
    from gradflow import plot

    fig = plot.draw_atlas(cheng, rows="input_scale", cols="size")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 9 * 4 + 18
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in panels} == {(14, 4)}
    labelled = [ax for ax in panels if ax.get_ylabel()]  # the first panel of each band
    assert len(labelled) == 27
    rows = [ax.get_subplotspec().rowspan.start for ax in labelled]
    assert rows == sorted(rows) and rows[:9] == list(range(9)) and rows[-1] == 13


def test_cheng_gate_ranges(cheng):
    for fam, gates_ in (("lstm", "io"), ("gru", "rz"), ("mgu", "f")):
        out, sat = cheng[f"{fam}_gates_outside_unit"], cheng[f"{fam}_gates_saturated"]
        # a sigmoid never leaves [0, 1] and is saturated < 0.5% of the time at init
        assert out.statistic[_rows(out, cell=fam)].max() == 0
        assert sat.statistic[_rows(sat, cell=fam)].max() < 0.005
        # multiplicative: sigma(z) * x, negative wherever x is: 24-56% outside [0, 1] per
        # seed, 24-54% the medians over seeds (README), 58-98% 'saturated' (60-98% the
        # medians; mostly |value| < 0.05: the small x, not a decisive gate), wherever the
        # forward pass stays finite (else no reading: NaN, does not hold)
        m = [i for i in _rows(out, cell=f"refined_{fam}") if np.isfinite(out.statistic[i]).all()]
        assert out.fraction[m].min() == 1 and 0.23 < out.statistic[m].min()
        assert out.statistic[m].max() < 0.56
        med = np.median(out.statistic[m], axis=1)
        assert 0.235 <= med.min() and med.max() < 0.545
        rows = _rows(sat, cell=f"refined_{fam}")
        s = sat.statistic[rows]
        assert (sat.holds[rows] | np.isnan(s)).all() and np.nanmin(s) > 0.58
        med = np.median(s[~np.isnan(s).any(axis=1)], axis=1)
        assert 0.595 <= med.min() and med.max() < 0.985
        assert np.array_equal(np.isnan(s), np.isnan(out.statistic[rows]))  # one rule for both
        # additive: sigma(z) + x never leaves [0, 1] at input scale 0.1, 51-69% at 1 per seed
        a = f"refined_{fam}:mode=add"
        assert out.statistic[_rows(out, cell=a, input_scale=0.1)].max() == 0
        assert sat.statistic[_rows(sat, cell=a, input_scale=0.1)].max() == 0
        big = out.statistic[_rows(out, cell=a, input_scale=1.0, layers=2)]
        assert big.min() > 0.5 and big.max() < 0.7
        assert 0.515 <= np.median(big) < 0.685  # the README's 52-68% (medians over seeds)
        big = sat.statistic[_rows(sat, cell=a, input_scale=1.0, layers=2)]
        assert 0.545 <= np.median(big) < 0.715  # and 55-71% saturated
    # the exploded additive GRU/MGU at 8 layers: non-finite gate values, no reading, and the
    # multiplicative MGU there in 3 of 4 seeds; every other condition reads a number
    for fam in ("lstm", "gru", "mgu"):
        for claim in (f"{fam}_gates_outside_unit", f"{fam}_gates_saturated"):
            r = cheng[claim]
            for i, c in enumerate(r.config["conditions"]):
                overflows = (c["layers"] == 8 and c["input_scale"] == 1.0
                             and c["cell"] in ("refined_gru:mode=add", "refined_mgu:mode=add",
                                               "refined_mgu"))
                n = np.isnan(r.statistic[i]).sum()
                assert n == ((3 if c["cell"] == "refined_mgu" else 4) if overflows else 0), c


def test_cheng_mechanism():
    """Seed 0 (figures/atlas_items_mechanism.py): where the refined states go."""
    import json

    with open(os.path.join(FIGURES, "atlas_cheng_refined_mechanism.json")) as f:
        m = json.load(f)
    # multiplicative LSTM: o and i scale with the layer's input, so |h| shrinks about
    # quadratically per layer (0.137, 0.004, ..., 1.6e-11, 1e-27, then exactly 0 at scale 1)
    # and the hidden map is exactly 0 below the top layer (7 of 8 layers)
    u = m["refined_lstm|orthogonal|8x10"]["1.0"]
    assert u["mean_abs_h"][1] < 0.01 and u["mean_abs_h"][3] < 1e-10
    assert max(u["mean_abs_h"][5:]) == 0
    assert u["hidden_map_zero"] == 0.875
    # multiplicative MGU / additive GRU and MGU at scale 1: the kept coefficient leaves [0, 1],
    # the state grows without bound layer by layer and the 8-layer hidden map is all NaN/inf
    for cell in ("refined_mgu", "refined_gru:mode=add", "refined_mgu:mode=add"):
        g = m[f"{cell}|orthogonal|8x10"]["1.0"]
        assert g["hidden_map_nonfinite"] == 1.0 and g["mean_abs_h"][1] > 50
    # vanilla cells: bounded states, finite maps
    for cell in ("lstm", "gru", "mgu"):
        g = m[f"{cell}|orthogonal|8x10"]["1.0"]
        assert g["hidden_map_nonfinite"] == 0 and max(g["mean_abs_h"]) < 0.4


# ---------------------------------------------------------------------------------------------
# figures/atlas_star_fig2_width and atlas_gu_gates_depth: the boundaries README quotes


def test_star_fig2_claims_across_widths():
    """README, "Width and input scale": the vRNN's final-output amplification needs smaller
    inputs as H grows, the sequence loss's holds everywhere; the collapse of the LSTM with
    forget bias 1 fails at ever smaller inputs as H grows."""
    w = _committed("atlas_star_fig2_width")
    assert sorted(w) == ["lstm_collapses", "rnn_amplified"]
    r, lc = w["rnn_amplified"], w["lstm_collapses"]
    assert r.statistic.shape == (24, 4) and lc.statistic.shape == (32, 4)

    def med(res, **m):
        return np.round(np.median(res.statistic[_rows(res, **m)], axis=1), 3).tolist()

    def share(res, **m):
        return res.fraction[_rows(res, **m)].tolist()

    last = dict(loss="last")
    assert share(r, input_scale=0.001, **last) == [1.0] * 4
    assert [round(v, 1) for v in med(r, input_scale=0.001, **last)] == [41.3, 16.6, 10.4, 4.9]
    assert share(r, input_scale=0.01, **last) == [1.0, 1.0, 0.0, 0.0]
    assert med(r, input_scale=0.01, **last) == [4.199, 2.311, 1.721, 1.107]
    assert share(r, input_scale=0.1, **last) == [0.0] * 4
    s = np.median(r.statistic[_rows(r, input_scale=0.1, **last)], axis=1)
    assert 0.925 < s.min() and s.max() < 1.5
    s = np.median(r.statistic[_rows(r, loss="all")], axis=1)
    assert r.fraction[_rows(r, loss="all")].min() == 1 and 2.2 < s.min() and s.max() < 38.5
    # the LSTM with forget bias 1: rows are H = 16, 32, 64, 128
    held = {(c["input_scale"], c["hidden"], c["loss"]): f
            for c, f in zip(lc.config["conditions"], lc.fraction)}
    medians = {(c["input_scale"], c["hidden"], c["loss"]): float(np.median(s))
               for c, s in zip(lc.config["conditions"], lc.statistic)}
    assert {k for k, m in medians.items() if m > 0.1} == (
        {(1.0, H, loss) for H in (32, 64, 128) for loss in ("last", "all")}
        | {(0.3, H, loss) for H in (64, 128) for loss in ("last", "all")} | {(0.1, 128, "all")})
    assert held[(0.1, 128, "last")] == 0.75 and held[(0.1, 128, "all")] == 0.25
    assert held[(0.1, 64, "all")] == 0.75 and held[(0.3, 32, "all")] == 0.75
    assert held[(1.0, 16, "all")] == 0.75 and held[(1.0, 16, "last")] == 1.0
    assert held[(1.0, 32, "last")] == 0.25 and held[(0.3, 64, "last")] == 0.25
    assert sum(f > 0 for (sc, H, _), f in held.items()
               if (sc, H) in {(1.0, 32), (1.0, 64), (1.0, 128), (0.3, 64), (0.3, 128)}) == 2
    assert all(held[(0.01, H, loss)] == 1 for H in (16, 32, 64, 128) for loss in ("last", "all"))
    small = [m for (sc, H, _), m in medians.items() if sc == 0.01]
    assert 0.0295 < min(small) and max(small) < 0.041
    fail1 = [m for (sc, H, _), m in medians.items() if sc == 1.0 and H >= 32]
    assert 0.105 < min(fail1) and max(fail1) < 0.23


def test_ugi_two_decades_across_width_and_depth():
    """README, UGI: H = 64 fails at every depth; H = 128 and 192 hold in every seed at 8
    layers; at 2-4 layers the seeds split, H = 128 at scale 1 and 2 layers in none."""
    g = _committed("atlas_gu_gates_depth")["ugi_timescales_two_decades"]
    stat = {(c["input_scale"], c["hidden"], c["layers"]): (float(np.median(s)), f)
            for c, s, f in zip(g.config["conditions"], g.statistic, g.fraction)}
    assert len(stat) == 18
    h64 = [m for (_, H, _), (m, f) in stat.items() if H == 64]
    assert all(f == 0 for (_, H, _), (m, f) in stat.items() if H == 64)
    assert 1.62 < min(h64) and max(h64) < 1.785
    deep = [(m, f) for (_, H, L), (m, f) in stat.items() if H >= 128 and L == 8]
    assert all(f == 1 for _, f in deep) and 2.06 < min(m for m, _ in deep) < max(
        m for m, _ in deep) < 2.235
    assert stat[(1.0, 128, 2)] == (pytest.approx(1.84, abs=0.005), 0.0)
    assert stat[(1.0, 128, 4)] == (pytest.approx(1.94, abs=0.005), 0.5)
    split = [(m, f) for (sc, H, L), (m, f) in stat.items()
             if H >= 128 and L < 8 and not (sc == 1.0 and H == 128)]
    assert {f for _, f in split} == {0.5, 0.75}
    assert 1.995 < min(m for m, _ in split) and max(m for m, _ in split) < 2.225
