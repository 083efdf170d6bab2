"""Task generators checked against plain Python/NumPy decoding of the arrays they produce."""
import builtins
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import tasks

F32 = jnp.float32


B = 256  # one batch size everywhere: each task configuration compiles its generator once


def synthetic_digits(n=20, seed=0):
    """``n`` distinct 8x8 images with pixels 0..16 and labels ``0..9``."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 17, (n, 8, 8))
    labels = rng.integers(0, 10, n)
    return images, labels


IMAGES, LABELS = synthetic_digits()
DIGITS = tasks.make("digits", images=IMAGES, labels=LABELS)
ADDING = tasks.make("adding", steps=10)
COPY = tasks.make("copy", lag=3, symbols=4, alphabet=6)
COUNTING = {t: tasks.make("counting", steps=9, alphabet=3, target=t)
            for t in ("regression", "classification")}
ALL = [ADDING, COPY, COUNTING["regression"], COUNTING["classification"], DIGITS]


def draw(task, seed):
    return tuple(np.asarray(a) for a in tasks.sample(task, jax.random.key(seed), B, F32))


# ---------------------------------------------------------------------------------------------
# Registry and options


def test_names_and_unknown_task():
    assert tasks.names() == ("adding", "copy", "counting", "digits")
    with pytest.raises(ValueError, match="adding, copy, counting, digits"):
        tasks.make("addition")


@pytest.mark.parametrize("name,options,match", [
    ("adding", {"length": 5}, "valid options: steps"),
    ("adding", {"steps": 1}, "steps must be an integer >= 2"),
    ("copy", {"lag": -1}, "lag must be an integer >= 0"),
    ("copy", {"alphabet": 2.5}, "alphabet must be an integer"),
    ("copy", {"alphabet": 1}, "alphabet must be at least 2, got 1 .with one symbol"),
    ("counting", {"alphabet": 1}, "alphabet must be at least 2"),
    ("digits", {"images": np.full((3, 64), np.nan), "labels": np.zeros(3, int)},
     "192 non-finite pixels"),
    ("digits", {"images": np.full((3, 64), "a"), "labels": np.zeros(3, int)}, "real numbers"),
    ("counting", {"target": "ordinal"}, "'regression', 'classification'"),
    ("digits", {"images": np.zeros((3, 8, 8))}, "give both images= and labels="),
    ("digits", {"images": np.zeros((3, 7, 7)), "labels": np.zeros(3, int)}, r"\(N, 8, 8\)"),
    ("digits", {"images": np.zeros((3, 64)), "labels": np.full(3, 10)}, "0..9"),
    ("digits", {"images": np.zeros((3, 64)), "labels": np.zeros(3, int), "split": "dev"},
     "'all', 'train', 'test'"),
])
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        tasks.make(name, **options)


def test_digits_without_sklearn_names_the_pip_command(monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match=r"pip install 'gradflow\[digits\]'"):
        tasks.make("digits")


def test_digits_default_loader():
    """scikit-learn's data when it is installed, else the ImportError naming the extra."""
    if importlib.util.find_spec("sklearn") is None:
        with pytest.raises(ImportError, match="pip install"):
            tasks.make("digits")
        return
    task = tasks.make("digits")
    assert task.config["n_images"] == 1797 and task.steps == 64
    xs, ys, _ = tasks.sample(task, jax.random.key(0), 8, F32)
    assert xs.shape == (8, 64, 1) and float(xs.max()) <= 1.0 and 0 <= int(ys[:, -1].min())


# ---------------------------------------------------------------------------------------------
# Determinism, shapes, jit/vmap


@pytest.mark.parametrize("task", ALL, ids=lambda t: f"{t.name}-{t.kind}")
def test_deterministic_and_shapes(task):
    a, b, c = draw(task, 3), draw(task, 3), draw(task, 4)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    xs, ys, mask = a
    T = task.steps
    assert xs.shape == (B, T, task.input_size) and xs.dtype == F32
    assert mask.shape == (B, T)
    if task.kind == "classification":
        assert ys.shape == (B, T) and ys.dtype == jnp.int32
        assert 0 <= ys.min() and ys.max() < task.output_size
    else:
        assert ys.shape == (B, T, task.output_size) and ys.dtype == F32
    if task.loss_on == "last":
        np.testing.assert_array_equal(mask, np.eye(T)[[T - 1] * B])


def test_traceable_and_float64(x64):
    """Under jit and vmap over keys the draws are those of single calls; float64 holds the same
    draws."""
    keys = jax.random.split(jax.random.key(0), 3)
    xv = jax.jit(jax.vmap(lambda k: tasks.sample(ADDING, k, B, F32)[0]))(keys)
    np.testing.assert_array_equal(xv[1], tasks.sample(ADDING, keys[1], B, F32)[0])
    xs64, ys64, _ = tasks.sample(ADDING, keys[1], B, jnp.float64)
    assert xs64.dtype == ys64.dtype == jnp.float64
    np.testing.assert_allclose(xs64, xv[1], rtol=1e-7)


def test_sample_rejects_bad_arguments():
    with pytest.raises(TypeError, match="Task"):
        tasks.sample("adding", jax.random.key(0), 2)
    with pytest.raises(ValueError, match="batch"):
        tasks.sample(tasks.make("adding", steps=4), jax.random.key(0), 0)


def test_task_is_hashable_and_equal_by_config():
    assert tasks.make("copy", lag=3) == tasks.make("copy", lag=3)
    assert hash(tasks.make("copy", lag=3)) == hash(tasks.make("copy", lag=3))
    assert tasks.make("copy", lag=3) != tasks.make("copy", lag=4)
    assert tasks.make("copy", lag=3) is tasks.make("copy", lag=3)  # one jitted generator
    i2, l2 = synthetic_digits(seed=2)
    assert tasks.make("digits", images=IMAGES, labels=LABELS) == DIGITS
    assert tasks.make("digits", images=i2, labels=l2) != DIGITS


# ---------------------------------------------------------------------------------------------
# Contents, decoded with plain loops


@pytest.mark.parametrize("T", [10, 11, 2])
def test_adding_markers_and_targets(T):
    xs, ys, mask = draw(tasks.make("adding", steps=T), T)
    half = T // 2
    first, second = set(), set()
    for b in range(B):
        v, m = xs[b, :, 0], xs[b, :, 1]
        assert set(np.unique(m)) <= {0.0, 1.0}
        marked = [t for t in range(T) if m[t] == 1.0]
        assert len(marked) == 2
        p1, p2 = marked
        assert 0 <= p1 < half <= p2 < 2 * half  # one in each half (STAR code: p2 = T//2 + p1')
        first.add(p1)
        second.add(p2)
        assert all(0.0 <= x < 1.0 for x in v)
        total = 0.0
        for t in range(T):
            if m[t] == 1.0:
                total += float(v[t])
        assert ys[b, T - 1, 0] == pytest.approx(total, rel=1e-6)
        assert not ys[b, :T - 1].any()
    # every position of each half is used
    assert first == set(range(half)) and second == set(range(half, 2 * half))
    # values look uniform: mean 1/2, variance 1/12, within 4 standard errors
    v = xs[:, :, 0].ravel()
    assert abs(v.mean() - 0.5) < 4 * math.sqrt(1 / 12 / v.size)
    assert abs(v.var() - 1 / 12) < 4 * math.sqrt((1 / 80 - 1 / 144) / v.size)


def test_copy_layout():
    n, lag, A = 4, 3, 6
    task = COPY
    assert (task.steps, task.input_size, task.output_size) == (2 * n + lag + 1, A + 2, A + 1)
    xs, ys, mask = draw(task, 1)
    assert set(np.unique(xs)) == {0.0, 1.0} and (xs.sum(-1) == 1).all()  # exactly one-hot
    seen = set()
    for b in range(B):
        labels = [int(np.argmax(xs[b, t])) for t in range(task.steps)]
        symbols = labels[:n]
        assert all(1 <= s <= A for s in symbols)
        seen.update(symbols)
        assert labels[n:n + lag] == [0] * lag
        assert labels[n + lag] == A + 1  # the delimiter
        assert labels[n + lag + 1:] == [0] * n  # recall steps are blank
        assert list(ys[b]) == [0] * (n + lag + 1) + symbols
        assert list(mask[b]) == [0] * (n + lag + 1) + [1] * n
    assert seen == set(range(1, A + 1))


def test_copy_lag_zero():
    xs, ys, _ = draw(tasks.make("copy", lag=0, symbols=2, alphabet=3), 0)
    labels = np.argmax(xs[0], -1)
    assert labels[2] == 4 and list(labels[3:]) == [0, 0] and list(ys[0, 3:]) == list(labels[:2])


@pytest.mark.parametrize("target", ["regression", "classification"])
def test_counting_targets(target):
    T, A = 9, 3
    task = COUNTING[target]
    assert task.input_size == A + 1
    assert task.output_size == (T if target == "classification" else 1)
    xs, ys, mask = draw(task, 2)
    counts = []
    for b in range(B):
        assert list(xs[b, :, A]) == [1.0] + [0.0] * (T - 1)  # the marker channel
        assert (xs[b, :, :A].sum(-1) == 1).all()
        q = int(np.argmax(xs[b, 0, :A]))
        seq = [int(np.argmax(xs[b, t, :A])) for t in range(1, T)]
        count = seq.count(q)
        counts.append(count)
        if target == "classification":
            assert ys[b, T - 1] == count
        else:
            assert ys[b, T - 1, 0] == pytest.approx(count / (T - 1), rel=1e-6)
    assert len(set(counts)) > 3  # varied targets


def test_digits_reads_pixels_row_by_row():
    n = len(LABELS)
    flat = IMAGES.reshape(n, 64)
    xs, ys, mask = draw(DIGITS, 5)
    seen = set()
    for b in range(B):
        pixels = xs[b, :, 0] * 16.0
        matches = [i for i in range(n) if np.allclose(flat[i], pixels, atol=1e-5)]
        assert len(matches) == 1
        i = matches[0]
        # row-major: step t = 8 * row + col
        assert pixels[8 * 2 + 5] == pytest.approx(IMAGES[i, 2, 5])
        assert ys[b, 63] == LABELS[i] and not ys[b, :63].any()
        seen.add(i)
    assert seen == set(range(n))
    # (N, 64) input is the same task
    assert tasks.make("digits", images=flat, labels=LABELS) == DIGITS


def test_digits_takes_binary_images():
    """Bool (binary) images are pixels 0 and 1, as before the finite-pixel check."""
    t = tasks.make("digits", images=IMAGES > 8, labels=LABELS, scale=1.0)
    xs = draw(t, 0)[0]
    assert set(np.unique(np.asarray(xs))) <= {0.0, 1.0}


def test_digits_split_is_a_partition():
    flat = IMAGES.reshape(-1, 64)

    def drawn(split):
        t = tasks.make("digits", images=IMAGES, labels=LABELS, split=split, test_fraction=0.2)
        xs = draw(t, 0)[0][:, :, 0] * 16
        return t, {i for i in range(len(flat)) if np.isclose(xs, flat[i]).all(1).any()}

    train, tr = drawn("train")
    test, te = drawn("test")
    assert train.config["n_images"] == 16 and test.config["n_images"] == 4
    assert len(tr) == 16 and len(te) == 4 and not tr & te


# ---------------------------------------------------------------------------------------------
# Losses and metrics vs NumPy


def test_regression_loss_and_metric(x64):
    task = tasks.make("adding", steps=5)
    rng = np.random.default_rng(0)
    out, ys = rng.normal(size=(2, 3, 5, 1))
    mask = (rng.random((3, 5)) < 0.5).astype(float)
    mask[0, 0] = 1.0
    num = sum(mask[b, t] * (out[b, t, 0] - ys[b, t, 0]) ** 2 for b in range(3) for t in range(5))
    want = num / mask.sum()
    assert float(jax.jit(tasks.loss_fn(task))(out, ys, mask)) == pytest.approx(want, rel=1e-12)
    assert float(jax.jit(tasks.metric_fn(task))(out, ys, mask)) == pytest.approx(want, rel=1e-12)
    assert math.isnan(tasks.chance(task))


def test_classification_loss_and_accuracy(x64):
    task = tasks.make("copy", lag=1, symbols=2, alphabet=4)
    rng = np.random.default_rng(1)
    K = task.output_size
    out = rng.normal(size=(3, task.steps, K))
    ys = rng.integers(0, K, (3, task.steps))
    mask = np.zeros((3, task.steps))
    mask[:, -2:] = 1
    ce, hits = [], []
    for b in range(3):
        for t in range(task.steps - 2, task.steps):
            z = out[b, t]
            ce.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[ys[b, t]])
            hits.append(float(np.argmax(z) == ys[b, t]))
    loss, metric = jax.jit(tasks.loss_fn(task)), jax.jit(tasks.metric_fn("classification"))
    assert float(loss(out, ys, mask)) == pytest.approx(np.mean(ce), rel=1e-12)
    assert float(metric(out, ys, mask)) == pytest.approx(np.mean(hits))
    assert tasks.chance(task) == pytest.approx(math.log(4))
    # uniform logits give the uniform-guess cross-entropy log K
    assert float(loss(np.zeros_like(out), ys, mask)) == pytest.approx(math.log(K))
    with pytest.raises(ValueError, match="regression, classification"):
        tasks.loss_fn("ordinal")


def test_resize():
    assert tasks.resize(tasks.make("adding", steps=10), 4) == tasks.make("adding", steps=4)
    c = tasks.resize(tasks.make("copy", lag=5, symbols=2), 12)
    assert c.steps == 12 and c.config["lag"] == 7
    n = tasks.resize(tasks.make("counting", steps=5, alphabet=2, target="classification"), 7)
    assert n == tasks.make("counting", steps=7, alphabet=2, target="classification")
    with pytest.raises(ValueError, match="at least 5 steps"):
        tasks.resize(tasks.make("copy", symbols=2), 4)
    with pytest.raises(ValueError, match="fixed length of 64 steps; resizable tasks: adding, "
                                         "copy, counting"):
        tasks.resize(DIGITS, 32)


def test_for_length_and_chance_per_task():
    """Each task's length rule and class count, as its generator and registry entry declare
    them: the option that fixes a length must agree with the length asked for."""
    assert tasks.for_length("copy", 21, symbols=5) == tasks.make("copy", lag=10, symbols=5)
    assert tasks.for_length("copy", 21, lag=10, symbols=5).steps == 21
    with pytest.raises(ValueError, match="lag=9 makes copy sequences of 20 steps"):
        tasks.for_length("copy", 21, lag=9, symbols=5)
    assert tasks.for_length("counting", 9).steps == 9
    assert tasks.for_length("digits", 64, images=IMAGES, labels=LABELS) == DIGITS
    counting = tasks.make("counting", steps=7, target="classification")
    assert tasks.chance(counting) == pytest.approx(math.log(7))   # counts 0..6
    assert tasks.chance(DIGITS) == pytest.approx(math.log(10))
    assert math.isnan(tasks.chance(tasks.make("counting", steps=7)))


def test_a_batch_larger_than_the_memory_is_refused_before_allocating():
    """``tasks.sample`` with a batch or a length no machine holds: one ValueError saying how
    much it would take and how many sequences fit (a batch of 10**10 reached the allocator)."""
    t = tasks.make("adding", steps=100)
    with pytest.raises(ValueError, match=r"a batch of 10,000,000,000 x 100 steps of task "
                                         r"'adding' takes [\d,.]+ GiB.*at most about [\d,]+ fit"):
        tasks.sample(t, jax.random.key(0), 10**10)
    with pytest.raises(ValueError, match="fewer steps are needed"):
        tasks.sample(tasks.make("adding", steps=10**12), jax.random.key(0), 1)
    xs, ys, mask = tasks.sample(t, jax.random.key(0), 3)  # an ordinary batch is untouched
    assert xs.shape == (3, 100, 2) and ys.shape == (3, 100, 1) and mask.shape == (3, 100)


def test_sample_and_config_helpers_refuse_what_they_cannot_use():
    """An integer or complex dtype (the adding task's inputs came back all 0), a key that is
    no PRNG key, a config without a task, and ``chance`` of a name: one message each."""
    t = tasks.make("adding", steps=10)
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        tasks.sample(t, jax.random.key(0), 3, jnp.int32)
    for key in (0, None):
        with pytest.raises(TypeError, match=r"key must be a PRNG key \(jax.random.key"):
            tasks.sample(t, key, 2)
    with pytest.raises(ValueError, match="batch must be an integer >= 1, got 0"):
        tasks.sample(t, jax.random.key(0), 0)
    assert tasks.sample(t, jax.random.PRNGKey(0), 2)[0].shape == (2, 10, 2)  # a raw key too
    for bad in ({}, None, {"steps": 3}):
        with pytest.raises(ValueError, match="a task config is a dict"):
            tasks.from_config(bad)
    with pytest.raises(TypeError, match="task must be a gradflow.tasks.Task"):
        tasks.chance("adding")


def test_a_digits_config_rebuilds_its_task_or_says_why_not(monkeypatch):
    """A digits task records its data (source, size, fingerprint), not options: from its
    config scikit-learn's set is loaded again and checked to be the run's; one made from
    arrays cannot be rebuilt from a config, and says how to measure it."""
    with pytest.raises(ValueError, match="made from images= and labels= arrays, which a run "
                                         "does not save"):
        tasks.from_config(DIGITS.config)
    monkeypatch.setattr(tasks, "load_digits", lambda: (IMAGES, LABELS))
    sk = tasks.make("digits", split="train")
    assert sk.config["source"] == "sklearn" and tasks.from_config(sk.config) == sk
    other = synthetic_digits(seed=1)
    monkeypatch.setattr(tasks, "load_digits", lambda: other)
    tasks._make_cached.cache_clear()  # (another installation's set)
    with pytest.raises(ValueError, match="scikit-learn's digits here .* are not the images "
                                         "the run read"):
        tasks.from_config(sk.config)
    tasks._make_cached.cache_clear()  # (no other test sees these stand-in digits)
