"""gradflow.checks: every bad argument gets one clear ValueError/TypeError at the door."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow
from gradflow import checks
from gradflow.errors import user_input


@pytest.fixture(scope="module")
def small():
    stack = gradflow.Stack("lstm", layers=2, input_size=3, hidden_size=4)
    return stack, stack.init(jax.random.key(0)), jnp.ones((2, 5, 3))


@pytest.mark.parametrize("value", [0, -1, 2.5, "3", True, None, np.float32(2)])
def test_positive_int_rejects(value):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        checks.positive_int("n", value)


def test_ints_accept_integers():
    assert checks.positive_int("n", np.int64(3)) == 3
    assert checks.nonneg_int("n", 0) == 0
    with pytest.raises(ValueError, match="non-negative"):
        checks.nonneg_int("n", -1)
    from gradflow.stack import _positive_int  # the old name stays importable
    assert _positive_int("n", 2) == 2


def test_choice_names_valid():
    assert checks.choice("wrt", "cell", ("hidden", "cell")) == "cell"
    with pytest.raises(ValueError, match="unknown wrt 'x'; valid: hidden, cell"):
        checks.choice("wrt", "x", ("hidden", "cell"))
    with pytest.raises(ValueError, match="unknown wrt"):
        checks.choice("wrt", ["unhashable"], ("hidden",))


@pytest.mark.parametrize("xs, err, msg", [
    (np.ones((2, 5, 3), np.complex64), TypeError, "complex64"),
    (np.array([[["a", "b", "c"]]]), TypeError, "<U1"),
    (np.array([[["a", "b", "c"]]], dtype=object), TypeError, "object"),
    (np.ones((2, 5, 3), object), TypeError, "object"),
    (np.ones((2, 5, 3), bool), TypeError, "bool"),
    ("abc", ValueError, "got str"),
    (None, ValueError, "got NoneType"),
    (np.ones((2, 5)), ValueError, r"shape \(batch, steps, 3\), got \(2, 5\)"),
    (np.ones((2, 5, 4)), ValueError, r"got \(2, 5, 4\)"),
    (np.ones((0, 5, 3)), ValueError, "at least one example"),
    ([[[1.0, 2.0, 3.0]]], ValueError, r"got list: use np.asarray\(...\)"),
])
def test_check_xs(small, xs, err, msg):
    with pytest.raises(err, match=msg):
        checks.check_xs(small[0], xs)


def test_check_xs_accepts_ints(small):
    assert checks.check_xs(small[0], np.ones((1, 2, 3), np.int32)).shape == (1, 2, 3)


def test_check_params_key(small):
    stack = small[0]
    for key in (jax.random.key(0), jax.random.PRNGKey(0)):
        with pytest.raises(TypeError, match=r"looks like a PRNG key; call stack.init\(key\)"):
            checks.check_params(stack, key)


def test_check_params_structure(small):
    stack, params, _ = small
    checks.check_params(stack, params)
    with pytest.raises(TypeError, match="must be the dict returned by stack.init"):
        checks.check_params(stack, [1, 2])
    with pytest.raises(ValueError, match="params hold 1 layers, the stack has 2"):
        checks.check_params(stack, {"layers": params["layers"][:1]})
    no_gate = {"layers": [params["layers"][0], {k: v for k, v in params["layers"][1].items()
                                                 if k != sorted(params["layers"][1])[0]}]}
    with pytest.raises(ValueError, match=r"params\['layers'\]\[1\]\[.*\] is missing"):
        checks.check_params(stack, no_gate)
    # a layer's params one level too deep (a whole model's dict given for one layer): the
    # message says what that layer's dict holds instead
    nested = {"layers": [params["layers"][0], {"cell": params["layers"][1], "extra": {}}]}
    with pytest.raises(ValueError, match=r"is missing: expected an array of shape \(.*\); "
                                         r"params\['layers'\]\[1\] holds 'cell', 'extra'$"):
        checks.check_params(stack, nested)
    bad = jax.tree_util.tree_map(lambda a: a, params)
    gate = sorted(bad["layers"][1])[0]
    leaf = sorted(bad["layers"][1][gate])[0]
    shape = bad["layers"][1][gate][leaf].shape
    bad["layers"][1][gate][leaf] = jnp.zeros(shape + (1,))
    with pytest.raises(ValueError, match=rf"params\['layers'\]\[1\]\['{gate}'\]\['{leaf}'\] has "
                                         rf"shape {re_shape(shape + (1,))}, the stack expects "
                                         rf"{re_shape(shape)}"):
        checks.check_params(stack, bad)
    extra = {**params, "readout": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"params\['readout'\] is not a parameter"):
        checks.check_params(stack, extra)
    ints = jax.tree_util.tree_map(lambda a: a.astype(jnp.int32), params)
    with pytest.raises(TypeError, match="real floating array"):
        checks.check_params(stack, ints)


def re_shape(shape):
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_check_params_deep_stack_is_fast():
    import time
    stack = gradflow.Stack("gru", layers=300, input_size=2, hidden_size=3)
    params = stack.init(jax.random.key(0))
    t0 = time.perf_counter()
    checks.check_params(stack, params)
    assert time.perf_counter() - t0 < 5
    params["layers"][299] = params["layers"][0]  # layer 0 reads 2 features, layer 299 reads 3
    with pytest.raises(ValueError, match=r"\['layers'\]\[299\]"):
        checks.check_params(stack, params)


def test_check_scalar_loss():
    spec = jax.ShapeDtypeStruct((2, 5, 4), jnp.float32)
    checks.check_scalar_loss(lambda o: jnp.mean(o), spec)
    with pytest.raises(ValueError, match=r"must return a scalar, got an array of shape \(2, 4\)"):
        checks.check_scalar_loss(lambda o: o[:, -1], spec)
    with pytest.raises(TypeError, match="real floating scalar"):
        checks.check_scalar_loss(lambda o: jnp.sum(o > 0), spec)
    with pytest.raises(ValueError, match=r"loss\(outputs: \(2, 5, 4\) float32\) failed"):
        checks.check_scalar_loss(lambda o: o @ jnp.ones(7), spec)
    with pytest.raises(ValueError, match="one scalar array"):
        checks.check_scalar_loss(lambda o: (jnp.mean(o), jnp.mean(o)), spec)


@pytest.mark.parametrize("fn", [gradflow.gradient_map, gradflow.jacobian_map,
                                gradflow.local_gains])
def test_measurements_check_at_the_door(small, fn):
    stack, params, xs = small
    with pytest.raises(TypeError, match="PRNG key"):
        fn(stack, jax.random.key(0), xs)
    with pytest.raises(TypeError, match="complex64"):
        fn(stack, params, xs.astype(jnp.complex64))
    with pytest.raises(ValueError, match=r"params\['layers'\]\[0\]"):
        fn(stack, {"layers": [params["layers"][1], params["layers"][1]]}, xs)
    with pytest.raises(ValueError, match="params hold 3 layers"):
        fn(stack, {"layers": params["layers"] + params["layers"][:1]}, xs)
    bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    with pytest.raises(TypeError, match=r"params are bfloat16; .* a.astype\(jnp.float32\)"):
        fn(stack, bf16, xs)  # (it ran, then failed inside counting underflow or in an SVD)


def test_gradient_map_loss_must_be_scalar(small):
    stack, params, xs = small
    with pytest.raises(ValueError, match=r"must return a scalar, got an array of shape \(2,\)"):
        gradflow.gradient_map(stack, params, xs, loss=lambda o: jnp.sum(o, axis=(1, 2)))
    with pytest.raises(ValueError, match="unknown wrt"):
        gradflow.gradient_map(stack, params, xs, wrt="weights")


def test_gate_statistics_check_at_the_door(small):
    stack, params, xs = small
    with pytest.raises(TypeError, match="PRNG key"):
        gradflow.gates.saturation(stack, jax.random.key(0), xs)
    with pytest.raises(TypeError, match="complex64"):
        gradflow.gates.saturation(stack, params, xs.astype(jnp.complex64))
    with pytest.raises(TypeError, match="complex64"):
        stack.apply(params, xs.astype(jnp.complex64))
    res = gradflow.gates.saturation(stack, params, np.asarray(xs, np.int32))  # ints are fine
    assert res.config["batch"] == 2


def _measurements():
    from gradflow import gates
    return [gradflow.gradient_map, gradflow.jacobian_map, gradflow.local_gains,
            gates.saturation]


@pytest.mark.parametrize("transform", ["jit", "vmap", "grad"])
def test_measurements_under_a_transformation_name_their_traceable_cores(transform):
    """A Result-returning measurement called under the user's jit/vmap/grad: one TypeError
    naming what to transform instead (it was a tracer error from inside gradflow)."""
    prob = gradflow.problem("lstm", layers=2, steps=3, hidden=4, batch=2, seed=0)
    s, p, xs = prob.stack, prob.params, prob.xs
    for fn in _measurements():
        call = {"jit": lambda: jax.jit(lambda q: fn(s, q, xs).arrays)(p),
                "vmap": lambda: jax.vmap(lambda x: fn(s, p, x).arrays)(xs[None]),
                "grad": lambda: jax.grad(lambda q: fn(s, q, xs).arrays)(p)}[transform]
        with pytest.raises(TypeError, match="run outside jax.jit/vmap/grad/lax.scan; to "
                                            "transform one, use its traceable core: "
                                            "gradflow.jacobian.map_arr"):
            call()


@pytest.mark.parametrize("transform", ["jit", "scan"])
def test_measurements_inside_a_trace_with_concrete_arguments_say_so(transform):
    """Called inside the user's jit or scan with params and inputs closed over (concrete), a
    measurement failed at its first look at a value with JAX's tracer error, re-raised as bad
    input ("Attempted boolean conversion of traced array"); the model functions' message named
    cores that take a Stack. Now the same TypeError as for traced arguments, which says a model
    function has no traceable core."""
    from gradflow import gates

    prob = gradflow.problem("lstm", layers=2, steps=3, hidden=4, batch=2, seed=0)
    s, p, xs = prob.stack, prob.params, prob.xs

    def model(w, xs, taps):
        def step(h, inp):
            x, tap_t = inp
            h = gradflow.tap(jnp.tanh(x @ w), tap_t[0])
            return h, h
        _, ys = jax.lax.scan(step, jnp.zeros((xs.shape[0], 4)),
                             (xs.swapaxes(0, 1), taps.swapaxes(0, 1)))
        return ys.swapaxes(0, 1)

    def gates_model(w, xs):
        return {"f": jax.nn.sigmoid(xs @ w)[None]}

    w = jnp.eye(4)
    calls = [lambda fn=fn: fn(s, p, xs) for fn in _measurements()] + [
        lambda: gradflow.model_map(model, w, xs, layers=1),
        lambda: gradflow.model_jacobian_map(model, w, xs, layers=1),
        lambda: gates.model_saturation(gates_model, w, xs, kinds={"f": "sigmoid"})]
    for call in calls:
        run = {"jit": lambda: jax.jit(lambda: call().arrays)(),
               "scan": lambda: jax.lax.scan(lambda c, _: (c, call().arrays), 0, None,
                                            length=1)}[transform]
        with pytest.raises(TypeError, match="run outside jax.jit/vmap/grad/lax.scan; .*a "
                                            "model function's measurements .* have none"):
            run()


@pytest.mark.parametrize("value", [2 ** 31 - 1, 2 ** 32, 2 ** 40, -1, 1.5, "0", None, True])
def test_seeds_outside_31_bits_or_not_integers_are_refused(value):
    """2**32 would silently be seed 0 (a key takes its seed modulo 2**32), -1 seed 2**32 - 1."""
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*31 - 1\)"):
        gradflow.problem("lstm", layers=1, steps=2, hidden=4, batch=1, seed=value)
    with pytest.raises(ValueError, match=r"readout_seed must be an integer in \[0, 2\*\*31"):
        gradflow.jacobian.readout_loss("last", 4, 2, 1, value)


def test_other_arguments_at_the_door(small):
    from gradflow import gates

    stack, params, xs = small
    for fn in (gradflow.jacobian_map, gradflow.local_gains):
        for bad in (-3, 0, 2.5, "a"):
            with pytest.raises(ValueError, match=f"chunk must be a positive integer, got "
                                                 f"{bad!r}"):
                fn(stack, params, xs, chunk=bad)
    with pytest.raises(ValueError, match="seed must be an integer"):
        gradflow.jacobian_map(stack, params, xs, method="probe", seed="x")
    with pytest.raises(ValueError, match="unknown dtype int32; valid: float32, float64"):
        stack.init(jax.random.key(0), jnp.int32)
    with pytest.raises(ValueError, match="unknown dtype 'float17'; valid: float32, float64"):
        stack.init(jax.random.key(0), "float17")
    for half in (jnp.float16, jnp.bfloat16):  # named with what to do, not "unknown"
        with pytest.raises(ValueError, match=r"dtype b?float16: gradflow measures in float32 or "
                                             r"float64 .* measure the same weights in float32"):
            stack.init(jax.random.key(0), half)
    p16 = jax.tree.map(lambda a: a.astype(jnp.float16), params)
    with pytest.raises(ValueError, match="dtype float16: gradflow measures in float32"):
        gradflow.gradient_map(stack, p16, xs.astype(jnp.float16))
    with pytest.raises(ValueError, match="float64 needs 64-bit JAX"):
        stack.init(jax.random.key(0), "float64")
    assert gradflow.problem("lstm", layers=1, steps=2, hidden=4, batch=1,
                            dtype=jnp.float32).config["dtype"] == "float32"
    stats = gates.saturation(stack, params, xs, eps=jnp.float32(0.25))
    assert stats.config["eps"] == 0.25


def test_widths_past_any_machine_are_refused_at_the_door():
    """A width past JAX's 32-bit indexing failed deep inside a cell's init (OverflowError)."""
    from gradflow.checks import MAX_WIDTH
    for kw in ({"hidden_size": 3_000_000_000}, {"hidden_size": [8, MAX_WIDTH + 1]},
               {"input_size": 2 ** 40}):
        args = {"input_size": 3, "hidden_size": 8, **kw}
        with pytest.raises(ValueError, match=r"is beyond any machine .* widths go up to "
                                             r"16,777,216$"):
            gradflow.Stack("lstm", 2, args["input_size"], args["hidden_size"])
    assert gradflow.Stack("rnn", 1, 3, MAX_WIDTH).hidden_size == MAX_WIDTH  # described, not built
    with pytest.raises(ValueError, match="beyond any machine"):
        gradflow.atlas.Grid(cells=("rnn",), hidden=(2 ** 31,))


def test_meta_adds_to_a_config_and_cannot_contradict_it():
    lstm = gradflow.problem("lstm", layers=3, steps=5, hidden=8, batch=2, seed=0)
    gru = gradflow.problem("gru", layers=2, steps=5, hidden=8, batch=2, seed=7)
    r = gradflow.gradient_map(gru.stack, gru.params, gru.xs, meta={**gru.config, "note": 1})
    assert r.config["cell"] == "gru" and r.config["seed"] == 7 and r.config["note"] == 1
    with pytest.raises(ValueError, match=r"meta\['cell'\] = 'lstm' disagrees with the measured "
                                         r"cell 'gru'"):
        gradflow.gradient_map(gru.stack, gru.params, gru.xs, meta=lstm.config)
    with pytest.raises(ValueError, match=r"meta\['batch'\] = 999 disagrees"):
        gradflow.local_gains(gru.stack, gru.params, gru.xs, meta={"batch": 999})
    with pytest.raises(TypeError, match="meta must be a dict, got list"):
        gradflow.gradient_map(gru.stack, gru.params, gru.xs, meta=[1, 2])


def test_a_stack_too_deep_to_describe_is_refused_before_it_is_built(monkeypatch):
    """Stack(layers=10**9) was killed by the kernel (a tuple of 10**9 cell references) before
    any check; now one ValueError naming the depth that fits, at once."""
    import time

    from gradflow import cost

    monkeypatch.setattr(cost, "available_memory", lambda device=None: 8 << 30)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"layers=1000000000: .* more than a quarter of the "
                                         r"8 GiB available; at most 33,554,432 layers here"):
        gradflow.Stack("lstm", 10 ** 9, 8, 8)
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(TypeError, match="residual must be True or False, got 'yes'"):
        gradflow.Stack("lstm", 2, 8, 8, residual="yes")


# -- a bug in gradflow's own code is never reported as bad input ------------------------------


def _break_builtin_init(monkeypatch):
    """Plant a library error (JAX refusing a broadcast) in gradflow's own initialisation of
    the LSTM and GRU families, compiled under the file name of gradflow's mechanisms module so
    that its traceback reads as gradflow's code (as a real regression there would)."""
    from gradflow.cells import mechanisms

    ns = {"jnp": jnp}
    exec(compile("def apply_bias_scheme(*args, **kwargs):\n"
                 "    return jnp.ones(4) + jnp.ones(8)\n", mechanisms.__file__, "exec"), ns)
    monkeypatch.setattr(mechanisms, "apply_bias_scheme", ns["apply_bias_scheme"])


def test_a_library_error_in_gradflows_own_init_is_internal_not_input(monkeypatch, capsys):
    from gradflow.cli import main
    from gradflow.errors import InputError, InternalError

    stack = gradflow.Stack("lstm", 2, 3, 11)  # a size no other test traced (caches)
    params = stack.init(jax.random.key(0))  # (before the bug)
    _break_builtin_init(monkeypatch)
    checks._expected_params.cache_clear()  # init traced the shapes (its memory check)
    with pytest.raises(InternalError, match="tracing the stack's init .* failed: TypeError: "
                                            "add got incompatible shapes") as info:
        checks.expected_params(stack)
    assert not isinstance(info.value, (InputError, ValueError, TypeError))
    # through the API's input checks and the command line's: exit 1, "internal error"
    checks._expected_params.cache_clear()  # the shapes were traced by init above
    with pytest.raises(InternalError):
        gradflow.gradient_map(stack, params, jnp.ones((2, 4, 3)))
    capsys.readouterr()
    assert main(["heatmap", "--cell", "lstm", "--layers", "2", "--steps", "4", "--hidden",
                 "11", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "internal error: InternalError" in err and "a bug in gradflow" in err
    assert "Traceback" not in err


def test_errors_of_the_users_code_and_of_gradflows_checks_stay_input_errors():
    from gradflow.cells import from_function
    from gradflow.errors import InputError

    def init(key, n_in, H, dtype):  # the user's init: a shape error of theirs
        return {"W": jnp.ones((n_in, H)) @ jnp.ones((H + 1, H))}

    def step(p, h, x):
        return (h, h)

    with pytest.raises(InputError, match="dot_general requires contracting dimensions"):
        with user_input():
            checks.expected_params(gradflow.Stack(from_function(step, init), 2, 3, 5))
    # a built-in cell's own check (a raise in gradflow): the user's sizes
    with pytest.raises(InputError, match="not divisible by chunk_size"):
        with user_input():
            checks.expected_params(gradflow.Stack(gradflow.cells.get(
                "on_lstm", chunk_size=2), 2, 3, 7))


def test_a_model_whose_outputs_move_with_the_place_in_the_batch_is_found():
    """checks.depends_on_place: a dropout mask drawn with the batch's shape from a fixed key
    (examples independent, but each device of a split would draw its own) is found; a model
    that treats every example alike is not, nor one drawing each example's mask alone."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from test_parallel import masked_model
    from test_model_map import two_layer_tanh, W_SIZE

    def two(w, xs, taps):
        return two_layer_tanh([w, w], xs, jnp.concatenate([taps, taps]))

    def one_mask(w, xs, taps):  # one mask for every example: the same wherever it is
        return two(w, xs, taps) * jax.random.bernoulli(jax.random.key(42), 0.5, (W_SIZE,))

    w = jnp.eye(W_SIZE) * 0.5
    xs = jax.random.normal(jax.random.key(0), (4, 3, W_SIZE))
    arrays, rest = checks.split_static(w)
    extra = (((1, 3, 4), "float32"),)
    assert checks.depends_on_place(masked_model, rest, arrays, xs, 2, extra)
    assert checks.depends_on_place(masked_model, rest, arrays, xs, 1, extra)
    assert not checks.depends_on_place(one_mask, rest, arrays, xs, 2, extra)
    assert not checks.depends_on_place(two, rest, arrays, xs, 2, extra)

    def fixed(w, xs, taps):  # built for a batch of 4: cannot run on 2
        return two(w, xs, taps) + jnp.ones((4, 1, 1))
    assert checks.depends_on_place(fixed, rest, arrays, xs, 2, extra)


def test_nbytes_counts_a_prng_keys_data():
    """A ``jax.random.key`` among a model's parameters (its dtype ``key<fry>`` is no NumPy
    dtype: the memory check raised a TypeError before anything was measured)."""
    from gradflow import checks
    tree = {"key": jax.random.key(0), "keys": jax.random.split(jax.random.key(1), 3),
            "w": jnp.ones((2, 3), jnp.float32), "spec": jax.ShapeDtypeStruct((4,), jnp.int8)}
    assert checks.nbytes(tree) == 8 + 3 * 8 + 6 * 4 + 4
