"""Honest full-split losses: `python eval.py [--field=value ...]`.

Prints one `name: value` line per metric for a params file and a text (by default the one it
was trained on): the mean cross-entropy over the whole validation split in fixed,
non-overlapping EVAL_SEQ_LEN-character windows (every character after the first predicted
exactly once), the same on as many windows spread over the training split, bits per
character, size and step. For a streaming model also val_loss_stream: every validation
character predicted with all the validation text before it, as its sampler would (reader.py).
For a model that reads 256 characters, val_loss_256: nanoGPT's shakespeare_char measure (its
estimate_loss: 256-character windows, every position counted) over non-overlapping windows
covering the whole validation split, the expectation of its random batches, so that a Tiny
Shakespeare model stands beside nanoGPT's published loss.
"""

import math
import sys
import time
from typing import NamedTuple

import jax
import numpy as np
import optax
from tqdm import tqdm

import checkpoint
import data
import encoding
import metrics
import position_encodings
import reader
import transformer
from common import UserError, parse_overrides, run_main


LONG_SPLIT = 1 << 20  # characters from which val_loss_stream shows its progress


class Config(NamedTuple):
    params: str = checkpoint.DEFAULT_PARAMS  # params file to evaluate
    source_file: str | None = None           # text for the losses (None: the one the params
                                             # file was trained on, else the corpus)
    eval_batch_size: int = 32                # windows per step of the evaluation lax.map


CONFIG = Config()


def source_file(ckpt: checkpoint.Checkpoint, config: Config) -> str:
    """The text to evaluate on: config.source_file, else the params file's training text."""
    return config.source_file or checkpoint.training_text(ckpt)


def stream_loss(ckpt: checkpoint.Checkpoint, ids: np.ndarray) -> float:
    """Mean nats per character of ids[1:], each predicted as its sampler would (reader.py),
    in bounded memory: chunk by chunk."""
    total, begin = 0.0, 0
    with tqdm(total=len(ids) - 1, unit="char", unit_scale=True, desc="val_loss_stream",
              leave=False, disable=len(ids) <= LONG_SPLIT) as bar:
        for logits in reader.iter_next_logits(ckpt.hparams, len(ckpt.vocab), ckpt.params,
                                              ids[:-1]):
            targets = ids[1 + begin: 1 + begin + len(logits)].astype(np.int32)
            total += float(optax.softmax_cross_entropy_with_integer_labels(logits,
                                                                           targets).sum())
            begin += len(logits)
            bar.update(len(logits))
    return total / (len(ids) - 1)


def evaluate(ckpt: checkpoint.Checkpoint, config: Config) -> dict:
    """The metrics that `python eval.py` prints."""
    path = source_file(ckpt, config)
    ids = encoding.load(path, ckpt.vocab).ids
    seq_len = metrics.window_len(ckpt.hparams)
    data.check_splits(path, len(ids), seq_len + 1, seq_len + 1)
    train, val = metrics.split_windows(ids, seq_len)
    window_loss = metrics.make_window_loss(transformer.build(ckpt.hparams, len(ckpt.vocab)))
    params = jax.device_put(ckpt.params)
    batches = lambda windows: data.batch_windows(windows, config.eval_batch_size)
    val_loss = metrics.mean_loss(window_loss, params, batches(val), "val_loss")
    train_loss = metrics.mean_loss(window_loss, params, batches(train), "train_loss")
    extra = {}
    _, val_ids = data.split(ids)
    if position_encodings.is_streaming(ckpt.hparams):
        extra["val_loss_stream"] = round(stream_loss(ckpt, val_ids), 4)
    if metrics.takes(ckpt.hparams, metrics.NANOGPT_SEQ_LEN):
        windows = data.eval_windows(val_ids, metrics.NANOGPT_SEQ_LEN)
        extra["val_loss_256"] = round(metrics.mean_loss(window_loss, params, batches(windows),
                                                        "val_loss_256"), 4)
    return {
        "val_loss": round(val_loss, 4),
        **extra,
        "val_bpc": round(val_loss / math.log(2), 4),
        "train_loss": round(train_loss, 4),
        "train_bpc": round(train_loss / math.log(2), 4),
        "params": checkpoint.num_params(ckpt.params),
        "step": ckpt.meta.get("step"),
        "eval_seq_len": seq_len,
        "val_chars": int(val.weights.sum()),
        "source_file": path,
    }


def main(argv) -> int:
    (config,) = parse_overrides(argv, CONFIG)
    if config.eval_batch_size < 1:
        raise UserError(f"--eval_batch_size={config.eval_batch_size}: must be >= 1.")
    ckpt = checkpoint.load(config.params)
    print(f"# {config.params} on {jax.devices()}", file=sys.stderr)
    start = time.time()
    for name, value in evaluate(ckpt, config).items():
        print(f"{name}: {value}")
    print(f"# evaluated in {time.time() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main, __doc__, [CONFIG])
