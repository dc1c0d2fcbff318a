"""run.py: a run's record (history, best and latest files, the plot), apart from training."""

import os
import time
from typing import NamedTuple

import numpy as np

import checkpoint
import train
from conftest import TINY, tiny_config
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
    assert [run.record(step, 2.0, val) for step, val in ((10, 1.5), (20, 1.2), (30, 1.3))] == [
        True, True, False]
    history = run.meta["history"]
    assert history["step"] == [10, 20, 30] and history["val_loss"] == [1.5, 1.2, 1.3]
    assert all(5.0 <= s < 60 for s in history["wall_s"])  # since the run's start
    assert (run.meta["min_val_loss"], run.meta["min_val_step"]) == (1.2, 20)
    assert (run.meta["val_loss"], run.meta["eval_step"]) == (1.3, 30)
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
