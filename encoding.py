"""A text file as character ids, in memory that scales with its bytes: read once, decoded in
pieces (data.normalize's rules), its characters counted, the vocabulary chosen, and encoded in
the smallest unsigned integer type that holds it (uint8 up to 256 characters, uint16 up to
65,536: a 100 MB text takes 100 or 200 MB, not 400).

A vocabulary can be bounded (`min_count`): the characters seen fewer times become one unknown
symbol, UNKNOWN. A vocabulary holding it (saved in the params file like
any other) reads every character it lacks as it, in training, evaluation and sampling alike.

A text of CACHE_MIN_BYTES or more keeps its counts and ids in a cache file beside it
(`.NAME.SHA.ids.npz`, named by the SHA-256 of its bytes: an edited text never reads a stale
one), so that a second run or a resume starts in seconds. Where the folder is read-only, the
text is encoded each time.
"""

import glob
import hashlib
import os
import sys
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

import data
from common import UserError, atomic_file
from data import UNKNOWN

CACHE_MIN_BYTES = 8 << 20  # texts this large keep their encoding beside them
PIECE_BYTES = 16 << 20  # decoded a piece at a time: memory of a piece, not of the text
NUM_CODE_POINTS = 0x110000
HINT_VOCAB, HINT_COUNT = 256, 10  # a vocabulary this large, mostly this rare: a hint


class Text(NamedTuple):
    ids: np.ndarray  # [N] the text's character ids (uint8, uint16 or int32)
    vocab: str       # character id i is vocab[i]
    note: str        # what the vocabulary kept, for the run's first lines


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer type that holds ids below vocab_size."""
    return np.dtype(np.uint8 if vocab_size <= 1 << 8 else
                    np.uint16 if vocab_size <= 1 << 16 else np.int32)


def _pieces(raw: bytes, path: str, progress: bool):
    """The text's code points, normalized, a piece at a time ([n] uint32 each). Pieces end
    after a newline where they can (never inside a character or a CR LF pair)."""
    bar = tqdm(total=len(raw), unit="B", unit_scale=True, desc=f"reading {path}",
               disable=not progress, file=sys.stderr, leave=False)
    begin = 0
    while begin < len(raw):
        end = raw.rfind(b"\n", begin, begin + PIECE_BYTES) + 1
        if end <= begin or begin + PIECE_BYTES >= len(raw):
            end = min(begin + PIECE_BYTES, len(raw))
        while end < len(raw) and (raw[end] & 0xC0 == 0x80 or raw[end - 1:end + 1] == b"\r\n"):
            end += 1  # not inside a character, nor between CR and LF
        text = data.decode_utf8(raw[begin:end], path, begin)
        # Only the file's first piece may start with the byte-order mark that normalize drops.
        text = data.normalize(text) if begin == 0 else data.normalize("\n" + text)[1:]
        yield np.frombuffer(text.encode("utf-32-le"), np.uint32)
        bar.update(end - begin)
        begin = end
    bar.close()


def _count_and_encode(raw: bytes, path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(counts [V], ids [N] against the text's every character, that vocabulary): two passes,
    the first counting, the second encoding with a table from code point to id."""
    progress = len(raw) >= CACHE_MIN_BYTES
    counts = np.zeros(NUM_CODE_POINTS, np.int64)
    for codes in _pieces(raw, path, progress):
        counts += np.bincount(codes, minlength=NUM_CODE_POINTS)
    present = np.flatnonzero(counts)
    table = np.zeros(NUM_CODE_POINTS, id_dtype(len(present)))
    table[present] = np.arange(len(present))
    ids = np.empty(int(counts.sum()), table.dtype)
    at = 0
    for codes in _pieces(raw, path, progress):
        ids[at: at + len(codes)] = table[codes]
        at += len(codes)
    vocab = "".join(map(chr, present))
    return counts[present], ids, vocab


def _cache_path(path: str, digest: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{digest[:16]}.ids.npz")


def _encoded(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """_count_and_encode of the file at `path`, from its cache where one was written."""
    raw = data.read_bytes(path)
    digest = hashlib.sha256(raw).hexdigest()
    cache = _cache_path(path, digest)
    if os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as f:
            if str(f["sha256"]) == digest:
                return f["counts"], f["ids"], str(f["vocab"])
    counts, ids, vocab = _count_and_encode(raw, path)
    if not len(ids):
        raise data.empty_text(path)
    if len(raw) >= CACHE_MIN_BYTES:
        _write_cache(cache, path, digest, counts, ids, vocab)
    return counts, ids, vocab


def _write_cache(cache: str, path: str, digest: str, counts, ids, vocab) -> None:
    """Writes the cache (atomic), removing the text's older ones; a note if it cannot."""
    try:
        for old in glob.glob(_cache_path(path, "*" * 16).replace("*" * 16, "*")):
            os.remove(old)
        with atomic_file(cache) as f:
            np.savez(f, sha256=digest, counts=counts, ids=ids, vocab=np.str_(vocab))
    except OSError as e:
        print(f"note: cannot keep the encoding of {path} beside it ({e.strerror}): the "
              "next run encodes it again.", file=sys.stderr)


def bounded_vocab(vocab: str, counts: np.ndarray, min_count: int) -> str:
    """The characters seen at least min_count times, and UNKNOWN if any was dropped (sorted)."""
    kept = {c for c, n in zip(vocab, counts) if n >= min_count}
    if len(kept) < len(vocab):
        kept.add(UNKNOWN)
    return "".join(sorted(kept))


def remap(ids: np.ndarray, source: str, target: str) -> np.ndarray:
    """ids against vocabulary `source` as ids against `target`: a character `target` lacks
    becomes its UNKNOWN, or, without one, a UserError listing them all."""
    position = {c: i for i, c in enumerate(target)}
    fallback = position.get(UNKNOWN, -1)
    table = np.array([position.get(c, fallback) for c in source], np.int64)
    missing = [c for c, i in zip(source, table) if i < 0]
    if missing:
        raise data.unknown_characters(missing)
    if target == source:
        return ids
    return table.astype(id_dtype(len(target)))[ids]


def load(path: str, vocab: str | None = None, min_count: int = 1) -> Text:
    """The text file at `path` as ids: against `vocab` (a params file's), or against its own
    characters seen at least min_count times (and UNKNOWN for the rest)."""
    counts, ids, own = _encoded(path)
    target = vocab if vocab is not None else bounded_vocab(own, counts, min_count)
    try:
        ids = remap(ids, own, target)
    except UserError as e:
        raise UserError(f"{path!r}: {e} Is it the text this model was trained on?") from None
    dropped = [n for c, n in zip(own, counts) if c not in target]
    note = f"{len(target):,} characters"
    if dropped and vocab is None:
        note += (f": the {len(dropped):,} seen fewer than {min_count:,} times "
                 f"({sum(dropped) / len(ids):.3%} of the text) read as {UNKNOWN!r} (U+FFFD)")
    rare = int((counts < HINT_COUNT).sum())
    if vocab is None and min_count == 1 and len(own) > HINT_VOCAB and 2 * rare > len(own):
        note += (f" ({rare:,} of them seen fewer than {HINT_COUNT} times, each an embedding "
                 f"row and a logit: --min_char_count={HINT_COUNT} keeps "
                 f"{len(bounded_vocab(own, counts, HINT_COUNT)):,})")
    return Text(ids, target, note)
