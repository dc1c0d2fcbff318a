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


def next_probs(ckpt: checkpoint.Checkpoint, ids: np.ndarray) -> np.ndarray:
    """[len(ids) - 1, V]: the distribution of each next character as the sampler reads it."""
    logits = reader.next_logits(ckpt.hparams, len(ckpt.vocab), ckpt.params, ids[:-1])
    return np.asarray(jax.nn.softmax(logits))


def batch_probs(hp, params, ids, starts, seq_len) -> np.ndarray:
    read = jax.jit(reader.make_window_logits(hp, len(VOCAB), seq_len))
    return np.asarray(jax.nn.softmax(read(params, jnp.asarray(ids), jnp.asarray(starts))))


def test_streaming_teacher_reads_each_batch_as_the_whole_text():
    """A streaming teacher's distributions for a training batch, computed from the batch's
    starts in the step, equal the rows of one reading of the whole text (the sampler's, as
    the dense array of every position held them before), near the start and far from it."""
    teacher = random_teacher(STREAMING, 0)
    ids = np.random.default_rng(0).integers(0, len(VOCAB), 100).astype(np.uint8)
    T, starts = 12, np.array([0, 3, 40, 87])
    probs = batch_probs(STREAMING, teacher.params, ids, starts, T)
    assert probs.shape == (len(starts), T, len(VOCAB))
    whole = next_probs(teacher, ids)                                   # [99, V]
    np.testing.assert_allclose(probs, whole[starts[:, None] + np.arange(T)], atol=1e-5)
    one_pass = softmax(transformer.build(STREAMING, len(VOCAB)), teacher.params, ids[:-1])
    np.testing.assert_allclose(whole, one_pass, atol=1e-5)


def test_windowed_teacher_reads_each_window_alone():
    """A model with learned positions predicts a window's characters from the window alone,
    at positions 0.., as it was trained."""
    teacher = random_teacher(TINY, 0)
    ids = np.random.default_rng(1).integers(0, len(VOCAB), 40).astype(np.uint8)
    T, starts = TINY.max_seq_len, np.array([0, 5, 23])
    probs = batch_probs(TINY, teacher.params, ids, starts, T)
    model = transformer.build(TINY, len(VOCAB))
    for row, s in zip(probs, starts):
        np.testing.assert_allclose(row, softmax(model, teacher.params, ids[s: s + T]),
                                   atol=1e-5)


@pytest.mark.parametrize("table_bytes", [objectives.TABLE_BYTES, 0])
def test_targets_average_the_teachers_from_a_table_or_in_the_step(tmp_path, monkeypatch,
                                                                   table_bytes):
    """Streaming teachers' predictions, read once into a table where it fits (else in the
    step, per batch): the same averaged distributions either way."""
    monkeypatch.setattr(objectives, "TABLE_BYTES", table_bytes)
    ids = np.random.default_rng(2).integers(0, len(VOCAB), 50).astype(np.uint8)
    teachers = [random_teacher(STREAMING, seed) for seed in (0, 1)]
    paths = []
    for i, t in enumerate(teachers):
        paths.append(str(tmp_path / f"t{i}.pkl"))
        checkpoint.save(paths[-1], params=t.params, hparams=t.hparams, vocab=t.vocab, meta={})
    made = objectives.make_teachers(",".join(paths), VOCAB, 10, ids)
    is_table = [isinstance(p, np.ndarray) and p.shape == (49, len(VOCAB)) for p in made.params]
    assert is_table == [table_bytes > 0] * 2
    starts = jnp.array([0, 7, 39])
    targets = np.asarray(jax.jit(made.targets)(made.params, jnp.asarray(ids), starts))
    each = [batch_probs(STREAMING, t.params, ids, starts, 10) for t in teachers]
    assert np.abs(each[0] - each[1]).max() > 0.01  # different teachers
    np.testing.assert_allclose(targets, (each[0] + each[1]) / 2, atol=1e-5)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(UserError, match="another text"):
        objectives.make_teachers(paths[0], VOCAB[:-1] + "z", 10, ids)
    windowed = str(tmp_path / "windowed.pkl")
    checkpoint.save(windowed, params=random_teacher(TINY, 0).params, hparams=TINY,
                    vocab=VOCAB, meta={})
    with pytest.raises(UserError, match="fewer than the student's windows"):
        objectives.make_teachers(windowed, VOCAB, TINY.max_seq_len + 1, ids)


def one_step(teacher, distill_weight):
    """Params and metrics after one SGD step (learning rate 1) of the tiny model, with
    soft targets `teacher(train_ids, starts)` -> [B, T, V] (or none)."""
    T = TINY.max_seq_len
    model = transformer.build(TINY, len(VOCAB))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32), False)
    train_ids = jnp.asarray(np.random.default_rng(3).integers(0, len(VOCAB), 200), jnp.uint8)
    loss = objectives.build_loss(TINY, len(VOCAB), objectives.Weights(0.0, distill_weight))
    soft_targets = None if teacher is None else (lambda _, ids, starts: teacher(ids, starts))
    step = train_step.make_train_step(loss, optax.sgd(1.0), 4, T, soft_targets=soft_targets)
    state = train_step.TrainState(params, optax.sgd(1.0).init(params), jax.random.PRNGKey(1),
                                  jnp.int32(0))
    return step(state, train_ids, None if teacher is None else ())


def test_student_step_takes_distill_weight_of_its_loss_from_the_teachers():
    """Against one-hot teachers (the targets themselves), any weight gives the plain step;
    against uniform ones, weight 1 gives another step; the logged loss is the plain one."""
    T, V = TINY.max_seq_len, len(VOCAB)
    plain, plain_metrics = one_step(None, 0.5)
    for weight in (0.5, 1.0):
        same, metrics = one_step(
            lambda ids, starts: jax.nn.one_hot(ids[starts[:, None] + 1 + jnp.arange(T)], V),
            weight)
        for x, y in zip(jax.tree.leaves(same.params), jax.tree.leaves(plain.params)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    other, metrics = one_step(lambda ids, starts: jnp.full((len(starts), T, V), 1 / V), 1.0)
    np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    assert max(float(jnp.abs(x - y).max()) for x, y in zip(
        jax.tree.leaves(other.params), jax.tree.leaves(plain.params))) > 1e-3


def test_student_learns_towards_its_teacher(tiny_run, tmp_path):
    """A tiny run distilled from the tiny run's params (distill_weight 1) ends nearer to that
    teacher's predictions on the validation split than the same run on the text alone."""
    teacher = checkpoint.load(tiny_run["best"])
    _, val_ids = data.split(data.encode(data.read_text(CORPUS), teacher.vocab))
    target = next_probs(teacher, val_ids[:2000])

    def divergence_after(**changes):
        config = tiny_config(tmp_path / str(len(changes)), max_iters=40, **changes)
        meta = train.train(config, TINY)
        student = checkpoint.load(train.params_paths(config.params_dir, meta["run_hash"])[0])
        probs = next_probs(student, val_ids[:2000])
        return float(np.mean(np.sum(target * (np.log(target) - np.log(probs)), -1)))

    assert divergence_after(teachers=tiny_run["best"], distill_weight=1.0) < (
        0.8 * divergence_after())


def test_bad_teachers_are_refused(tmp_path, tiny_run):
    """A distill_weight past 1, a missing file, a teacher of another text, and one that
    reads fewer characters than the student's windows: each a UserError saying which."""
    with pytest.raises(UserError, match="distill_weight"):
        train.check_config(train.CONFIG._replace(distill_weight=1.5))
    with pytest.raises(UserError, match="missing.pkl"):
        objectives.load_teachers(str(tmp_path / "missing.pkl"), VOCAB)
    with pytest.raises(UserError, match="was trained on another text"):
        objectives.load_teachers(f"{tiny_run['best']},{tiny_run['best']}", VOCAB)
    teacher = checkpoint.load(tiny_run["best"])  # 16 positions, learned
    ids = np.zeros(1000, np.int32)
    with pytest.raises(UserError, match="reads 16 characters, fewer than the student's "
                                        "windows of 32"):
        objectives.make_teachers(tiny_run["best"], teacher.vocab, 32, ids)


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
    features = hk.transform(lambda t: transformer.forward_fn(
        hp, V, output=lambda features, head: features)(t, False))
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
    features = hk.transform(lambda t: transformer.forward_fn(
        hp, V, output=lambda features, head: features)(t, False))
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
