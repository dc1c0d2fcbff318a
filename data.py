"""Texts, their character vocabulary, training batches and evaluation windows.

Any UTF-8 text file trains (read_text). Two known texts are fetched with their SHA-256
checked: `python data.py` (what `make data` runs) puts the Cervantes corpus at CORPUS_FILE,
`python data.py tinyshakespeare` (`make shakespeare`) puts Tiny Shakespeare at its file; each
copies the file that its environment variable names (NOVELAS_EJEMPLARES, TINYSHAKESPEARE),
else downloads its pinned URL.
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


class KnownText(NamedTuple):
    file: str    # where `python data.py NAME` puts it
    sha256: str
    url: str     # pinned to a commit: the bytes never change
    env: str     # environment variable naming a local copy, copied instead of downloading
    command: str  # the command that fetches it, for messages


TEXTS = {
    "novelas": KnownText(
        "novelas_ejemplares.txt",
        "caa24472d59281c1168ad4c2362b6ea0da75ba68c31f7bffc3ca38c094591528",
        "https://raw.githubusercontent.com/luis-gnz11/nanogpt-haiku/"
        "598b6912442c20213bfc1a9f387da4f1d1027f8e/novelas_ejemplares.txt",
        "NOVELAS_EJEMPLARES", "make data"),
    "tinyshakespeare": KnownText(  # Karpathy's char-rnn input.txt, nanoGPT's shakespeare_char
        "tinyshakespeare.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "https://raw.githubusercontent.com/karpathy/char-rnn/"
        "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",
        "TINYSHAKESPEARE", "make shakespeare"),
}
CORPUS_FILE = TEXTS["novelas"].file
CORPUS_SHA256 = TEXTS["novelas"].sha256
CORPUS_URL = TEXTS["novelas"].url
TRAIN_FRACTION = 0.9  # first 90% trains, the last 10% (the end of the text) validates
BYTE_ORDER_MARK = "\ufeff"
UNKNOWN = "\ufffd"  # U+FFFD: in a bounded vocabulary (encoding.py), every character it lacks


def _known(path: str) -> KnownText | None:
    """The known text that `path` is the fetched file of (same place), if any."""
    for text in TEXTS.values():
        if os.path.abspath(path) == os.path.abspath(text.file):
            return text
    return None


def _check_sha256(raw: bytes, origin: str, known: KnownText) -> None:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != known.sha256:
        raise UserError(
            f"{origin} is not the expected {known.file}: its SHA-256 is {digest}, expected "
            f"{known.sha256}. Delete it and run `{known.command}` to fetch the right file.")


def normalize(text: str) -> str:
    """The text as the model reads it: without a leading byte-order mark, and with Windows
    (CRLF) and old Mac (CR) line endings as "\\n", so that a file trains, evaluates and
    samples the same whichever editor saved it (Python's universal newlines)."""
    return text.removeprefix(BYTE_ORDER_MARK).replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: str) -> str:
    """A UTF-8 text file, normalized. The fetched file of a known text (novelas_ejemplares.txt,
    tinyshakespeare.txt in this folder) has its SHA-256 checked; any other file is the user's.
    UserError, naming the file and what to do, if it is missing, unreadable, not UTF-8 or
    empty."""
    text = normalize(decode_utf8(read_bytes(path), path))
    if not text:
        raise empty_text(path)
    return text


def read_bytes(path: str) -> bytes:
    """The bytes of a text file, a known text's SHA-256 checked; UserError, naming the file
    and what to do, if it is missing, unreadable or the wrong file."""
    known = _known(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        fetch = f": run `{known.command}` to fetch it" if known else ""
        raise UserError(f"text file {path!r} not found{fetch}.") from None
    except OSError as e:
        raise UserError(f"cannot read text file {path!r}: {e.strerror}.") from None
    if known:
        _check_sha256(raw, path, known)
    return raw


def decode_utf8(raw: bytes, path: str, offset: int = 0) -> str:
    """`raw` (the bytes of `path` from `offset` on) as text; UserError naming the first byte
    that is not UTF-8, and how to convert the file."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path!r} is not UTF-8 text: byte {offset + e.start} is "
            f"{raw[e.start:e.start + 1]!r} ({e.reason}). Convert it first, e.g. `iconv -f "
            f"latin1 -t utf-8 {path} > {os.path.splitext(path)[0]}.utf8.txt` for Latin-1."
        ) from None


def empty_text(path: str) -> UserError:
    return UserError(f"{path!r} is empty: there is nothing to learn from. Pass a text file "
                     "with at least a few thousand characters.")


def unknown_characters(chars) -> UserError:
    """The error for characters a model's vocabulary lacks, each named with its code point."""
    listed = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars)
    return UserError(f"{len(chars)} character(s) not in the model's vocabulary: {listed}.")


def fetch(name: str, dest: str | None = None) -> str:
    """Copies $ENV or downloads the pinned URL of known text `name` to `dest` (default: its
    file), checked and atomic; returns where it came from."""
    known = TEXTS[name]
    source = os.environ.get(known.env)
    if source:
        try:
            with open(source, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise UserError(f"cannot read {known.env}={source!r}: {e}.") from None
        origin = f"{known.env}={source!r}"
    else:
        try:
            with urllib.request.urlopen(known.url, timeout=60) as response:
                raw = response.read()
        except OSError as e:
            raise UserError(
                f"download of {known.url} failed ({e}). Set {known.env} to a local copy of "
                f"{known.file} and run `{known.command}` again.") from None
        origin = f"the download from {known.url}"
    _check_sha256(raw, origin, known)
    atomic_write(dest or known.file, raw)
    return origin


def build_vocab(text: str) -> str:
    """The sorted distinct characters of `text`: character id i is vocab[i]."""
    return "".join(sorted(set(text)))


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def encode(text: str, vocab: str) -> np.ndarray:
    """Character ids of `text` as int32. A character not in `vocab` reads as its UNKNOWN
    where it has one; else UserError lists every such character."""
    vocab_codes = _code_points(vocab)
    order = np.argsort(vocab_codes)
    codes = _code_points(text)
    slots = np.minimum(np.searchsorted(vocab_codes[order], codes), len(vocab) - 1)
    ids = order[slots]
    missing = vocab_codes[ids] != codes
    if UNKNOWN in vocab:
        ids[missing] = vocab.index(UNKNOWN)
        missing[:] = False
    unknown = sorted(set(text[i] for i in np.flatnonzero(missing)))
    if unknown:
        raise unknown_characters(unknown)
    return ids.astype(np.int32)


def decode(ids, vocab: str) -> str:
    return "".join(vocab[i] for i in np.asarray(ids).reshape(-1))


def split(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the first TRAIN_FRACTION of the ids, and the rest."""
    n = int(TRAIN_FRACTION * len(ids))
    return ids[:n], ids[n:]


def check_splits(path: str, num_chars: int, train_window: int, val_window: int) -> None:
    """UserError, naming the file and what to do, unless its training split holds one
    training window (train_window characters: the inputs and the one after) and its
    validation split one evaluation window (val_window characters)."""
    def sizes(n: int) -> tuple[int, int]:
        return int(TRAIN_FRACTION * n), n - int(TRAIN_FRACTION * n)

    num_train, num_val = sizes(num_chars)
    if num_train >= train_window and num_val >= val_window:
        return
    needed = next(n for n in range(num_chars, 100 * (train_window + val_window))
                  if sizes(n)[0] >= train_window and sizes(n)[1] >= val_window)
    name, size, window = (("training split (the first 90%)", num_train, train_window)
                          if num_train < train_window else
                          ("validation split (the last 10%)", num_val, val_window))
    raise UserError(
        f"{path!r} is too short: {num_chars:,} characters, so its {name} holds {size:,}, "
        f"fewer than one window of {window:,}. Use a text of at least {needed:,} "
        f"characters, or a smaller --max_seq_len.")


def sample_starts(key: jax.Array, num_ids: int, batch_size: int, seq_len: int) -> jax.Array:
    """[B] random window starts in ids of length num_ids (window_batch cuts the windows)."""
    return jax.random.randint(key, (batch_size,), 0, num_ids - seq_len)


def windows_per_pass(num_ids: int, seq_len: int) -> int:
    """How many windows (of seq_len + 1 ids) one of shuffled_starts's passes cuts: any offset
    below seq_len leaves room for them all."""
    return (num_ids - seq_len) // seq_len


def shuffled_starts(key: jax.Array, step: jax.Array, num_ids: int, batch_size: int,
                    seq_len: int) -> jax.Array:
    """[B] window starts of batch `step` of shuffled passes over ids of length num_ids: each
    pass cuts them into windows at its own random offset and visits them in its own random
    order, so that every character is trained on once per pass (random windows miss some and
    repeat others). `key` is fixed for the run; the step picks pass and batch."""
    per_pass = windows_per_pass(num_ids, seq_len)
    batches = per_pass // batch_size                                  # whole batches in it
    pass_key = jax.random.fold_in(key, step // batches)
    offset = jax.random.randint(jax.random.fold_in(pass_key, 0), (), 0, seq_len)
    places = (step % batches) * batch_size + jnp.arange(batch_size)
    return offset + seq_len * permuted(jax.random.fold_in(pass_key, 1), places, per_pass)


def permuted(key: jax.Array, places: jax.Array, n: int) -> jax.Array:
    """The entries at `places` of a random permutation of range(n) that `key` picks, computed
    for those places alone: a keyed 6-round Feistel network on the bits of n, cycle-walked
    into range(n) (a value that lands beyond n is permuted again). Its work grows with the
    places, not n, where jax.random.permutation sorts all n values (an eighth of a small
    model's step on Tiny Shakespeare's 15,684 windows, twenty steps' time on 100 MB:
    docs/benchmarks.md). Fewer rounds left small ranges measurably uneven."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)                  # 2 * half bits hold n
    mask = jnp.uint32((1 << half) - 1)
    round_keys = jax.random.bits(key, (6,), jnp.uint32)

    def feistel(x):
        left, right = x >> half, x & mask
        for round_key in round_keys:
            left, right = right, left ^ (_mix(right ^ round_key) & mask)
        return (left << half) | right

    return jax.lax.while_loop(lambda x: jnp.any(x >= n),
                              lambda x: jnp.where(x >= n, feistel(x), x),
                              feistel(places.astype(jnp.uint32))).astype(jnp.int32)


def _mix(x: jax.Array) -> jax.Array:
    """uint32 -> uint32 hash: Wellons' lowbias32, Feistel's round function."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def window_batch(ids: jax.Array, starts: jax.Array, seq_len: int):
    """The windows at `starts` [B], on the device: inputs [B, T] and targets shifted by one."""
    windows = ids[starts[:, None] + jnp.arange(seq_len + 1)].astype(jnp.int32)  # [B, T+1]
    return windows[:, :-1], windows[:, 1:]


class Windows(NamedTuple):
    """Fixed evaluation windows: loss = sum(weights * nll(inputs -> targets)) / sum(weights)."""
    inputs: np.ndarray   # [W, T] int32
    targets: np.ndarray  # [W, T] int32
    weights: np.ndarray  # [W, T] float32: 1 where a target counts, 0 on padding


def eval_windows(ids: np.ndarray, seq_len: int, keep: np.ndarray | None = None) -> Windows:
    """Non-overlapping windows predicting every id after the first exactly once.

    Window w predicts ids[w*T+1 : w*T+T+1] from ids[w*T : w*T+T]; the last, shorter window is
    zero-padded and its padding weighs 0. `keep` (window numbers) cuts only those: a fixed
    sample of a long split, in memory of the sample's size.
    """
    num_windows = -(-(len(ids) - 1) // seq_len)  # ceil
    keep = np.arange(num_windows) if keep is None else np.asarray(keep)
    at = keep[:, None] * seq_len + np.arange(seq_len + 1)                  # [W, T+1]
    inside = at < len(ids)
    windows = np.where(inside, ids[np.minimum(at, len(ids) - 1)], 0).astype(np.int32)
    return Windows(windows[:, :-1], windows[:, 1:], inside[:, 1:].astype(np.float32))


def put(array: np.ndarray, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    """A host array on the device(s), each device (of every process) taking its shard."""
    if sharding is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def batch_windows(windows: Windows, batch_size: int,
                  sharding: jax.sharding.Sharding | None = None) -> Windows:
    """Windows as device arrays [NB, batch_size, T], the last batch padded with zero weight;
    with `sharding` (over the batch axis), each batch is split across devices."""
    num = len(windows.inputs)
    pad = -num % batch_size
    return Windows(*(
        put(np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]).reshape(
            -1, batch_size, *a.shape[1:]), sharding) for a in windows))


def main(argv) -> int:
    if len(argv) > 1 or (argv and argv[0] not in TEXTS):
        raise UserError(f"usage: python data.py [NAME], NAME one of {', '.join(TEXTS)} "
                        f"(default novelas); got {' '.join(argv)}. A local copy is taken from "
                        "the environment variable " + ", ".join(
                            f"{t.env} ({n})" for n, t in TEXTS.items()) + ".")
    name = argv[0] if argv else "novelas"
    known = TEXTS[name]
    if os.path.exists(known.file):
        read_text(known.file)  # raises if it is not the right file
        print(f"{known.file}: present, SHA-256 verified")
        return 0
    origin = fetch(name)
    print(f"{known.file}: written from {origin}, SHA-256 verified", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main, __doc__)
