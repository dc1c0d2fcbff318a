"""Training for a budget of wall time, `train.py --minutes=N` (its recipe: recipes.BUDGETS,
found by measurement: docs/results.md): the plan that paces a run: Steps
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


def evaluations(minutes: float) -> int:
    """The evaluations a run of `minutes` spreads over its time (its budget's)."""
    return recipes.BUDGETS[recipes.budget_minutes(minutes)].evaluations


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

