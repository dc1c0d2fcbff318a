"""What training minimizes: the next character's cross-entropy, and two objectives beside it
that the model never sees at evaluation or sampling (build_loss composes them for the step,
train_step.make_train_step):

- the character after next (multi-token prediction; Gloeckle et al. 2024): a second head on
  the model's final features, trained only, predicts the character after next; its
  cross-entropy is added at `ahead_loss`. Its parameters ("after_next") are the objective's:
  the params files to sample from (.min_val.pkl) do not hold them (model_params).
- distillation: in the data-limited regime an ensemble of separately trained models predicts
  better than any of its members, and a student trained on the ensemble's predicted
  distributions keeps much of that gain in one model (Kim et al. 2025, arXiv 2509.14786).
  `train.py --teachers=A,B` reads each teacher's distribution of the next character at every
  position of each training batch (reader.py: a streaming teacher as its sampler would,
  from a table of the whole split where it fits, else in the step), and averages them
  (make_teachers); `distill_weight` of the next character's cross-entropy is then taken
  against that distribution instead.

The loss logged as training loss stays the next character's alone, as evaluation measures it.
"""

from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import checkpoint
import kernels
import position_encodings
import reader
import transformer
from common import UserError

AFTER_NEXT = "after_next"  # the after-next head's module: its params' key
TABLE_BYTES = 1 << 30  # streaming teachers' predictions of the whole split, up to this size


class Weights(NamedTuple):
    ahead_loss: float = 0.0      # of the after-next head's cross-entropy (0: no head)
    distill_weight: float = 0.0  # of the cross-entropy against the teachers (with teachers)


def next_character(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits [B, T, V] against the next characters targets [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def after_next(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits [B, T, V] at position t against targets[t + 1]: the
    character after the next one (the last position has none)."""
    return next_character(logits[:, :-1], targets[:, 1:])


def distillation(logits: jax.Array, soft_targets: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits [B, T, V] against distributions soft_targets [B, T, V]."""
    return optax.softmax_cross_entropy(logits, soft_targets).mean()


def build_loss(hp: transformer.HParams, vocab_size: int, weights: Weights,
               compute_dtype: str = "float32") -> hk.Transformed:
    """apply(params, rng, inputs [B, T], targets [B, T], soft_targets [B, T, V] or None,
    is_training=True) -> (the objective minimized, the next character's loss). Its params:
    the model's (transformer.build's) and, with ahead_loss, the after-next head's (init with
    is_training False draws them as transformer.build's init would, in the same order)."""
    return hk.transform(loss_fn(hp, vocab_size, weights, compute_dtype))


def loss_fn(hp: transformer.HParams, vocab_size: int, weights: Weights,
            compute_dtype: str = "float32"):
    """build_loss's function, untransformed (optimizer.hidden_matrices reads its modules):
    the model's forward (transformer.forward_fn) with these objectives as its output."""
    def objectives(features, head, targets, soft_targets):
        logits = head(features)                                                # [B, T, V]
        loss = next_character(logits, targets)
        objective = loss
        if soft_targets is not None:
            objective = ((1 - weights.distill_weight) * loss
                         + weights.distill_weight * distillation(logits, soft_targets))
        if weights.ahead_loss:
            ahead = kernels.Logits(vocab_size, name=AFTER_NEXT)(features)      # [B, T, V]
            objective += weights.ahead_loss * after_next(ahead, targets)
        return objective, loss

    forward = transformer.forward_fn(hp, vocab_size, compute_dtype, objectives)

    def loss(inputs, targets, soft_targets=None, is_training=True):
        return forward(inputs, is_training, targets, soft_targets)

    return loss


def model_params(params: hk.Params) -> hk.Params:
    """The model's params alone, without the objectives' (what evaluation and sampling read)."""
    return {name: p for name, p in params.items() if name != AFTER_NEXT}


def load_teachers(paths: str, vocab: str) -> list[checkpoint.Checkpoint]:
    """The comma-separated params files `paths`, each checked to share the student's vocab."""
    teachers = []
    for path in paths.split(","):
        ckpt = checkpoint.load(path)
        if ckpt.vocab != vocab:
            raise UserError(f"--teachers: {path!r} was trained on another text (its "
                            f"{len(ckpt.vocab)} characters differ from the student's "
                            f"{len(vocab)}): use teachers trained on --source_file.")
        teachers.append(ckpt)
    return teachers


class Teachers(NamedTuple):
    params: tuple                # per teacher, on the host: its table or its params
    targets: Callable            # jittable (params, train_ids, starts [B]) -> [B, T, V]


def make_teachers(paths: str, vocab: str, seq_len: int, train_ids: np.ndarray) -> Teachers:
    """The teachers (comma-separated params files) and their averaged distribution of each
    next character of a batch's windows (seq_len from each start). A streaming teacher
    predicts each character from all it can see of the text before it, as its sampler
    would: read once over the whole training split into a table [N - 1, V] where the tables
    fit in TABLE_BYTES, else computed in the step from the windows it draws, each read
    after its receptive field (the same distributions, in memory of a batch: see
    reader.make_window_logits). Any other teacher reads each window alone, as it was
    trained, in the step."""
    teachers = load_teachers(paths, vocab)
    tables = TABLE_BYTES // ((len(train_ids) - 1) * len(vocab) * 4)  # how many fit
    params, reads = [], []
    for path, teacher in zip(paths.split(","), teachers):
        hp = teacher.hparams
        if not position_encodings.is_streaming(hp) and hp.max_seq_len < seq_len:
            raise UserError(f"--teachers: {path!r} reads {hp.max_seq_len} characters, fewer "
                            f"than the student's windows of {seq_len}.")
        if position_encodings.is_streaming(hp) and tables > 0:
            tables -= 1
            logits = reader.next_logits(hp, len(vocab), teacher.params, train_ids[:-1])
            params.append(np.asarray(jax.nn.softmax(logits)))                  # [N - 1, V]
            reads.append(lambda table, _, starts: table[starts[:, None] + jnp.arange(seq_len)])
        else:
            read = reader.make_window_logits(hp, len(vocab), seq_len)
            params.append(teacher.params)
            reads.append(lambda p, ids, starts, read=read: jax.nn.softmax(
                read(p, ids, starts).astype(jnp.float32)))

    def targets(params, train_ids, starts):
        return sum(read(p, train_ids, starts) for read, p in zip(reads, params)) / len(reads)

    return Teachers(tuple(params), targets)
