"""eval.py: its metrics equal an independent computation over the whole validation split."""

import math

import jax
import numpy as np
import pytest

import checkpoint
import data
import transformer
from conftest import CORPUS, run_script


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def independent_loss(ckpt, ids, seq_len):
    """Mean nats per predicted character over consecutive non-overlapping windows of ids,
    the last one shorter, computed window by window with numpy."""
    apply = jax.jit(transformer.build(ckpt.hparams, len(ckpt.vocab)).apply, static_argnums=3)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        inputs = ids[start:start + seq_len]
        targets = ids[start + 1:start + seq_len + 1]
        inputs = inputs[:len(targets)]
        logits = np.asarray(apply(ckpt.params, None, inputs[None], False))[0]
        total -= log_softmax(logits.astype(np.float64))[np.arange(len(targets)), targets].sum()
        count += len(targets)
    assert count == len(ids) - 1  # every character after the first, once
    return total / count


def test_eval_metrics_match_an_independent_computation(tiny_run):
    result = run_script("eval.py", f"--params={tiny_run['best']}", f"--source_file={CORPUS}")
    assert result.returncode == 0, result.stderr
    metrics = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    ckpt = checkpoint.load(tiny_run["best"])
    ids = data.encode(data.load_corpus(CORPUS), ckpt.vocab)
    _, val_ids = data.split(ids)
    seq_len = ckpt.hparams.max_seq_len  # the tiny model's window is under 128
    assert int(metrics["eval_seq_len"]) == seq_len
    expected = independent_loss(ckpt, val_ids, seq_len)
    assert float(metrics["val_loss"]) == pytest.approx(expected, abs=2e-4)
    assert float(metrics["val_bpc"]) == pytest.approx(expected / math.log(2), abs=2e-4)
    assert int(metrics["val_chars"]) == len(val_ids) - 1
    assert int(metrics["params"]) == transformer.param_count(ckpt.hparams, len(ckpt.vocab))
    assert int(metrics["step"]) == ckpt.meta["step"]
    assert float(metrics["val_loss"]) == pytest.approx(ckpt.meta["min_val_loss"], abs=1e-4)
    assert 0 < float(metrics["train_loss"]) < math.log(len(ckpt.vocab))


def test_eval_bad_params_exit_2(tmp_path):
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle at all")
    result = run_script("eval.py", f"--params={garbage}")
    assert result.returncode == 2
    assert f"'{garbage}' is truncated or corrupt" in result.stderr
    assert "Traceback" not in result.stderr
