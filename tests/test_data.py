"""Tests for data.py: vocabulary, corpus loading and fetching, splits, batches, eval windows."""

import hashlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
import data
from conftest import CORPUS

CORPUS_CHARS = 1_030_979  # len() of the corpus text, in characters
CORPUS_VOCAB_SIZE = 88


@pytest.fixture(scope="module")
def corpus_text():
    return data.read_text(CORPUS)


@pytest.fixture
def no_network(monkeypatch):
    """fetch must use NOVELAS_EJEMPLARES here: a download attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("fetch tried to download while NOVELAS_EJEMPLARES is set")
    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)


def _modified_copy(tmp_path) -> str:
    """The corpus with one character changed: same length, different SHA-256."""
    with open(CORPUS, "rb") as f:
        raw = bytearray(f.read())
    raw[1000] = ord("X") if raw[1000] != ord("X") else ord("Y")
    path = tmp_path / "modified.txt"
    path.write_bytes(bytes(raw))
    return str(path)


# ---- vocabulary and encoding ----

def test_vocab_round_trip_on_corpus(corpus_text):
    assert len(corpus_text) == CORPUS_CHARS
    vocab = data.build_vocab(corpus_text)
    assert len(vocab) == CORPUS_VOCAB_SIZE
    assert all(ord(a) < ord(b) for a, b in zip(vocab, vocab[1:]))  # sorted, no repeats
    assert set(vocab) == set(corpus_text)
    ids = data.encode(corpus_text, vocab)
    assert ids.dtype == np.int32 and ids.shape == (CORPUS_CHARS,)
    assert ids.min() == 0 and ids.max() == CORPUS_VOCAB_SIZE - 1
    assert data.decode(ids, vocab) == corpus_text


def test_vocab_round_trip_on_synthetic_text():
    # Accents, a newline and a character outside the BMP (4 bytes in UTF-8, 2 in UTF-16).
    text = "¿Qué?\nbaña 😀 cas"
    vocab = data.build_vocab(text)
    assert vocab == "\n ?Qabcsu¿éñ😀"
    ids = data.encode(text, vocab)
    assert ids.tolist() == [vocab.index(c) for c in text]
    assert data.decode(ids, vocab) == text
    assert data.decode(jnp.asarray(ids).reshape(2, -1), vocab) == text  # any shape, any array


def test_encode_known_ids():
    # Ids are positions in vocab, whatever its order (a vocab read from a file is trusted).
    assert data.encode("abca", "abc").tolist() == [0, 1, 2, 0]
    assert data.encode("abca", "cab").tolist() == [1, 2, 0, 1]
    empty = data.encode("", "abc")
    assert empty.dtype == np.int32 and empty.shape == (0,)


def test_encode_unknown_characters_are_all_listed():
    # Unknown characters below, between and above the vocabulary's code points, some repeated.
    with pytest.raises(common.UserError) as excinfo:
        data.encode("açbcdçe😀a", "abd")
    message = str(excinfo.value)
    assert message.startswith("4 character(s) not in the model's vocabulary")
    for listed in ("'c' (U+0063)", "'ç' (U+00E7)", "'e' (U+0065)", "'😀' (U+1F600)"):
        assert listed in message
    for known in ("'a'", "'b'", "'d'"):
        assert known not in message

    with pytest.raises(common.UserError, match=r"'\\n' \(U\+000A\)"):
        data.encode("ab\n", "ab")  # below every vocabulary character


# ---- corpus file ----

def test_read_text_accepts_the_corpus(corpus_text):
    with open(CORPUS, encoding="utf-8", newline="") as f:
        assert corpus_text == f.read()


def test_read_text_sha256_mismatch(tmp_path, monkeypatch):
    path = _modified_copy(tmp_path)
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    (tmp_path / data.CORPUS_FILE).write_bytes(raw)  # where `make data` puts the corpus
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.UserError) as excinfo:
        data.read_text(data.CORPUS_FILE)
    message = str(excinfo.value)
    for expected in (data.CORPUS_FILE, digest, data.CORPUS_SHA256, "make data"):
        assert expected in message
    # Anywhere else it is the user's own text, read as it is.
    assert len(data.read_text(path)) == CORPUS_CHARS


def test_read_text_missing_file(tmp_path, monkeypatch):
    path = str(tmp_path / "absent.txt")
    with pytest.raises(common.UserError, match="not found") as excinfo:
        data.read_text(path)
    assert path in str(excinfo.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.UserError, match="make data"):
        data.read_text(data.CORPUS_FILE)


def test_read_text_unreadable_path(tmp_path):
    # `--source_file=params` (a folder) must be a user error, not an IsADirectoryError traceback.
    with pytest.raises(common.UserError) as excinfo:
        data.read_text(str(tmp_path))
    assert str(tmp_path) in str(excinfo.value)


def test_read_text_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("señor".encode("latin-1"))
    with pytest.raises(common.UserError, match="not UTF-8"):
        data.read_text(str(path))


def test_fetch_copies_novelas_ejemplares(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("NOVELAS_EJEMPLARES", CORPUS)
    dest = tmp_path / "new_folder" / "novelas.txt"  # the folder does not exist yet
    origin = data.fetch("novelas", str(dest))
    assert CORPUS in origin
    with open(CORPUS, "rb") as f:
        assert dest.read_bytes() == f.read()
    assert os.listdir(dest.parent) == ["novelas.txt"]  # no temporary file left behind


def test_fetch_refuses_a_wrong_file(tmp_path, monkeypatch, no_network):
    wrong = _modified_copy(tmp_path)
    monkeypatch.setenv("NOVELAS_EJEMPLARES", wrong)
    dest = tmp_path / "novelas.txt"
    with pytest.raises(common.UserError,
                       match="not the expected novelas_ejemplares.txt") as excinfo:
        data.fetch("novelas", str(dest))
    assert wrong in str(excinfo.value)
    assert not dest.exists()
    assert sorted(os.listdir(tmp_path)) == ["modified.txt"]


def test_fetch_keeps_a_previous_file_when_refusing(tmp_path, monkeypatch, no_network):
    # A good corpus already at dest must survive a failed fetch of a wrong one.
    dest = tmp_path / "novelas.txt"
    shutil.copyfile(CORPUS, dest)
    monkeypatch.setenv("NOVELAS_EJEMPLARES", _modified_copy(tmp_path))
    with pytest.raises(common.UserError):
        data.fetch("novelas", str(dest))
    assert len(data.read_text(str(dest))) == CORPUS_CHARS


def test_fetch_unreadable_source(tmp_path, monkeypatch, no_network):
    missing = str(tmp_path / "nowhere.txt")
    monkeypatch.setenv("NOVELAS_EJEMPLARES", missing)
    with pytest.raises(common.UserError, match="cannot read NOVELAS_EJEMPLARES") as excinfo:
        data.fetch("novelas", str(tmp_path / "novelas.txt"))
    assert missing in str(excinfo.value)
    assert os.listdir(tmp_path) == []


# ---- split ----

@pytest.mark.parametrize("n, n_train", [(10, 9), (1001, 900), (CORPUS_CHARS, 927_881)])
def test_split_sizes(n, n_train):
    ids = np.arange(n, dtype=np.int32)
    train, val = data.split(ids)
    assert len(train) == n_train and len(val) == n - n_train
    np.testing.assert_array_equal(train, ids[:n_train])  # the first 90%, in order
    np.testing.assert_array_equal(val, ids[n_train:])    # then the rest: the end of the book


# ---- batches: sample_starts, window_batch ----

def sample_batch(key, ids, batch_size, seq_len):
    return data.window_batch(ids, data.sample_starts(key, len(ids), batch_size, seq_len),
                             seq_len)


OFFSET = 1000  # ids[i] = OFFSET + i: values differ from positions, yet name them
SOURCE = jnp.arange(50, dtype=jnp.int32) + OFFSET


def test_sample_batch_windows():
    batch_size, seq_len = 2000, 8
    inputs, targets = sample_batch(jax.random.PRNGKey(0), SOURCE, batch_size, seq_len)
    assert inputs.shape == targets.shape == (batch_size, seq_len)
    inputs, targets, source = np.asarray(inputs), np.asarray(targets), np.asarray(SOURCE)
    starts = inputs[:, 0] - OFFSET
    for b, start in enumerate(starts):
        np.testing.assert_array_equal(inputs[b], source[start: start + seq_len])
        np.testing.assert_array_equal(targets[b], source[start + 1: start + seq_len + 1])
    # Every window, the last one (ending at the last id) included, and nothing out of bounds.
    assert set(starts.tolist()) == set(range(len(source) - seq_len))


def test_sample_batch_deterministic_per_key():
    first = sample_batch(jax.random.PRNGKey(3), SOURCE, 16, 8)
    again = sample_batch(jax.random.PRNGKey(3), SOURCE, 16, 8)
    other = sample_batch(jax.random.PRNGKey(4), SOURCE, 16, 8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


# ---- eval_windows ----

@pytest.mark.parametrize("length", [2, 9, 33, 37, 100])
def test_eval_windows_cover_every_target_once(length):
    seq_len = 8
    ids = (np.arange(length, dtype=np.int32) * 7 + 3) % 101  # distinct, not positions
    windows = data.eval_windows(ids, seq_len)
    num_windows = -(-(length - 1) // seq_len)
    for array, dtype in zip(windows, (np.int32, np.int32, np.float32)):
        assert array.shape == (num_windows, seq_len) and array.dtype == dtype
    weighted = windows.weights == 1
    assert set(np.unique(windows.weights).tolist()) <= {0.0, 1.0}
    assert windows.weights.sum() == length - 1
    # Row-major order: the weighted targets, concatenated, are every id after the first...
    np.testing.assert_array_equal(windows.targets[weighted], ids[1:])
    # ... each predicted from the id just before it.
    np.testing.assert_array_equal(windows.inputs[weighted], ids[:-1])
    # Padding (only at the end of the last window) weighs 0.
    flat = windows.weights.reshape(-1)
    assert not flat[length - 1:].any()
    # Zero-padded after the last id: padding still holds valid ids, as the model gathers them.
    assert not windows.inputs.reshape(-1)[length:].any()
    assert not windows.targets.reshape(-1)[length - 1:].any()


def test_eval_windows_keep():
    seq_len = 4
    ids = np.arange(100, 100 + 42, dtype=np.uint8)  # 41 targets: 11 windows, the last padded
    kept = [0, 5, 10]  # the padded last one included
    windows = data.eval_windows(ids, seq_len, keep=np.array(kept))
    for array in windows:
        assert array.shape == (len(kept), seq_len)
    assert windows.inputs.dtype == np.int32
    for row, w in enumerate(kept):
        start = w * seq_len
        real = min(seq_len, len(ids) - 1 - start)  # targets that exist in this window
        np.testing.assert_array_equal(windows.inputs[row, :real], ids[start: start + real])
        np.testing.assert_array_equal(windows.targets[row, :real],
                                      ids[start + 1: start + real + 1])
        np.testing.assert_array_equal(windows.weights[row],
                                      [1.0] * real + [0.0] * (seq_len - real))
