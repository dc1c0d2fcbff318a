"""Any text: what real files hold (a byte-order mark, CRLF, emoji, CJK), files that cannot
train (each exits 2 naming the file, nothing written), and a text the project has never seen
going through train.py, eval.py and generate.py as a user runs them."""

import os
import re

import numpy as np
import pytest

import checkpoint
import data
import recipes
import transformer
from common import UserError
from conftest import CORPUS, SHAKESPEARE, run_command

# A text with everything a real file may hold: accents, emoji (outside the BMP), CJK, a BOM,
# Windows line endings and one old-Mac CR.
LINES = ["¿Qué tal, señora? 😀 naïve café", "你好，世界。 日本語のテキスト",
         "Plain ASCII, digits 0123.", "Ünïcödé ✓ — “quotes” 🐍"]
TEXT = "\n".join(LINES[i % len(LINES)] + f" {i}" for i in range(120)) + "\n"
TINY_ARGS = ["--max_seq_len=16", "--d_model=32", "--h=4", "--d_ff=64", "--decoder_N=1",
             "--batch_size=8", "--max_iters=20", "--eval_interval=10", "--warmup_iters=2",
             "--aim=False", "--sample_chars=0"]


def windows_file(tmp_path, name="windows.txt", text=TEXT) -> str:
    """TEXT as a Windows editor saves it: a byte-order mark and CRLF line endings."""
    path = tmp_path / name
    path.write_bytes(("\ufeff" + text.replace("\n", "\r\n")).encode("utf-8"))
    return str(path)


# ---- reading a file ----

def test_bom_and_line_endings_are_normalized(tmp_path):
    path = windows_file(tmp_path)
    assert data.read_text(path) == TEXT  # no BOM, "\n" only
    old_mac = tmp_path / "mac.txt"
    old_mac.write_bytes(b"one\rtwo\r\nthree\n")
    assert data.read_text(str(old_mac)) == "one\ntwo\nthree\n"
    assert data.normalize("\ufeffa\r\nb") == "a\nb"
    assert data.normalize("a\ufeffb") == "a\ufeffb"  # a BOM inside the text is a character


@pytest.mark.parametrize("content, message", [
    ("señor".encode("latin-1"), "is not UTF-8 text: byte 2 is b'\\xf1'"),
    (b"", "is empty"),
    ("\ufeff".encode("utf-8"), "is empty"),  # only a BOM: nothing left to learn from
])
def test_unusable_files_are_user_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(message)) as excinfo:
        data.read_text(str(path))
    assert str(path) in str(excinfo.value)


def test_missing_file_names_it_and_the_fetch_command_for_known_texts(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found") as excinfo:
        data.read_text(str(tmp_path / "mine.txt"))
    assert "mine.txt" in str(excinfo.value) and "make" not in str(excinfo.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="make shakespeare"):
        data.read_text("tinyshakespeare.txt")


def test_checksum_guards_only_the_fetched_known_texts(tmp_path, monkeypatch):
    changed = TEXT.encode("utf-8")
    (tmp_path / "tinyshakespeare.txt").write_bytes(changed)
    (tmp_path / "novelas_ejemplares.txt").write_bytes(changed)
    mine = tmp_path / "sub" / "novelas_ejemplares.txt"  # same name, another folder: the user's
    mine.parent.mkdir()
    mine.write_bytes(changed)
    monkeypatch.chdir(tmp_path)
    for name, command in (("tinyshakespeare.txt", "make shakespeare"),
                          ("novelas_ejemplares.txt", "make data")):
        with pytest.raises(UserError, match="is not the expected") as excinfo:
            data.read_text(name)
        assert command in str(excinfo.value)
    assert data.read_text(str(mine)) == TEXT
    assert len(data.read_text(SHAKESPEARE)) == 1_115_394  # the shared copy: the user's file


def test_fetch_tinyshakespeare_copies_the_local_file_and_checks_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: pytest.fail("network"))
    monkeypatch.setenv("TINYSHAKESPEARE", SHAKESPEARE)
    dest = tmp_path / "ts.txt"
    assert SHAKESPEARE in data.fetch("tinyshakespeare", str(dest))
    text = data.read_text(str(dest))
    assert len(text) == 1_115_394 and len(data.build_vocab(text)) == 65
    monkeypatch.setenv("TINYSHAKESPEARE", CORPUS)  # the wrong book
    with pytest.raises(UserError, match="not the expected tinyshakespeare.txt"):
        data.fetch("tinyshakespeare", str(tmp_path / "other.txt"))
    assert sorted(os.listdir(tmp_path)) == ["ts.txt"]


@pytest.mark.parametrize("num_chars, split", [(10, "training split"), (100, "validation split")])
def test_too_short_texts_say_how_long_a_text_must_be(num_chars, split):
    with pytest.raises(UserError, match=f"its {split}") as excinfo:
        data.check_splits("short.txt", num_chars, 17, 17)
    needed = int(str(excinfo.value).split("at least ")[1].split(" ")[0].replace(",", ""))
    data.check_splits("short.txt", needed, 17, 17)  # the length it names is enough
    with pytest.raises(UserError):
        data.check_splits("short.txt", needed - 1, 17, 17)  # and the least that is


# ---- through the scripts ----

def test_a_new_text_trains_evaluates_and_samples(tmp_path, capsys):
    """A Windows-saved file with emoji and CJK: its vocabulary has neither "\\r" nor the BOM;
    eval.py reads the recorded text by default and gives the CRLF file the LF file's losses;
    generate.py samples with no text file at all."""
    path = windows_file(tmp_path)
    params_dir = tmp_path / "params"
    status, _, err = run_command(capsys, "train.py", f"--source_file={path}",
                                 f"--params_dir={params_dir}", *TINY_ARGS)
    assert status == 0, err
    assert "preset: none (CONFIG in train.py and HPARAMS" in err  # as written
    (best,) = [str(p) for p in params_dir.glob("*.min_val.pkl")]
    vocab = checkpoint.load(best).vocab
    assert vocab == data.build_vocab(TEXT) and "\r" not in vocab and "\ufeff" not in vocab
    assert {"😀", "你", "✓"} <= set(vocab)

    status, recorded, err = run_command(capsys, "eval.py", f"--params={best}")  # its text
    assert status == 0, err
    metrics = dict(line.split(": ", 1) for line in recorded.splitlines())
    assert metrics["source_file"] == path
    assert float(metrics["val_loss"]) == pytest.approx(checkpoint.load(best).meta["min_val_loss"],
                                                       abs=1e-4)
    unix = tmp_path / "unix.txt"
    unix.write_text(TEXT, encoding="utf-8")
    status, other, err = run_command(capsys, "eval.py", f"--params={best}",
                                     f"--source_file={unix}")
    assert status == 0, err
    assert other.replace(str(unix), path) == recorded

    status, sampled, err = run_command(capsys, "generate.py", f"--params={best}",
                                       "--num_chars=80", "--prng_seed=3")
    assert status == 0, err
    assert "sampling from '\\n'" in err  # the default context is Cervantes
    assert sampled.startswith("\n") and len(sampled) == 1 + 80 + 1
    assert set(sampled) <= set(vocab)


@pytest.mark.parametrize("content, message", [
    ("señor y señora\n".encode("latin-1") * 50, "is not UTF-8 text"),
    (b"", "is empty"),
    (b"short text", "training split"),              # 10 characters: 9 train
    (("abcdefghij" * 10).encode(), "validation split"),  # 100: 10 validate; windows: 17
])
def test_texts_that_cannot_train_exit_2_and_write_nothing(tmp_path, content, message, capsys):
    path = tmp_path / "text.txt"
    path.write_bytes(content)
    out = tmp_path / "out"
    status, _, err = run_command(capsys, "train.py", f"--source_file={path}",
                                 f"--params_dir={out}", f"--aim_repo={out}",
                                 *TINY_ARGS[:-2])  # with Aim on
    assert status == 2 and message in err and str(path) in err, err
    assert not out.exists()  # no params file, no Aim repository


def test_eval_on_a_text_with_other_characters_exits_2_naming_them(tiny_run, tmp_path, capsys):
    path = tmp_path / "emoji.txt"
    path.write_text("hola 😀 " * 100, encoding="utf-8")
    status, _, err = run_command(capsys, "eval.py", f"--params={tiny_run['best']}",
                                 f"--source_file={path}")
    assert status == 2 and "'😀' (U+1F600)" in err and str(path) in err, err


def test_context_is_read_as_training_reads_text(tiny_run, tmp_path, capsys):
    """A CRLF context file samples exactly what its LF version does."""
    crlf, lf = tmp_path / "crlf.txt", tmp_path / "lf.txt"
    crlf.write_bytes("\ufeffEn un lugar\r\nde la Mancha".encode("utf-8"))
    lf.write_text("En un lugar\nde la Mancha", encoding="utf-8")
    runs = [run_command(capsys, "generate.py", f"--params={tiny_run['best']}",
                        f"--context_file={f}", "--num_chars=40", "--prng_seed=5")
            for f in (crlf, lf)]
    assert [status for status, _, _ in runs] == [0, 0], runs[0][2]
    assert runs[0][1] == runs[1][1]
    assert runs[0][1].startswith("En un lugar\nde la Mancha")


def test_shakespeare_preset_trains_on_tiny_shakespeare():
    import train

    config, hparams, _ = recipes.resolve(["--preset=shakespeare"], train.CONFIG,
                                         transformer.HPARAMS)
    assert config.source_file == data.TEXTS["tinyshakespeare"].file
    text = data.read_text(SHAKESPEARE)
    train_ids, val_ids = data.split(data.encode(text, data.build_vocab(text)))
    assert (len(train_ids), len(val_ids)) == (1_003_854, 111_540)  # nanoGPT's 90% / 10%
    assert np.all(np.asarray(val_ids) < 65)
    assert hparams == transformer.HParams(**recipes.CPU.hparams)._replace(decoder_N=4)
    assert config.ahead_loss == 0.0
