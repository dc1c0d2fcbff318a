"""train.py: the loop learns, writes both params files, resumes exactly, stops cleanly."""

import math
import os
import signal
import subprocess
import sys
import zlib

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import checkpoint
import common
import data
import encoding
import eval as evaluation
import kernels
import train
import objectives
import optimizer as optimizer_module
import train_step
import transformer
import metrics
import reader
import recipes
import run as run_module
import sampling
from conftest import (CORPUS, ROOT, SHAKESPEARE, TINY, make_optimizer, original_config,
                      run_command, tiny_config, tiny_loss, within)


def test_loss_falls_well_below_character_frequencies(tiny_run):
    """100 steps of the tiny model learn more than how often each character occurs: both
    losses end 0.2 nats/char or more below the unigram entropy of the training text (3.02),
    the best that a model of character frequencies alone can do."""
    history = tiny_run["meta"]["history"]
    assert history["step"] == [50, 100]
    ids = data.encode(data.read_text(CORPUS), checkpoint.load(tiny_run["best"]).vocab)
    counts = np.bincount(data.split(ids)[0])
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    assert 2.9 < unigram_entropy < 3.1
    assert history["val_loss"][-1] < history["val_loss"][0] < math.log(88)
    assert history["val_loss"][-1] < unigram_entropy - 0.2
    assert history["train_loss"][-1] < unigram_entropy - 0.2


def test_history_records_wall_clock_seconds_since_the_run_started(tiny_run):
    history = tiny_run["meta"]["history"]
    assert len(history["wall_s"]) == len(history["step"])
    assert 0 < history["wall_s"][0] < history["wall_s"][1] < tiny_run["meta"]["wall_s"]


def test_both_params_files_hold_their_steps(tiny_run):
    history = tiny_run["meta"]["history"]

    latest = checkpoint.load(tiny_run["latest"])
    best = checkpoint.load(tiny_run["best"])
    assert latest.meta["step"] == 100
    best_step = history["step"][int(np.argmin(history["val_loss"]))]
    assert best.meta["step"] == best.meta["min_val_step"] == best_step
    assert best.meta["min_val_loss"] == pytest.approx(min(history["val_loss"]))
    assert os.path.exists(run_module.plot_path(os.path.dirname(tiny_run["latest"]),
                                          latest.meta["run_hash"]))


def val_loss_of(ckpt: checkpoint.Checkpoint, eval_chars: int | None = None) -> float:
    """The validation loss of the params file: of the whole split, or of the sample of
    eval_chars characters that a run's evaluation reads."""
    ids = evaluation.data.encode(evaluation.data.read_text(CORPUS), ckpt.vocab)
    _, val = metrics.split_windows(ids, min(metrics.EVAL_SEQ_LEN, TINY.max_seq_len),
                                   eval_chars)
    window_loss = metrics.make_window_loss(transformer.build(ckpt.hparams, len(ckpt.vocab)))
    return metrics.mean_loss(window_loss, ckpt.params, data.batch_windows(val, 512))


def test_min_val_file_reproduces_its_validation_loss(tiny_run):
    best = checkpoint.load(tiny_run["best"])
    assert val_loss_of(best) == pytest.approx(best.meta["min_val_loss"], rel=1e-5)


def test_ema_evaluates_the_debiased_average_of_the_iterates(tmp_path):
    """With ema_decay d, the params evaluated after n steps are the iterates p_1..p_n
    averaged with weights (1 - d) d^(n - i), divided by 1 - d^n so that they sum to 1."""
    config = tiny_config(tmp_path, ema_decay=0.8)
    text = data.read_text(CORPUS)
    vocab = data.build_vocab(text)
    train_ids = jax.numpy.asarray(data.split(data.encode(text, vocab))[0])
    loss = hk.transform(tiny_loss(vocab_size=len(vocab)))
    optimizer = make_optimizer(config)
    state = train_step.init_state(config.prng_seed, loss, optimizer, TINY.max_seq_len)
    step = train_step.make_train_step(loss, optimizer, config.batch_size, TINY.max_seq_len)
    iterates = []
    for _ in range(5):
        state, _ = step(state, train_ids)
        iterates.append(jax.tree.map(np.array, state.params))  # copies: the step donates
    d, n = config.ema_decay, len(iterates)
    expected = jax.tree.map(
        lambda *ps: sum((1 - d) * d ** (n - i) * p for i, p in enumerate(ps, 1)) / (1 - d ** n),
        *iterates)
    averaged = optimizer_module.evaluated_params(config, state.params, state.opt_state)
    for x, y in zip(jax.tree.leaves(averaged), jax.tree.leaves(expected)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(x, y) for x, y in zip(jax.tree.leaves(averaged),
                                                     jax.tree.leaves(iterates[-1])))
    without = optimizer_module.evaluated_params(config._replace(ema_decay=0.0), state.params,
                                                state.opt_state)
    assert without is state.params


@pytest.mark.parametrize("minutes", [0.0, 2.0])
def test_ema_evaluates_the_params_themselves_before_the_first_step(tmp_path, minutes):
    """A timed run evaluates at step 0, before there is an average: it scores the initial
    params (debiasing an empty average divides 0 by 0)."""
    config = tiny_config(tmp_path, ema_decay=0.995, minutes=minutes)
    loss = hk.transform(tiny_loss(vocab_size=10))
    state = train_step.init_state(0, loss, make_optimizer(config), TINY.max_seq_len)
    evaluated = optimizer_module.evaluated_params(config, state.params, state.opt_state)
    for x, y in zip(jax.tree.leaves(evaluated), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(x, y)


def test_ema_run_keeps_the_average_as_its_best_and_resumes_it(tmp_path):
    """A run with ema_decay evaluates the average: its min-validation file holds it (and
    scores its recorded loss), its latest file the iterate, and resuming continues both."""
    config = tiny_config(tmp_path, max_iters=20, eval_interval=10, ema_decay=0.9)
    whole = train.train(config, TINY)
    latest, best = (checkpoint.load(path)
                    for path in train.params_paths(config.params_dir, whole["run_hash"]))
    assert best.meta["min_val_step"] == 20 == latest.meta["step"]
    assert val_loss_of(best, config.eval_chars) == pytest.approx(best.meta["min_val_loss"],
                                                                 rel=1e-5)
    assert val_loss_of(latest, config.eval_chars) != pytest.approx(best.meta["min_val_loss"],
                                                                   rel=1e-3)
    first = train.train(config, TINY, stop_at=10)
    resumed = train.train(config._replace(resume=train.params_paths(
        config.params_dir, first["run_hash"])[0]), transformer.HPARAMS)
    np.testing.assert_allclose(resumed["history"]["val_loss"], whole["history"]["val_loss"],
                               rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_equals_uninterrupted_training(tmp_path, optimizer):
    """Also the evaluation's sample of a split longer than eval_chars: the same windows."""
    config = tiny_config(tmp_path, max_iters=20, eval_interval=10, optimizer=optimizer,
                         eval_chars=40 * TINY.max_seq_len)
    whole = train.train(config, TINY)
    first = train.train(config, TINY, stop_at=10)
    latest, _ = train.params_paths(config.params_dir, first["run_hash"])
    assert checkpoint.load(latest).meta["step"] == 10
    resumed = train.train(config._replace(resume=latest), transformer.HPARAMS)
    assert resumed["run_hash"] == first["run_hash"]
    np.testing.assert_allclose(resumed["history"]["val_loss"], whole["history"]["val_loss"],
                               rtol=1e-5)
    a = checkpoint.load(train.params_paths(config.params_dir, whole["run_hash"])[0])
    b = checkpoint.load(latest)
    assert b.meta["step"] == 20
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state)):
        np.testing.assert_allclose(np.float32(x), np.float32(y), rtol=1e-5, atol=1e-6)


def test_overrides_are_typed_and_checked():
    config, hparams = common.parse_overrides(
        ["--max_iters=7", "--learning_rate=1e-3", "--aim=False", "--d_model=64",
         "--resume=x.pkl"], train.CONFIG, transformer.HPARAMS)
    assert (config.max_iters, config.learning_rate, config.aim) == (7, 1e-3, False)
    assert (hparams.d_model, config.resume) == (64, "x.pkl")
    assert config.batch_size == train.CONFIG.batch_size
    with pytest.raises(common.UserError, match="unknown option --bogus.*batch_size.*d_model"):
        common.parse_overrides(["--bogus=1"], train.CONFIG, transformer.HPARAMS)
    with pytest.raises(common.UserError, match="--max_iters=ten: expected int"):
        common.parse_overrides(["--max_iters=ten"], train.CONFIG)
    with pytest.raises(common.UserError, match="expected a bool"):
        common.parse_overrides(["--aim=maybe"], train.CONFIG)
    with pytest.raises(common.UserError, match="expected --name=value"):
        common.parse_overrides(["--max_iters"], train.CONFIG)


def test_gpu_recipe_lowers_for_cuda():
    """The GPU recipe cannot be timed here, but its training step (bfloat16, as auto picks on
    a GPU) and its sampler's jitted calls must lower for CUDA: jax.export needs no GPU."""
    recipe = recipes.PRESETS["gpu"]
    config = train.CONFIG._replace(**recipe.config, compute_dtype="bfloat16")
    hp = transformer.HParams(**recipe.hparams)
    V = 65
    loss_fn = tiny_loss(hp, V, config.ahead_loss, "bfloat16")
    loss = hk.transform(loss_fn)
    optimizer = make_optimizer(config, loss_fn)
    step = train_step.make_train_step(loss, optimizer, config.batch_size, hp.max_seq_len,
                                      shuffle_key=jax.random.PRNGKey(1))

    def initial_state():
        return train_step.init_state(0, loss, optimizer, hp.max_seq_len)

    state = jax.eval_shape(initial_state)
    ids = jax.ShapeDtypeStruct((1_000_000,), jnp.int32)
    exported = jax.export.export(step, platforms=["cuda"])(state, ids)
    assert exported.platforms == ("cuda",)
    assert "bf16" in exported.mlir_module()  # the matmuls run in bfloat16

    sampler = sampling.Sampler(hp, V)
    params = jax.eval_shape(lambda p: kernels.add_transposed_weights(p), state.params)
    cache = jax.eval_shape(lambda: reader.empty_cache(hp, 1))
    tokens = jax.ShapeDtypeStruct((1, sampler.reader.prefill_chunk), jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    jax.export.export(sampler.reader.read_chunk, platforms=["cuda"])(params, tokens, cache, scalar,
                                                              scalar)
    sampler_state = reader.ReadState(
        jax.ShapeDtypeStruct((1, 1), jnp.int32), scalar, cache,
        jax.ShapeDtypeStruct((1, V), jnp.float32))
    noise = jax.ShapeDtypeStruct((sampler.chunk, 1, V), jnp.float32)
    exported = jax.export.export(sampler.sample_chunk, platforms=["cuda"])(
        params, sampler_state, noise, cached=True)
    assert exported.platforms == ("cuda",)


def test_resume_keeps_the_saved_config_under_new_arguments(tiny_run):
    config, hparams, said = recipes.resolve([f"--resume={tiny_run['latest']}", "--max_iters=60"],
                                            train.CONFIG, transformer.HPARAMS)
    assert said.startswith("preset: the resumed run's")
    saved = tiny_run["meta"]["config"]
    assert config.optimizer == saved["optimizer"] != train.CONFIG.optimizer
    assert config.batch_size == saved["batch_size"] != train.CONFIG.batch_size
    assert (config.max_iters, config.resume) == (60, tiny_run["latest"])
    assert hparams == TINY


@pytest.mark.parametrize("args, message", [
    (["--bogus=1"], "unknown option --bogus"),
    (["--batch_size=0"], "--batch_size=0: must be >= 1"),
    (["--d_model=30", "--h=4"], "d_model=30 must be divisible by h=4"),
    (["--resume=/nonexistent.pkl"], "cannot read params file"),
    (["--preset=tpu"], "--preset=tpu: unknown preset. Valid presets: none, original, cpu"),
    (["--compute_dtype=float16"], "--compute_dtype='float16': one of auto, bfloat16, float32"),
    (["--optimizer=sgd"], "--optimizer='sgd': one of adamw, muon"),
    (["--schedule=step"], "--schedule='step': one of cosine, wsd"),
    (["--batches=epochs"], "--batches='epochs': one of random, shuffled"),
    (["--decay_fraction=0"], "--decay_fraction=0.0: must be in (0, 1]"),
    (["--ema_decay=1"], "--ema_decay=1.0: must be in [0, 1)"),
    (["--weight_decay_final=-0.5"], "--weight_decay_final=-0.5: must be >= 0"),
    (["--eval_chars=0"], "--eval_chars=0: must be >= 1"),
    (["--muon_ns_steps=0"], "--muon_ns_steps=0: must be >= 1"),
    (["--min_char_count=0"], "--min_char_count=0: must be >= 1"),
])
def test_bad_command_lines_exit_2_without_traceback(args, message, capsys):
    """In this process (conftest.run_command); as commands: test_multidevice.py's."""
    status, _, err = run_command(capsys, "train.py", *args, f"--source_file={CORPUS}",
                                 "--aim=False")
    assert status == 2 and message in err, err


def _read_aim_metrics(repo: str, run_hash: str) -> dict:
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "aim"), "storage", "--repo",
                    repo, "reindex", "-y"], check=True, capture_output=True, timeout=120)
    import aim

    run = aim.Repo.from_path(repo).get_run(run_hash)
    found = {}
    for metric in run.metrics():
        steps, values = metric.values.sparse_numpy()
        found[(metric.name, tuple(sorted(metric.context.to_dict().items())))] = [
            v for _, v in sorted(zip(steps, values))]
    return found, run


def test_aim_run_holds_the_metrics(tmp_path):
    config = tiny_config(tmp_path, max_iters=20, eval_interval=10, aim=True, sample_chars=20)
    meta = train.train(config, TINY)
    metrics, run = _read_aim_metrics(str(tmp_path), meta["run_hash"])
    np.testing.assert_allclose(metrics[("loss", (("subset", "val"),))],
                               meta["history"]["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics[("loss", (("subset", "train"),))],
                               meta["history"]["train_loss"], rtol=1e-6)
    for subset in ("train", "val"):
        np.testing.assert_allclose(metrics[("bpc", (("subset", subset),))],
                                   np.array(meta["history"][f"{subset}_loss"]) / math.log(2),
                                   rtol=1e-6)
    for name in ("learning_rate", "grad_norm", "tokens_per_s", "batch_loss"):
        assert len(metrics[(name, ())]) == 4  # every log_interval=5 steps
    assert run["hparams"]["d_model"] == TINY.d_model
    assert run["config"]["max_iters"] == 20

    # A text sample per evaluation: the sampler's text from a newline, seeded by the step.
    from aim.storage.context import Context
    steps, (texts, *_) = run.get_text_sequence("sample", Context({})).data.items_list()
    assert steps == [10, 20]
    latest = checkpoint.load(train.params_paths(config.params_dir, meta["run_hash"])[0])
    ids = sampling.Sampler(TINY, len(latest.vocab)).sample(
        latest.params, data.encode("\n", latest.vocab), jax.random.PRNGKey(20), 20)
    assert texts[-1].data == data.decode(ids[0], latest.vocab)
    assert len(texts[0].data) == 20 and texts[0].data != texts[-1].data


def test_unusable_aim_repo_warns_once_and_still_trains(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = tiny_config(tmp_path, max_iters=10, eval_interval=10, aim=True,
                         aim_repo=str(blocker / "repo"))
    meta = train.train(config, TINY)
    assert meta["step"] == 10 and len(meta["history"]["val_loss"]) == 1
    assert capsys.readouterr().err.count("warning: Aim tracking is off") == 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_and_exits_0(tmp_path, signum):
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's stop) at the command line: the latest params
    file is saved, the way to resume is printed, and the exit status is 0."""
    args = [sys.executable, "train.py", f"--source_file={CORPUS}", "--aim=False",
            f"--params_dir={tmp_path}", "--max_iters=100000", "--eval_interval=5",
            "--eval_batch_size=512", "--eval_chars=8192", "--batch_size=4", "--sample_chars=0",
            *(f"--{k}={v}" for k, v in TINY._asdict().items())]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        first_line = within(120, process.stdout.readline)  # the first evaluation's line
        assert first_line.startswith("step 5 | train "), first_line
        process.send_signal(signum)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert f"{signal.Signals(signum).name}: stopped at step" in err and "--resume=" in err
    assert f"compute dtype: {kernels.choose_compute_dtype('auto')[0]} (auto: " in err
    (latest,) = [p for p in os.listdir(tmp_path) if p.endswith(".pkl")
                 and not p.endswith("min_val.pkl")]
    assert checkpoint.load(os.path.join(tmp_path, latest)).meta["step"] >= 5


def _signal_after(monkeypatch, signum, at_step: int) -> None:
    """train.train's steps send this process `signum` once step `at_step` is done, as a
    Ctrl-C between two evaluations would."""
    real_make_train_step = train.make_train_step

    def make_train_step(*args):
        step_fn = real_make_train_step(*args)

        def step(state, *arrays):
            state, metrics = step_fn(state, *arrays)
            if int(state.step) == at_step:
                os.kill(os.getpid(), signum)
            return state, metrics
        return step

    monkeypatch.setattr(train, "make_train_step", make_train_step)


@pytest.mark.parametrize("signum, batches", [(signal.SIGINT, "random"),
                                             (signal.SIGTERM, "random"),
                                             (signal.SIGINT, "shuffled")])
def test_signal_mid_interval_then_resume_equals_uninterrupted_bit_for_bit(
        tmp_path, monkeypatch, signum, batches):
    """Stopped by a signal at step 13 (between the evaluations at 10 and 20), then resumed:
    the same params, optimizer state and evaluations as a run that never stopped. Exactly:
    the file holds the float32 state as it was, and the same compiled step continues it.
    With shuffled passes the resumed run goes on with the same pass (in its order)."""
    config = tiny_config(tmp_path, max_iters=20, eval_interval=10, batches=batches)
    whole = train.train(config, TINY)
    with monkeypatch.context() as patch:
        _signal_after(patch, signum, 13)
        stopped = train.train(config, TINY)
    assert stopped["step"] == 13 and stopped["history"]["step"] == [10]
    latest, _ = train.params_paths(config.params_dir, stopped["run_hash"])
    assert checkpoint.load(latest).meta["step"] == 13
    resumed = train.train(config._replace(resume=latest), transformer.HPARAMS)
    for name in ("step", "train_loss", "val_loss"):
        assert resumed["history"][name] == whole["history"][name]
    # The clock goes on from the stopped run's: its evaluation keeps its time, step 20's
    # comes after the time at the stop.
    assert resumed["history"]["wall_s"][0] == stopped["history"]["wall_s"][0]
    assert resumed["history"]["wall_s"][1] > stopped["wall_s"] > stopped["history"]["wall_s"][0]
    a = checkpoint.load(train.params_paths(config.params_dir, whole["run_hash"])[0])
    b = checkpoint.load(latest)
    assert b.meta["step"] == 20
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state, a.rng)),
                    jax.tree.leaves((b.params, b.opt_state, b.rng))):
        np.testing.assert_array_equal(x, y)


def test_resume_refusals_exit_2_with_their_message(tiny_run, tmp_path, capsys):
    """--resume refuses model overrides (the HPARAMS come from the file), a best file (its
    params are not the training state: it names the latest file instead), and a file without
    optimizer state (the shipped one, renamed), each with exit 2 and its message. The best
    file holds no optimizer state or rng at all."""
    best = checkpoint.load(tiny_run["best"])
    assert best.opt_state is None and best.rng is None
    renamed = tmp_path / "shipped.pkl"
    renamed.write_bytes(open(checkpoint.DEFAULT_PARAMS, "rb").read())
    cases = [
        ([f"--resume={tiny_run['latest']}", "--d_model=64"],
         "the model's HPARAMS come from the params file"),
        ([f"--resume={tiny_run['best']}"],
         f"not its training state. Resume from the run's latest file: "
         f"--resume={tiny_run['latest']}"),
        ([f"--resume={renamed}"], "the file has no optimizer state"),
    ]
    for args, message in cases:
        status, _, err = run_command(capsys, "train.py", *args, f"--source_file={CORPUS}",
                                     "--aim=False")
        assert status == 2 and message in err, (args, err)


def test_resume_where_auto_chooses_another_dtype_takes_this_optimizers_dtypes(
        tmp_path, monkeypatch):
    """A Muon run saved where "auto" meant float32 resumes where it means bfloat16 (and back)
    with its optimizer state in this machine's optimizer dtypes (Muon's moments follow the
    compute dtype), not in the file's."""
    for saved, here in (("float32", "bfloat16"), ("bfloat16", "float32")):
        monkeypatch.setattr(kernels, "choose_compute_dtype", lambda r, *_: (saved, "test"))
        config = tiny_config(tmp_path / saved, max_iters=20, eval_interval=10,
                             optimizer="muon")
        first = train.train(config, TINY, stop_at=10)
        config = config._replace(resume=train.params_paths(config.params_dir,
                                                           first["run_hash"])[0])
        monkeypatch.setattr(kernels, "choose_compute_dtype", lambda r, *_: (here, "test"))
        optimizer = make_optimizer(config)
        state = train.resumed_state(config, checkpoint.load(config.resume), optimizer)
        fresh = jax.eval_shape(optimizer.init, state.params)
        dtypes = [x.dtype for x in jax.tree.leaves(state.opt_state)]
        assert dtypes == [x.dtype for x in jax.tree.leaves(fresh)]
        assert (jax.numpy.bfloat16 in dtypes) == (here == "bfloat16")


def test_resume_refuses_a_changed_optimizer(tiny_run, monkeypatch):
    """An optimizer whose state differs from the file's (here: one more Adam moment pair) is
    refused rather than fed the wrong arrays."""
    real_make_optimizer = train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda config, hidden: optax.chain(
        real_make_optimizer(config, hidden), optax.scale_by_adam()))
    config, _, _ = recipes.resolve([f"--resume={tiny_run['latest']}"], train.CONFIG,
                                   transformer.HPARAMS)
    with pytest.raises(common.UserError, match="optimizer state does not match"):
        train.train(config, transformer.HPARAMS)


def test_nan_loss_exits_1_through_the_command_line(tmp_path, capsys):
    """A learning rate of 1e30 blows the loss up to nan within five steps: exit 1, a clear
    error, no traceback (conftest.run_command)."""
    status, _, err = run_command(
        capsys, "train.py", f"--source_file={CORPUS}", "--aim=False",
        f"--params_dir={tmp_path}", "--max_iters=40", "--eval_interval=20", "--batch_size=4",
        "--eval_batch_size=512", "--sample_chars=0", "--learning_rate=1e30", "--grad_clip=0",
        "--warmup_iters=0", "--log_interval=5", *(f"--{k}={v}" for k, v in TINY._asdict().items()))
    assert status == 1, err
    assert "error: the training loss is nan at step 5: training stopped" in err


def test_non_finite_loss_stops_with_clear_error_and_keeps_files(tmp_path, monkeypatch):
    real_make_train_step = train.make_train_step

    def poisoned_make_train_step(*args):
        step_fn = real_make_train_step(*args)

        def step(state, *arrays):
            state, metrics = step_fn(state, *arrays)
            if int(state.step) > 12:
                metrics = dict(metrics, loss=metrics["loss"] * np.nan)
            return state, metrics
        return step

    monkeypatch.setattr(train, "make_train_step", poisoned_make_train_step)
    config = tiny_config(tmp_path, max_iters=40, eval_interval=10)
    with pytest.raises(train.NonFiniteLoss, match="loss is nan at step 15"):
        train.train(config, TINY)
    (latest,) = [p for p in os.listdir(config.params_dir)
                 if p.endswith(".pkl") and not p.endswith("min_val.pkl")]
    assert checkpoint.load(os.path.join(config.params_dir, latest)).meta["step"] == 10


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_train_step_compiles_once(tmp_path, optimizer):
    """Static shapes (and dtypes): after its first call the jitted step never traces or
    compiles again (counted with jax.monitoring's compile events, whatever the persistent
    cache holds)."""
    config = tiny_config(tmp_path, optimizer=optimizer)
    text = evaluation.data.read_text(CORPUS)
    vocab = evaluation.data.build_vocab(text)
    loss = hk.transform(tiny_loss(vocab_size=len(vocab)))
    optimizer = make_optimizer(config)
    state = train_step.init_state(config.prng_seed, loss, optimizer, TINY.max_seq_len)
    step = train_step.make_train_step(loss, optimizer, config.batch_size, TINY.max_seq_len)
    ids = jax.numpy.asarray(evaluation.data.encode(text[:5000], vocab))
    state, _ = step(state, ids)
    events = []
    listener = lambda event, duration, **kwargs: events.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(3):
            state, metrics = step(state, ids)
        assert int(state.step) == 4 and math.isfinite(float(metrics["loss"]))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not [e for e in events if e.startswith("/jax/core/compile/")], events


# ---------------------------------------------------------------------------------------------
# The optimizer: schedule, weight-decay mask, gradient clipping (train.make_schedule and
# train.make_optimizer, with the expected values computed here).


def test_schedule_warms_up_linearly_then_cosine_decays_to_its_floor():
    config = original_config()._replace(learning_rate=2e-3, warmup_iters=50, max_iters=450,
                                   min_lr_ratio=0.1)
    schedule = optimizer_module.make_schedule(config)
    peak, floor = 2e-3, 2e-4
    assert float(schedule(0)) == 0.0
    assert float(schedule(25)) == pytest.approx(peak / 2, rel=1e-6)
    assert float(schedule(50)) == pytest.approx(peak, rel=1e-6)
    for step in (100, 250, 400):
        progress = (step - 50) / (450 - 50)
        expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
    assert float(schedule(450)) == pytest.approx(floor, rel=1e-5)
    assert float(schedule(10_000)) == pytest.approx(floor, rel=1e-5)  # past max_iters


def _tiny_loss(ahead_loss=0.0):
    return tiny_loss(TINY._replace(use_encoder=True), 10, ahead_loss)


def _tiny_params(ahead_loss=0.0):
    dummy = jax.numpy.zeros((1, 4), "int32")
    return jax.jit(hk.transform(_tiny_loss(ahead_loss)).init, static_argnums=4)(
        jax.random.PRNGKey(0), dummy, dummy, None, False)


def test_weight_decay_shrinks_matrices_and_embeddings_only():
    """With zero gradients an AdamW step is pure decay: p -> p * (1 - lr * weight_decay) for
    weight matrices and embedding tables; biases and LayerNorm gains and offsets stay."""
    config = original_config()._replace(learning_rate=1e-2, warmup_iters=0, weight_decay=0.5)
    params = _tiny_params()
    optimizer = make_optimizer(config, _tiny_loss())
    zeros = jax.tree.map(jax.numpy.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    decayed, kept = set(), set()
    for module, leaves in params.items():
        for name, value in leaves.items():
            if name in ("w", "embeddings", "position_embed"):
                np.testing.assert_allclose(new[module][name], value * (1 - 1e-2 * 0.5),
                                           rtol=1e-6)
                decayed.add(name)
            else:
                assert name in ("b", "scale", "offset"), name
                np.testing.assert_array_equal(new[module][name], value)
                kept.add(name)
    assert decayed == {"w", "embeddings", "position_embed"}
    assert kept == {"b", "scale", "offset"}


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_weight_decay_final_moves_the_decay_linearly_over_the_run(name):
    """--weight_decay_final: with zero gradients and a constant learning rate, step k shrinks
    each decayed matrix by lr * (weight_decay + (final - weight_decay) * k / max_iters), and
    by lr * final past max_iters; without it every step shrinks by lr * weight_decay."""
    config = original_config()._replace(optimizer=name, learning_rate=1e-2,
                                   muon_learning_rate=1e-2, warmup_iters=0, min_lr_ratio=1.0,
                                   max_iters=10, weight_decay=0.1, weight_decay_final=0.6,
                                   compute_dtype="float32")
    params = _tiny_params()
    zeros = jax.tree.map(jax.numpy.zeros_like, params)
    for final, expected in ((0.6, lambda k: 0.1 + 0.05 * min(k, 10)), (None, lambda k: 0.1)):
        optimizer = make_optimizer(config._replace(weight_decay_final=final), _tiny_loss())
        state, current = optimizer.init(params), params
        update = jax.jit(optimizer.update)
        for k in range(12):
            updates, state = update(zeros, state, current)
            new = optax.apply_updates(current, updates)
            before, after = (p["transformer/decoder_0/ff_in"]["w"] for p in (current, new))
            np.testing.assert_allclose(after, before * (1 - 1e-2 * expected(k)), rtol=1e-6)
            current = new


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_gradient_clipping_bounds_what_a_huge_gradient_moves(grad_clip):
    """A gradient of global norm 1e6 reaches Adam's first moment clipped to norm grad_clip
    (mu = (1 - b1) * g after one step); a small one is left as it is; 0 switches clipping off.
    Adam's first update alone is scale-free, so the moment shows what clipping changed."""
    config = original_config()._replace(grad_clip=grad_clip, warmup_iters=0)
    params = _tiny_params()
    optimizer = make_optimizer(config, _tiny_loss())
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    direction = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape)
                                          for k, x in zip(keys, leaves)])
    total = optax.tree.norm(direction)
    direction = jax.tree.map(lambda g: g / total, direction)                   # norm 1
    for norm in (1e6, 0.5):
        grads = jax.tree.map(lambda g: g * norm, direction)
        _, state = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
        mu = optax.tree_utils.tree_get(state, "mu")
        clipped = min(norm, grad_clip) if grad_clip > 0 else norm
        assert float(optax.tree.norm(mu)) == pytest.approx(0.1 * clipped, rel=1e-4)


def test_wsd_schedule_warms_up_holds_then_decays_linearly():
    config = original_config()._replace(learning_rate=2e-3, warmup_iters=50, max_iters=400,
                                   min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.25)
    schedule = optimizer_module.make_schedule(config)
    peak, floor, decay_start = 2e-3, 2e-4, 400 - 0.25 * 400
    assert float(schedule(0)) == 0.0
    assert float(schedule(25)) == pytest.approx(peak / 2, rel=1e-6)
    for step in (50, 200, decay_start):
        assert float(schedule(step)) == pytest.approx(peak, rel=1e-6)
    for step in (320, 350, 390):
        expected = peak + (floor - peak) * (step - decay_start) / (400 - decay_start)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
    assert float(schedule(400)) == pytest.approx(floor, rel=1e-5)
    assert float(schedule(10_000)) == pytest.approx(floor, rel=1e-5)
    # A second peak (Muon's) follows the same shape.
    assert float(optimizer_module.make_schedule(config, 0.02)(300)) == pytest.approx(0.02, rel=1e-6)


def _is_adamw_part(module: str, name: str) -> bool:
    return name != "w" or module.endswith(("unembed", objectives.AFTER_NEXT))


@pytest.mark.parametrize("compute_dtype,rtol", [("float32", 1e-3), ("bfloat16", 1e-2)])
def test_muon_orthogonalizes_hidden_matrices_and_adamw_takes_the_rest(compute_dtype, rtol):
    """--optimizer=muon: each hidden weight matrix (attention projections, feed-forward; the
    encoder's and cross-attention's too) moves by an orthogonalized update (its singular
    values closer together than in AdamW's update); the embeddings, the unembedding, biases
    and gains move by its AdamW part's first step, -learning_rate * sign(gradient) times
    Nesterov momentum's first-step factor. With zero gradients only Muon's matrices decay, by
    muon_learning_rate * weight_decay. With bfloat16 compute (bfloat16 moments) the same
    holds to bfloat16's precision. The second head of ahead_loss is an unembedding too."""
    config = original_config()._replace(optimizer="muon", learning_rate=1e-3,
                                   muon_learning_rate=0.02, warmup_iters=0, weight_decay=0.5,
                                   grad_clip=0.0, compute_dtype=compute_dtype)
    params = _tiny_params(ahead_loss=0.5)
    assert objectives.AFTER_NEXT in params
    optimizer = make_optimizer(config._replace(weight_decay=0.0), _tiny_loss(0.5))
    key = lambda module, name: jax.random.fold_in(jax.random.PRNGKey(1),  # by name: any order
                                                   zlib.crc32(f"{module}/{name}".encode()))
    grads = {module: {name: jax.random.normal(key(module, name), x.shape)
                      for name, x in leaves.items()} for module, leaves in params.items()}
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    muon_matrices = 0
    for module, leaves in params.items():
        for name, value in leaves.items():
            u, g = np.asarray(updates[module][name]), np.asarray(grads[module][name])
            if _is_adamw_part(module, name):
                nesterov = 1 + 0.9 * (1 - 0.9) / (1 - 0.9**2)  # b1 m_1 + (1 - b1) g, corrected
                np.testing.assert_allclose(u, -1e-3 * nesterov * np.sign(g), rtol=rtol)
            else:
                spread = lambda x: (lambda s: s.max() / s.min())(
                    np.linalg.svd(x, compute_uv=False))
                assert spread(u) < 2.5, module  # AdamW's, the sign of g: 3.2 to 2,000 here
                assert np.std(np.abs(u)) > 0.1 * np.mean(np.abs(u)), module  # not sign-like
                muon_matrices += 1
    assert muon_matrices == 4 * 2 + 4 + 3  # 2 decoder layers, 1 encoder layer, cross-attention

    optimizer = make_optimizer(config, _tiny_loss(0.5))
    zeros = jax.tree.map(jax.numpy.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    for module, leaves in params.items():
        for name, value in leaves.items():
            factor = 1.0 if _is_adamw_part(module, name) else 1 - 0.02 * 0.5
            np.testing.assert_allclose(new[module][name], value * factor, rtol=1e-6)


@pytest.mark.parametrize("ns_steps", [1, 3])
def test_muon_ns_steps_is_the_number_of_newton_schulz_iterations(ns_steps):
    """A hidden matrix's first Muon update is parallel to muon_ns_steps iterations of the
    quintic Newton-Schulz map X -> a X + (b A + c A^2) X, A = X X^T, from its gradient
    (Nesterov momentum's first step is a multiple of it) scaled to unit norm, on the wide
    orientation; computed in numpy."""
    config = original_config()._replace(optimizer="muon", muon_ns_steps=ns_steps,
                                        warmup_iters=0, weight_decay=0.0, grad_clip=0.0,
                                        compute_dtype="float32")
    params = _tiny_params()
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(x.size), x.shape),
                         params)
    optimizer = make_optimizer(config, _tiny_loss())
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    a, b, c = 3.4445, -4.7750, 2.0315  # Muon's coefficients (Jordan et al. 2024)
    for module, leaves in params.items():
        if _is_adamw_part(module, "w") or "w" not in leaves:
            continue
        g = np.asarray(grads[module]["w"], np.float64)
        x = g.T if g.shape[0] > g.shape[1] else g
        x = x / np.linalg.norm(x)
        for _ in range(ns_steps):
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
        x = x.T if g.shape[0] > g.shape[1] else x
        u = -np.asarray(updates[module]["w"], np.float64)
        np.testing.assert_allclose(u / np.linalg.norm(u), x / np.linalg.norm(x), atol=2e-5)


def shuffled_batch(key, step, ids, batch_size, seq_len):
    starts = data.shuffled_starts(key, jax.numpy.int32(step), len(ids), batch_size, seq_len)
    return data.window_batch(ids, starts, seq_len)


def test_shuffled_passes_visit_every_window_once_per_pass():
    ids = jax.numpy.arange(1000, dtype=jax.numpy.int32)
    key, B, T = jax.random.PRNGKey(0), 4, 10
    per_pass = (1000 - T) // T
    batches = per_pass // B

    def first_ids(pass_index):
        starts = []
        for step in range(pass_index * batches, (pass_index + 1) * batches):
            inputs, targets = shuffled_batch(key, step, ids, B, T)
            np.testing.assert_array_equal(targets, inputs + 1)
            np.testing.assert_array_equal(inputs, inputs[:, :1] + np.arange(T))
            starts += np.asarray(inputs[:, 0]).tolist()
        return starts

    first, second = first_ids(0), first_ids(1)
    for starts in (first, second):
        assert len(set(starts)) == len(starts) == batches * B  # no window twice in a pass
        assert len({s % T for s in starts}) == 1               # one cut of the text
        assert max(starts) + T < 1000
    assert first != second  # each pass its own order (and offset)


def test_shuffled_passes_leave_out_other_windows_each_pass():
    """A pass holds 99 windows, 24 batches of 4: the 3 it leaves out are other ones in each
    pass, so that over passes every window of the text is trained on."""
    key, B, T = jax.random.PRNGKey(0), 4, 10
    per_pass = data.windows_per_pass(1000, T)
    batches = per_pass // B
    assert per_pass % B == 3
    steps = jax.numpy.arange(12 * batches)
    starts = np.asarray(jax.jit(jax.vmap(
        lambda step: data.shuffled_starts(key, step, 1000, B, T)))(steps))    # [steps, B]
    seen = set()
    for one_pass in starts.reshape(12, batches * B):
        seen |= set((one_pass - one_pass[0] % T) // T)  # the windows, by index in the pass
    assert seen == set(range(per_pass))


def test_shuffled_passes_need_a_batch_of_windows(tmp_path, capsys):
    """A training split with fewer windows than a batch has no whole batch in a pass: the
    run exits 2 saying so, before any step."""
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij" * 100)  # 900 training characters: 55 windows of 16
    status, _, err = run_command(capsys, "train.py", f"--source_file={path}", "--aim=False",
                                 f"--params_dir={tmp_path}", "--batches=shuffled",
                                 "--batch_size=64",
                                 *(f"--{k}={v}" for k, v in TINY._asdict().items()))
    assert status == 2, err
    assert "--batches=shuffled: the training split holds fewer than batch_size=64 windows" in err
    assert not list(tmp_path.glob("*.pkl"))


def test_muon_wsd_and_shuffled_passes_train(tmp_path):
    """The other choices of the recipe train the tiny model as well as the defaults' run:
    both losses 0.2 nats/char or more below the unigram entropy of the training text."""
    config = tiny_config(tmp_path, max_iters=100, eval_interval=50, optimizer="muon",
                         schedule="wsd", batches="shuffled")
    history = train.train(config, TINY)["history"]
    assert history["val_loss"][-1] < 3.02 - 0.2 and history["train_loss"][-1] < 3.02 - 0.2


def test_each_shuffled_pass_cuts_the_text_at_its_own_offset():
    ids = jax.numpy.arange(1000, dtype=jax.numpy.int32)
    key, B, T = jax.random.PRNGKey(3), 4, 10
    batches = (1000 - T) // T // B
    offsets = []
    for pass_index in range(8):
        inputs, _ = shuffled_batch(key, pass_index * batches, ids, B, T)
        cut = {int(s) % T for s in np.asarray(inputs[:, 0])}
        assert len(cut) == 1  # one offset within a pass
        offsets += cut
    assert len(set(offsets)) >= 4  # 8 passes, 10 offsets: not one cut for all


def test_logged_learning_rates_are_each_optimizer_parts(tmp_path, capsys):
    """Under Muon the log line and Aim show muon_learning_rate and the AdamW part's
    learning_rate, each its own schedule."""
    config = tiny_config(tmp_path, max_iters=20, eval_interval=20, optimizer="muon",
                         learning_rate=3e-3, muon_learning_rate=0.02, warmup_iters=0,
                         schedule="wsd", decay_fraction=1.0, min_lr_ratio=0.0)
    rates = optimizer_module.learning_rates(config)
    assert set(rates) == {"learning_rate", "muon_learning_rate"}
    assert float(rates["muon_learning_rate"](10)) == pytest.approx(0.01)
    assert float(rates["learning_rate"](10)) == pytest.approx(1.5e-3)
    train.train(config, TINY)
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step 20 |")][0]
    assert (f"| learning_rate {float(rates['learning_rate'](19)):.2e} | "
            f"muon_learning_rate {float(rates['muon_learning_rate'](19)):.2e} | evaluated in "
            in line)
    assert "muon_learning_rate" not in optimizer_module.learning_rates(
        config._replace(optimizer="adamw"))


def test_ema_logs_both_losses_of_the_averaged_params(tmp_path):
    """With --ema_decay, the training and the validation loss of an evaluation are both of
    the averaged params that the best file keeps."""
    config = tiny_config(tmp_path, max_iters=20, eval_interval=20, ema_decay=0.9)
    meta = train.train(config, TINY)
    best = checkpoint.load(train.params_paths(config.params_dir, meta["run_hash"])[1])
    ids = data.encode(data.read_text(CORPUS), best.vocab)
    train_windows, val_windows = metrics.split_windows(ids, TINY.max_seq_len, config.eval_chars)
    window_loss = metrics.make_window_loss(transformer.build(TINY, len(best.vocab)))
    for name, windows in (("train_loss", train_windows), ("val_loss", val_windows)):
        loss = metrics.mean_loss(window_loss, best.params,
                                    data.batch_windows(windows, 512))
        assert meta["history"][name][-1] == pytest.approx(loss, rel=1e-5), name


@pytest.mark.parametrize("compute_dtype", ["auto", "float32", "bfloat16"])
def test_training_step_runs_its_matmuls_in_the_compute_dtype_it_reports(tmp_path,
                                                                        compute_dtype):
    """What train.py's compiled step multiplies: bfloat16 operands where the dtype the run
    reports (auto's choice, or the one asked for) is bfloat16, none where it is float32."""
    import time

    setup = train.set_up(tiny_config(tmp_path, compute_dtype=compute_dtype), TINY, time.time())
    reported = setup.run.meta["compute_dtype"]
    assert reported == kernels.choose_compute_dtype(compute_dtype)[0]
    hlo = setup.train_step.lower(setup.state, setup.train_ids).as_text()
    dots = [l for l in hlo.splitlines() if "dot_general" in l]
    assert dots
    assert any("bf16" in l for l in dots) == (reported == "bfloat16"), (compute_dtype, reported)


def test_muon_scales_each_matrix_by_haikus_in_out_layout():
    """Haiku's weights are [in, out]: Muon's update of a matrix that widens (in < out) is
    sqrt(out / in) times that of its narrowing transpose (optax's scale
    sqrt(max(1, fan_out / fan_in))); read the other way round, the narrowing one would get it."""
    config = original_config()._replace(optimizer="muon", muon_learning_rate=0.02, warmup_iters=0,
                                   weight_decay=0.0, grad_clip=0.0, compute_dtype="float32")
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (8, 32)))
    params = {"widen": {"w": np.zeros((8, 32), np.float32)},
              "narrow": {"w": np.zeros((32, 8), np.float32)}}
    grads = {"widen": {"w": g}, "narrow": {"w": g.T}}
    optimizer = make_optimizer(config, hidden={"widen": {"w": True}, "narrow": {"w": True}})
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    np.testing.assert_allclose(updates["widen"]["w"], 2.0 * updates["narrow"]["w"].T,
                               rtol=1e-4, atol=1e-7)
    assert np.abs(updates["widen"]["w"]).max() > 0


def test_every_evaluation_line_reports_the_speed_of_the_steps_before_it(tmp_path, capsys):
    """Also the last evaluation, at a max_iters off the eval and log intervals."""
    train.train(tiny_config(tmp_path, max_iters=25, eval_interval=10, log_interval=10), TINY)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [int(line.split()[1]) for line in lines] == [10, 20, 25]
    assert all(float(line.split(" | ")[3].removesuffix(" tok/s")) > 0 for line in lines)


def test_evaluation_reads_a_fixed_evenly_spread_sample_past_eval_chars(tmp_path, capsys):
    """A validation split longer than eval_chars: evaluation reads eval_chars // T of its
    windows, spread evenly from its first to its last, the same each time, and as many
    training windows spread over the training split; the run says so. Cervantes' and Tiny
    Shakespeare's splits are read whole at the default."""
    ids = np.asarray(data.encode(data.read_text(CORPUS), data.build_vocab(
        data.read_text(CORPUS))))
    T = TINY.max_seq_len
    _, whole_val = metrics.split_windows(ids, T)
    train_part, val = metrics.split_windows(ids, T, max_chars=10 * T)
    assert len(val.inputs) == len(train_part.inputs) == 10
    picked = [int(np.flatnonzero((whole_val.inputs == row).all(1))[0]) for row in val.inputs]
    assert picked[0] == 0 and picked[-1] == len(whole_val.inputs) - 1
    gaps = np.diff(picked)
    assert gaps.max() - gaps.min() <= 1  # evenly spread
    # As many training windows, spread over the whole training split too.
    every_train = data.eval_windows(data.split(ids)[0], T).inputs
    picked = [int(np.flatnonzero((every_train == row).all(1))[0]) for row in train_part.inputs]
    assert picked[0] == 0 and picked[-1] > 0.8 * len(every_train)
    assert len(set(np.diff(picked))) == 1
    again = metrics.split_windows(ids, T, max_chars=10 * T)[1]
    np.testing.assert_array_equal(again.inputs, val.inputs)
    for text in (ids, encoding.load(SHAKESPEARE).ids):  # both read whole at the default
        default = metrics.split_windows(text, metrics.EVAL_SEQ_LEN, train.CONFIG.eval_chars)
        full = metrics.split_windows(text, metrics.EVAL_SEQ_LEN)
        for a, b in zip(default, full):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    meta = train.train(tiny_config(tmp_path, max_iters=2, eval_interval=2,
                                   eval_chars=10 * T), TINY)
    counted = int(val.weights.sum())  # the split's last window is partial
    assert meta["eval_val_chars"] == counted and 9 * T < counted <= 10 * T
    assert (f"a fixed sample of the validation split, {counted:,} of its "
            f"{len(data.split(ids)[1]) - 1:,} characters") in capsys.readouterr().err
