"""Tests for checkpoint.py: exact round trips, refusal of unsafe or broken files, atomic saves."""

import builtins
import errno
import math
import os
import pickle
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import checkpoint
import common
import transformer

VOCAB = "\n !,.abcdeñé¿"
HPARAMS = transformer.HParams(max_seq_len=16, d_model=32, h=4, d_ff=64, decoder_N=2,
                              encoder_N=1, use_encoder=True, dropout=0.1, positions="sinusoidal",
                              attention_window=None)


def _params(seed: int = 0) -> dict:
    """A small Haiku-style params tree: {module: {name: float32 array}}."""
    rng = np.random.default_rng(seed)
    return {
        "embed": {"embeddings": rng.standard_normal((len(VOCAB), 8)).astype(np.float32)},
        "decoder/~/layer_0/linear": {"w": rng.standard_normal((8, 16)).astype(np.float32),
                                     "b": rng.standard_normal(16).astype(np.float32)},
        "layer_norm": {"scale": np.ones(8, np.float32), "offset": np.zeros(8, np.float32)},
    }


def _meta() -> dict:
    return {"step": 500, "val_loss": 1.625, "min_val_loss": math.inf, "min_val_step": None,
            "history": {"step": [250, 500], "val_loss": [1.75, 1.625], "train_loss": [2.0, 1.5]},
            "config": {"learning_rate": 3e-4, "resume": None, "name": "run", "aim": False},
            "versions": {"jax": "0.0.0"}}


def _save(path, **overrides) -> None:
    fields = dict(params=_params(), hparams=HPARAMS, vocab=VOCAB, meta=_meta())
    fields.update(overrides)
    checkpoint.save(str(path), **fields)


def _valid_payload() -> dict:
    """What `save` writes, built by hand, for files that differ from it in one way."""
    return {"format": checkpoint.FORMAT, "params": _params(), "hparams": HPARAMS._asdict(),
            "vocab": VOCAB, "meta": _meta(), "opt_state": None, "rng": None}


def _assert_trees_equal(loaded, expected) -> None:
    """Same structure, and every array the same dtype, shape and bits."""
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
        assert isinstance(got, np.ndarray)
        assert got.dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(got, np.asarray(want))


# ---- round trips ----

def test_round_trip_is_exact(tmp_path):
    path = tmp_path / "ckpt.pkl"
    opt_state = [np.arange(6, dtype=np.float32).reshape(2, 3) / 7, np.array(12, np.int32),
                 np.array([True, False])]
    rng = jax.random.PRNGKey(1234)
    _save(path, opt_state=opt_state, rng=rng)
    ckpt = checkpoint.load(str(path))
    _assert_trees_equal(ckpt.params, _params())
    assert isinstance(ckpt.hparams, transformer.HParams) and ckpt.hparams == HPARAMS
    assert ckpt.vocab == VOCAB
    assert ckpt.meta == _meta()
    assert isinstance(ckpt.opt_state, list) and len(ckpt.opt_state) == len(opt_state)
    _assert_trees_equal(ckpt.opt_state, opt_state)
    np.testing.assert_array_equal(ckpt.rng, np.asarray(rng))
    assert ckpt.rng.dtype == np.uint32
    # The restored key draws the same numbers as the original.
    np.testing.assert_array_equal(jax.random.normal(jnp.asarray(ckpt.rng), (4,)),
                                  jax.random.normal(rng, (4,)))


def test_round_trip_of_device_arrays_and_no_optional_fields(tmp_path):
    # The trainer passes jax arrays; they come back as numpy arrays with the same values.
    path = tmp_path / "ckpt.pkl"
    device_params = jax.tree.map(jnp.asarray, _params(seed=1))
    _save(path, params=device_params)
    ckpt = checkpoint.load(str(path))
    _assert_trees_equal(ckpt.params, _params(seed=1))
    assert ckpt.opt_state is None and ckpt.rng is None
    assert checkpoint.num_params(ckpt.params) == checkpoint.num_params(_params())


def test_round_trip_of_an_optax_state(tmp_path):
    # The trainer's optimizer shape: clipping, then AdamW on a schedule; its state is custom
    # classes, saved as leaves and rebuilt with the structure of a fresh init.
    def make_optimizer():
        schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 100)
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))

    params = jax.tree.map(jnp.asarray, _params())
    optimizer = make_optimizer()
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    for _ in range(3):  # non-zero moments and counts
        _, opt_state = optimizer.update(grads, opt_state, params)
    path = tmp_path / "ckpt.pkl"
    _save(path, params=params, opt_state=opt_state)

    ckpt = checkpoint.load(str(path))
    structure = jax.tree.structure(make_optimizer().init(params))
    assert structure.num_leaves == len(ckpt.opt_state)
    restored = jax.tree.unflatten(structure, [jnp.asarray(x) for x in ckpt.opt_state])
    assert jax.tree.structure(restored) == jax.tree.structure(opt_state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(opt_state)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    # Resuming from the restored state takes exactly the step the original would have.
    updates, _ = optimizer.update(grads, opt_state, params)
    restored_updates, _ = optimizer.update(grads, restored, params)
    for got, want in zip(jax.tree.leaves(restored_updates), jax.tree.leaves(updates)):
        np.testing.assert_array_equal(got, want)


# ---- unsafe pickles ----

class _Evil:
    """Pickles as a call of `fn(*args)`: what a hostile params file would run when loaded."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _evil_cases(marker: str):
    """(name of the global as pickled, object) pairs, each creating `marker` if it runs."""
    create = f"open({marker!r}, 'w').close()"
    return [
        # os.system pickles under its defining module: "posix.system" on Linux.
        (f"{os.system.__module__}.system", _Evil(os.system, f"touch '{marker}'")),
        ("builtins.eval", _Evil(builtins.eval, create)),
        ("builtins.exec", _Evil(builtins.exec, create)),
        ("subprocess.Popen", _Evil(subprocess.Popen, ["touch", marker])),
        ("io.open", _Evil(builtins.open, marker, "w")),  # open is io.open, pickled as such
    ]


@pytest.mark.parametrize("case", range(5), ids=["os.system", "eval", "exec", "Popen", "open"])
@pytest.mark.parametrize("nested", [False, True], ids=["bare", "nested_in_meta"])
def test_unsafe_pickles_are_refused(tmp_path, case, nested):
    marker = str(tmp_path / "pwned")
    name, evil = _evil_cases(marker)[case]
    if nested:  # hidden in an otherwise valid file, after the (allowed) numpy arrays
        payload = {**_valid_payload(), "meta": {"step": 1, "note": [1.0, {"x": evil}]}}
    else:
        payload = evil
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(checkpoint.CheckpointError) as excinfo:
        checkpoint.load(str(path))
    message = str(excinfo.value)
    assert "unsafe pickle global" in message and name in message and str(path) in message
    assert not os.path.exists(marker)


def test_hand_written_os_system_pickle_is_refused(tmp_path):
    # Protocol 0, the classic exploit text: GLOBAL "os system", a string, a tuple, REDUCE.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(checkpoint.CheckpointError, match=r"unsafe pickle global os\.system"):
        checkpoint.load(str(path))
    assert not marker.exists()


def test_unsafe_global_inside_an_object_array_is_refused(tmp_path):
    # numpy pickles object arrays element by element: the allowed array globals must not let
    # a hostile element through.
    marker = str(tmp_path / "pwned")
    array = np.empty(2, dtype=object)
    array[0], array[1] = 1.0, _Evil(builtins.eval, f"open({marker!r}, 'w').close()")
    path = tmp_path / "evil.pkl"
    _save(path, opt_state=[np.zeros(3, np.float32), array])
    with pytest.raises(checkpoint.CheckpointError, match=r"unsafe pickle global builtins\.eval"):
        checkpoint.load(str(path))
    assert not os.path.exists(marker)


# ---- broken files ----

def _valid_bytes(tmp_path) -> bytes:
    path = tmp_path / "valid.pkl"
    _save(path, opt_state=[np.ones(4, np.float32)], rng=jax.random.PRNGKey(0))
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "random"])
def test_corrupt_files_are_refused(tmp_path, kind):
    valid = _valid_bytes(tmp_path)
    contents = {"truncated": valid[: len(valid) // 2],
                "garbage": b"this is not a params file\n" * 20,
                "empty": b"",
                "random": np.random.default_rng(0).bytes(1000)}[kind]
    path = tmp_path / "broken.pkl"
    path.write_bytes(contents)
    with pytest.raises(checkpoint.CheckpointError) as excinfo:
        checkpoint.load(str(path))
    assert str(path) in str(excinfo.value)


def test_missing_file_is_refused(tmp_path):
    path = str(tmp_path / "absent.pkl")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read params file") as excinfo:
        checkpoint.load(path)
    assert path in str(excinfo.value)


@pytest.mark.parametrize("payload", [
    {"params": {}, "vocab": "ab"},                  # no format at all
    {"format": "nanogpt-haiku/0", "params": {}},    # another version
    ["nanogpt-haiku/1"],                            # not a dict
    "nanogpt-haiku/1",
], ids=["no_format", "other_format", "list", "str"])
def test_pickles_without_our_format_are_refused(tmp_path, payload):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(checkpoint.CheckpointError, match="not a nanogpt-haiku params file") \
            as excinfo:
        checkpoint.load(str(path))
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize("change", [
    {"hparams": {**HPARAMS._asdict(), "h": 5}},        # d_model 32 not divisible by 5
    {"hparams": {**HPARAMS._asdict(), "colour": 1}},   # a field HParams lacks
    {"vocab": ""},
    {"meta": None},
    {"params": {"embed": {"embeddings": "not an array"}}},
    {"params": {"embed": {"embeddings": np.array(["a"])}}},
], ids=["bad_hparams", "unknown_hparam", "empty_vocab", "meta_none", "str_param",
        "str_array_param"])
def test_invalid_contents_are_refused(tmp_path, change):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({**_valid_payload(), **change}, protocol=4))
    with pytest.raises(checkpoint.CheckpointError, match="not a valid params file"):
        checkpoint.load(str(path))


@pytest.mark.parametrize("key", ["params", "hparams", "vocab", "meta", "opt_state", "rng"])
def test_missing_keys_are_refused(tmp_path, key):
    payload = _valid_payload()
    del payload[key]
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(checkpoint.CheckpointError, match=key):
        checkpoint.load(str(path))


# ---- atomic saves ----

def _disk_full_fdopen(real_fdopen):
    """os.fdopen whose files write half of the data, then fail as a full disk would."""
    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    return lambda fd, mode: HalfWriter(real_fdopen(fd, mode))


def _raise(exception):
    def fail(*args, **kwargs):
        raise exception
    return fail


@pytest.mark.parametrize("failure", ["disk_full", "fsync", "replace", "interrupt"])
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "ckpt.pkl"
    _save(path, meta={"step": 100}, opt_state=[np.full(3, 0.5, np.float32)])
    before = path.read_bytes()

    if failure == "disk_full":
        monkeypatch.setattr(common.os, "fdopen", _disk_full_fdopen(os.fdopen))
        expected = OSError
    elif failure == "fsync":
        monkeypatch.setattr(common.os, "fsync", _raise(OSError(errno.EIO, "I/O error")))
        expected = OSError
    elif failure == "replace":
        monkeypatch.setattr(common.os, "replace", _raise(OSError(errno.EXDEV, "cross-device")))
        expected = OSError
    else:  # Ctrl-C at the last moment: a BaseException, not an Exception
        monkeypatch.setattr(common.os, "replace", _raise(KeyboardInterrupt()))
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        _save(path, params=_params(seed=7), meta={"step": 200},
              opt_state=[np.full(3, 0.25, np.float32)])
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["ckpt.pkl"]  # no temporary file left behind
    assert path.read_bytes() == before
    ckpt = checkpoint.load(str(path))
    assert ckpt.meta == {"step": 100}
    _assert_trees_equal(ckpt.params, _params())
    _assert_trees_equal(ckpt.opt_state, [np.full(3, 0.5, np.float32)])


def test_save_replaces_the_previous_file(tmp_path):
    # The counterpart of the test above: without a failure, the second save wins.
    path = tmp_path / "ckpt.pkl"
    _save(path, meta={"step": 100})
    _save(path, params=_params(seed=7), meta={"step": 200})
    ckpt = checkpoint.load(str(path))
    assert ckpt.meta == {"step": 200}
    _assert_trees_equal(ckpt.params, _params(seed=7))
    assert os.listdir(tmp_path) == ["ckpt.pkl"]


def test_saved_file_has_the_permissions_of_a_plain_write(tmp_path):
    old_umask = os.umask(0o022)
    try:
        _save(tmp_path / "ckpt.pkl", meta={"step": 1})
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(old_umask)
    assert os.stat(tmp_path / "plain").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "ckpt.pkl").st_mode & 0o777 == 0o644


def _numpy_globals():
    """(module, name) of every public attribute of numpy's modules that pickles name."""
    import numpy
    modules = [numpy, numpy.linalg, numpy.random, numpy.lib, numpy.testing]
    for name in ("numpy._core.multiarray", "numpy._core.numeric", "numpy.core.multiarray",
                 "numpy._core.umath", "numpy.lib.format", "numpy.ctypeslib"):
        try:
            modules.append(__import__(name, fromlist=["_"]))
        except ImportError:
            pass
    return sorted({(m.__name__, n) for m in modules for n in dir(m) if not n.startswith("__")})


def test_every_global_outside_the_list_is_refused(tmp_path):
    """A pickle naming any global but the listed few is refused, numpy's own included
    (numpy.load, numpy.testing's, numpy.lib.format's, ...): only how arrays are rebuilt."""
    path = tmp_path / "one_global.pkl"
    refused = 0
    for module, name in _numpy_globals() + [("builtins", "getattr"), ("pickle", "loads"),
                                             ("ml_dtypes", "float8_e4m3fn")]:
        path.write_bytes(b"c" + f"{module}\n{name}\n".encode() + b".")
        if (module, name) in ARRAY_GLOBALS:
            continue
        with pytest.raises(checkpoint.CheckpointError, match="unsafe pickle global"):
            checkpoint.load(str(path))
        refused += 1
    assert refused > 500


# What numpy needs to rebuild arrays and dtypes (numpy 1.x and 2.x), and bfloat16: nothing else.
ARRAY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"),
                 ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy.core.multiarray", "_reconstruct"),
                 ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
                 ("ml_dtypes", "bfloat16")}


def test_files_from_before_the_after_next_objective_load_in_todays_form(tmp_path, capsys):
    """A file written before the after-next head left the model (its weight in HParams, its
    params "transformer/unembed_ahead"): load() drops the head and moves the weight to the
    run's config; its training state is refused by --resume, naming the commit that resumes
    it (exit 2); the params sample as before."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__)))
    from conftest import TINY, run_command

    model = transformer.build(TINY, 7)
    params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 4), jnp.int32), False))
    head = {"w": np.ones((TINY.d_model, 7), np.float32), "b": np.zeros(7, np.float32)}
    old = {"format": checkpoint.FORMAT, "params": {**params, checkpoint.LEGACY_HEAD: head},
           "hparams": {**TINY._asdict(), "ahead_loss": 0.3}, "vocab": "abcdefg",
           "meta": {"step": 5, "config": {"max_iters": 10}}, "opt_state": [np.zeros(3)],
           "rng": np.zeros(2, np.uint32)}
    path = str(tmp_path / "params.old.pkl")
    with open(path, "wb") as f:
        pickle.dump(old, f, protocol=4)
    ckpt = checkpoint.load(path)
    assert set(ckpt.params) == set(params) and ckpt.hparams == TINY
    assert ckpt.meta["config"]["ahead_loss"] == 0.3
    tokens = jnp.asarray([[0, 1, 2, 3]])
    np.testing.assert_array_equal(model.apply(ckpt.params, None, tokens, False),
                                  model.apply(params, None, tokens, False))
    status, _, err = run_command(capsys, "train.py", f"--resume={path}", "--aim=False")
    assert status == 2 and checkpoint.LEGACY_COMMIT in err, err


def test_a_file_lacking_an_hparams_field_reads_the_value_it_was_trained_with(tmp_path):
    """Fields added to HParams since the first files were added switched off: a file that
    lacks one (the oldest shipped file lacks attention_window) reads the original value,
    not today's default (a 128-character window, rotary positions)."""
    old = {k: v for k, v in HPARAMS._asdict().items()
           if k not in ("positions", "attention_window", "activation", "stochastic_depth")}
    path = tmp_path / "params.old.pkl"
    path.write_bytes(pickle.dumps({**_valid_payload(), "hparams": old}, protocol=4))
    assert (transformer.HPARAMS.positions, transformer.HPARAMS.attention_window) == (
        "rotary", 128)
    hparams = checkpoint.load(str(path)).hparams
    assert hparams == HPARAMS._replace(positions="learned")
    assert hparams.attention_window is None and hparams.activation == "relu"
