"""encoding.py: a text file as ids in the smallest integer type, read in pieces, cached beside
it (never stale), with a vocabulary a user can bound; the unknown symbol through a run, its
params file, evaluation and sampling."""

import errno
import glob
import os

import numpy as np
import pytest

import checkpoint
import data
import encoding
import eval as eval_script
import train
from common import UserError
from conftest import CORPUS, TINY, run_command, tiny_config

# Multibyte characters, CR LF and lone CR (normalized to LF), a byte order mark, an emoji.
TRICKY = "\ufeffEn un lugar\r\nde la Mancha,\rcuyo nombre — ¿no? ¡sí! 🦆 ñandú\r\n" * 7


def write(tmp_path, text: str, name: str = "text.txt") -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(text.encode("utf-8"))
    return path


def test_ids_and_vocabulary_are_those_of_the_whole_text_read_at_once(tmp_path):
    path = write(tmp_path, TRICKY)
    text = encoding.load(path)
    whole = data.read_text(path)
    assert text.vocab == data.build_vocab(whole)
    assert text.ids.dtype == np.uint8
    np.testing.assert_array_equal(text.ids, data.encode(whole, text.vocab))
    assert text.note == f"{len(text.vocab)} characters"


@pytest.mark.parametrize("piece_bytes", [1, 2, 3, 5, 13])
def test_pieces_never_cut_a_character_or_a_line_end(tmp_path, monkeypatch, piece_bytes):
    """Decoded a few bytes at a time, the text reads exactly as in one piece."""
    path = write(tmp_path, TRICKY)
    expected = encoding.load(path)
    monkeypatch.setattr(encoding, "PIECE_BYTES", piece_bytes)
    text = encoding.load(path)
    assert text.vocab == expected.vocab
    np.testing.assert_array_equal(text.ids, expected.ids)


def test_ids_take_the_smallest_integer_type_of_the_vocabulary():
    assert [encoding.id_dtype(n) for n in (2, 256, 257, 65_536, 65_537)] == [
        np.uint8, np.uint8, np.uint16, np.uint16, np.int32]


def test_a_large_vocabulary_reads_as_uint16_with_a_hint_to_bound_it(tmp_path):
    chars = "".join(map(chr, range(0x4E00, 0x4E00 + 300)))  # 300 CJK characters, each twice
    text = encoding.load(write(tmp_path, "ab" * 20 + chars * 2))
    assert text.ids.dtype == np.uint16 and len(text.vocab) == 302
    np.testing.assert_array_equal(text.ids[40:], np.tile(np.arange(2, 302), 2))
    assert text.note == ("302 characters (300 of them seen fewer than 10 times, each an "
                         "embedding row and a logit: --min_char_count=10 keeps 3)")


def test_a_large_text_keeps_its_encoding_beside_it_never_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(encoding, "CACHE_MIN_BYTES", 1)
    monkeypatch.setattr(encoding, "PIECE_BYTES", 16)  # read in pieces, as a large text is
    path = write(tmp_path, TRICKY)
    first = encoding.load(path)
    caches = glob.glob(str(tmp_path / ".text.txt.*.ids.npz"))
    assert len(caches) == 1
    # The second load reads the cache: it never decodes the text.
    monkeypatch.setattr(encoding, "_pieces", lambda *_: pytest.fail("decoded again"))
    again = encoding.load(path)
    assert again.vocab == first.vocab
    np.testing.assert_array_equal(again.ids, first.ids)
    monkeypatch.undo()
    monkeypatch.setattr(encoding, "CACHE_MIN_BYTES", 1)
    monkeypatch.setattr(encoding, "PIECE_BYTES", 16)
    # An edited text (same length) is read anew, and its old cache removed, wherever the
    # edit is: here past the first of the pieces the text is read in.
    at = TRICKY.rindex("Mancha")
    assert len(TRICKY[:at].encode()) > 2 * encoding.PIECE_BYTES
    write(tmp_path, TRICKY[:at] + "Manxha" + TRICKY[at + len("Mancha"):])
    edited = encoding.load(path)
    assert "x" in edited.vocab and "x" not in first.vocab
    assert len(glob.glob(str(tmp_path / ".text.txt.*.ids.npz"))) == 1
    assert not os.path.exists(caches[0])


def test_a_cached_text_bounds_and_maps_its_vocabulary_as_a_fresh_read(tmp_path, monkeypatch):
    """A second run or a resume reads the cache: its bounded vocabulary, its note, and its
    ids against a model's vocabulary equal those of the text read anew."""
    path = write(tmp_path, TRICKY + "xxy")
    model_vocab = "".join(sorted(set("En un lugar"))) + data.UNKNOWN
    reads = lambda: (encoding.load(path, min_count=7), encoding.load(path, vocab=model_vocab))
    fresh = reads()
    monkeypatch.setattr(encoding, "CACHE_MIN_BYTES", 1)
    encoding.load(path)  # the first run, which writes the cache
    assert glob.glob(str(tmp_path / ".text.txt.*.ids.npz"))
    cached = reads()
    for a, b in zip(fresh, cached):
        assert (a.vocab, a.note) == (b.vocab, b.note)
        np.testing.assert_array_equal(a.ids, b.ids)
    assert "x" not in cached[0].vocab and data.UNKNOWN in cached[0].vocab


def test_a_folder_it_cannot_write_encodes_the_text_each_time_with_a_note(tmp_path,
                                                                          monkeypatch, capsys):
    """A cache that cannot be written (a read-only folder; simulated: these tests may run as
    root) is a note, not an error, and the text reads the same."""
    monkeypatch.setattr(encoding, "CACHE_MIN_BYTES", 1)
    path = write(tmp_path, TRICKY)
    expected = encoding.load(path)
    for cache in glob.glob(str(tmp_path / ".text.txt.*.ids.npz")):
        os.remove(cache)

    def read_only(*_):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(encoding, "atomic_file", read_only)
    capsys.readouterr()
    for _ in range(2):
        text = encoding.load(path)
        np.testing.assert_array_equal(text.ids, expected.ids)
        assert "cannot keep the encoding of" in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / ".text.txt.*.ids.npz"))


def test_a_small_text_writes_no_cache(tmp_path):
    encoding.load(write(tmp_path, TRICKY))
    assert not glob.glob(str(tmp_path / ".*.npz"))


def test_a_bounded_vocabulary_reads_rare_characters_as_the_unknown_symbol(tmp_path):
    path = write(tmp_path, "abababab" * 10 + "xxyyz")
    text = encoding.load(path, min_count=3)
    assert text.vocab == "ab" + data.UNKNOWN
    assert "".join(text.vocab[i] for i in text.ids) == "abababab" * 10 + data.UNKNOWN * 5
    # The share of the text: the dropped characters' 5 occurrences, not their 3 kinds.
    assert text.note == (f"3 characters: the 3 seen fewer than 3 times ({5 / 85:.3%} of the "
                         f"text) read as '{data.UNKNOWN}' (U+FFFD)")
    assert encoding.load(path, min_count=1).vocab == "abxyz"  # the default keeps them all


def test_a_models_vocabulary_reads_what_it_lacks_as_its_unknown_symbol_or_refuses(tmp_path):
    path = write(tmp_path, "abcab")
    text = encoding.load(path, vocab="ab" + data.UNKNOWN)
    assert "".join(text.vocab[i] for i in text.ids) == "ab" + data.UNKNOWN + "ab"
    with pytest.raises(UserError, match=r"1 character\(s\) not in the model's vocabulary: "
                                        r"'c' \(U\+0063\)"):
        encoding.load(path, vocab="ab")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"abc\xff\xfedef", "is not UTF-8 text: byte 3"),
])
def test_bad_files_are_refused_with_their_message(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        encoding.load(str(path))
    with pytest.raises(UserError, match="not found"):
        encoding.load(str(tmp_path / "missing.txt"))


def test_the_unknown_symbol_round_trips_through_the_params_file(tmp_path, capsys):
    """A run with min_char_count keeps its bounded vocabulary in its params file; evaluation
    and sampling read the text's rare characters as its unknown symbol, as training did."""
    rare = "".join(map(chr, range(0x3040, 0x3060)))  # 32 characters, each seen once
    common = data.read_text(CORPUS)[:60_000]
    path = write(tmp_path, common[:30_000] + rare + common[30_000:])
    config = tiny_config(tmp_path, max_iters=4, eval_interval=4, source_file=path,
                         min_char_count=3)
    meta = train.train(config, TINY)
    best = train.params_paths(config.params_dir, meta["run_hash"])[1]
    ckpt = checkpoint.load(best)
    assert data.UNKNOWN in ckpt.vocab and not set(rare) & set(ckpt.vocab)
    assert ckpt.vocab == encoding.load(path, min_count=3).vocab
    losses = eval_script.evaluate(ckpt, eval_script.CONFIG._replace(params=best))
    assert losses["val_loss"] == pytest.approx(meta["history"]["val_loss"][-1], rel=1e-4)
    status, out, err = run_command(capsys, "generate.py", f"--params={best}",
                                   f"--context={rare[:3]}abc", "--num_chars=20", "--prng_seed=1")
    assert status == 0, err  # the vocabulary lacks the context's first 3
    assert out.startswith(rare[:3] + "abc")

