"""run.py: a run's record (history, best and latest files, the plot), apart from training."""

import os
import time
from typing import NamedTuple

import numpy as np

import checkpoint
import train
from conftest import TINY, original_config, tiny_config
from run import Run


class State(NamedTuple):
    params: dict
    opt_state: tuple
    rng: np.ndarray


def _run(tmp_path, is_main=True, meta=None):
    config = tiny_config(tmp_path)
    return Run(config, TINY, "abc", meta or {}, "float32", started=time.time() - 5.0,
               is_main=is_main)


def _params(value):
    return {"linear": {"w": np.full((2, 3), value, np.float32)}}


def test_record_keeps_the_history_and_says_which_evaluation_is_the_best(tmp_path):
    run = _run(tmp_path)
    # A tie is no improvement: the best file keeps the earlier params.
    assert [run.record(step, 2.0, val) for step, val in (
        (10, 1.5), (20, 1.2), (30, 1.3), (40, 1.2))] == [True, True, False, False]
    history = run.meta["history"]
    assert history["step"] == [10, 20, 30, 40] and history["val_loss"] == [1.5, 1.2, 1.3, 1.2]
    assert all(5.0 <= s < 60 for s in history["wall_s"])  # since the run's start
    assert (run.meta["min_val_loss"], run.meta["min_val_step"]) == (1.2, 20)
    assert (run.meta["val_loss"], run.meta["eval_step"]) == (1.2, 40)
    assert run.meta["run_hash"] == run.hash and run.meta["config"]["max_iters"] == 40


def test_best_file_holds_params_alone_and_latest_the_training_state(tmp_path):
    run = _run(tmp_path)
    run.record(10, 2.0, 1.5)
    run.save_best(10, _params(1.0))
    run.save_latest(10, State(_params(2.0), (np.ones(3, np.float32),), np.arange(2)))
    best, latest = checkpoint.load(run.best_path), checkpoint.load(run.latest_path)
    assert best.opt_state is None and best.rng is None
    np.testing.assert_array_equal(best.params["linear"]["w"], 1.0)
    np.testing.assert_array_equal(latest.params["linear"]["w"], 2.0)
    np.testing.assert_array_equal(latest.opt_state[0], 1.0)
    np.testing.assert_array_equal(latest.rng, [0, 1])
    assert best.meta["step"] == latest.meta["step"] == 10 and best.vocab == "abc"
    assert run.best_path == run.latest_path + ".min_val.pkl"
    assert run.latest_path == train.params_paths(str(tmp_path / "params"), run.hash)[0]


def test_a_resumed_run_keeps_its_hash_history_and_clock(tmp_path):
    first = _run(tmp_path)
    first.record(10, 2.0, 1.5)
    first.save_latest(10, State(_params(0.0), (), np.arange(2)))
    saved = checkpoint.load(first.latest_path).meta
    resumed = Run(tiny_config(tmp_path), TINY, "abc", saved, "float32",
                  started=time.time() - saved["wall_s"], is_main=True)
    assert resumed.hash == first.hash and resumed.latest_path == first.latest_path
    assert resumed.record(20, 1.9, 1.6) is False  # 1.5 stays the best
    assert resumed.meta["history"]["step"] == [10, 20]
    assert resumed.meta["history"]["wall_s"][1] >= saved["wall_s"]


def test_only_the_main_process_writes(tmp_path):
    run = _run(tmp_path, is_main=False)
    run.record(10, 2.0, 1.5)
    run.save_best(10, _params(1.0))
    run.save_latest(10, State(_params(1.0), (), np.arange(2)))
    run.plot()
    assert not os.path.exists(tmp_path / "params")
    assert run.meta["step"] == 10  # the record is kept all the same


def test_plot_once_there_are_evaluations(tmp_path):
    run = _run(tmp_path)
    run.plot()
    assert not os.path.exists(run.plot_path)
    run.record(10, 2.0, 1.5)
    run.record(20, 1.8, 1.4)
    run.plot()
    with open(run.plot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_stopped_says_how_to_resume(tmp_path, capsys):
    import signal

    run = _run(tmp_path)
    run.stopped(13, signal.SIGTERM)
    err = capsys.readouterr().err
    assert err.startswith("SIGTERM: stopped at step 13")
    assert f"python train.py --resume={run.latest_path}" in err
    run.stopped(7, None)  # at train(stop_at=7): no signal to name
    assert capsys.readouterr().err.startswith("stopped at step 7;")


def test_plot_marks_the_evaluation_whose_validation_loss_is_lowest(tmp_path, monkeypatch):
    """Against steps and against minutes, the red point is at the lowest validation loss
    (here neither the first nor the last evaluation, nor the lowest training loss)."""
    import matplotlib.axes

    import run as run_module

    marked = []
    real_scatter = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", lambda self, x, y, **kw: (
        marked.append((list(x), list(y), kw.get("label", ""))), real_scatter(self, x, y, **kw))[1])
    history = {"step": [100, 200, 300, 400], "train_loss": [2.0, 1.5, 1.2, 1.0],
               "val_loss": [2.1, 1.7, 1.6, 1.65], "wall_s": [60, 150, 240, 330]}
    run_module.plot_losses(history, str(tmp_path / "plot.png"), "run")
    (steps, vals, label), (minutes, vals_t, _) = marked
    assert (steps, vals) == ([300], [1.6]) and "1.6000 at step 300" in label
    assert (minutes, vals_t) == ([4.0], [1.6])


class FakeTracker:
    def __init__(self):
        self.tracked, self.run = [], None

    def track(self, step, context=None, **metrics):
        self.tracked.append((step, context or {}, metrics))

    def track_text(self, step, name, text):
        pass


def test_log_lines_and_aim_get_the_bpc_of_each_loss_and_each_rate(tmp_path, capsys):
    """An evaluation's line and Aim: bpc = loss / ln 2 for both subsets, and the rates."""
    import math

    from tqdm import tqdm

    import run as run_module

    run = _run(tmp_path)
    run.tracker = FakeTracker()
    bar = tqdm(disable=True)
    run_module.log_evaluation(run, bar, 7, (1.2, 1.5), 1000.0, {"learning_rate": 0.6},
                              eval_s=12.34)
    line = capsys.readouterr().out
    assert line == ("step 7 | train 1.2000 | val 1.5000 | 1000 tok/s | learning_rate "
                    "6.00e-01 | evaluated in 12.3 s\n")
    for subset, loss in (("train", 1.2), ("val", 1.5)):
        (metrics,) = [m for _, c, m in run.tracker.tracked if c == {"subset": subset}]
        assert metrics == {"loss": loss, "bpc": loss / math.log(2)}
    run_module.log_progress(run, bar, 7, {"loss": 1.3, "grad_norm": 0.5}, 1000.0,
                            {"learning_rate": 0.6})
    assert run.tracker.tracked[-1] == (7, {}, {"batch_loss": 1.3, "grad_norm": 0.5,
                                               "tokens_per_s": 1000.0, "learning_rate": 0.6})


def test_the_first_update_uses_the_schedules_rate_at_count_0():
    """What 'the rate at s - 1' rests on: with a warmup from 0, the first update (the one
    that makes step 1) changes nothing, the second does."""
    import jax

    import optimizer

    config = original_config()._replace(warmup_iters=5, learning_rate=0.1, weight_decay=0.5)
    params = {"linear": {"w": np.ones((2, 3), np.float32)}}
    grads = {"linear": {"w": np.ones((2, 3), np.float32)}}
    opt = optimizer.make_optimizer(config, {"linear": {"w": True}})
    state = opt.init(params)
    first, state = opt.update(grads, state, params)
    second, _ = opt.update(grads, state, params)
    assert float(optimizer.make_schedule(config)(0)) == 0.0
    assert not np.any(jax.tree.leaves(first)[0]) and np.all(jax.tree.leaves(second)[0] < 0)


def test_speed_counts_the_steps_it_timed(monkeypatch):
    """tokens/s = steps since the last reset x tokens a step / seconds since that reset."""
    import run as run_module

    clock = iter([100.0, 104.0, 110.0, 111.0])
    monkeypatch.setattr(run_module.time, "time", lambda: next(clock))
    speed = run_module.Speed(tokens_per_step=64)
    speed.steps = 8
    assert speed.measure() == 8 * 64 / 4.0
    speed.reset()
    speed.steps = 3
    assert speed.measure() == 3 * 64 / 1.0 and speed.tokens_per_s == 192.0


def test_speed_waits_for_the_steps_it_times():
    """The steps' results still being computed (asynchronous dispatch): the clock stops when
    they are ready, not when they were queued."""
    import threading

    import run as run_module

    class Pending:  # a result that becomes ready 0.3 s from now
        def __init__(self):
            self.done = threading.Timer(0.3, lambda: None)
            self.done.start()

        def block_until_ready(self):
            self.done.join()
            return self

    speed = run_module.Speed(tokens_per_step=100)
    speed.steps = 3
    assert speed.measure({"loss": Pending()}) <= 3 * 100 / 0.3
