"""The corpus, its character vocabulary, training batches and evaluation windows.

`python data.py` (what `make data` runs) puts the corpus at CORPUS_FILE: a copy of the file
that $NOVELAS_EJEMPLARES names, or a download from CORPUS_URL; its SHA-256 is checked first.
"""

import hashlib
import os
import sys
import urllib.request
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from common import UserError, atomic_write, run_main

CORPUS_FILE = "novelas_ejemplares.txt"
CORPUS_SHA256 = "caa24472d59281c1168ad4c2362b6ea0da75ba68c31f7bffc3ca38c094591528"
CORPUS_URL = ("https://raw.githubusercontent.com/luis-gnz11/nanogpt-haiku/"
              "598b6912442c20213bfc1a9f387da4f1d1027f8e/novelas_ejemplares.txt")
TRAIN_FRACTION = 0.9  # first 90% trains, the last 10% (the end of the book) validates


def _check_sha256(raw: bytes, origin: str) -> None:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CORPUS_SHA256:
        raise UserError(
            f"{origin} is not the expected corpus: its SHA-256 is {digest}, expected "
            f"{CORPUS_SHA256}. Delete it and run `make data` to fetch the right file.")


def load_corpus(path: str = CORPUS_FILE, check_sha256: bool = True) -> str:
    """The corpus text, read as UTF-8 after checking its SHA-256 (skip that for other texts)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"corpus {path!r} not found: run `make data` to fetch it.") from None
    except OSError as e:
        raise UserError(f"cannot read corpus {path!r}: {e.strerror}.") from None
    if check_sha256:
        _check_sha256(raw, path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path!r} is not UTF-8 text ({e}).") from None


def fetch_corpus(dest: str = CORPUS_FILE) -> str:
    """Copies $NOVELAS_EJEMPLARES or downloads CORPUS_URL to `dest`, checked and atomic."""
    source = os.environ.get("NOVELAS_EJEMPLARES")
    if source:
        try:
            with open(source, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise UserError(f"cannot read NOVELAS_EJEMPLARES={source!r}: {e}.") from None
        origin = f"NOVELAS_EJEMPLARES={source!r}"
    else:
        try:
            with urllib.request.urlopen(CORPUS_URL, timeout=60) as response:
                raw = response.read()
        except OSError as e:
            raise UserError(
                f"download of {CORPUS_URL} failed ({e}). Set NOVELAS_EJEMPLARES to a local "
                f"copy of the corpus and run `make data` again.") from None
        origin = f"the download from {CORPUS_URL}"
    _check_sha256(raw, origin)
    atomic_write(dest, raw)
    return origin


def build_vocab(text: str) -> str:
    """The sorted distinct characters of `text`: character id i is vocab[i]."""
    return "".join(sorted(set(text)))


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def encode(text: str, vocab: str) -> np.ndarray:
    """Character ids of `text` as int32; UserError lists every character not in `vocab`."""
    vocab_codes = _code_points(vocab)
    order = np.argsort(vocab_codes)
    codes = _code_points(text)
    slots = np.minimum(np.searchsorted(vocab_codes[order], codes), len(vocab) - 1)
    ids = order[slots]
    unknown = sorted(set(text[i] for i in np.flatnonzero(vocab_codes[ids] != codes)))
    if unknown:
        listed = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unknown)
        raise UserError(f"{len(unknown)} character(s) not in the model's vocabulary: {listed}.")
    return ids.astype(np.int32)


def decode(ids, vocab: str) -> str:
    return "".join(vocab[i] for i in np.asarray(ids).reshape(-1))


def split(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the first TRAIN_FRACTION of the ids, and the rest."""
    n = int(TRAIN_FRACTION * len(ids))
    return ids[:n], ids[n:]


def sample_batch(key: jax.Array, ids: jax.Array, batch_size: int, seq_len: int):
    """Random windows of ids, on the device: inputs [B, T] and targets shifted by one [B, T]."""
    starts = jax.random.randint(key, (batch_size,), 0, ids.shape[0] - seq_len)  # [B]
    windows = ids[starts[:, None] + jnp.arange(seq_len + 1)]                      # [B, T+1]
    return windows[:, :-1], windows[:, 1:]


def windows_per_pass(num_ids: int, seq_len: int) -> int:
    """How many windows (of seq_len + 1 ids) one of shuffled_batch's passes cuts: any offset
    below seq_len leaves room for them all."""
    return (num_ids - seq_len) // seq_len


def shuffled_batch(key: jax.Array, step: jax.Array, ids: jax.Array, batch_size: int,
                   seq_len: int):
    """Batch `step` of shuffled passes over ids: each pass cuts them into windows at its own
    random offset and visits them in its own random order, so that every character is
    trained on once per pass (random windows miss some and repeat others). -> (inputs,
    targets) as sample_batch's. `key` is fixed for the run; the step picks pass and batch."""
    per_pass = windows_per_pass(ids.shape[0], seq_len)
    batches = per_pass // batch_size                                  # whole batches in it
    pass_key = jax.random.fold_in(key, step // batches)
    offset = jax.random.randint(jax.random.fold_in(pass_key, 0), (), 0, seq_len)
    order = jax.random.permutation(jax.random.fold_in(pass_key, 1), per_pass)
    starts = offset + seq_len * jax.lax.dynamic_slice_in_dim(
        order, (step % batches) * batch_size, batch_size)             # [B]
    windows = ids[starts[:, None] + jnp.arange(seq_len + 1)]          # [B, T+1]
    return windows[:, :-1], windows[:, 1:]


class Windows(NamedTuple):
    """Fixed evaluation windows: loss = sum(weights * nll(inputs -> targets)) / sum(weights)."""
    inputs: np.ndarray   # [W, T] int32
    targets: np.ndarray  # [W, T] int32
    weights: np.ndarray  # [W, T] float32: 1 where a target counts, 0 on padding


def eval_windows(ids: np.ndarray, seq_len: int, every: int = 1) -> Windows:
    """Non-overlapping windows predicting every id after the first exactly once.

    Window w predicts ids[w*T+1 : w*T+T+1] from ids[w*T : w*T+T]; the last, shorter window is
    zero-padded and its padding weighs 0. `every` keeps one window in `every` (a fixed,
    evenly spread subset, for a training-split estimate the size of the validation split).
    """
    num_windows = -(-(len(ids) - 1) // seq_len)  # ceil
    padded = np.zeros(num_windows * seq_len + 1, np.int32)
    padded[: len(ids)] = ids
    weights = np.zeros(num_windows * seq_len, np.float32)
    weights[: len(ids) - 1] = 1.0
    inputs = padded[:-1].reshape(num_windows, seq_len)[::every]
    targets = padded[1:].reshape(num_windows, seq_len)[::every]
    return Windows(inputs, targets, weights.reshape(num_windows, seq_len)[::every])


def main(argv) -> int:
    if argv:
        raise UserError(f"data.py takes no arguments (got {' '.join(argv)}); it reads "
                        "NOVELAS_EJEMPLARES from the environment.")
    if os.path.exists(CORPUS_FILE):
        load_corpus(CORPUS_FILE)  # raises if it is not the right file
        print(f"{CORPUS_FILE}: present, SHA-256 verified")
        return 0
    origin = fetch_corpus(CORPUS_FILE)
    print(f"{CORPUS_FILE}: written from {origin}, SHA-256 verified", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
