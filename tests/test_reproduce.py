"""Tests for gradflow.reproduce: the registry of figure kinds, the configs shipped as package data,
reproduce's output folder rules and progress, its bad input, and a non-editable install that
regenerates star_fig2 from outside the checkout (compared with the committed data)."""
import functools
import json
import operator
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import gradflow
from gradflow import plot, reproduce
from gradflow.results import make_result

ROOT = Path(__file__).resolve().parent.parent


def _ramp(tmp_path, monkeypatch):
    """A figure kind ``ramp`` (an (n, 2) map 1..2n) and one config of it in ``tmp_path``."""
    def compute(config):
        values = np.arange(1.0, 1.0 + config["n"] * 2).reshape(config["n"], 2)
        return make_result("gradient_map", {"values": values}, {"cell": "none", **config})

    def draw(config, data):
        return plot.heatmap(data)

    monkeypatch.setitem(reproduce.BUILDERS, "ramp", reproduce.Builder(compute, draw))
    (tmp_path / "ramp.json").write_text(json.dumps({"figure": "ramp", "n": 3}))


def test_a_new_figure_kind_is_one_register_call_and_one_json(tmp_path, monkeypatch):
    _ramp(tmp_path, monkeypatch)
    (tmp_path / "notes.json").write_text(json.dumps({"not": "a figure"}))
    assert list(reproduce.configs(tmp_path)) == ["ramp"]
    lines, steps = [], []
    written = reproduce.reproduce(config_dir=tmp_path, out_dir=tmp_path, log=lines.append,
                                  progress=steps.append)
    assert written == [str(tmp_path / "ramp.npz"), str(tmp_path / "ramp.png")]
    assert lines == [f"wrote {p}" for p in written]
    np.testing.assert_array_equal(gradflow.load(tmp_path / "ramp.npz").values,
                                  [[1, 2], [3, 4], [5, 6]])
    # progress: one line before and one after each figure
    assert steps[0] == "[1/1] ramp (ramp): computing ..."
    assert steps[1].startswith("[1/1] ramp: done in ") and steps[1].endswith(" s")


def test_reproduce_needs_an_output_folder_and_spares_the_committed_figures(tmp_path,
                                                                          monkeypatch):
    _ramp(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="needs an output folder.*update=True"):
        reproduce.reproduce(config_dir=tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in reproduce.FIGURES_DIR.iterdir()}
    with pytest.raises(ValueError, match="holds the committed figures.*update=True"):
        reproduce.reproduce(config_dir=tmp_path, out_dir=reproduce.FIGURES_DIR)
    with pytest.raises(ValueError, match="holds the committed figures"):  # the same, spelled
        reproduce.reproduce(config_dir=tmp_path, out_dir=ROOT / "tests" / ".." / "figures")
    after = {p.name: p.stat().st_mtime_ns for p in reproduce.FIGURES_DIR.iterdir()}
    assert after == before and "ramp.npz" not in after
    # update=True writes there; here FIGURES_DIR is pointed at a scratch copy
    scratch = tmp_path / "committed"
    scratch.mkdir()
    monkeypatch.setattr(reproduce, "FIGURES_DIR", scratch)
    with pytest.raises(ValueError, match="made from the shipped configs, not those in"):
        reproduce.reproduce(config_dir=tmp_path, update=True)
    assert not any(scratch.iterdir())
    monkeypatch.setattr(reproduce, "CONFIG_DIR", tmp_path)  # (ramp.json, shipped here)
    written = reproduce.reproduce(config_dir=tmp_path, update=True, log=lambda s: None,
                                  progress=lambda s: None)
    assert written == [str(scratch / "ramp.npz"), str(scratch / "ramp.png")]


def test_reproduce_and_configs_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown figure 'nope'; valid: .*star_fig2, "):
        reproduce.reproduce("nope", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        reproduce.reproduce(out_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        reproduce.configs(tmp_path / "missing")
    with pytest.raises(ValueError, match="no figure configs"):
        reproduce.reproduce(config_dir=tmp_path, out_dir=tmp_path)
    (tmp_path / "odd.json").write_text(json.dumps({"figure": "odd"}))
    with pytest.raises(ValueError, match="unknown figure kind 'odd'; known: .*gradient_grid"):
        reproduce.configs(tmp_path)
    (tmp_path / "odd.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read figure config"):
        reproduce.configs(tmp_path)
    with pytest.raises(ValueError, match="cannot read figure config .*nope.json"):
        reproduce.load_config("nope")
    with pytest.raises(ValueError, match="has no data at .*run gradflow reproduce"):
        reproduce.figure_data("star_fig2", data_dir=tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"layers": -2}, "layers must be a positive integer, got -2"),
    ({"cells": ["lstm", "nope"]}, "unknown cell 'nope'"),
    ({"cell_options": {"lstm": {"mode": "add"}}}, "mode='add' shapes refined gates"),
    ({"layer": 2}, "unknown key 'layer' for a gradient_grid figure; valid: batch, "),
    ({"cells": "<drop>"}, "a gradient_grid figure needs 'cells', which it lacks"),
])
def test_a_users_config_with_a_bad_value_exits_2_before_computing(tmp_path, capsys, change,
                                                                  message):
    """A figure config of the user's own (--figures DIR) is input: a bad value is one line and
    exit 2 (it was an internal error), found before any map is computed."""
    from gradflow.cli import main

    config = json.loads((reproduce.CONFIG_DIR / "star_fig2.json").read_text())
    mine = {k: v for k, v in {**config, **change}.items() if v != "<drop>"}
    (tmp_path / "mine.json").write_text(json.dumps(mine))
    (tmp_path / "out").mkdir()
    rc = main(["reproduce", "--figures", str(tmp_path), "--only", "mine", "--out",
               str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not any((tmp_path / "out").iterdir())


def test_update_without_a_checkout_says_so(tmp_path, monkeypatch):
    """An installed package has no figures/ to update: one input error naming the fix (it
    was "internal error: output directory ... does not exist")."""
    monkeypatch.setattr(reproduce, "FIGURES_DIR", tmp_path / "figures")
    with pytest.raises(gradflow.errors.InputError, match="which this installation does not "
                                                         "have: write to a folder of yours"):
        reproduce.reproduce("star_fig2", update=True)


def test_figure_data_with_overrides_says_its_description_is_the_figures():
    """The committed figure's description (10 layers x 10 steps, H = 128) is not the setting
    of a run with other sizes: it is kept, marked as the figure's, with what changed."""
    small = reproduce.figure_data("star_fig2", layers=2, steps=3, hidden=4, batch=2)
    text = small.config["description"]
    assert text.startswith("SPEC section 4 item 1") and text.endswith(
        "[the committed figure's setting; changed here: batch=2, hidden=4, layers=2, steps=3]")


def test_a_misspelt_key_is_refused_not_recorded_as_a_note():
    """figure_data's overrides, build's config and every loaded config are checked against the
    keys their kind reads; a key the kind reads is passed to the function that takes it (each
    from_config kind's keys are parameters of its function or drawing options)."""
    import inspect

    with pytest.raises(ValueError, match=r"'deep_adding' with layer, steps given: unknown key "
                                         r"'layer' for a training_runs figure; valid: .*layers"):
        reproduce.figure_data("deep_adding", layer=2, steps=5)
    config = reproduce.load_config("star_fig2")
    with pytest.raises(ValueError, match="unknown keys 'seeds', 'zoom' for a gradient_grid"):
        reproduce.build({**config, "zoom": 2, "seeds": [1]})
    functions = {"gradient_grid": "gradient_grid", "vertical_gain": "vertical_gain",
                 "gate_saturation": "gate_saturation", "training_runs": "training_runs"}
    drawn = {"normalize", "gates", "color_range"}
    for kind, name in functions.items():
        params = set(inspect.signature(getattr(gradflow.experiments, name)).parameters)
        assert reproduce.BUILDERS[kind].keys - drawn <= params, kind
    for name, path in reproduce.configs().items():  # every shipped key is read
        config = reproduce.load_config(path)
        assert set(config) <= reproduce.BUILDERS[config["figure"]].keys | reproduce.COMMON_KEYS


def test_cli_refuses_what_it_would_ignore(tmp_path, capsys):
    """--update beside an --out elsewhere was ignored (only --out was written), and a figure
    named twice in --only was computed twice: both are one line and exit 2, nothing written."""
    from gradflow.cli import main

    for argv, said in ((["--update", "--out", str(tmp_path)], "give one of the two"),
                       (["--only", "star_fig2,star_fig2", "--out", str(tmp_path)],
                        "--only names star_fig2 more than once")):
        assert main(["reproduce", *argv]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


def test_every_committed_figure_has_its_config_in_the_package():
    shipped = reproduce.configs()
    assert all(p.parent == reproduce.CONFIG_DIR for p in shipped.values())
    for name in shipped:  # the committed data and picture of each
        assert (reproduce.FIGURES_DIR / f"{name}.npz").is_file()
        assert (reproduce.FIGURES_DIR / f"{name}.png").is_file()
    # one copy of each config: none left beside the committed figures
    stray = [p.name for p in reproduce.FIGURES_DIR.glob("*.json")
             if isinstance(json.loads(p.read_text()), dict)
             and "figure" in json.loads(p.read_text())]
    assert not stray
    for name in shipped:
        assert reproduce.load_config(name) == reproduce.load_config(shipped[name])
        assert reproduce.load_config(name)["figure"] in reproduce.BUILDERS
    # the package data are declared, so a non-editable install carries them
    assert '"figure_configs/*.json"' in (ROOT / "pyproject.toml").read_text()


def _install(tmp_path) -> Path:
    """``pip install`` (not editable) of a copy of the package into a fresh venv; returns the
    venv. Dependencies (jax, numpy, matplotlib) come from this interpreter's site-packages
    through a ``.pth`` line, which adds the folder without running its ``.pth`` files, so this
    checkout's editable install stays out."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "gradflow", src / "gradflow",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    venv = tmp_path / "venv"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "wheel"), str(src)], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("gradflow-*.whl")
    subprocess.run(pip + ["--python", str(venv / "bin" / "python"), "install", "--no-deps",
                          "--no-index", str(wheel)], check=True, cwd=tmp_path)
    (site,) = (venv / "lib").glob("python*/site-packages")
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "gradflow-test-deps.pth").write_text("\n".join(deps) + "\n")
    return venv


def _installed_reproduce(env):
    """Install a copy, then run its ``gradflow reproduce --only star_fig2`` outside the checkout;
    returns ``(where gradflow was imported from, venv, run, PNG header, loaded result)``."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        venv = _install(tmp)
        env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        where = subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import gradflow; print(gradflow.__file__)"], cwd=tmp,
                               env=env, capture_output=True, text=True, check=True).stdout
        out = tmp / "out"
        out.mkdir()
        run = subprocess.run([str(venv / "bin" / "gradflow"), "reproduce", "--only",
                              "star_fig2", "--out", str(out)], cwd=tmp, env=env,
                             capture_output=True, text=True)
        if run.returncode:
            return where, str(venv), run, None, None
        return (where, str(venv), run, (out / "star_fig2.png").read_bytes()[:8],
                gradflow.load(out / "star_fig2.npz"))


@pytest.mark.background(job=_installed_reproduce)
def test_installed_package_reproduces_star_fig2_outside_the_checkout(background):
    where, venv, run, png, again = background
    assert where.startswith(venv), where  # the installed copy, not this checkout
    assert run.returncode == 0, run.stderr
    assert "[1/1] star_fig2 (gradient_grid): computing ..." in run.stdout
    assert png == b"\x89PNG\r\n\x1a\n"
    committed = gradflow.load(reproduce.FIGURES_DIR / "star_fig2.npz")
    for key, value in reproduce.load_config("star_fig2").items():
        assert again.config[key] == value == committed.config[key], key
    for key in committed.arrays:
        np.testing.assert_allclose(again[key], committed[key], rtol=1e-4, err_msg=key)


def test_redraw_draws_the_committed_data_and_computes_nothing(tmp_path, capsys, monkeypatch):
    """--redraw: the PNG again from figures/NAME.npz (after a change to the drawing), no .npz
    written and nothing computed; a figure without committed data is one line, exit 2."""
    from gradflow.cli import main

    def fail(config):
        raise AssertionError("--redraw computed")

    for b in reproduce.BUILDERS:
        monkeypatch.setitem(reproduce.BUILDERS, b, reproduce.BUILDERS[b]._replace(compute=fail))
    rc = main(["reproduce", "--redraw", "--only", "atlas_cheng_refined,vertical_gain", "--out",
               str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas_cheng_refined.png",
                                                          "vertical_gain.png"]
    (tmp_path / "cfg").mkdir()
    config = json.loads((reproduce.CONFIG_DIR / "vertical_gain.json").read_text())
    (tmp_path / "cfg" / "not_committed.json").write_text(json.dumps(config))
    rc = main(["reproduce", "--redraw", "--figures", str(tmp_path / "cfg"), "--out",
               str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "figure 'not_committed' has no committed data" in err, err
    # --data DIR: data of one's own (an earlier --out; it was always figures/)
    (tmp_path / "mine").mkdir()
    shutil.copy(reproduce.data_path("vertical_gain"), tmp_path / "mine" / "not_committed.npz")
    (tmp_path / "drawn").mkdir()
    rc = main(["reproduce", "--redraw", "--figures", str(tmp_path / "cfg"), "--data",
               str(tmp_path / "mine"), "--out", str(tmp_path / "drawn")])
    assert rc == 0, capsys.readouterr().err
    assert [p.name for p in (tmp_path / "drawn").iterdir()] == ["not_committed.png"]
    rc = main(["reproduce", "--data", str(tmp_path / "mine"), "--out", str(tmp_path)])
    assert rc == 2 and "--data is where --redraw reads the data" in capsys.readouterr().err


def _edited(folder: Path, name: str, edit) -> Path:
    """``folder`` holding the shipped config ``name`` changed by ``edit(config)``."""
    config = reproduce.load_config(name)
    edit(config)
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(config))
    return folder


def _set(*path_and_value):
    """An edit setting ``config[k1][k2]...[kn] = value``."""
    *path, key, value = path_and_value
    return lambda config: functools.reduce(operator.getitem, path, config).__setitem__(key,
                                                                                        value)


@pytest.mark.parametrize("name,edit,said", [
    ("star_fig2", _set("input_scale", 2), "(input_scale; input_scale: the data's 1.0, the "
                                          "config's 2)"),
    ("star_fig2", _set("cell_options", {"forget_bias": 1.0}),
     '(cell_options; cell_options: the data\'s {}, the config\'s {"forget_bias": 1.0})'),
    ("deep_adding", _set("task_options", {"steps": 20}),
     "(task_options; task_options.steps: the data's 10, the config's 20)"),
    ("deep_adding", _set("runs", 0, 2, {"forget_bias": 5.0}),
     '(runs; runs[0][2]: the data\'s {}, the config\'s {"forget_bias": 5.0})'),
    ("deep_adding", lambda config: config["runs"][0].append({"lr": 0.01}),  # (its {})
     '(runs; runs[0][3]: the data\'s {}, the config\'s {"lr": 0.01})'),
    ("ur_lstm_gates_init", _set("entries", 1, 2, "init", "orthogonal"),
     "entries[1][2].init: the data's \"ugi\", the config's \"orthogonal\""),
    ("train_atlas_gu_copy", _set("claims", ["ur_lstm_binary_recall"]),
     "(claims; claims: the data's [\"ur_lstm_binary_recall\", \"ur_lstm_beats_baselines\"]"),
])
def test_redraw_refuses_data_computed_with_other_nested_or_numeric_settings(
        tmp_path, capsys, name, edit, said):
    """A redraw from the committed data under an edited config of --figures DIR was drawn,
    exit 0, under a title naming the new settings, where the edit was a nested value
    (cell_options, task_options, a run's options, an entry's) or a number of the other JSON
    type (input_scale 2 where the data's is 1.0): only plain values of one type were compared.
    Now every setting both hold is: one line, exit 2, nothing written."""
    from gradflow.cli import main

    figs = _edited(tmp_path / "figs", name, edit)
    (tmp_path / "out").mkdir()
    rc = main(["reproduce", "--figures", str(figs), "--redraw", "--only", name, "--out",
               str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"figure {name!r}: its committed data was computed with other settings than its " \
        "config holds " in err and said in err and "(leave out --redraw)" in err, err
    assert not any((tmp_path / "out").iterdir())


def test_every_shipped_figure_passes_the_redraw_check_and_drawing_options_may_change():
    """Each shipped config against its committed data: equal, though its data records some
    keys in another form (an atlas's claims by name -> config, a training_runs figure's runs by
    label -> resolved config, ``runs_spec`` as given); a number spelt as the other JSON type
    (1 for 1.0) is the same number; the keys only the drawing reads may change (a redraw is for
    changes to the drawing), the title and description too."""
    for name, path in reproduce.configs().items():
        reproduce._check_drawn_data(name, reproduce.load_config(path),
                                    reproduce.figure_data(name))
    for name, edit in [("star_fig2", _set("input_scale", 1)),
                       ("star_fig2", _set("color_range", [0.1, 10])),
                       ("star_fig2", _set("normalize", False)),
                       ("star_fig2", _set("title", "another title")),
                       ("ur_lstm_gates_init", _set("gates", "LSTM", "i")),
                       ("gu_copy_gates", _set("gates", "LSTM", "o")),
                       ("atlas_star_fig2", _set("rows", "hidden"))]:
        config = reproduce.load_config(name)
        edit(config)
        reproduce._check_drawn_data(name, config, reproduce.figure_data(name))
    config = reproduce.load_config("atlas_star_fig2")  # (the claims' order is the figure's)
    config["claims"] = config["claims"][::-1]
    with pytest.raises(gradflow.errors.InputError, match=r"\(claims; claims\[0\]: the data's "
                                                               r'"rnn_amplified", the config'):
        reproduce._check_drawn_data("atlas_star_fig2", config,
                                    reproduce.figure_data("atlas_star_fig2"))


def test_update_with_configs_of_ones_own_is_refused(tmp_path, capsys, monkeypatch):
    """--update --figures DIR computed (or redrew) figures from configs that are not the
    shipped ones and wrote them over the committed figures/ (an edited title: star_fig2.png
    replaced): one line, exit 2, nothing written. (figures/ is a scratch copy here.)"""
    from gradflow.cli import main

    scratch = tmp_path / "committed"
    scratch.mkdir()
    for suffix in (".npz", ".png"):
        shutil.copy(reproduce.FIGURES_DIR / f"star_fig2{suffix}", scratch)
    monkeypatch.setattr(reproduce, "FIGURES_DIR", scratch)
    before = (scratch / "star_fig2.png").read_bytes()
    figs = _edited(tmp_path / "figs", "star_fig2", _set("title", "EDITED"))
    for extra in ([], ["--redraw"]):
        rc = main(["reproduce", "--figures", str(figs), "--only", "star_fig2", "--update",
                   *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "--update replaces the committed figures (figures/), made from the shipped " \
            f"configs, not those in --figures {figs}: write these to a folder of yours " \
            "(--out DIR)" in err, err
    assert (scratch / "star_fig2.png").read_bytes() == before
    assert sorted(p.name for p in scratch.iterdir()) == ["star_fig2.npz", "star_fig2.png"]


def test_damaged_figure_data_and_an_empty_config_folder_are_the_users_to_fix(tmp_path,
                                                                             capsys):
    """A damaged figures/NAME.npz and a --figures folder with no configs exited 1 as
    "internal error ... a bug in gradflow"."""
    from gradflow.cli import main
    from gradflow.errors import InputError

    (tmp_path / "star_fig2.npz").write_bytes(b"not an npz")
    with pytest.raises(InputError, match="cannot load .*star_fig2.npz"):
        reproduce.figure_data("star_fig2", data_dir=tmp_path)
    empty = tmp_path / "configs"
    empty.mkdir()
    for extra in (["--out", str(tmp_path)], ["--list"]):
        assert main(["reproduce", "--figures", str(empty), *extra]) == 2
        err = capsys.readouterr().err
        assert "holds no figure configs (*.json with a 'figure' field); the shipped ones " \
            "are in" in err
        assert err.count("\n") == 1


def test_json_files_that_are_not_configs_are_passed_over(tmp_path, capsys):
    """``--figures figures/`` (the data, beside an atlas's list-valued grid JSON) failed on
    the list: "figure config ... must hold a JSON object". Such files are not configs."""
    from gradflow.cli import main

    (tmp_path / "grid.json").write_text("[1, 2]")
    (tmp_path / "meta.json").write_text('{"cells": ["lstm"]}')
    shutil.copy(reproduce.CONFIG_DIR / "star_fig2.json", tmp_path)
    assert list(reproduce.configs(tmp_path)) == ["star_fig2"]
    assert main(["reproduce", "--figures", str(tmp_path), "--list"]) == 0
    assert capsys.readouterr().out.startswith("star_fig2: ")
    (tmp_path / "broken.json").write_text('{"figure": ')  # a config written wrongly: said
    with pytest.raises(ValueError, match="cannot read figure config .*broken.json"):
        reproduce.configs(tmp_path)
