"""objectives.py: the losses a training step composes (the next character, the character
after next, distillation), the teachers' predictions, and a student that learns towards
them."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import checkpoint
import data
import objectives
import reader
import train
import train_step
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
    monkeypatch.setattr(reader, "STREAM_CHUNK", 12)
    teacher = random_teacher(STREAMING, 0)
    ids = np.random.default_rng(0).integers(0, len(VOCAB), 100).astype(np.int32)
    probs = objectives.teacher_probs(teacher, ids)
    assert probs.shape == (99, len(VOCAB))
    whole = softmax(transformer.build(STREAMING, len(VOCAB)), teacher.params, ids[:-1])
    np.testing.assert_allclose(probs, whole, atol=1e-5)


def test_windowed_teacher_predicts_each_character_from_its_sampler_window():
    """A model with learned positions: character i from the last max_seq_len characters up to
    it, at positions 0.., as its sampler shows them."""
    teacher = random_teacher(TINY, 0)
    ids = np.random.default_rng(1).integers(0, len(VOCAB), 40).astype(np.int32)
    probs = objectives.teacher_probs(teacher, ids)
    model = transformer.build(TINY, len(VOCAB))
    T = TINY.max_seq_len
    first = softmax(model, teacher.params, ids[:T])  # position i < T sees ids[:i + 1]
    np.testing.assert_allclose(probs[:T], first, atol=1e-5)
    for i in range(T, 39):
        window = ids[i + 1 - T: i + 1]
        np.testing.assert_allclose(probs[i], softmax(model, teacher.params, window)[-1],
                                   atol=1e-5)


def test_targets_average_the_teachers(tmp_path):
    ids = np.random.default_rng(2).integers(0, len(VOCAB), 50).astype(np.int32)
    teachers = [random_teacher(STREAMING, seed) for seed in (0, 1)]
    paths = []
    for i, t in enumerate(teachers):
        paths.append(str(tmp_path / f"t{i}.pkl"))
        checkpoint.save(paths[-1], params=t.params, hparams=t.hparams, vocab=t.vocab, meta={})
    targets = objectives.teacher_targets(",".join(paths), ids, VOCAB)
    each = [objectives.teacher_probs(t, ids) for t in teachers]
    assert np.abs(each[0] - each[1]).max() > 0.01  # different teachers
    np.testing.assert_allclose(targets, (each[0] + each[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(UserError, match="another text"):
        objectives.teacher_targets(paths[0], ids, VOCAB[:-1] + "z")


def one_step(teacher, distill_weight):
    """Params and metrics after one SGD step (learning rate 1) of the tiny model."""
    model = transformer.build(TINY, len(VOCAB))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, TINY.max_seq_len), jnp.int32),
                        False)
    train_ids = jnp.asarray(np.random.default_rng(3).integers(0, len(VOCAB), 200), jnp.int32)
    loss = objectives.build_loss(TINY, len(VOCAB), objectives.Weights(0.0, distill_weight))
    step = train_step.make_train_step(loss, optax.sgd(1.0), 4, TINY.max_seq_len)
    state = train_step.TrainState(params, optax.sgd(1.0).init(params), jax.random.PRNGKey(1),
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
    target = objectives.teacher_probs(teacher, val_ids[:2000])

    def divergence_after(**changes):
        config = tiny_config(tmp_path / str(len(changes)), max_iters=40, **changes)
        meta = train.train(config, TINY)
        student = checkpoint.load(train.params_paths(config.params_dir, meta["run_hash"])[0])
        probs = objectives.teacher_probs(student, val_ids[:2000])
        return float(np.mean(np.sum(target * (np.log(target) - np.log(probs)), -1)))

    assert divergence_after(teachers=tiny_run["best"], distill_weight=1.0) < (
        0.8 * divergence_after())


def test_bad_teachers_are_refused(tmp_path):
    with pytest.raises(UserError, match="distill_weight"):
        train.check_config(train.CONFIG._replace(distill_weight=1.5))
    with pytest.raises(UserError):
        objectives.load_teachers(str(tmp_path / "missing.pkl"), VOCAB)


def cross_entropy(logits, targets) -> float:
    return float(-np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                                             np.asarray(targets)[..., None], -1)))


def test_loss_is_next_plus_weighted_after_next_by_hand_and_logs_the_next_alone():
    """On a text where the next and the after-next characters differ (x -> x+1 -> x+2), the
    objective equals CE(next) + w CE(after next) computed here from the model's features and
    the head's own params; the logged loss is CE(next); evaluation params drop the head."""
    hp, V = TINY._replace(dropout=0.0), 7
    loss = objectives.build_loss(hp, V, objectives.Weights(ahead_loss=0.5))
    tokens = jnp.asarray(np.arange(2 * (hp.max_seq_len + 1)).reshape(2, -1) % V, jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    params = loss.init(jax.random.PRNGKey(0), inputs, targets, None, False)
    assert set(params) - set(objectives.model_params(params)) == {objectives.AFTER_NEXT}
    objective, next_loss = loss.apply(params, None, inputs, targets, None, False)
    features = hk.transform(lambda t: transformer.Transformer(hp, V).features(t, False)[0])
    x = features.apply(params, None, inputs)                                   # [B, T, D]
    head = params[objectives.AFTER_NEXT]
    after = x @ head["w"] + head["b"]
    logits = transformer.build(hp, V).apply(objectives.model_params(params), None, inputs,
                                            False)
    np.testing.assert_allclose(next_loss, cross_entropy(logits, targets), rtol=1e-5)
    after_next = cross_entropy(after[:, :-1], targets[:, 1:])
    np.testing.assert_allclose(objective, cross_entropy(logits, targets) + 0.5 * after_next,
                               rtol=1e-5)
    assert abs(after_next - cross_entropy(after, targets)) > 0.01  # the targets differ


def test_training_moves_the_after_next_head_toward_the_character_after_next():
    """Steps on x -> x+1 -> x+2: the second head learns to predict x+2 (its loss on the
    after-next characters falls far below its loss on the next ones)."""
    hp, V = TINY._replace(dropout=0.0), 7
    loss = objectives.build_loss(hp, V, objectives.Weights(ahead_loss=1.0))
    train_ids = jnp.asarray(np.arange(400) % V, jnp.int32)
    optimizer = optax.adam(1e-2)
    params = loss.init(jax.random.PRNGKey(0), train_ids[None, :hp.max_seq_len],
                       train_ids[None, :hp.max_seq_len], None, False)
    state = train_step.TrainState(params, optimizer.init(params), jax.random.PRNGKey(1),
                                  jnp.int32(0))
    step = train_step.make_train_step(loss, optimizer, 8, hp.max_seq_len)
    for _ in range(60):
        state, _ = step(state, train_ids)
    features = hk.transform(lambda t: transformer.Transformer(hp, V).features(t, False)[0])
    inputs = train_ids[None, :hp.max_seq_len]
    head = state.params[objectives.AFTER_NEXT]
    after = features.apply(state.params, None, inputs) @ head["w"] + head["b"]
    to_after_next = cross_entropy(after[:, :-1], train_ids[None, 2:hp.max_seq_len + 1])
    to_next = cross_entropy(after, train_ids[None, 1:hp.max_seq_len + 1])
    assert to_after_next < 0.2 < 2.0 < to_next


def test_distillation_loss_is_the_cross_entropy_against_the_soft_targets_by_hand():
    """distill_weight w: (1 - w) CE(next) + w CE(teachers' distribution), on targets that
    differ from the teachers'."""
    hp, V = TINY._replace(dropout=0.0), 7
    loss = objectives.build_loss(hp, V, objectives.Weights(distill_weight=0.25))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, hp.max_seq_len + 1)),
                         jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    soft = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (*inputs.shape, V)))
    params = loss.init(jax.random.PRNGKey(0), inputs, targets, None, False)
    objective, next_loss = loss.apply(params, None, inputs, targets, soft, False)
    logits = transformer.build(hp, V).apply(params, None, inputs, False)
    soft_ce = float(-np.mean(np.sum(np.asarray(soft) * np.asarray(jax.nn.log_softmax(logits)),
                                    -1)))
    hard = cross_entropy(logits, targets)
    np.testing.assert_allclose(next_loss, hard, rtol=1e-5)
    np.testing.assert_allclose(objective, 0.75 * hard + 0.25 * soft_ce, rtol=1e-5)
    assert abs(soft_ce - hard) > 0.01
