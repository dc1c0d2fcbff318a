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
  position of each training batch, in the step (reader.py: a streaming teacher as its
  sampler would), and averages them (make_teachers); `distill_weight` of the next
  character's cross-entropy is then taken against that distribution instead.

The loss logged as training loss stays the next character's alone, as evaluation measures it.
"""

from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

import checkpoint
import kernels
import reader
import transformer
from common import UserError

AFTER_NEXT = "after_next"  # the after-next head's module: its params' key


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
               speed: kernels.Speed = kernels.Speed()) -> hk.Transformed:
    """apply(params, rng, inputs [B, T], targets [B, T], soft_targets [B, T, V] or None,
    is_training=True) -> (the objective minimized, the next character's loss). Its params:
    the model's (transformer.build's) and, with ahead_loss, the after-next head's (init with
    is_training False draws them as transformer.build's init would, in the same order)."""
    return hk.transform(loss_fn(hp, vocab_size, weights, speed))


def loss_fn(hp: transformer.HParams, vocab_size: int, weights: Weights,
            speed: kernels.Speed = kernels.Speed()):
    """build_loss's function, untransformed (optimizer.hidden_matrices reads its modules)."""
    def loss(inputs, targets, soft_targets=None, is_training=True):
        with kernels.running(speed):
            model = transformer.Transformer(hp, vocab_size)
            features, _ = model.features(inputs, is_training)                  # [B, T, D]
            logits = model.head(features)                                      # [B, T, V]
            loss = next_character(logits, targets)
            objective = loss
            if soft_targets is not None:
                objective = ((1 - weights.distill_weight) * loss
                             + weights.distill_weight * distillation(logits, soft_targets))
            if weights.ahead_loss:
                ahead = kernels.Logits(vocab_size, name=AFTER_NEXT)(features)  # [B, T, V]
                objective += weights.ahead_loss * after_next(ahead, targets)
        return objective, loss

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
    params: tuple                # each teacher's params, on the device: the step's argument
    targets: Callable            # jittable (params, train_ids, starts [B]) -> [B, T, V]


def make_teachers(paths: str, vocab: str, seq_len: int) -> Teachers:
    """The teachers (comma-separated params files) and their averaged distribution of each
    next character of a batch's windows (seq_len from each start), computed in the step from
    the windows it draws: memory of a batch, whatever the text's length. Each predicts as
    reader.make_window_logits reads: a streaming teacher as its sampler would (all it can
    see of the text before), any other from the window alone."""
    teachers = load_teachers(paths, vocab)
    for path, teacher in zip(paths.split(","), teachers):
        if not transformer.is_streaming(teacher.hparams) and teacher.hparams.max_seq_len < seq_len:
            raise UserError(f"--teachers: {path!r} reads {teacher.hparams.max_seq_len} "
                            f"characters, fewer than the student's windows of {seq_len}.")
    reads = [reader.make_window_logits(t.hparams, len(vocab), seq_len) for t in teachers]

    def targets(params, train_ids, starts):
        probs = [jax.nn.softmax(read(p, train_ids, starts).astype(jnp.float32))
                 for read, p in zip(reads, params)]
        return sum(probs) / len(probs)

    return Teachers(tuple(jax.device_put(t.params) for t in teachers), targets)
