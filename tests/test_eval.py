"""eval.py: its metrics equal independent computations over the whole validation split."""

import math

import jax
import numpy as np
import pytest

import bench
import checkpoint
import data
import transformer
from conftest import CORPUS, run_command, run_script


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def independent_loss(ckpt, ids, seq_len):
    """Mean nats per predicted character over consecutive non-overlapping windows of ids,
    the last one shorter, computed with numpy from the model's logits (the full windows a
    batch of them at a time, the last one alone)."""
    apply = jax.jit(transformer.build(ckpt.hparams, len(ckpt.vocab)).apply, static_argnums=3)
    num_full = (len(ids) - 1) // seq_len
    inputs = ids[:num_full * seq_len].reshape(num_full, seq_len)
    targets = ids[1:num_full * seq_len + 1].reshape(num_full, seq_len)
    groups = -(-num_full // 256)
    parts = list(zip(np.array_split(inputs, groups), np.array_split(targets, groups)))
    if (len(ids) - 1) % seq_len:
        parts.append((ids[num_full * seq_len:-1][None], ids[num_full * seq_len + 1:][None]))
    total, count = 0.0, 0
    for part_inputs, part_targets in parts:
        logits = np.asarray(apply(ckpt.params, None, part_inputs, False), np.float64)
        log_probs = np.take_along_axis(log_softmax(logits), part_targets[..., None], -1)
        total -= log_probs.sum()
        count += part_targets.size
    assert count == len(ids) - 1  # every character after the first, once
    return total / count


def trained_and_evaluated(tmp_path, capsys, hp, **changes):
    """A brief training run of `hp` on the corpus's first 200,000 characters (eval.py reads
    every character of both splits), then eval.py on its best file: (its checkpoint,
    eval.py's metrics, the validation ids)."""
    import train
    from conftest import tiny_config

    excerpt = tmp_path / "excerpt.txt"
    excerpt.write_text(data.read_text(CORPUS)[:200_000], encoding="utf-8")
    meta = train.train(tiny_config(tmp_path, source_file=str(excerpt), **changes), hp)
    best = train.params_paths(str(tmp_path / "params"), meta["run_hash"])[1]
    status, out, err = run_command(capsys, "eval.py", f"--params={best}",
                                   f"--source_file={excerpt}")
    assert status == 0, err
    metrics = dict(line.split(": ", 1) for line in out.splitlines())
    ckpt = checkpoint.load(best)
    _, val_ids = data.split(data.encode(data.read_text(str(excerpt)), ckpt.vocab))
    return ckpt, metrics, val_ids


def test_eval_metrics_match_an_independent_computation(tiny_run, capsys):
    status, out, err = run_command(capsys, "eval.py", f"--params={tiny_run['best']}",
                                   f"--source_file={CORPUS}")
    assert status == 0, err
    metrics = dict(line.split(": ", 1) for line in out.splitlines())
    ckpt = checkpoint.load(tiny_run["best"])
    ids = data.encode(data.read_text(CORPUS), ckpt.vocab)
    _, val_ids = data.split(ids)
    seq_len = ckpt.hparams.max_seq_len  # the tiny model's window is under 128
    assert int(metrics["eval_seq_len"]) == seq_len
    expected = independent_loss(ckpt, val_ids, seq_len)
    assert float(metrics["val_loss"]) == pytest.approx(expected, abs=2e-4)
    assert float(metrics["val_bpc"]) == pytest.approx(expected / math.log(2), abs=2e-4)
    assert float(metrics["train_bpc"]) == pytest.approx(
        float(metrics["train_loss"]) / math.log(2), abs=2e-4)
    assert int(metrics["val_chars"]) == len(val_ids) - 1
    assert int(metrics["params"]) == bench.param_count(ckpt.hparams, len(ckpt.vocab))
    assert int(metrics["step"]) == ckpt.meta["step"]
    assert float(metrics["val_loss"]) == pytest.approx(ckpt.meta["min_val_loss"], abs=1e-4)
    assert 0 < float(metrics["train_loss"]) < math.log(len(ckpt.vocab))
    assert "val_loss_256" not in metrics  # 16 positions: nanoGPT's 256 do not fit


def test_eval_bad_params_exit_2(tmp_path):
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle at all")
    result = run_script("eval.py", f"--params={garbage}")
    assert result.returncode == 2
    assert f"'{garbage}' is truncated or corrupt" in result.stderr
    assert "Traceback" not in result.stderr


def test_streaming_model_also_reports_the_loss_its_sampler_gives(tmp_path, capsys):
    """A streaming model (trained briefly) gets val_loss_stream: every validation character
    predicted with all the text before it. Computed independently here in segments of 64
    targets, each read with the reach of the model before it (decoder_N * (W - 1)
    characters: all that can affect its predictions)."""
    from conftest import TINY

    hp = TINY._replace(positions="rotary", attention_window=8, max_seq_len=32)
    ckpt, metrics, val_ids = trained_and_evaluated(tmp_path, capsys, hp, max_iters=30,
                                                   eval_interval=30)
    reach, length = hp.decoder_N * (hp.attention_window - 1), 64
    apply = jax.jit(transformer.build(hp, len(ckpt.vocab)).apply, static_argnums=3)
    inputs, targets = val_ids[:-1], val_ids[1:]
    first = apply(ckpt.params, None, inputs[None, :reach + length], False)[0]  # no text before
    nll = [-log_softmax(np.asarray(first, np.float64))[np.arange(reach + length),
                                                      targets[:reach + length]]]
    padded = np.concatenate([inputs, np.zeros(length, np.int32)])  # on the right: causal
    starts = np.arange(reach + length, len(inputs), length)       # each segment's first target
    segments = np.stack([padded[s - reach:s + length] for s in starts])
    logits = np.concatenate([apply(ckpt.params, None, part, False)[:, reach:]
                             for part in np.array_split(segments, 8)])       # [n, 64, V]
    log_probs = log_softmax(logits.astype(np.float64))
    for s, row in zip(starts, log_probs):
        count = min(length, len(inputs) - s)
        nll.append(-row[np.arange(count), targets[s:s + count]])
    nll = np.concatenate(nll)
    assert len(nll) == len(val_ids) - 1
    assert float(metrics["val_loss_stream"]) == pytest.approx(nll.mean(), abs=1e-4)
    assert float(metrics["val_loss_stream"]) < math.log(len(ckpt.vocab))
    # nanoGPT's measure: non-overlapping 256-character windows, every position counted.
    assert float(metrics["val_loss_256"]) == pytest.approx(
        independent_loss(ckpt, val_ids, 256), abs=2e-4)


def test_eval_refuses_sampling_options(capsys):
    """Each script owns its config: eval.py has no sampling options to ignore silently."""
    status, _, err = run_command(capsys, "eval.py", "--temperature=0.5")
    assert status == 2 and "unknown option --temperature" in err


def test_nanogpt_measure_reads_256_character_windows(tmp_path, capsys):
    """val_loss_256: non-overlapping 256-character windows over the whole validation split,
    every position counted, computed here window by window. A model with learned positions
    (its logits depend on the position in the window) tells it from the 128-character
    val_loss."""
    from conftest import TINY

    ckpt, metrics, val_ids = trained_and_evaluated(tmp_path, capsys, TINY._replace(max_seq_len=256),
                                                   max_iters=10, eval_interval=10,
                                                   batch_size=4)
    expected = independent_loss(ckpt, val_ids, 256)
    assert float(metrics["val_loss_256"]) == pytest.approx(expected, abs=2e-4)
    assert abs(float(metrics["val_loss"]) - expected) > 1e-3  # 128-character windows
