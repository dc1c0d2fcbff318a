"""Evaluation and sampling config, loading a params file, and honest full-split losses.

`python eval.py [--field=value ...]` prints one `name: value` line per metric for a params
file: the mean cross-entropy over the whole validation split in fixed, non-overlapping
EVAL_SEQ_LEN-character windows (every character after the first predicted exactly once), the
same on as many windows spread over the training split, bits per character, size and step.
For a streaming model also val_loss_stream: every validation character predicted with all
the validation text before it, as its sampler would (one pass through the window).
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

# The shipped params: `python train.py --preset=cpu`'s best validation, without optimizer state.
DEFAULT_PARAMS = "params/params.4ac43463b21d4fc7a7051fc5.pkl.min_val.pkl"
EVAL_SEQ_LEN = 128  # the project's metric: windows of 128 characters, whatever max_seq_len


class Config(NamedTuple):
    params: str = DEFAULT_PARAMS             # params file to evaluate or sample from
    prng_seed: int | None = None             # sampling seed; None: the current UNIX time
    context_file: str = "eval_context.txt"   # text the samples continue (UTF-8)
    context: str | None = None               # that text inline, instead of context_file
    num_chars: int | None = None             # characters to sample; None: until Ctrl-C
    temperature: float = 1.0                 # divides the logits: < 1 sharper, > 1 flatter
    top_k: int | None = None                 # sample among the k likeliest characters only
    num_samples: int = 1                     # independent streams sampled together
    source_file: str = data.CORPUS_FILE      # corpus for eval.py's losses
    eval_batch_size: int = 32                # windows per step of the evaluation lax.map


CONFIG = Config()


def load_params(path: str) -> checkpoint.Checkpoint:
    """The checkpoint at `path`, with a pointer to training when the default is missing."""
    try:
        return checkpoint.load(path)
    except checkpoint.CheckpointError:
        if path == DEFAULT_PARAMS:
            raise checkpoint.CheckpointError(
                f"the shipped params file {DEFAULT_PARAMS!r} is missing or unreadable (an "
                "incomplete checkout?). Restore it with `git checkout -- params`, or train a "
                "model (`python train.py --preset=cpu`) and pass its file: "
                "--params=params/params.<run hash>.pkl.min_val.pkl") from None
        raise


def make_window_loss(model: hk.Transformed):
    """jitted (params, batches) -> (summed nll in nats, counted characters), one call for
    all batches (a lax.map over their leading axis): one dispatch and one host sync."""

    def batch_loss(params, batch: data.Windows):
        logits = model.apply(params, None, batch.inputs, False)                  # [B, T, V]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)  # [B, T]
        return jnp.sum(nll * batch.weights)

    @jax.jit
    def window_loss(params, batches: data.Windows):
        losses = jax.lax.map(lambda b: batch_loss(params, b), batches)          # [NB]
        return jnp.sum(losses), jnp.sum(batches.weights)

    return window_loss


def put(array: np.ndarray, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    """A host array on the device(s), each device (of every process) taking its shard."""
    if sharding is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def batch_windows(windows: data.Windows, batch_size: int,
                  sharding: jax.sharding.Sharding | None = None) -> data.Windows:
    """Windows as device arrays [NB, batch_size, T], the last batch padded with zero weight;
    with `sharding` (over the batch axis), each batch is split across devices."""
    num = len(windows.inputs)
    pad = -num % batch_size
    return data.Windows(*(
        put(np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]).reshape(
            -1, batch_size, *a.shape[1:]), sharding) for a in windows))


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


def split_windows(ids: np.ndarray, seq_len: int) -> tuple[data.Windows, data.Windows]:
    """(train, val) evaluation windows: the whole validation split, and as many windows
    spread evenly over the training split."""
    train_ids, val_ids = data.split(ids)
    val = data.eval_windows(val_ids, seq_len)
    every = max(1, (len(train_ids) - 1) // seq_len // len(val.inputs))
    train = data.eval_windows(train_ids, seq_len, every)
    return data.Windows(*(a[: len(val.inputs)] for a in train)), val


def evaluate(ckpt: checkpoint.Checkpoint, config: Config) -> dict:
    """The metrics that `python eval.py` prints."""
    ids = data.encode(data.load_corpus(config.source_file), ckpt.vocab)
    seq_len = min(EVAL_SEQ_LEN, ckpt.hparams.max_seq_len)
    train, val = split_windows(ids, seq_len)
    model = transformer.build(ckpt.hparams, len(ckpt.vocab))
    window_loss = make_window_loss(model)
    params = jax.device_put(ckpt.params)
    val_loss = mean_loss(window_loss, params, batch_windows(val, config.eval_batch_size))
    train_loss = mean_loss(window_loss, params, batch_windows(train, config.eval_batch_size))
    stream = {}
    if transformer.streams(ckpt.hparams):  # one pass over the whole split through the window
        _, val_ids = data.split(ids)
        stream_loss = make_stream_loss(model)
        stream["val_loss_stream"] = round(float(stream_loss(params, jnp.asarray(val_ids))), 4)
    return {
        "val_loss": round(val_loss, 4),
        **stream,
        "val_bpc": round(val_loss / math.log(2), 4),
        "train_loss": round(train_loss, 4),
        "train_bpc": round(train_loss / math.log(2), 4),
        "params": checkpoint.num_params(ckpt.params),
        "step": ckpt.meta.get("step"),
        "eval_seq_len": seq_len,
        "val_chars": int(val.weights.sum()),
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
