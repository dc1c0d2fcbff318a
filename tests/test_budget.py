"""train.py --minutes (budget.py): a run keeps its budget of wall time, start-up and
evaluations included; its learning rates decay with the share of the time spent and end at
their final values as it runs out; the recipe for each budget; a resumed run keeps the time
it had left."""

import math
import time

import jax
import jax.numpy as jnp
import pytest

import budget
import recipes
import checkpoint
import common
import optimizer
import train
from conftest import TINY, run_command, original_config, tiny_config


def test_a_timed_run_keeps_its_budget_through_a_resume_and_ends_at_its_final_rates(tmp_path,
                                                                                   capsys):
    """30 s of a tiny model, stopped after 1,000 steps (seconds in) and resumed: the run's
    wall time, both calls' time in train, stays within a few percent of the budget (a
    resumed run given the whole budget again would overrun it by the first call's time);
    it evaluated first, where it resumed, and last (the 2-minute recipe's single
    evaluation), the steps went on, and the last update's rates are the schedules' ends
    (cosine to learning_rate * min_lr_ratio)."""
    config = tiny_config(tmp_path, minutes=0.5, schedule="cosine", min_lr_ratio=0.1,
                         learning_rate=3e-3, optimizer="muon", muon_learning_rate=0.02,
                         max_iters=10)  # max_iters: not a bound of a timed run
    began = time.time()
    first = train.train(config, TINY, stop_at=1000)
    assert first["step"] == 1000 and first["wall_s"] > 3
    latest = train.params_paths(config.params_dir, first["run_hash"])[0]
    meta = train.train(config._replace(resume=latest), TINY)
    seconds = time.time() - began
    assert 0.92 * 30 <= meta["wall_s"] <= 1.03 * 30 and seconds <= 1.03 * 30 + 1
    assert meta["history"]["step"] == [0, 1000, meta["step"]] and meta["step"] > 1100
    assert checkpoint.load(latest).meta["step"] == meta["step"]
    last = [l for l in capsys.readouterr().out.splitlines()
            if l.startswith(f"step {meta['step']} |")][0]
    assert "| learning_rate 3.00e-04 | muon_learning_rate 2.00e-03 |" in last


def test_the_clock_spreads_its_evaluations_and_keeps_the_final_ones_time(monkeypatch):
    """A minute from t=100 with two evaluations: the first (at t=110, 8 s) starts the clock
    and sets the time kept for the last; progress is the share of the time between, never
    decreasing; an evaluation at half of it, the end at all of it."""
    now = [110.0]
    monkeypatch.setattr(budget.time, "time", lambda: now[0])
    clock = budget.Clock(minutes=1, started=100.0, evaluations=2)
    assert clock.evaluates(0) and not clock.finished(0)
    clock.evaluated(8.0)
    end = 160 - 8 - budget.MARGIN_S
    at = lambda share: 110 + share * (end - 110)
    now[0] = at(0.25)
    assert clock.progress() == pytest.approx(0.25) and not clock.evaluates(1)
    now[0] = at(0.5)
    assert clock.progress() == pytest.approx(0.5)
    assert clock.evaluates(2) and not clock.evaluates(3) and not clock.finished(3)
    clock.evaluated(3.0)  # compiled now: the last evaluation is given 3 s, the steps 5 more
    assert clock.end == pytest.approx(160 - 3 - budget.MARGIN_S)
    now[0] = at(0.4)
    assert clock.progress() == pytest.approx(0.5)  # never back
    now[0] = 200.0
    assert clock.progress() == 1.0 and clock.finished(4) and clock.evaluates(4)


def test_compile_time_is_what_a_first_call_costs_beyond_the_later_ones():
    """CompileTime counts tracing, lowering and XLA's compile (a budget keeps the final
    evaluation's time without its compile): here a function whose compile dominates (a
    constant of this run in it: no compilation cache holds it)."""
    salt = time.time()

    def f(x):
        for i in range(60):
            x = jnp.sin(x @ x.T + i * salt)[:, :64]
        return x

    x = jnp.ones((64, 64))
    jitted = jax.jit(f)
    with budget.CompileTime() as compiling:
        began = time.perf_counter()
        jitted(x).block_until_ready()
        first = time.perf_counter() - began
    began = time.perf_counter()
    jitted(x).block_until_ready()
    later = time.perf_counter() - began
    assert 0.8 * (first - later) <= compiling.seconds <= first


def test_a_budget_with_no_time_to_train_is_refused(monkeypatch):
    now = [104.0]
    monkeypatch.setattr(budget.time, "time", lambda: now[0])
    clock = budget.Clock(minutes=0.1, started=100.0, evaluations=1)
    with pytest.raises(common.UserError, match="took 4 s, leaving no time to train; give at "
                                               "least 0.5 minutes"):
        clock.evaluated(3.0)


@pytest.mark.parametrize("schedule, at_half, at_three_quarters", [
    ("wsd", 1.0, 1 - 0.9 * 0.5),  # constant, then linear over the last half
    ("cosine", 0.1 + 0.9 * 0.5, 0.1 + 0.9 * (1 + math.cos(0.75 * math.pi)) / 2)])
def test_timed_rates_warm_up_by_steps_and_decay_by_time(schedule, at_half, at_three_quarters):
    """A rate of the update's count (warmup) and of the budget's progress (decay): 0 at the
    first update, half the peak halfway through the warmup, then the decay of the time
    spent, ending at peak * min_lr_ratio."""
    config = original_config()._replace(minutes=5, warmup_iters=10, learning_rate=1e-3,
                                   schedule=schedule, decay_fraction=0.5, min_lr_ratio=0.1)
    (rate,) = optimizer.learning_rates(config).values()
    assert float(rate(0, 0.0)) == 0.0 and float(rate(5, 0.0)) == pytest.approx(5e-4)
    assert float(rate(20, 0.0)) == pytest.approx(1e-3)
    assert float(rate(20, 0.5)) == pytest.approx(1e-3 * at_half)
    assert float(rate(20, 0.75)) == pytest.approx(1e-3 * at_three_quarters)
    assert float(rate(20, 1.0)) == pytest.approx(1e-4)


def test_minutes_choose_their_budgets_recipe_and_other_options_still_win():
    resolve = lambda *argv: recipes.resolve(argv, train.CONFIG, train.transformer.HPARAMS)
    config, hparams, said = resolve("--minutes=2", "--batch_size=8")
    assert (config.preset, config.minutes, config.batch_size) == ("minutes2", 2, 8)
    assert hparams == train.transformer.HParams(**recipes.BUDGETS[2].recipe.hparams)
    assert "  batch_size" not in said and "  d_model 256 -> 128" in said  # the option wins
    assert resolve("--minutes=7")[0].preset == "minutes5"
    assert resolve("--minutes=0.5")[0].preset == "minutes2"
    config, hparams, _ = resolve("--preset=cpu", "--minutes=30")  # the preset, timed
    assert (config.preset, config.minutes) == ("cpu", 30)
    assert hparams == train.transformer.HParams(**recipes.CPU.hparams)
    config, hparams, said = resolve("--preset=none", "--minutes=30")  # as written, timed
    assert (config, hparams) == (train.CONFIG._replace(preset="none", minutes=30),
                                 train.transformer.HPARAMS)
    assert said.startswith("preset: none")


@pytest.mark.parametrize("minutes, message", [
    ("-1", "--minutes=-1.0: must be a positive number of minutes"),
    ("nan", "--minutes=nan: must be a positive number of minutes"),
    ("0.01", "leaving no time to train; give at least"),
])
def test_bad_budgets_exit_2_without_traceback(tmp_path, minutes, message, capsys):
    status, _, err = run_command(capsys, "train.py", f"--minutes={minutes}", "--d_model=32",
                                 "--d_ff=64", "--decoder_N=1", "--aim=False",
                                 f"--params_dir={tmp_path}")
    assert status == 2 and message in err, err
    assert err.startswith("error: ") or "\nerror: " in err
