"""gradflow.load of files that are not what they claim: one clear error naming file and problem."""
import json
import zipfile

import numpy as np
import pytest

import gradflow
from gradflow import results
from gradflow.results import FORMAT_VERSION, make_result


@pytest.fixture
def saved(tmp_path):
    res = make_result("gradient_map", {"values": np.arange(12.0).reshape(3, 4),
                                       "loss_value": np.float32(1.5)}, {"cell": "lstm"})
    return res, res.save(tmp_path / "good.npz")


def test_round_trip_carries_the_format_version(saved):
    res, path = saved
    with np.load(path) as f:
        meta = json.loads(str(f[results._META]))
    assert meta["format"] == FORMAT_VERSION == 1
    back = gradflow.load(path)
    assert back.kind == res.kind and back.config == res.config
    np.testing.assert_array_equal(back.values, res.values)


def test_arrays_are_read_only_measured_or_loaded_and_the_callers_stay_writable(saved):
    """A result's counts are of its arrays: neither a measured nor a loaded result's arrays
    can be written in place (a loaded one could, before), and the arrays a caller built it
    from stay the caller's, writable."""
    res, path = saved
    mine = np.ones((2, 3))
    built = make_result("gradient_map", {"values": mine}, {"cell": "lstm"})
    for r in (res, gradflow.load(path), built):
        with pytest.raises(ValueError, match="read-only"):
            r.values[0, 0] = np.inf
        assert r.total_nonfinite == 0
    mine[0, 0] = 7.0  # (a view: the caller's write shows, as before)
    assert built.values[0, 0] == 7.0 and mine.flags.writeable
    copy = gradflow.load(path).values.copy()
    copy[0, 0] = -1.0  # (a copy is the caller's to write)


def test_results_and_saved_weights_carry_what_computed_them(saved, tmp_path):
    """Versions, gradflow's code, backend, CPU and XLA's flags travel with every result and
    every params file."""
    import importlib.metadata as md
    import os
    import re

    import jax
    res, path = saved
    import platform
    try:  # (Linux on x86; elsewhere the platform's word for it)
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    want = {"gradflow": md.version("gradflow"), "jax": jax.__version__,
            "jaxlib": md.version("jaxlib"), "numpy": np.__version__,
            "source": results.source_fingerprint(), "backend": jax.default_backend(),
            "cpu": cpu, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "devices": jax.device_count(), "batch_devices": "auto"}
    assert re.fullmatch("[0-9a-f]{16}", want["source"])
    assert res.provenance == want and gradflow.load(path).provenance == want
    stack = gradflow.Stack("rnn", 1, 2, 3)
    saved_params = gradflow.runs.save_params(tmp_path / "p.npz", stack,
                                             stack.init(jax.random.key(0)))
    assert gradflow.runs.read_run(saved_params)["provenance"] == want
    # the batch split is a process setting: what a map ran under is said
    with gradflow.parallel.batch_devices(None):
        assert gradflow.results.provenance()["batch_devices"] is None
        with gradflow.parallel.batch_devices(1):
            assert gradflow.results.provenance()["batch_devices"] == 1
        assert gradflow.results.provenance()["batch_devices"] is None
    with gradflow.parallel.batch_devices(jax.devices()[:1]):
        assert gradflow.results.provenance()["batch_devices"] == 1
    assert gradflow.results.provenance()["batch_devices"] == "auto"


def test_version_0_files_still_read(tmp_path):
    """Files written before the version was recorded (no "format" key) are version 0."""
    meta = json.dumps({"kind": "k", "config": {"cell": "rnn"}, "nonfinite": {}})
    path = tmp_path / "old.npz"
    np.savez(path, **{results._META: np.array(meta)}, values=np.ones(3))
    old = gradflow.load(path)
    assert old.config == {"cell": "rnn"} and old.provenance == {} and old.underflow == {}


def _expect(path, pattern, err=ValueError):
    with pytest.raises(err) as info:
        gradflow.load(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert "\n" not in msg
    import re
    assert re.search(pattern, msg), msg
    return msg


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.npz", "no such file", FileNotFoundError)


def test_directory(tmp_path):
    _expect(tmp_path, "is a directory")


def test_empty(tmp_path):
    p = tmp_path / "empty.npz"
    p.write_bytes(b"")
    _expect(p, r"empty \(0 bytes\)")


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9, 0.99])
def test_truncated(saved, keep):
    _, path = saved
    data = open(path, "rb").read()
    cut = path.replace("good", f"cut{int(keep * 100)}")
    open(cut, "wb").write(data[:int(len(data) * keep)])
    _expect(cut, "truncated or corrupted")


def test_corrupted_bytes_inside(saved):
    """Flipped bytes inside an array's data: the zip's CRC check catches them."""
    _, path = saved
    data = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("values.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 100
    data[start:start + 8] = b"\xff" * 8
    bad = path.replace("good", "flipped")
    open(bad, "wb").write(bytes(data))
    _expect(bad, "truncated or corrupted")


def test_not_a_zip(tmp_path):
    p = tmp_path / "text.npz"
    p.write_text("hello, not an archive\n")
    _expect(p, r"not an \.npz \(zip\) archive")
    q = tmp_path / "array.npy"
    np.save(q, np.ones(3))
    _expect(q, r"not an \.npz")


def test_foreign_npz(tmp_path):
    p = tmp_path / "foreign.npz"
    np.savez(p, weights=np.ones(3), bias=np.zeros(2))
    msg = _expect(p, "not a gradflow result: an .npz without gradflow metadata")
    assert "weights" in msg and "bias" in msg


def test_pickled_entry(tmp_path):
    p = tmp_path / "pickled.npz"
    meta = json.dumps({"kind": "k", "config": {}, "nonfinite": {}, "format": 1})
    np.savez(p, **{results._META: np.array(meta)}, obj=np.array([{"a": 1}], dtype=object))
    _expect(p, "cannot be read without pickle")


@pytest.mark.parametrize("meta, pattern", [
    ("{not json", "not valid JSON"),
    (json.dumps({"kind": "k"}), "lacks kind/config/nonfinite"),
    (json.dumps(["a list"]), "lacks kind/config/nonfinite"),
    # loaded, then failed as an AttributeError on its first repr
    (json.dumps({"kind": "k", "config": {}, "nonfinite": 3}), "entries of the wrong kind"),
    (json.dumps({"kind": "k", "config": [], "nonfinite": {}}), "entries of the wrong kind"),
    (json.dumps({"kind": "k", "config": {}, "nonfinite": {}, "format": "one"}),
     "not a version number"),
    (json.dumps({"kind": "k", "config": {}, "nonfinite": {}, "format": FORMAT_VERSION + 1}),
     rf"newer gradflow \(format version {FORMAT_VERSION + 1}; this gradflow reads up to "
     rf"{FORMAT_VERSION}\)"),
])
def test_bad_metadata(tmp_path, meta, pattern):
    p = tmp_path / "meta.npz"
    np.savez(p, **{results._META: np.array(meta)}, values=np.ones(2))
    _expect(p, pattern)


def test_a_path_saved_without_extension_loads_as_saved(tmp_path):
    res = make_result("gradient_map", {"values": np.ones((2, 3))}, {"cell": "gru"})
    written = res.save(tmp_path / "noext")
    assert str(written).endswith("noext.npz")
    back = gradflow.load(tmp_path / "noext")  # as given to save
    np.testing.assert_array_equal(back.values, res.values)
    with pytest.raises(FileNotFoundError, match="no such file"):
        gradflow.load(tmp_path / "other")


@pytest.mark.parametrize("whole", [False, True])
def test_save_refuses_what_it_cannot_write_whole_or_not(tmp_path, monkeypatch, whole):
    """``save(whole=True)`` skipped ``save``'s checks: "" and a folder wrote a hidden
    ``.npz``, a folder named like the file raised IsADirectoryError; an array named like
    np.savez's own arguments was dropped (``allow_pickle``) or raised a bare TypeError."""
    monkeypatch.chdir(tmp_path)
    res = make_result("gradient_map", {"values": np.ones((2, 3))}, {"cell": "gru"})
    (tmp_path / "d.npz").mkdir()
    for path in ("", "sub/", "d.npz"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(gradflow.errors.InputError, match="give a file name"):
            res.save(path, whole=whole)
    with pytest.raises(gradflow.errors.InputError, match="cannot write 'd.npz': "):
        res.save("d", whole=whole)
    for name in ("allow_pickle", "file", "__gradflow__"):
        odd = make_result("k", {name: np.ones(2)}, {})
        with pytest.raises(ValueError, match=f"an array may not be named '{name}'"):
            odd.save("odd.npz", whole=whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "sub"]  # nothing written
    assert res.save(b"ok", whole=whole) == "ok.npz"
    np.testing.assert_array_equal(gradflow.load("ok.npz").values, res.values)


def test_lower_level_helpers_name_what_they_take(tmp_path):
    """Helpers of a third API sweep that raised AttributeError, KeyError, matplotlib's or
    JAX's errors, or accepted nonsense: one message each."""
    import jax
    import gradflow
    from gradflow import cost, plot, runs, sweep
    from gradflow.problem import gaussian_inputs, precision
    pr = gradflow.problem("lstm", layers=2, steps=3, hidden=4, batch=2)
    cases = [
        (lambda: gradflow.Result(kind="x", arrays=[1], config={}, nonfinite={}), TypeError,
         "Result arrays must be a dict"),
        (lambda: gradflow.Result(kind=3, arrays={}, config={}, nonfinite={}), TypeError,
         "Result kind must be a non-empty string"),
        (lambda: gradflow.Result(kind="x", arrays={"a": np.ones(2)}, config={"f": print},
                                 nonfinite={}).save(tmp_path / "r"), TypeError,
         "its config must hold JSON values only"),
        (lambda: runs.stack_from_config({}), ValueError, "a stack config is a dict"),
        (lambda: runs.record_file(-1), ValueError, "a record index is an integer >= 0"),
        (lambda: plot.gates_figure(gradflow.gradient_map(*pr[:3])), ValueError,
         "gates_figure expects a result of kind 'gate_stats', got 'gradient_map'"),
        (lambda: plot.figure((-1, 3)), ValueError, "a figure size is"),
        (lambda: plot.save(plot.figure((2, 2)), tmp_path / "f.png", dpi=0), ValueError,
         "dpi must be a positive number"),
        (lambda: sweep.device_mesh("x"), TypeError, "devices must be a list of JAX devices"),
        (lambda: gradflow.jacobian_map(*pr[:3], target=(True, 0)), ValueError,
         r"target must be a \(layer, step\) pair of integers"),
        (lambda: gaussian_inputs(0, (2, -1, 3)), ValueError, "shape must be non-negative"),
        (lambda: gaussian_inputs(0, (1, 1, 2), scale=float("nan")), ValueError,
         "scale must be a finite number"),
        (lambda: precision("x"), ValueError, "unknown dtype 'x'"),
        (lambda: gradflow.cells.is_spec(None), TypeError, "a cell spec is a string"),
        (lambda: gradflow.cells.stack_params(None, []), TypeError,
         "stack must be a gradflow.Stack"),
        (lambda: cost.parse_size(3.5), ValueError, "memory size must be a whole number of bytes"),
        (lambda: cost.estimate(None, 2, 3), TypeError, "stack must be a gradflow.Stack"),
        (lambda: cost.check_fits(None), TypeError, "cost must be a Cost"),
        (lambda: pr.stack.layer_in(9), ValueError, r"layer index must be in 0..1, got 9"),
    ]
    for call, kind, match in cases:
        with pytest.raises(kind, match=match):
            call()
    path = runs.save_params(tmp_path / "pp", pr.stack, pr.params)  # writes pp.npz ...
    assert path.endswith("pp.npz")
    stack, _ = runs.load_params(tmp_path / "pp")  # ... which the same name reads back
    assert stack.layers == 2
    assert len(sweep.device_mesh(jax.devices()[:1]).devices.flat) == 1


def test_an_array_of_python_objects_is_refused_when_saved(tmp_path):
    """``save`` wrote an object array (pickled) that ``load`` then refused ("cannot be read
    without pickle"): refused when saved, by name."""
    res = make_result("x", {"values": np.array([1.0, None], dtype=object)}, {})
    with pytest.raises(TypeError, match="array 'values' holds Python objects"):
        res.save(tmp_path / "r.npz")
    assert not (tmp_path / "r.npz").exists()
