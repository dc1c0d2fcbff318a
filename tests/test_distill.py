"""distill.py and train.py --teachers: the teachers' predictions, and a student that learns
towards them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import checkpoint
import data
import distill
import eval as evaluation
import train
import transformer
from common import UserError
from conftest import CORPUS, TINY, tiny_config

STREAMING = TINY._replace(positions="rotary", attention_window=8)
VOCAB = "abcdefg"


def random_teacher(hp: transformer.HParams, seed: int) -> checkpoint.Checkpoint:
    params = transformer.build(hp, len(VOCAB)).init(
        jax.random.PRNGKey(seed), jnp.zeros((1, hp.max_seq_len), jnp.int32), False)
    return checkpoint.Checkpoint(jax.tree.map(np.asarray, params), hp, VOCAB, {}, None, None)


def softmax(model, params, tokens) -> np.ndarray:
    return np.asarray(jax.nn.softmax(model.apply(params, None, tokens[None], False)[0]))


def test_streaming_teacher_predicts_each_character_from_all_it_can_see(monkeypatch):
    """Chunked, with the context each chunk depends on read first: the same distributions as
    one forward pass over the whole text."""
    monkeypatch.setattr(evaluation, "STREAM_CHUNK", 12)
    teacher = random_teacher(STREAMING, 0)
    ids = np.random.default_rng(0).integers(0, len(VOCAB), 100).astype(np.int32)
    probs = distill.teacher_probs(teacher, ids)
    assert probs.shape == (99, len(VOCAB))
    whole = softmax(transformer.build(STREAMING, len(VOCAB)), teacher.params, ids[:-1])
    np.testing.assert_allclose(probs, whole, atol=1e-5)


def test_windowed_teacher_predicts_in_windows_of_its_length():
    teacher = random_teacher(TINY, 0)
    ids = np.random.default_rng(1).integers(0, len(VOCAB), 40).astype(np.int32)
    probs = distill.teacher_probs(teacher, ids)
    model = transformer.build(TINY, len(VOCAB))
    T = TINY.max_seq_len
    for begin in range(0, 39, T):
        window = ids[begin: min(begin + T, 39)]
        np.testing.assert_allclose(probs[begin: begin + len(window)],
                                   softmax(model, teacher.params, window), atol=1e-5)


def test_targets_average_the_teachers(tmp_path):
    ids = np.random.default_rng(2).integers(0, len(VOCAB), 50).astype(np.int32)
    teachers = [random_teacher(STREAMING, seed) for seed in (0, 1)]
    paths = []
    for i, t in enumerate(teachers):
        paths.append(str(tmp_path / f"t{i}.pkl"))
        checkpoint.save(paths[-1], params=t.params, hparams=t.hparams, vocab=t.vocab, meta={})
    targets = distill.teacher_targets(",".join(paths), ids, VOCAB)
    each = [distill.teacher_probs(t, ids) for t in teachers]
    assert np.abs(each[0] - each[1]).max() > 0.01  # different teachers
    np.testing.assert_allclose(targets, (each[0] + each[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(UserError, match="another text"):
        distill.teacher_targets(paths[0], ids, VOCAB[:-1] + "z")


def one_step(teacher, distill_weight):
    """Params and metrics after one SGD step (learning rate 1) of the tiny model."""
    model = transformer.build(TINY, len(VOCAB))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, TINY.max_seq_len), jnp.int32),
                        False)
    train_ids = jnp.asarray(np.random.default_rng(3).integers(0, len(VOCAB), 200), jnp.int32)
    step = train.make_train_step(model, optax.sgd(1.0), 4, TINY.max_seq_len,
                                 distill_weight=distill_weight)
    state = train.TrainState(params, optax.sgd(1.0).init(params), jax.random.PRNGKey(1),
                             jnp.int32(0))
    if teacher == "one-hot":
        teacher = jax.nn.one_hot(train_ids[1:], len(VOCAB))
    return step(state, train_ids, teacher)


def test_student_step_takes_distill_weight_of_its_loss_from_the_teachers():
    """Against one-hot teachers (the targets themselves), any weight gives the plain step;
    against uniform ones, weight 1 gives another step; the logged loss is the plain one."""
    plain, plain_metrics = one_step(None, 0.5)
    for weight in (0.5, 1.0):
        same, metrics = one_step("one-hot", weight)
        for x, y in zip(jax.tree.leaves(same.params), jax.tree.leaves(plain.params)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    uniform = jnp.full((199, len(VOCAB)), 1 / len(VOCAB))
    other, metrics = one_step(uniform, 1.0)
    np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    assert max(float(jnp.abs(x - y).max()) for x, y in zip(
        jax.tree.leaves(other.params), jax.tree.leaves(plain.params))) > 1e-3


def test_student_learns_towards_its_teacher(tiny_run, tmp_path):
    """A tiny run distilled from the tiny run's params (distill_weight 1) ends nearer to that
    teacher's predictions on the validation split than the same run on the text alone."""
    teacher = checkpoint.load(tiny_run["best"])
    _, val_ids = data.split(data.encode(data.read_text(CORPUS), teacher.vocab))
    target = distill.teacher_probs(teacher, val_ids[:2000])

    def divergence_after(**changes):
        config = tiny_config(tmp_path / str(len(changes)), max_iters=40, **changes)
        meta = train.train(config, TINY)
        student = checkpoint.load(train.params_paths(config.params_dir, meta["run_hash"])[0])
        probs = distill.teacher_probs(student, val_ids[:2000])
        return float(np.mean(np.sum(target * (np.log(target) - np.log(probs)), -1)))

    assert divergence_after(teachers=tiny_run["best"], distill_weight=1.0) < (
        0.8 * divergence_after())


def test_bad_teachers_are_refused(tmp_path):
    with pytest.raises(UserError, match="distill_weight"):
        train.check_config(train.CONFIG._replace(distill_weight=1.5))
    with pytest.raises(UserError):
        distill.load_teachers(str(tmp_path / "missing.pkl"), VOCAB)
