"""train.py: the loop learns, writes both params files, resumes exactly, stops cleanly."""

import math
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import checkpoint
import common
import eval as evaluation
import train
import transformer
from conftest import CORPUS, ROOT, TINY, run_script, tiny_config


def test_loss_falls_and_both_params_files_hold_their_steps(tiny_run):
    history = tiny_run["meta"]["history"]
    assert history["step"] == [20, 40]
    assert history["val_loss"][-1] < history["val_loss"][0] < math.log(88) + 0.5
    assert history["train_loss"][-1] < 3.6  # from ~4.5 (uniform over 88 characters)

    latest = checkpoint.load(tiny_run["latest"])
    best = checkpoint.load(tiny_run["best"])
    assert latest.meta["step"] == 40
    best_step = history["step"][int(np.argmin(history["val_loss"]))]
    assert best.meta["step"] == best.meta["min_val_step"] == best_step
    assert best.meta["min_val_loss"] == pytest.approx(min(history["val_loss"]))
    assert os.path.exists(train.plot_path(os.path.dirname(tiny_run["latest"]),
                                          latest.meta["run_hash"]))


def test_min_val_file_reproduces_its_validation_loss(tiny_run):
    best = checkpoint.load(tiny_run["best"])
    ids = evaluation.data.encode(evaluation.data.load_corpus(CORPUS), best.vocab)
    _, val = evaluation.split_windows(ids, min(evaluation.EVAL_SEQ_LEN, TINY.max_seq_len))
    window_loss = evaluation.make_window_loss(transformer.build(best.hparams, len(best.vocab)))
    loss = evaluation.mean_loss(window_loss, best.params, evaluation.batch_windows(val, 512))
    assert loss == pytest.approx(best.meta["min_val_loss"], rel=1e-5)


def test_resume_equals_uninterrupted_training(tmp_path):
    config = tiny_config(tmp_path, max_iters=20, eval_interval=10)
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
    for x, y in zip(a.opt_state, b.opt_state):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


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


def test_preset_sets_defaults_that_arguments_override():
    assert train.resolve([]) == (train.CONFIG, transformer.HPARAMS)
    cpu_config, cpu_hparams = train.PRESETS["cpu"]
    config, hparams = train.resolve(["--preset=cpu", "--batch_size=8"])
    assert hparams == transformer.validate(cpu_hparams) != transformer.HPARAMS
    assert config == cpu_config._replace(batch_size=8) and config.preset == "cpu"
    train.check_config(cpu_config)


def test_resume_keeps_the_saved_config_under_new_arguments(tiny_run):
    config, hparams = train.resolve([f"--resume={tiny_run['latest']}", "--max_iters=60"])
    saved = tiny_run["meta"]["config"]
    assert config.learning_rate == saved["learning_rate"] != train.CONFIG.learning_rate
    assert config.batch_size == saved["batch_size"] != train.CONFIG.batch_size
    assert (config.max_iters, config.resume) == (60, tiny_run["latest"])
    assert hparams == TINY


@pytest.mark.parametrize("args, message", [
    (["--bogus=1"], "unknown option --bogus"),
    (["--batch_size=0"], "--batch_size=0: must be >= 1"),
    (["--d_model=30", "--h=4"], "d_model=30 must be divisible by h=4"),
    (["--resume=/nonexistent.pkl"], "cannot read params file"),
    (["--preset=tpu"], "--preset=tpu: unknown preset. Valid presets: gpu, cpu"),
    (["--compute_dtype=float16"], "--compute_dtype='float16': 'bfloat16' or 'float32'"),
])
def test_bad_command_lines_exit_2_without_traceback(args, message):
    result = run_script("train.py", *args, f"--source_file={CORPUS}", "--aim=False")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


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
    for name in ("learning_rate", "grad_norm", "tokens_per_s", "batch_loss"):
        assert len(metrics[(name, ())]) == 4  # every log_interval=5 steps
    assert run["hparams"]["d_model"] == TINY.d_model
    assert run["config"]["max_iters"] == 20


def test_unusable_aim_repo_warns_once_and_still_trains(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = tiny_config(tmp_path, max_iters=10, eval_interval=10, aim=True,
                         aim_repo=str(blocker / "repo"))
    meta = train.train(config, TINY)
    assert meta["step"] == 10 and len(meta["history"]["val_loss"]) == 1
    assert capsys.readouterr().err.count("warning: Aim tracking is off") == 1


def test_sigint_saves_and_exits_0(tmp_path):
    args = [sys.executable, "train.py", f"--source_file={CORPUS}", "--aim=False",
            f"--params_dir={tmp_path}", "--max_iters=100000", "--eval_interval=5",
            "--eval_batch_size=512", "--batch_size=4", "--sample_chars=0",
            *(f"--{k}={v}" for k, v in TINY._asdict().items())]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        first_line = process.stdout.readline()  # blocks until the first evaluation
        assert first_line.startswith("step 5 | train "), first_line
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "SIGINT: stopped at step" in err and "--resume=" in err
    (latest,) = [p for p in os.listdir(tmp_path) if p.endswith(".pkl")
                 and not p.endswith("min_val.pkl")]
    assert checkpoint.load(os.path.join(tmp_path, latest)).meta["step"] >= 5


def test_non_finite_loss_stops_with_clear_error_and_keeps_files(tmp_path, monkeypatch):
    real_make_train_step = train.make_train_step

    def poisoned_make_train_step(*args):
        step_fn = real_make_train_step(*args)

        def step(state, ids):
            state, metrics = step_fn(state, ids)
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


def test_train_step_compiles_once(tmp_path):
    """Static shapes: the jitted step (and evaluation) never recompile after the first call."""
    config = tiny_config(tmp_path)
    text = evaluation.data.load_corpus(CORPUS)
    vocab = evaluation.data.build_vocab(text)
    model = transformer.build(TINY, len(vocab))
    optimizer = train.make_optimizer(config)
    state = train.fresh_start(config, TINY, vocab, model, optimizer).state
    step = train.make_train_step(model, optimizer, config.batch_size, TINY.max_seq_len)
    ids = jax.numpy.asarray(evaluation.data.encode(text[:5000], vocab))
    for _ in range(3):
        state, metrics = step(state, ids)
    assert int(state.step) == 3 and math.isfinite(float(metrics["loss"]))
    assert step._cache_size() == 1
