"""Evaluation config, loading a params file, and honest full-split losses.

`python eval.py [--field=value ...]` prints one `name: value` line per metric for a params
file and a text (by default the one it was trained on): the mean cross-entropy over the whole
validation split in fixed, non-overlapping EVAL_SEQ_LEN-character windows (every character
after the first predicted exactly once), the same on as many windows spread over the training
split, bits per character, size and step. For a streaming model also val_loss_stream: every
validation character predicted with all the validation text before it, as its sampler would
(one pass through the window). For a model that reads 256 characters, val_loss_256: nanoGPT's
shakespeare_char measure (its estimate_loss: 256-character windows, every position counted)
over non-overlapping windows covering the whole validation split, the expectation of its
random batches, so that a Tiny Shakespeare model stands beside nanoGPT's published loss.
"""

import math
import sys
import time
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import checkpoint
import data
import transformer
from common import UserError, parse_overrides, run_main

# The shipped params, by the preset that trained them: each run's best validation params,
# without optimizer state. Cervantes' are every script's default.
SHIPPED_PARAMS = {"cpu": "params/params.786a84eefdb443bf9e98d68b.pkl.min_val.pkl",
                  "shakespeare": "params/params.04320fa1ba314b95aeefe005.pkl.min_val.pkl"}
DEFAULT_PARAMS = SHIPPED_PARAMS["cpu"]
EVAL_SEQ_LEN = 128  # the project's metric: windows of 128 characters, whatever max_seq_len
NANOGPT_SEQ_LEN = 256  # nanoGPT's shakespeare_char block_size: val_loss_256
STREAM_CHUNK = 8192  # positions per forward pass of chunked_logits for a streaming model


class Config(NamedTuple):
    params: str = DEFAULT_PARAMS             # params file to evaluate
    source_file: str | None = None           # text for the losses (None: the one the params
                                             # file was trained on, else the corpus)
    eval_batch_size: int = 32                # windows per step of the evaluation lax.map


CONFIG = Config()


def load_params(path: str) -> checkpoint.Checkpoint:
    """The checkpoint at `path`, with a pointer to training when the default is missing."""
    try:
        return checkpoint.load(path)
    except checkpoint.CheckpointError:
        if path in SHIPPED_PARAMS.values():
            raise checkpoint.CheckpointError(
                f"the shipped params file {path!r} is missing or unreadable (an "
                "incomplete checkout?). Restore it with `git checkout -- params`, or train a "
                "model (`python train.py --preset=cpu`) and pass its file: "
                "--params=params/params.<run hash>.pkl.min_val.pkl") from None
        raise


def position_losses(model: hk.Transformed, params, batch: data.Windows) -> jax.Array:
    """[B, T]: nats of each window position's target, weighted (padding: 0)."""
    logits = model.apply(params, None, batch.inputs, False)                      # [B, T, V]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)  # [B, T]
    return nll * batch.weights


def make_window_loss(model: hk.Transformed):
    """jitted (params, batches) -> (summed nll in nats, counted characters), one call for
    all batches (a lax.map over their leading axis): one dispatch and one host sync."""

    @jax.jit
    def window_loss(params, batches: data.Windows):
        losses = jax.lax.map(lambda b: jnp.sum(position_losses(model, params, b)),
                             batches)                                           # [NB]
        return jnp.sum(losses), jnp.sum(batches.weights)

    return window_loss


def mean_loss(window_loss, params, batches: data.Windows) -> float:
    """Mean nats per counted character over all `batches`."""
    total, count = window_loss(params, batches)
    return float(total) / float(count)


def make_stream_loss(model: hk.Transformed):
    """jitted (params, ids [N]) -> mean nats per character of ids[1:], predicted in one
    forward pass over all of them: each character with all the text before it, which is the
    context a streaming model's sampler gives it (for other models, see make_window_loss)."""

    @jax.jit
    def stream_loss(params, ids):
        logits = model.apply(params, None, ids[None, :-1], False)               # [1, N-1, V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[None, 1:]).mean()

    return stream_loss


def chunked_logits(model: hk.Transformed, params, hp: transformer.HParams,
                   ids: np.ndarray) -> np.ndarray:
    """[len(ids), V] float32: the logits after each of ids, in bounded memory. A streaming
    model's are exactly those of one pass over all of ids (each character predicted with all
    the text before it): passes over STREAM_CHUNK positions, each read after the
    transformer.reach(hp) positions it depends on. Any other model's come from
    non-overlapping windows of its max_seq_len."""
    if transformer.streams(hp):
        chunk, context = STREAM_CHUNK, transformer.reach(hp)
    else:
        chunk, context = hp.max_seq_len, 0
    forward = jax.jit(lambda p, x: model.apply(p, None, x[None], False)[0].astype(jnp.float32))
    params, length = jax.device_put(params), min(context + chunk, len(ids))
    logits = []
    for begin in range(0, len(ids), chunk):
        low = max(0, begin - context)
        segment = ids[low: low + length]  # zero-padded at the end: causal, so unseen
        out = forward(params, np.pad(segment, (0, length - len(segment))))
        logits.append(np.asarray(out[begin - low: min(begin + chunk, len(ids)) - low]))
    return np.concatenate(logits)


def split_windows(ids: np.ndarray, seq_len: int) -> tuple[data.Windows, data.Windows]:
    """(train, val) evaluation windows: the whole validation split, and as many windows
    spread evenly over the training split."""
    train_ids, val_ids = data.split(ids)
    val = data.eval_windows(val_ids, seq_len)
    every = max(1, (len(train_ids) - 1) // seq_len // len(val.inputs))
    train = data.eval_windows(train_ids, seq_len, every)
    return data.Windows(*(a[: len(val.inputs)] for a in train)), val


def source_file(ckpt: checkpoint.Checkpoint, config: Config) -> str:
    """The text to evaluate on: config.source_file, else the params file's training text."""
    if config.source_file is not None:
        return config.source_file
    return ckpt.meta.get("config", {}).get("source_file") or data.CORPUS_FILE


def window_len(hp: transformer.HParams) -> int:
    """The evaluation windows' length for a model: EVAL_SEQ_LEN, or max_seq_len if shorter."""
    return min(EVAL_SEQ_LEN, hp.max_seq_len)


def reads(hp: transformer.HParams, length: int) -> bool:
    """Whether the model takes `length` positions in one pass."""
    return transformer.streams(hp) or hp.max_seq_len >= length


def evaluate(ckpt: checkpoint.Checkpoint, config: Config) -> dict:
    """The metrics that `python eval.py` prints."""
    path = source_file(ckpt, config)
    text = data.read_text(path)
    seq_len = window_len(ckpt.hparams)
    data.check_splits(path, len(text), seq_len + 1, seq_len + 1)
    try:
        ids = data.encode(text, ckpt.vocab)
    except UserError as e:
        raise UserError(f"{path!r}: {e} Is it the text this model was trained on?") from None
    train, val = split_windows(ids, seq_len)
    model = transformer.build(ckpt.hparams, len(ckpt.vocab))
    window_loss = make_window_loss(model)
    params = jax.device_put(ckpt.params)
    val_loss = mean_loss(window_loss, params, data.batch_windows(val, config.eval_batch_size))
    train_loss = mean_loss(window_loss, params, data.batch_windows(train, config.eval_batch_size))
    extra = {}
    _, val_ids = data.split(ids)
    if transformer.streams(ckpt.hparams):  # one pass over the whole split through the window
        stream_loss = make_stream_loss(model)
        extra["val_loss_stream"] = round(float(stream_loss(params, jnp.asarray(val_ids))), 4)
    if reads(ckpt.hparams, NANOGPT_SEQ_LEN):
        windows = data.eval_windows(val_ids, NANOGPT_SEQ_LEN)
        extra["val_loss_256"] = round(mean_loss(
            window_loss, params, data.batch_windows(windows, config.eval_batch_size)), 4)
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
    ckpt = load_params(config.params)
    print(f"# {config.params} on {jax.devices()}", file=sys.stderr)
    start = time.time()
    for name, value in evaluate(ckpt, config).items():
        print(f"{name}: {value}")
    print(f"# evaluated in {time.time() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
