"""Training for a budget of wall time, `train.py --minutes=N`: the recipe for N minutes
(BUDGETS, found by measurement: docs/results.md), and the plan that paces a run: Steps
(max_iters steps, an evaluation every eval_interval) or, with --minutes, Clock (as many steps
as the budget holds: the learning rates decay with the share of the budget spent, as in
budgeted training (Li et al. 2020), so a slower or busier host gets a shorter run, not a
truncated one).
"""

import math
import time

import jax

import recipes
from common import UserError

# Seconds kept after the last step beyond the final evaluation's: the params files, the plot.
MARGIN_S = 2.0

# The recipe for each budget in minutes (a shorter budget gets the 2-minute recipe, one
# between two the shorter one's): Config settings, HPARAMS settings, and the evaluations
# spread over the run (besides the first, which times one). Found on Tiny Shakespeare and
# Cervantes on a 2-core AMD EPYC Zen 4 (docs/results.md, "Budgets"): a 4 x 128 streaming
# model reading 64 characters (a wider one trains too few characters in the time), Muon, no
# dropout, the learning rates falling linearly to zero over the whole run; measured at 2, 5,
# 10 and 20 minutes, where it gains little over 10 (it overfits). An hour takes the `cpu`
# preset's recipe, unmeasured as a timed run.
_SHORT = dict(optimizer="muon", schedule="wsd", decay_fraction=1.0, min_lr_ratio=0.0,
              batches="shuffled", ema_decay=0.0, ahead_loss=0.0, warmup_iters=50,
              learning_rate=3e-3, muon_learning_rate=0.02, weight_decay=0.1)
_SMALL = dict(d_model=128, h=4, d_ff=512, decoder_N=4, dropout=0.0, max_seq_len=64,
              positions="rotary", attention_window=64)
_HOUR = recipes.PRESETS["cpu"]
BUDGETS = {
    2: (dict(_SHORT, batch_size=16), _SMALL, 1),
    5: (dict(_SHORT, batch_size=32), _SMALL, 2),
    10: (dict(_SHORT, batch_size=32), _SMALL, 2),
    20: (dict(_SHORT, batch_size=32), _SMALL, 4),
    60: ({name: getattr(_HOUR[0], name) for name in (*_SHORT, "batch_size")},
         _HOUR[1]._asdict(), 10),
}


def chosen(minutes: float) -> int:
    """The BUDGETS entry for `minutes`: the longest not above it, else the shortest."""
    return max([m for m in BUDGETS if m <= minutes], default=min(BUDGETS))


def recipe(minutes: float, config, hparams) -> tuple:
    """(config, hparams): BUDGETS' recipe for `minutes` over `config` and `hparams`."""
    settings, shape, _ = BUDGETS[chosen(minutes)]
    return (config._replace(preset=f"minutes{chosen(minutes)}", minutes=minutes, **settings),
            hparams._replace(**shape))


def explain(config, hparams) -> str:
    """Why a timed run (its recipe from BUDGETS, overrides applied) trains as it does."""
    return (f"--minutes={config.minutes:g}: the {chosen(config.minutes)}-minute recipe, a "
            f"{hparams.decoder_N} x {hparams.d_model} model reading {hparams.max_seq_len} "
            f"characters, batches of {config.batch_size}, as many steps as the time holds, "
            "the learning rates decaying as it runs out (docs/results.md, "
            "\"Budgets\")")


def evaluations(minutes: float) -> int:
    """The evaluations a run of `minutes` spreads over its time (its recipe's)."""
    return BUDGETS[chosen(minutes)][2]


class Steps:
    """The plan of a run without --minutes: config.max_iters steps, an evaluation every
    eval_interval and at the end; the schedules read the step (progress is None)."""

    def __init__(self, config):
        self.total, self.eval_interval = config.max_iters, config.eval_interval

    def progress(self, pending=None) -> None:
        return None

    def finished(self, step: int) -> bool:
        return step >= self.total

    def evaluates(self, step: int) -> bool:
        return step % self.eval_interval == 0 or step == self.total

    def evaluated(self, seconds: float) -> None:
        pass


class Clock:
    """The plan of a run of `minutes` of wall time from `started` (the process's start, or a
    resumed run's first): an evaluation first (timing it, its compiling aside), then steps
    until the time left is the final evaluation's (MARGIN_S more), `evaluations`
    evaluations spread over that time.
    progress(): the share of the steps' time spent, 0 to 1, never decreasing."""

    total = None  # steps: as many as the time holds

    def __init__(self, minutes: float, started: float, evaluations: int):
        self.minutes, self.deadline = minutes, started + 60 * minutes
        self.evaluations, self.done_evaluations = evaluations, 0
        self.begin = self.end = None
        self.last = 0.0

    def evaluated(self, seconds: float) -> None:
        """An evaluation took `seconds`, its compiling not counted (CompileTime): the final
        one is kept that long; the first starts the clock."""
        self.end = self.deadline - seconds - MARGIN_S
        if self.begin is None:
            self.begin = time.time()
            if self.end <= self.begin:
                spent = self.begin - (self.deadline - 60 * self.minutes)
                raise UserError(
                    f"--minutes={self.minutes:g}: the start and one evaluation took "
                    f"{spent:.0f} s, leaving no time to train; give at least "
                    f"{math.ceil((spent + seconds + MARGIN_S) / 30) / 2:g} minutes.")

    def progress(self, pending=None) -> float:
        """The share of the time spent, once the step that returned `pending` has run (so
        the clock reads the steps run, not those merely queued)."""
        jax.block_until_ready(pending)
        now = (time.time() - self.begin) / max(self.end - self.begin, 1e-9)
        self.last = min(1.0, max(self.last, now))
        return self.last

    def finished(self, step: int) -> bool:
        return self.begin is not None and self.last >= 1.0

    def evaluates(self, step: int) -> bool:
        """Before the first step, at each 1/evaluations of the time, and at the end."""
        if self.begin is None or self.finished(step):
            return True
        if self.last >= (self.done_evaluations + 1) / self.evaluations:
            self.done_evaluations += 1
            return True
        return False


class CompileTime:
    """`with CompileTime() as compiling:` the seconds JAX spends tracing and compiling inside
    the block (jax.monitoring's events), `compiling.seconds`: what a first call costs beyond
    the later ones."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __enter__(self):
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._record)
        return self

    def _record(self, event: str, seconds: float, **kwargs) -> None:
        if event in self.EVENTS:
            self.seconds += seconds

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._record)


def plan(config, started: float) -> Steps | Clock:
    return (Clock(config.minutes, started, evaluations(config.minutes)) if config.minutes
            else Steps(config))

