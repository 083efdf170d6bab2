"""Tests for gradflow.plot: the drawn data equals the result's arrays, checked against NumPy and
against the rendered pixels; shared scales, non-finite markings, file formats, bad input."""
import os
import re
import pathlib
import subprocess
import sys
import warnings

import matplotlib
import numpy as np
import pytest
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle, StepPatch

from gradflow import plot
from gradflow.results import NonFiniteWarning, make_result

L, T = 4, 6


def _map(seed=0, shape=(L, T), low=-6.0, high=0.0):
    """Positive (L, T) map spanning several decades, as gradient magnitudes do."""
    return 10.0 ** np.random.default_rng(seed).uniform(low, high, shape)


def _gradient_map(values, cell="lstm", loss="last", wrt="params", **kw):
    config = dict(cell=cell, layers=values.shape[0], steps=values.shape[1], hidden_size=8,
                  loss=loss, wrt=wrt)
    return make_result("gradient_map", {"values": values}, config, **kw)


def _gate_stats(seed=0, bins=5, gates=("i", "f", "o")):
    rng = np.random.default_rng(seed)
    arrays = {}
    for g in gates:
        arrays[f"hist/{g}"] = rng.integers(0, 50, (L, bins))
        arrays[f"outside/{g}"] = rng.integers(0, 4, (L, 2))
        arrays[f"saturated/{g}"] = rng.uniform(0, 1, (L, T))
        arrays[f"mean/{g}"] = rng.uniform(0, 1, (L, T))
    return make_result("gate_stats", arrays, dict(cell="lstm", gates=list(gates), bins=bins,
                                                  eps=0.05))


def _gains(seed=0, cell="lstm", scale=0.25):
    rng = np.random.default_rng(seed)
    arrays = {f"{k}_{s}": scale * rng.lognormal(0.0, 0.3, (L, T))
              for k in plot.GAIN_KINDS for s in plot.GAIN_STATS}
    return make_result("local_gains", arrays, dict(cell=cell))


def _pixels(fig, ax, cells):
    """RGBA in [0, 1] of the rendered pixels at the centres of cells [(layer l, step t), ...]."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    out = []
    for l, t in cells:
        x, y = ax.transData.transform((t, l))
        out.append(rgba[int(rgba.shape[0] - y), int(x)] / 255.0)
    return np.array(out)


def _hatched(ax):
    return [c for c in ax.collections if c.get_hatch() == plot.NONFINITE_HATCH]


# --- heatmap -----------------------------------------------------------------------------------


def test_heatmap_draws_the_map_with_layer0_at_the_bottom_on_a_log_scale():
    values = _map()
    fig = plot.heatmap(_gradient_map(values))
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    image = ax.images[0]
    np.testing.assert_array_equal(np.ma.getdata(image.get_array()), values)
    assert image.origin == "lower"
    assert isinstance(image.norm, mcolors.LogNorm)
    assert (image.norm.vmin, image.norm.vmax) == (values.min(), values.max())
    # The rendered pixels put layer 0 at the bottom and time left to right: the colour at the
    # bottom-left, top-left and bottom-right cells is the colour of values[0,0], [L-1,0], [0,T-1].
    corners = [(0, 0), (L - 1, 0), (0, T - 1), (L - 1, T - 1)]
    expected = [image.cmap(image.norm(values[l, t])) for l, t in corners]
    np.testing.assert_allclose(_pixels(fig, ax, corners), expected, atol=2.5 / 255)
    lo, hi = ax.get_ylim()
    assert lo < hi  # y grows upwards
    assert ax.get_xlabel().startswith("time") and ax.get_ylabel().startswith("layer")
    colorbar_axes = fig.axes[1]
    assert "partial" in colorbar_axes.get_ylabel()  # labelled with the quantity
    title = ax.get_title()
    assert "lstm" in title and "loss=last" in title and "wrt=params" in title
    assert "non-finite" not in title


def test_heatmap_linear_scale_and_explicit_limits():
    values = _map(1)
    fig = plot.heatmap(_gradient_map(values), log=False, colorbar=False)
    norm = fig.axes[0].images[0].norm
    assert type(norm) is mcolors.Normalize
    assert (norm.vmin, norm.vmax) == (values.min(), values.max())
    assert len(fig.axes) == 1  # no colour bar
    norm = plot.heatmap(_gradient_map(values), vmin=1e-3, vmax=1e-1).axes[0].images[0].norm
    assert (norm.vmin, norm.vmax) == (1e-3, 1e-1)
    with pytest.raises(ValueError, match="vmin must be < vmax"):
        plot.heatmap(_gradient_map(values), vmin=1.0, vmax=0.5)
    for kw in ({"vmin": np.nan}, {"vmax": np.inf}, {"vmin": "0.1"}):  # (matplotlib's words)
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be a finite number or "
                                             "None, got"):
            plot.heatmap(_gradient_map(values), **kw)
    for v in (np.float32(1e-3), np.array(1e-3, np.float32)):  # a 0-d array too (jnp.min(...))
        norm = plot.heatmap(_gradient_map(values), vmin=v).axes[0].images[0].norm
        assert norm.vmin == np.float32(1e-3)


def test_heatmap_normalize_divides_by_top_last_on_a_log_scale_centred_at_one():
    values = _map(2)
    values[-1, -1] = 1e-3  # some entries above it (amplified), some below (attenuated)
    fig = plot.heatmap(_gradient_map(values), normalize=True)
    image = fig.axes[0].images[0]
    np.testing.assert_allclose(np.ma.getdata(image.get_array()), values / 1e-3, rtol=1e-15)
    norm = image.norm
    assert isinstance(norm, mcolors.LogNorm)
    ratios = values / 1e-3
    # as many decades either side of 1 as the ratio farthest from it: 10^k as dark as 10^-k
    m = np.max(np.abs(np.log10(ratios)))
    assert (norm.vmin, norm.vmax) == pytest.approx((10.0 ** -m, 10.0 ** m), rel=1e-12)
    assert norm(1.0) == pytest.approx(0.5)
    for k in (0.3, 1.0, m):
        assert float(norm(10.0 ** k) + norm(10.0 ** -k)) == pytest.approx(1.0, abs=1e-12)
    below, above = image.cmap(norm(0.01)), image.cmap(norm(100.0))
    assert below[2] > below[0] and above[0] > above[2]  # blue-ish vs red-ish
    assert "top, last" in fig.axes[1].get_ylabel()
    ticks = np.log10(fig.axes[1].get_yticks())
    assert 0.0 in ticks and np.allclose(ticks, np.round(ticks))  # whole decades, 1 labelled


def test_heatmap_normalize_takes_as_many_decades_either_side_of_one():
    """An LSTM-like collapse: 0.25 per layer down to 9 decades below the top-last value and
    nothing above it. The smallest ratio takes the darkest blue; above 1 the scale mirrors it
    (1e+9 darkest red), so 1 stays the centre and an amplification is as dark as an
    attenuation of as many decades: a 1.5 beside the collapse is pale, not dark red (each side
    on its own range, until 2026-12-08, drew 2x as dark red as 1e-9 dark blue)."""
    L_, T_ = 16, 4
    values = 0.25 ** (L_ - 1 - np.arange(L_))[:, None] * np.ones((1, T_))
    norm = plot.heatmap(_gradient_map(values), normalize=True).axes[0].images[0].norm
    assert (norm.vmin, norm.vmax) == pytest.approx((0.25 ** 15, 0.25 ** -15), rel=1e-12)
    # by hand: u = (1 + log10(v) / (15 log10 4)) / 2 on both sides
    d = 15 * np.log10(4.0)
    for v, u in ((0.25 ** 15, 0.0), (0.25 ** 10, (1 - 10 / 15) / 2), (1.0, 0.5),
                 (1.5, (1 + np.log10(1.5) / d) / 2), (0.25 ** -15, 1.0)):
        assert float(norm(v)) == pytest.approx(u, abs=1e-12), v
        assert float(norm.inverse(u)) == pytest.approx(v, rel=1e-9), v
    assert np.ma.is_masked(norm(0.0))  # no gradient at all: the 'bad' (minimum) colour
    # a value above 1 is red-ish, below blue-ish; 1.5 and 0.9 pale beside 9 decades
    cmap = plot._cmap(None, "RdBu_r")
    red, blue = cmap(norm(1.5)), cmap(norm(0.9))
    assert red[0] > red[2] and blue[2] > blue[0]
    assert min(red[:3]) > 0.9 and min(blue[:3]) > 0.9
    # nothing far from 1: at least a factor 2 either side, so rounding of 1 reads white
    near = plot.heatmap(_gradient_map(np.full((2, 3), 1.0)), normalize=True)
    assert (near.axes[0].images[0].norm.vmin, near.axes[0].images[0].norm.vmax) == \
        pytest.approx((0.5, 2.0), rel=1e-12)


def test_heatmap_normalize_with_explicit_limits_keeps_1_white():
    """Limits either side of 1 keep 1 at the colour map's centre (the STAR figure's (0.05, 5)
    as a plain LogNorm put white at 0.5: its reference entry, r = 1, was drawn red); limits on
    one side of 1 give a plain log scale."""
    values = _map(2)
    values[-1, -1] = 1e-3
    norm = plot.heatmap(_gradient_map(values), normalize=True, vmin=0.05, vmax=5.0
                        ).axes[0].images[0].norm
    assert type(norm) is plot.CentredLogNorm and (norm.vmin, norm.vmax) == (0.05, 5.0)
    assert float(norm(1.0)) == 0.5 and float(norm(0.5)) < 0.5
    m = np.max(np.abs(np.log10(values / 1e-3)))  # one limit given: the other mirrored as before
    norm = plot.heatmap(_gradient_map(values), normalize=True, vmax=5.0).axes[0].images[0].norm
    assert type(norm) is plot.CentredLogNorm and float(norm(1.0)) == 0.5
    np.testing.assert_allclose((norm.vmin, norm.vmax), (10.0 ** -m, 5.0))
    norm = plot.heatmap(_gradient_map(values), normalize=True, vmin=2.0, vmax=50.0
                        ).axes[0].images[0].norm
    assert type(norm) is mcolors.LogNorm and (norm.vmin, norm.vmax) == (2.0, 50.0)


def test_heatmap_normalize_needs_a_positive_finite_reference():
    values = _map(3)
    values[-1, -1] = 0.0
    with pytest.raises(ValueError, match=r"values\[-1, 5\] \(top layer, the last step"):
        plot.heatmap(_gradient_map(values), normalize=True)


def test_a_memory_map_is_normalised_where_the_loss_enters():
    """A map wrt a memory ``c`` is 0 at the last step by construction: it is drawn relative
    to the top layer's last step that c reaches (T-2), in ``heatmap`` and ``draw_grid``
    alike (it was refused, and drawn as an empty panel)."""
    values = _map(3)
    values[:, -1] = 0.0
    res = _gradient_map(values, wrt="cell")
    fig = plot.heatmap(res, normalize=True)
    np.testing.assert_allclose(np.ma.getdata(fig.axes[0].images[0].get_array()),
                               values / values[-1, -2], rtol=1e-15)
    assert "last c reaches" in fig.axes[1].get_ylabel()
    with pytest.raises(ValueError, match=r"values\[-1, 5\]"):  # any other map: its last step
        plot.heatmap(_gradient_map(values, wrt="hidden"), normalize=True)


def test_heatmap_hatches_and_counts_nonfinite_entries_and_shows_zeros_as_minimum_colour():
    values = _map(4)
    bad = [(0, 1), (2, 3), (3, 5)]
    values[0, 1], values[2, 3], values[3, 5] = np.nan, np.inf, -np.inf
    values[1, 2] = 0.0
    with pytest.warns(NonFiniteWarning):
        result = _gradient_map(values)
    fig = plot.heatmap(result)
    ax = fig.axes[0]
    assert "3 non-finite" in ax.get_title()
    assert "1 \u2264 0" in ax.get_title()
    (overlay,) = _hatched(ax)
    centres = sorted(tuple(np.round(p.get_extents().get_points().mean(axis=0), 9))
                     for p in overlay.get_paths())
    assert centres == sorted((float(t), float(l)) for l, t in bad)  # one hatched cell per entry
    image = ax.images[0]
    np.testing.assert_allclose(_pixels(fig, ax, [(1, 2)])[0], image.cmap(0.0), atol=2.5 / 255)
    finite = values[np.isfinite(values) & (values > 0)]
    assert (image.norm.vmin, image.norm.vmax) == (finite.min(), finite.max())
    # A custom title still carries the count.
    fig = plot.heatmap(result, title="mine")
    assert fig.axes[0].get_title().startswith("mine") and "3 non-finite" in fig.axes[0].get_title()


def test_a_map_with_nothing_to_colour_has_a_bar_without_a_made_up_range():
    """All entries non-finite (an overflowed forward pass), or none positive on a log scale:
    the colour bar has no ticks and says why; a map with one finite entry keeps its ticks."""
    cases = [(np.full((L, T), np.nan), True, "(no finite entries)"),
             (np.zeros((L, T)), True, "(no positive entries)"),
             (np.full((L, T), np.inf), False, "(no finite entries)")]
    for values, log, said in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteWarning)
            fig = plot.heatmap(_gradient_map(values), log=log)
        bar = fig.axes[1]
        assert bar.get_ylabel().endswith(said)
        fig.canvas.draw()
        assert bar.get_yticks().size == 0 and not bar.yaxis.get_minorticklocs().size
        nonfinite = int((~np.isfinite(values)).sum())
        assert (f"({nonfinite} non-finite)" in fig.axes[0].get_title()) == (nonfinite > 0)
    values = np.full((L, T), np.nan)
    values[1, 2] = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        fig = plot.heatmap(_gradient_map(values))
    assert "entries)" not in fig.axes[1].get_ylabel() and fig.axes[1].get_yticks().size


def test_heatmap_draws_on_a_given_axes_and_any_key():
    fig = Figure()
    ax = fig.add_subplot()
    gains = _gains()
    assert plot.heatmap(gains, ax=ax, key="temporal_spectral") is fig
    np.testing.assert_array_equal(np.ma.getdata(ax.images[0].get_array()),
                                  gains["temporal_spectral"])
    assert "temporal_spectral" in ax.get_title()


def test_heatmap_jacobian_title():
    result = make_result("jacobian_map", {"values": _map(5), "stderr": _map(6)},
                         dict(cell="star", jacobian_norm="rms", norm="layer",
                              target=[L - 1, T - 1]))
    title = plot.heatmap(result).axes[0].get_title()
    assert "star" in title and "rms" in title and f"({L - 1}, {T - 1})" in title


def test_heatmap_rejects_bad_input():
    with pytest.raises(TypeError, match="Result"):
        plot.heatmap(_map())
    with pytest.raises(ValueError, match="vertical_rms"):
        plot.heatmap(_gains())  # no "values": the message lists the arrays to pick from
    with pytest.raises(ValueError, match="layers, steps"):
        plot.heatmap(make_result("gradient_map", {"values": np.ones(3)}, {}))
    with pytest.raises(ValueError, match="colormap"):
        plot.heatmap(_gradient_map(_map()), cmap="no-such-map")
    with pytest.raises(TypeError, match="Axes"):
        plot.heatmap(_gradient_map(_map()), ax="ax")


# --- grid --------------------------------------------------------------------------------------


def _star_figure_2():
    """{(loss, cell): map}: 2 losses x 3 cells with different ranges."""
    maps = {}
    for i, loss in enumerate(["last", "all"]):
        for j, cell in enumerate(["rnn", "lstm", "star"]):
            maps[(loss, cell)] = _map(10 * i + j, low=-3.0 * j - 1, high=j)
    return maps


def test_grid_shares_one_norm_over_all_panels():
    maps = _star_figure_2()
    fig = plot.grid({k: _gradient_map(v, cell=k[1], loss=k[0]) for k, v in maps.items()})
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6 and len(fig.axes) == 7  # 2 x 3 panels + one colour bar
    norms = {id(ax.images[0].norm) for ax in panels}
    assert len(norms) == 1
    norm = panels[0].images[0].norm
    assert isinstance(norm, mcolors.LogNorm)
    everything = np.concatenate([v.ravel() for v in maps.values()])
    assert (norm.vmin, norm.vmax) == (everything.min(), everything.max())
    # Row-major panel order: row = loss, column = cell.
    for ax, (key, values) in zip(panels, maps.items()):
        np.testing.assert_array_equal(np.ma.getdata(ax.images[0].get_array()), values)
    assert [ax.get_title() for ax in panels[:3]] == ["rnn", "lstm", "star"]
    assert panels[0].get_ylabel().startswith("last") and panels[3].get_ylabel().startswith("all")


def test_grid_accepts_nested_mappings_lists_and_leaves_gaps():
    maps = _star_figure_2()
    nested = {}
    for (loss, cell), v in maps.items():
        nested.setdefault(loss, {})[cell] = _gradient_map(v, cell=cell, loss=loss)
    fig = plot.grid(nested, cols=["star", "lstm"])  # choose and order the columns
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4
    np.testing.assert_array_equal(np.ma.getdata(panels[0].images[0].get_array()),
                                  maps[("last", "star")])

    rows = [[nested["last"]["rnn"], None], [nested["all"]["rnn"], nested["all"]["lstm"]]]
    fig = plot.grid(rows, rows=["last", "all"], cols=["rnn", "lstm"])
    assert len(fig.axes) == 5
    assert not fig.axes[1].axison and not fig.axes[1].images  # the gap

    fig = plot.grid([nested["last"]["rnn"], nested["last"]["lstm"]])  # one row, own titles
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert "rnn" in titles[0] and "lstm" in titles[1]


def test_grid_normalize_divides_each_panel_by_its_own_top_last():
    maps = _star_figure_2()
    fig = plot.grid({k: _gradient_map(v) for k, v in maps.items()}, normalize=True)
    panels = [ax for ax in fig.axes if ax.images]
    for ax, values in zip(panels, maps.values()):
        np.testing.assert_allclose(np.ma.getdata(ax.images[0].get_array()),
                                   values / values[-1, -1], rtol=1e-15)
    ratios = np.concatenate([(v / v[-1, -1]).ravel() for v in maps.values()])
    norm = panels[0].images[0].norm
    assert {id(ax.images[0].norm) for ax in panels} == {id(norm)}
    m = np.max(np.abs(np.log10(ratios)))  # the ratio farthest from 1, in decades, both sides
    assert (norm.vmin, norm.vmax) == pytest.approx((10.0 ** -m, 10.0 ** m), rel=1e-12)
    assert norm(1.0) == pytest.approx(0.5)


def test_grid_counts_nonfinite_in_panel_and_figure_titles():
    values = _map()
    values[1, 1] = np.nan
    with pytest.warns(NonFiniteWarning):
        broken = _gradient_map(values)
    fig = plot.grid({("last", "a"): broken, ("last", "b"): _gradient_map(_map(1))}, title="maps")
    assert "1 non-finite" in fig.axes[0].get_title()
    assert fig.get_suptitle() == "maps (1 non-finite)"
    assert len(_hatched(fig.axes[0])) == 1 and not _hatched(fig.axes[1])


def test_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        plot.grid({})
    with pytest.raises(TypeError, match="list of lists"):
        plot.grid("abc")
    with pytest.raises(TypeError, match="Result"):
        plot.grid([[_map()]])
    with pytest.raises(ValueError, match="labels"):
        plot.grid([[_gradient_map(_map())]], rows=["a", "b"])
    with pytest.raises(ValueError, match="no result"):
        plot.grid({("a", "b"): _gradient_map(_map())}, rows=["x"])


# --- save --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext, magic", [(".png", b"\x89PNG\r\n\x1a\n"), (".pdf", b"%PDF-"),
                                        (".svg", b"<?xml")])
def test_save_writes_valid_files(tmp_path, ext, magic):
    fig = plot.heatmap(_gradient_map(_map()), colorbar=False)
    path = tmp_path / f"map{ext}"
    assert plot.save(fig, path) == str(path)
    assert plot.save(fig, os.fsencode(path)) == str(path)  # a bytes path too
    data = path.read_bytes()
    assert data.startswith(magic)
    if ext == ".svg":
        assert b"<svg" in data[:2000]
    if ext == ".pdf":
        assert data.rstrip().endswith(b"%%EOF")


def test_save_rejects_bad_paths(tmp_path):
    fig = plot.heatmap(_gradient_map(_map()))
    with pytest.raises(ValueError, match=r"\.png, \.pdf, \.svg"):
        plot.save(fig, tmp_path / "map.jpg")
    with pytest.raises(ValueError, match="does not exist"):
        plot.save(fig, tmp_path / "missing" / "map.png")
    with pytest.raises(TypeError, match="Figure"):
        plot.save(fig.axes[0], tmp_path / "map.png")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file.py").write_text("")
    with pytest.raises(ValueError, match="file.py' is a file, not a folder"):
        plot.save(fig, tmp_path / "file.py" / "map.png")
    # a result's file needs a name: "" and a folder wrote a hidden ".npz"
    res = _gradient_map(_map())
    for bad in ("", str(tmp_path) + os.sep, tmp_path):
        with pytest.raises(ValueError, match="give a file name"):
            res.save(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.py"]


# --- gates -------------------------------------------------------------------------------------


def _bars(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_gate_histograms_bar_heights_are_the_counts():
    stats = _gate_stats()
    hist, outside = stats["hist/f"], stats["outside/f"]
    bins = hist.shape[1]
    fig = plot.gate_histograms(stats, gate="f", layers="pooled")
    ax = fig.axes[0]
    bars = _bars(ax)
    np.testing.assert_array_equal([b.get_height() for b in bars], hist.sum(axis=0))
    np.testing.assert_allclose([b.get_x() for b in bars], np.arange(bins) / bins, atol=1e-15)
    np.testing.assert_allclose([b.get_width() for b in bars], 1.0 / bins)
    below, above = outside.sum(axis=0)
    assert f"outside [0, 1]: {below} below 0, {above} above 1" in ax.get_title()

    ax = plot.gate_histograms(stats, gate="f", layers=2).axes[0]
    np.testing.assert_array_equal([b.get_height() for b in _bars(ax)], hist[2])
    assert f"{outside[2, 0]} below 0, {outside[2, 1]} above 1" in ax.get_title()


def test_gate_histograms_draw_one_outline_per_layer():
    stats = _gate_stats(1)
    hist = stats["hist/o"]
    ax = plot.gate_histograms(stats, gate="o").axes[0]
    steps = [p for p in ax.patches if isinstance(p, StepPatch)]
    assert len(steps) == L
    for l, step in enumerate(steps):
        np.testing.assert_array_equal(step.get_data().values, hist[l])
        np.testing.assert_allclose(step.get_data().edges, np.linspace(0, 1, hist.shape[1] + 1))
    ax = plot.gate_histograms(stats, gate="o", layers=[0, -1]).axes[0]
    steps = [p for p in ax.patches if isinstance(p, StepPatch)]
    np.testing.assert_array_equal(steps[1].get_data().values, hist[L - 1])
    # Default gate: the first one listed.
    assert "gate i" in plot.gate_histograms(stats, layers="pooled").axes[0].get_title()


def test_gate_histograms_of_a_tanh_gate_span_its_own_range():
    """A gate with ``bin_edges/{gate}`` (a tanh gate: [-1, 1]) is drawn on those edges, its
    outside counts named by that range; the others keep the shared [0, 1] ``bin_edges``."""
    stats = _gate_stats(3, bins=4)
    arrays = {**stats.arrays, "bin_edges": np.linspace(0, 1, 5),
              "bin_edges/o": np.linspace(-1, 1, 5)}
    stats = make_result("gate_stats", arrays, stats.config)
    ax = plot.gate_histograms(stats, gate="o", layers="pooled").axes[0]
    np.testing.assert_allclose([b.get_x() for b in _bars(ax)], [-1.0, -0.5, 0.0, 0.5])
    np.testing.assert_allclose([b.get_width() for b in _bars(ax)], 0.5)
    assert ax.get_xlim() == (-1.0, 1.0)
    below, above = stats["outside/o"].sum(axis=0)
    assert f"outside [-1, 1]: {below} below -1, {above} above 1" in ax.get_title()
    ax = plot.gate_histograms(stats, gate="f", layers="pooled").axes[0]
    np.testing.assert_allclose([b.get_x() for b in _bars(ax)], [0.0, 0.25, 0.5, 0.75])
    assert "outside [0, 1]" in ax.get_title()
    bad = make_result("gate_stats", {**arrays, "bin_edges/o": np.linspace(-1, 1, 3)},
                      stats.config)
    with pytest.raises(ValueError, match="'bin_edges/o' must be 5 increasing edges"):
        plot.gate_histograms(bad, gate="o")


def test_gate_plots_reject_missing_gates_and_arrays():
    stats = _gate_stats()
    with pytest.raises(ValueError, match="gates: i, f, o"):
        plot.gate_histograms(stats, gate="x")
    partial = make_result("gate_stats", {"mean/f": np.zeros((L, T))}, dict(gates=["f"]))
    with pytest.raises(ValueError, match="'hist/f'"):
        plot.gate_histograms(partial, gate="f")
    with pytest.raises(ValueError, match="'saturated/f'"):
        plot.saturation_map(partial, "f")
    with pytest.raises(ValueError, match="gate_stats"):
        plot.gate_histograms(_gradient_map(_map()))
    with pytest.raises(ValueError, match="no gates"):
        plot.saturation_map(make_result("gate_stats", {}, dict(cell="rnn", gates=[])))
    with pytest.raises(ValueError, match="out of range"):
        plot.gate_histograms(stats, gate="f", layers=L)
    with pytest.raises(ValueError, match="pooled"):
        plot.gate_histograms(stats, gate="f", layers="all")


def test_saturation_map_is_a_linear_unit_map():
    stats = _gate_stats(2)
    fig = plot.saturation_map(stats, "f", vmin=0, vmax=1)
    ax = fig.axes[0]
    image = ax.images[0]
    np.testing.assert_array_equal(np.ma.getdata(image.get_array()), stats["saturated/f"])
    assert image.origin == "lower"
    assert type(image.norm) is mcolors.Normalize and (image.norm.vmin, image.norm.vmax) == (0, 1)
    assert fig.axes[1].get_ylabel() == "fraction saturated\n(colour scale 0 to 1)"
    assert "gate f" in ax.get_title() and "eps=0.05" in ax.get_title()


def test_saturation_map_is_on_a_fixed_unit_scale_by_default():
    """1% saturation is drawn near the bottom colour of [0, 1], not in the brightest one;
    ``vmax=None`` scales to the map's largest fraction (the colour bar says so)."""
    arrays = dict(_gate_stats(2).arrays)
    arrays["saturated/f"] = 0.011 * np.random.default_rng(0).uniform(0, 1, (L, T))
    stats = make_result("gate_stats", arrays, dict(cell="lstm", gates=["i", "f", "o"], eps=0.05))
    fig = plot.saturation_map(stats, "f")
    image = fig.axes[0].images[0]
    assert (image.norm.vmin, image.norm.vmax) == (0.0, 1.0)
    assert image.norm(0.011) == pytest.approx(0.011)
    assert fig.axes[1].get_ylabel() == "fraction saturated\n(colour scale 0 to 1)"
    fig = plot.saturation_map(stats, "f", vmax=None)
    top = arrays["saturated/f"].max()
    assert fig.axes[0].images[0].norm.vmax == top
    assert fig.axes[1].get_ylabel() == ("fraction saturated\n(colour scale 0 to "
                                        f"{top:.3g}, this map's largest)")
    arrays["saturated/f"] = np.zeros((L, T))  # nothing saturated: still a valid scale
    stats = make_result("gate_stats", arrays, stats.config)
    image = plot.saturation_map(stats, "f", vmax=None).axes[0].images[0]
    assert (image.norm.vmin, image.norm.vmax) == (0.0, 1.0)


def test_gates_figure_draws_every_gate_on_one_fraction_scale():
    """The same colour is the same fraction in every panel: [0, 1] by default, the largest
    fraction of the gates shown with ``vmax=None``."""
    arrays = dict(_gate_stats(4).arrays)
    for g, top in (("i", 0.62), ("f", 0.47), ("o", 0.011)):
        arrays[f"saturated/{g}"] = top * np.linspace(0, 1, L * T).reshape(L, T)
    stats = make_result("gate_stats", arrays, dict(cell="lstm", gates=["i", "f", "o"], eps=0.05))
    for vmax, top, label in ((1.0, 1.0, "0 to 1"), (None, 0.62, "0 to 0.62, the gates' largest"),
                             (0.5, 0.5, "0 to 0.5")):
        fig = plot.gates_figure(stats, vmax=vmax)
        images = [ax.images[0] for ax in fig.axes if ax.images]
        assert len(images) == 3
        assert {(im.norm.vmin, im.norm.vmax) for im in images} == {(0.0, top)}
        labels = {im.colorbar.ax.get_ylabel() for im in images}
        assert labels == {f"fraction saturated\n(colour scale {label})"}


def test_gates_figure_shows_a_map_and_histograms_per_gate_with_the_settings():
    config = dict(cell="lstm", gates=["i", "f", "o"], bins=5, eps=0.05, layers=L, steps=T,
                  hidden_size=8, init="orthogonal", seed=3)
    stats = make_result("gate_stats", dict(_gate_stats(1).arrays), config)
    fig = plot.gates_figure(stats, ["f", "o"])
    maps = [ax for ax in fig.axes if ax.images]
    assert len(maps) == 2
    np.testing.assert_array_equal(np.ma.getdata(maps[1].images[0].get_array()),
                                  stats["saturated/o"])
    assert fig.get_suptitle() == f"lstm \u00b7 L={L}, T={T}, H=8, init orthogonal, seed 3"
    assert len(plot.gates_figure(stats).axes) >= 6  # every gate by default
    with pytest.raises(ValueError, match="unknown gate 'z'"):
        plot.gates_figure(stats, ["z"])


def test_gate_plots_of_a_stack_whose_layers_report_different_gates():
    """A gate some layers lack (``config["gate_layers"]``): its saturation map greys those
    rows out and says so (no hatching, no non-finite count for them), its histograms draw only
    the layers that report it."""
    arrays = {k: v.copy() for k, v in _gate_stats(5).arrays.items()}  # (a result's are read-only)
    arrays["saturated/o"][[0, 2]] = np.nan  # o in layer 1 only, as gates.saturation writes it
    arrays["hist/o"][[0, 2]] = 0
    config = dict(cell=["lstm", "star", "lstm"][:L] + ["lstm"] * (L - 3), eps=0.05,
                  gates=["i", "f", "o"], gate_layers={"i": list(range(L)),
                                                      "f": list(range(L)), "o": [1]})
    stats = make_result("gate_stats", arrays, config, warn=False)
    ax = plot.saturation_map(stats, "o").axes[0]
    assert "gate o saturated (layer 1 only)" in ax.get_title() and "non-finite" not in \
        ax.get_title()
    assert ax.get_title().startswith("lstm / star / lstm")
    assert not ax.collections  # nothing hatched
    grey = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert sorted(int(p.get_y() + 0.5) for p in grey) == [0, 2] + list(range(3, L))
    assert {t.get_text() for t in ax.texts} == {"no gate o"}
    ax = plot.gate_histograms(stats, "o").axes[0]
    assert [b.get_height() for b in _bars(ax)] == list(arrays["hist/o"][1])  # layer 1's bars
    assert "gate o (layer 1)" in ax.get_title()
    pooled = plot.gate_histograms(stats, "o", layers="pooled").axes[0].get_title()
    assert "all layers pooled (layer 1 only)" in pooled
    for layers in (2, [1, 2]):  # a layer without the gate: its zeros drew as a histogram
        with pytest.raises(ValueError, match=r"gate 'o' is in layer\(s\) 1 only; layers="
                                             rf"{re.escape(repr(layers))} asks for 2$"):
            plot.gate_histograms(stats, "o", layers=layers)
    ax = plot.gate_histograms(stats, "f").axes[0]  # a gate of every layer: as before
    assert len([p for p in ax.patches if isinstance(p, StepPatch)]) == L


def test_default_titles_carry_the_settings():
    result = make_result("gradient_map", {"values": _map()},
                         dict(cell="lstm", layers=L, steps=T, hidden_size=8, loss="last",
                              wrt="params", init="glorot", seed=7))
    title = plot.heatmap(result).axes[0].get_title()
    assert f"L={L}, T={T}, H=8, init glorot, seed 7" in title and "loss=last" in title
    assert plot.settings({"layers": 2, "hidden": 4}) == "L=2, H=4"
    assert plot.settings({}) == ""


# --- figures of experiments --------------------------------------------------------------------


def _synthetic_grid(maps, **config):
    """A gradient_grid Result from ``{(loss, cell): (L, T) array}``, as gradient_grid lays it out."""
    losses = list(dict.fromkeys(k[0] for k in maps))
    cells_ = list(dict.fromkeys(k[1] for k in maps))
    arrays, configs = {}, {}
    for (loss, cell), v in maps.items():
        arrays[f"values/{loss}/{cell}"] = v
        arrays[f"loss_value/{loss}/{cell}"] = np.float64(1.0)
        configs[f"{loss}/{cell}"] = {"cell": cell, "loss": loss, "wrt": "params"}
    return make_result("gradient_grid", arrays,
                       {"cells": cells_, "losses": losses, "maps": configs, **config},
                       warn=False)


def test_draw_grid_normalises_each_panel_and_leaves_an_all_zero_map_empty():
    a = 10.0 ** np.arange(6.0).reshape(2, 3)
    grid = _synthetic_grid({("last", "x"): a, ("last", "y"): np.zeros((2, 3)),
                            ("all", "x"): 2 * a, ("all", "y"): a[::-1].copy()})
    fig = plot.draw_grid(grid, normalize=True)
    panels = fig.axes[:4]  # row-major: (last, x), (last, y), (all, x), (all, y)
    np.testing.assert_allclose(np.ma.getdata(panels[0].images[0].get_array()), a / a[-1, -1])
    np.testing.assert_allclose(np.ma.getdata(panels[2].images[0].get_array()), a / a[-1, -1])
    np.testing.assert_allclose(np.ma.getdata(panels[3].images[0].get_array()),
                               a[::-1] / a[0, -1])
    assert not panels[1].images and "all 6 entries are 0" in panels[1].texts[0].get_text()
    assert panels[1].get_title() == "y"
    fig = plot.draw_grid(grid, normalize=False)  # raw values: every panel drawn
    assert all(ax.images for ax in fig.axes[:4])


def test_draw_grid_counts_the_non_finite_entries_of_the_panels_it_leaves_empty():
    """A panel with nothing to normalise by (all NaN: an exploded cell) was left empty and its
    entries left out of the figure's total ("2 non-finite" of 8)."""
    a = 10.0 ** np.arange(6.0).reshape(2, 3)
    b = a.copy()
    b[0, :2] = np.nan
    grid = _synthetic_grid({("last", "x"): b, ("last", "y"): np.full((2, 3), np.nan)})
    fig = plot.draw_grid(grid, normalize=True)
    assert fig._suptitle.get_text().endswith("(8 non-finite)")
    assert "top-last value is nan (6 non-finite)" in fig.axes[1].texts[0].get_text()


def test_draw_grid_on_a_fixed_colour_range_marks_what_it_clips():
    """color_range=(0.05, 5), the STAR paper's scale: the norm is that range, and the colour
    bar's arrows say which ends clip values (entries beyond it take the end colours)."""
    a = 10.0 ** np.arange(-3.0, 3.0).reshape(2, 3)  # 1e-3 .. 1e2, relative to a[-1, -1] = 100
    wide = _synthetic_grid({("last", "x"): a, ("all", "x"): a[::-1].copy()})
    fig = plot.draw_grid(wide, color_range=(0.05, 5))
    norm = fig.axes[0].images[0].norm
    assert (norm.vmin, norm.vmax) == (0.05, 5.0)
    def extend(fig):  # of the figure's one colour bar
        return next(im.colorbar for ax in fig.axes for im in ax.images if im.colorbar).extend

    assert extend(fig) == "both"  # 1e-5 below, 1e5 (the reversed map) above
    inside = _synthetic_grid({("last", "x"): np.full((2, 3), 2.0)})
    assert extend(plot.draw_grid(inside, color_range=(0.05, 5))) == "neither"
    assert extend(plot.draw_grid(wide)) == "neither"  # on its own range nothing is clipped


@pytest.mark.parametrize("bad", [(5, 0.05), (0, 5), (0.05, float("inf")), (1,), "ab", 3])
def test_draw_grid_names_color_range_when_it_is_bad(bad):
    """A bad range is reported as ``color_range`` (draw_grid has no vmin/vmax arguments)."""
    grid = _synthetic_grid({("last", "x"): np.full((2, 3), 2.0)})
    with pytest.raises(ValueError, match=r"^color_range must be") as err:
        plot.draw_grid(grid, color_range=bad)
    assert "vmin" not in str(err.value)


def test_draw_grid_is_normalised_by_default_and_titled_with_the_settings():
    a = 10.0 ** np.arange(6.0).reshape(2, 3)
    grid = _synthetic_grid({("last", "x"): a, ("all", "x"): 3 * a}, wrt="params", layers=2,
                           steps=3, hidden=16, init="orthogonal", seed=4)
    fig = plot.draw_grid(grid)
    np.testing.assert_allclose(np.ma.getdata(fig.axes[1].images[0].get_array()), a / a[-1, -1])
    norm = fig.axes[0].images[0].norm
    assert isinstance(norm, mcolors.LogNorm)
    # centred on 1, from the smallest ratio (1e-5) to as many decades above (nothing exceeds 1)
    assert (norm.vmin, norm.vmax, float(norm(1.0))) == (1e-5, 1e5, 0.5)
    assert fig.axes[0].images[0].get_cmap().name.startswith("RdBu_r")  # the relative view
    assert fig.get_suptitle() == ("gradient maps wrt params, relative to (top layer, last step)"
                                  "\nL=2, T=3, H=16, init orthogonal, seed 4")
    assert [ax.get_ylabel().split("\n")[0] for ax in fig.axes[:2]] == ["loss=last", "loss=all"]
    fig = plot.draw_grid(grid, normalize=False, title="mine")
    np.testing.assert_allclose(np.ma.getdata(fig.axes[1].images[0].get_array()), 3 * a)
    assert fig.get_suptitle() == "mine\nL=2, T=3, H=16, init orthogonal, seed 4"
    everything_zero = _synthetic_grid({("last", "x"): np.zeros((2, 3))})
    fig = plot.draw_grid(everything_zero)  # nothing to normalise by anywhere: still a figure
    assert "nothing to normalise by" in fig.axes[0].texts[0].get_text()


# --- gain profiles -----------------------------------------------------------------------------


def _line(ax, label):
    (line,) = [ln for ln in ax.lines if ln.get_label() == label]
    return line


def test_gain_profile_plots_the_time_mean_per_layer():
    gains = _gains()
    ax = plot.gain_profile(gains, reference=0.25).axes[0]
    line = _line(ax, "lstm")
    expected = [sum(gains["vertical_rms"][l]) / T for l in range(L)]  # plain Python mean
    np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-14)
    np.testing.assert_array_equal(line.get_xdata(), np.arange(L))
    assert ax.get_yscale() == "log"
    np.testing.assert_array_equal(_line(ax, "gain 1 (preserved)").get_ydata(), [1, 1])
    np.testing.assert_array_equal(_line(ax, "reference 0.25").get_ydata(), [0.25, 0.25])


def test_gain_profile_compares_several_results_and_skips_nonfinite_entries():
    lstm, star = _gains(0, "lstm", 0.25), _gains(1, "star", 0.5)
    arrays = dict(star.arrays)
    arrays["temporal_spectral"] = arrays["temporal_spectral"].copy()
    arrays["temporal_spectral"][2, 4] = np.nan
    with pytest.warns(NonFiniteWarning):
        star = make_result("local_gains", arrays, star.config)
    ax = plot.gain_profile({"LSTM": lstm, "STAR": star}, kind="temporal", stat="spectral",
                           reference={"STAR": 0.5}).axes[0]
    np.testing.assert_allclose(_line(ax, "LSTM").get_ydata(),
                               lstm["temporal_spectral"].mean(axis=1), rtol=1e-14)
    row = [v for v in arrays["temporal_spectral"][2] if v == v]  # the finite entries of layer 2
    np.testing.assert_allclose(_line(ax, "STAR").get_ydata()[2], sum(row) / len(row), rtol=1e-14)
    assert "1 non-finite" in ax.get_title()
    _line(ax, "STAR: 0.5")
    # gains of 0 (a layer whose activations underflowed) fall off the log axis: counted
    arrays["temporal_spectral"][3] = 0.0
    with pytest.warns(NonFiniteWarning):
        star = make_result("local_gains", arrays, star.config)
    title = plot.gain_profile(star, kind="temporal", stat="spectral").axes[0].get_title()
    assert title.endswith(f"(1 non-finite, {T} \u2264 0)")


def test_gains_figure_draws_each_kind_of_gain_over_depth():
    """``gradflow gains``' figure: one profile per kind (vertical, temporal, the whole state's),
    each the time means of its own array."""
    gains = _gains()
    fig = plot.gains_figure(gains)
    assert [ax.get_title() for ax in fig.axes] == [f"{k} local gains (rms)"
                                                   for k in ("vertical", "temporal", "state")]
    for ax, kind in zip(fig.axes, plot.GAIN_KINDS):
        np.testing.assert_allclose(_line(ax, "lstm").get_ydata(),
                                   gains[f"{kind}_rms"].mean(axis=1), rtol=1e-14)
    assert fig._suptitle.get_text().startswith("lstm")


def test_gain_profile_rejects_bad_options():
    with pytest.raises(ValueError, match="'vertical', 'temporal'"):
        plot.gain_profile(_gains(), kind="diagonal")
    with pytest.raises(ValueError, match="'rms', 'spectral'"):
        plot.gain_profile(_gains(), stat="max")
    with pytest.raises(TypeError, match="mapping"):
        plot.gain_profile([_gains()])


# --- no global state ---------------------------------------------------------------------------


def test_plots_leave_matplotlib_state_alone():
    before = dict(matplotlib.rcParams)
    colormaps = set(matplotlib.colormaps)
    plot.heatmap(_gradient_map(_map()), normalize=True)
    plot.gate_histograms(_gate_stats())
    plot.gain_profile(_gains())
    assert dict(matplotlib.rcParams) == before and set(matplotlib.colormaps) == colormaps
    code = ("import sys, numpy as np; from gradflow import plot, results; "
            "r = results.make_result('gradient_map', {'values': np.ones((2, 3))}, {}); "
            "plot.heatmap(r); print('matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_function_returns_a_figure_of_axes():
    figures = [plot.heatmap(_gradient_map(_map())), plot.grid([[_gradient_map(_map())]]),
               plot.gate_histograms(_gate_stats()), plot.saturation_map(_gate_stats(), "o"),
               plot.gain_profile(_gains())]
    for fig in figures:
        assert isinstance(fig, Figure) and all(isinstance(ax, Axes) for ax in fig.axes)


def _draw_saved_without_jax():
    """A fresh process draws committed figures' data (a grid, a gate-saturation experiment, a
    training experiment) through gradflow.plot and reports whether JAX was imported."""
    code = (
        "import sys, gradflow.plot as P, gradflow.results as R\n"
        "P.draw_grid(R.load('figures/star_fig2.npz'))\n"
        "P.draw_saturation(R.load('figures/ur_lstm_gates_init.npz'))\n"
        "P.draw_training(R.load('figures/gu_copy_gates.npz'))\n"
        "print(sorted(m for m in ('jax', 'gradflow.stack', 'gradflow.cells') "
        "if m in sys.modules))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=180, cwd=str(pathlib.Path(__file__).resolve().parents[1]),
                          env={**os.environ, "MPLBACKEND": "Agg"})


@pytest.mark.background(job=_draw_saved_without_jax)  # its work is a fresh process
def test_saved_results_are_drawn_without_jax(background):
    """gradflow.plot reads packed Results through gradflow.views (NumPy only): drawing saved
    .npz files does not start JAX (it imported the whole measurement stack, about 2 s)."""
    assert background.returncode == 0, background.stderr
    assert background.stdout.strip() == "[]"


# --- the probes' findings: diverged curves, the Jacobian's norm, the default gate -------------


def test_a_diverged_curve_stops_where_its_loss_does_and_the_figure_says_so():
    """The running mean skipped non-finite losses, so a run that diverged at step 1 was drawn
    as a flat line at its last finite loss, with nothing said."""
    loss = np.r_[1.0, 0.9, [np.nan] * 10]
    curve = make_result("training", {"step": np.arange(12), "loss": loss,
                                     "metric": np.zeros(12), "seq_len": np.full(12, 5),
                                     "eval_step": np.array([0, 6, 12]),
                                     "eval_loss": np.r_[1.0, np.nan, np.nan],
                                     "eval_metric": np.r_[1.0, np.nan, np.nan]},
                        {"metric": "mse"}, warn=False)
    fig = plot.draw_curves({"rnn": curve}, title="runs")
    smoothed = fig.axes[0].lines[1].get_ydata()
    np.testing.assert_allclose(smoothed[:2], [1.0, 0.95])
    assert np.all(np.isnan(smoothed[2:]))
    assert fig._suptitle.get_text() == ("runs\ndiverged (rnn: 10 of 12 losses non-finite from "
                                        "step 2, 2 of 3 evaluations): the lines stop there")
    np.testing.assert_allclose(plot._smooth(np.r_[1.0, 3.0, 5.0], 2), [1.0, 2.0, 4.0])


def test_a_burst_of_huge_losses_ends_the_loss_axis_and_is_said():
    """A run whose loss bursts to 3e11 for a few steps (cheng_refined_adding's refined MGU)
    stretched the loss axis over 15 decades; it ends at 100x the largest first loss, saying
    how far the losses went; without a burst the axis is the data's."""
    def curve(loss):
        n = len(loss)
        return make_result("training", {"step": np.arange(n), "loss": np.asarray(loss),
                                        "metric": np.zeros(n), "seq_len": np.full(n, 5),
                                        "eval_step": np.array([0]), "eval_loss": np.r_[1.0],
                                        "eval_metric": np.r_[1.0]}, {"metric": "mse"},
                           warn=False)
    calm = curve(np.geomspace(2.0, 1e-3, 30))
    burst = curve(np.r_[1.5, 3e11, 1e6, np.geomspace(1.0, 1e-3, 27)])
    ax = plot.draw_curves({"calm": calm, "burst": burst}).axes[0]
    assert ax.get_ylim()[1] == pytest.approx(plot.BURST_FACTOR * 2.0)
    assert [t.get_text() for t in ax.texts] == ["off the axis: losses up to 3e+11"]
    ax = plot.draw_curves({"calm": calm}).axes[0]
    assert not ax.texts and ax.get_ylim()[1] < plot.BURST_FACTOR * 2.0
    gone = curve(np.r_[np.nan, 3e11, np.nan, np.geomspace(1.0, 1e-3, 27)])  # no first loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ax = plot.draw_curves({"gone": gone, "burst": burst}).axes[0]
    assert ax.get_ylim()[1] == pytest.approx(plot.BURST_FACTOR * 1.5)


def test_a_jacobian_maps_colour_bar_names_its_own_norm():
    """The colour bar read config["norm"], the stack's normalisation ("layer", or None)."""
    result = make_result("jacobian_map", {"values": _map(5)},
                         dict(cell="lstm", jacobian_norm="spectral", norm="layer"))
    fig = plot.heatmap(result)
    label = fig.axes[-1].get_ylabel()
    assert label.endswith("(spectral)") and "layer" not in label


def test_gate_panels_default_to_the_gate_that_keeps_the_state():
    """The default gate was "f" for every entry: a GRU's panel raised KeyError: 'f'."""
    from gradflow import gates

    stats = gates.compare(["lstm", "gru", "star"], layers=1, steps=3, hidden=4, batch=2)
    fig = plot.draw_gate_panels({"init": stats}, {})
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes]
    assert titles == ["lstm, gate f (init)", "gru, gate z (init)", "star, gate k (init)"]
    with pytest.raises(ValueError, match="unknown gate 'f'; these stats have gates: r, z, n"):
        plot.draw_gate_panels({"init": stats}, {"gru": "f"})


def test_subnormal_entries_are_drawn_and_counted_as_the_underflow_they_are():
    """One float32 entry of 1e-40 (positive, below the normal range: counted as underflow) set
    the log scale's lower end at 1e-40, squeezing the data into the top colours; and the title
    took every underflow entry for a zero ("2 underflow, 1 <= 0" for 2 structural zeros)."""
    values = _map(3, low=-5, high=0).astype(np.float32)
    values[0, 0] = np.float32(1e-40)  # subnormal: underflow
    values[1, 0] = 0.0  # underflow stored as 0
    values[:, -1] = 0.0  # a memory map's last step: 0 by construction, not underflow
    res = _gradient_map(values, wrt="cell", positive={"values": np.arange(T) < T - 1})
    assert res.underflow == {"values": 2}
    fig = plot.heatmap(res)
    norm = fig.axes[0].images[0].norm
    assert norm.vmin == pytest.approx(float(np.min(values[values >= 1e-30])))
    assert fig.axes[0].get_title().endswith(f"(2 underflow, {L} \u2264 0)")
    # the zeros (and the subnormal, drawn as 0) are dotted: told from the lowest colour
    dotted, = [c for c in fig.axes[0].collections if c.get_hatch() == plot.ZERO_HATCH]
    at = sorted((round(p.vertices[:, 1].min() + 0.5), round(p.vertices[:, 0].min() + 0.5))
                for p in dotted.get_paths())  # (l, t) of each dotted cell
    assert at == sorted({(0, 0), (1, 0)} | {(l, T - 1) for l in range(L)})
    assert not [c for c in plot.heatmap(res, log=False).axes[0].collections
                if c.get_hatch() == plot.ZERO_HATCH]  # on a linear scale 0 has its colour


def test_experiment_figures_say_which_result_kind_they_take():
    """A result of another kind failed inside, KeyError 'cells' / 'stats' / 'runs'."""
    from gradflow import views

    res = _gradient_map(_map())
    for draw, kind in ((plot.draw_grid, "gradient_grid"), (plot.draw_gains, "vertical_gain"),
                       (plot.draw_saturation, "gate_saturation"),
                       (plot.draw_training, "training_runs")):
        with pytest.raises(ValueError, match=f"expected a result of kind '{kind}' "
                                             rf"\(gradflow.experiments.{kind}\), got kind "
                                             "'gradient_map'"):
            draw(res)
    for read, args in ((views.panel, ("last", "lstm")), (views.gain_panel, ("lstm",)),
                       (views.stats_panel, ("a",)), (views.run_curve, ("a",)),
                       (views.run_record, ("a", "map"))):
        with pytest.raises(ValueError, match="expected a result of kind"):
            read(res, *args)
    with pytest.raises(TypeError, match="got NoneType"):
        views.panel(None, "last", "lstm")


def test_title_helpers_and_curves_say_what_they_take():
    for call in (lambda: plot.settings(None), lambda: plot.subject(None)):
        with pytest.raises(TypeError, match="takes a result's config"):
            call()
    with pytest.raises(TypeError, match=r"draw_curves takes \{label: training Result\}.*"
                                        r"\{'a': ndarray\}"):
        plot.draw_curves({"a": np.ones(5)})


def test_one_layer_or_one_step_is_labelled_by_its_index():
    """A map of one layer (or one step) had its axis ticked -0.45..0.45: integer ticks need
    two in range unless asked for one."""
    fig = plot.heatmap(_gradient_map(np.full((1, 1), 0.5)))
    fig.canvas.draw()
    ax = fig.axes[0]
    for axis in (ax.xaxis, ax.yaxis):
        lo, hi = sorted(axis.get_view_interval())
        shown = [t for t in axis.get_majorticklocs() if lo <= t <= hi]
        assert shown == [0.0], shown


def test_a_training_title_names_a_runs_own_learning_rate():
    """A run's ``lr`` override (``training_runs``' per-run options) is in the title beside
    the shared one; the title said only the shared ``lr``, which that run did not use."""
    config = {"layers": 2, "hidden": 4, "steps": 6, "batch": 4, "lr": 3e-3, "seed": 0,
              "runs": {"lstm": {"lr": 3e-3}, "star": {"lr": 1e-2}}}
    curve = {"task": {"task": "adding", "steps": 5}, "metric": "mse"}
    assert plot._training_settings(config, curve) == (
        "task adding(steps=5), L=2, H=4, 6 steps of batch 4, lr 0.003 (star 0.01), seed 0, "
        "eval metric mse")
    config["runs"]["star"]["lr"] = 3e-3
    assert ", lr 0.003, seed 0" in plot._training_settings(config, curve)


def test_a_grid_of_two_quantities_names_both_on_its_colour_bar():
    """Panels of h beside panels of c share one colour bar: its label named the first
    panel's quantity only (swap the order and it named the other)."""
    v = np.arange(1, 7.0).reshape(2, 3)
    h = make_result("gradient_map", {"values": v}, {"cell": "lstm", "wrt": "hidden"})
    c = make_result("gradient_map", {"values": v}, {"cell": "lstm", "wrt": "cell"})
    for panels in ({"h": h, "c": c}, {"c": c, "h": h}):
        label = plot.grid(panels).axes[-1].get_ylabel()
        assert r"\partial L/\partial h^l_t" in label and r"\partial L/\partial c^l_t" in label
    assert ";" not in plot.grid({"a": h, "b": h}).axes[-1].get_ylabel()
