"""Ensemble distillation: a student trained towards its teachers' averaged predictions.

In the data-limited regime an ensemble of separately trained models predicts better than any
of its members, and a student trained on the ensemble's predicted distributions keeps much of
that gain in one model (Kim et al. 2025, arXiv 2509.14786). `python train.py --teachers=A,B`
computes, once before training, each teacher's distribution of the next character at every
position of the training split and averages them (teacher_targets); each training step then
minimizes

    (1 - distill_weight) * cross-entropy(the next character)
        + distill_weight * cross-entropy(the teachers' distribution)

at every position (train.make_train_step). The logged training loss stays the first term's,
as evaluation measures it. A streaming teacher predicts each character with all the text
before it that it can see (transformer.reach), like its sampler; any other teacher with
non-overlapping windows of its max_seq_len.
"""

import jax
import numpy as np

import checkpoint
import eval as evaluation
import transformer
from common import UserError


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


def teacher_probs(ckpt: checkpoint.Checkpoint, ids: np.ndarray,
                  compute_dtype: str = "float32") -> np.ndarray:
    """[len(ids) - 1, V] float32: the teacher's distribution of ids[t + 1] at each t."""
    model = transformer.build(ckpt.hparams, len(ckpt.vocab), compute_dtype)
    logits = evaluation.chunked_logits(model, ckpt.params, ckpt.hparams, ids[:-1])
    return np.asarray(jax.nn.softmax(logits))


def teacher_targets(paths: str, ids: np.ndarray, vocab: str,
                    compute_dtype: str = "float32") -> np.ndarray:
    """[len(ids) - 1, V]: the mean of the teachers' (comma-separated params files)
    distributions of each next character (teacher_probs)."""
    teachers = load_teachers(paths, vocab)
    return sum(teacher_probs(t, ids, compute_dtype) for t in teachers) / len(teachers)
