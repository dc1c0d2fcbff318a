"""How a model is scored: mean cross-entropy over fixed, non-overlapping windows of a text
(every character after the first predicted exactly once), shared by train.py's evaluations,
eval.py and visualize.py. What a character sees when read as a stream: reader.py.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import data
import position_encodings
import transformer

EVAL_SEQ_LEN = 128  # the project's metric: windows of 128 characters, whatever max_seq_len
NANOGPT_SEQ_LEN = 256  # nanoGPT's shakespeare_char block_size: val_loss_256
PROGRESS_BATCHES = 256  # eval.py on a long text: batches per call, between progress updates


def window_len(hp: transformer.HParams) -> int:
    """The evaluation windows' length for a model: EVAL_SEQ_LEN, or max_seq_len if shorter."""
    return min(EVAL_SEQ_LEN, hp.max_seq_len)


def takes(hp: transformer.HParams, length: int) -> bool:
    """Whether the model reads `length` positions in one pass."""
    return position_encodings.is_streaming(hp) or hp.max_seq_len >= length


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


def mean_loss(window_loss, params, batches: data.Windows, desc: str | None = None) -> float:
    """Mean nats per counted character over all `batches`; with `desc`, a long split's are
    read PROGRESS_BATCHES at a time behind a progress bar of that name."""
    group = len(batches.inputs) if desc is None else PROGRESS_BATCHES
    total = count = 0.0
    for begin in tqdm(range(0, len(batches.inputs), group), desc=desc, leave=False,
                      disable=True if len(batches.inputs) <= group else None):
        part_total, part_count = window_loss(params, data.Windows(
            *(a[begin: begin + group] for a in batches)))
        total, count = total + float(part_total), count + float(part_count)
    return total / count


def split_windows(ids: np.ndarray, seq_len: int,
                  max_chars: int | None = None) -> tuple[data.Windows, data.Windows]:
    """(train, val) evaluation windows: the whole validation split or, where it holds more
    than max_chars characters, max_chars // seq_len of its windows spread evenly over it
    (always the same ones); and as many windows spread evenly over the training split. Only
    the windows kept are cut: memory of the sample, not of the text."""
    train_ids, val_ids = data.split(ids)
    num_val = -(-(len(val_ids) - 1) // seq_len)  # every window of the split
    keep = np.arange(num_val)
    if max_chars is not None and len(val_ids) - 1 > max_chars:
        keep = np.round(np.linspace(0, num_val - 1, max(1, max_chars // seq_len))).astype(int)
    every = max(1, (len(train_ids) - 1) // seq_len // len(keep))
    num_train = -(-(len(train_ids) - 1) // seq_len)
    train_keep = np.arange(0, num_train, every)[: len(keep)]
    return (data.eval_windows(train_ids, seq_len, train_keep),
            data.eval_windows(val_ids, seq_len, keep))


def make_evaluate(hp: transformer.HParams, vocab_size: int, ids: np.ndarray,
                  batch_size: int, sharding: jax.sharding.Sharding | None = None,
                  max_chars: int | None = None):
    """(params -> (train_loss, val_loss), the validation characters it counts): the
    validation split (or its windows of split_windows' sample, with max_chars) and as many
    training windows, in eval.py's windows and float32; with `sharding` (over the batch axis
    of [batches, batch, T]), each batch split across devices."""
    windows = split_windows(ids, window_len(hp), max_chars)
    train_batches, val_batches = (data.batch_windows(w, batch_size, sharding) for w in windows)
    window_loss = make_window_loss(transformer.build(hp, vocab_size))
    evaluate = lambda params: (mean_loss(window_loss, params, train_batches),
                               mean_loss(window_loss, params, val_batches))
    return evaluate, int(windows[1].weights.sum())
