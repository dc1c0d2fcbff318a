"""A training run's record: its Aim run and hash, its two params files, its history, its log
lines, its speed and its loss plot. train.py's loop hands it what happened (an evaluation's
losses, the state to save); nothing here trains. Only the main process (process 0) writes or
tracks.
"""

import importlib.metadata
import io
import math
import os
import platform
import signal
import subprocess
import sys
import time
import uuid

import jax
import numpy as np
from tqdm import tqdm

import checkpoint
from common import UserError, atomic_write


class Run:
    """One run, fresh or resumed (`meta`: what its params file recorded, empty when fresh).

    meta, saved in both params files: run_hash, config, compute_dtype, versions, git_commit,
    step, wall_s, train_loss, val_loss, eval_step, min_val_loss, min_val_step, and the
    history (step, train_loss, val_loss, wall_s at each evaluation).
    """

    def __init__(self, config, hparams, vocab: str, meta: dict, compute_dtype: str,
                 started: float, is_main: bool):
        self.hparams, self.vocab, self.is_main = hparams, vocab, is_main
        self.started = started  # wall_s counts from here: the run's start, not this process's
        self.tracker = Tracker(config if is_main else config._replace(aim=False),
                               meta.get("run_hash"))
        self.hash = self.tracker.hash or meta.get("run_hash") or uuid.uuid4().hex[:24]
        self.tracker.set("hparams", hparams._asdict())
        self.tracker.set("config", config._asdict())
        self.latest_path, self.best_path = params_paths(config.params_dir, self.hash)
        self.plot_path = plot_path(config.params_dir, self.hash)
        self.meta = {"min_val_loss": math.inf, "min_val_step": None, "val_loss": None,
                     "train_loss": None, "eval_step": None,
                     "history": {"step": [], "train_loss": [], "val_loss": [], "wall_s": []},
                     **meta}
        self.meta.update(run_hash=self.hash, versions=library_versions(),
                         git_commit=git_commit(), config=config._asdict(),
                         compute_dtype=compute_dtype)

    def elapsed(self) -> float:
        return time.time() - self.started

    def record(self, step: int, train_loss: float, val_loss: float) -> bool:
        """Adds an evaluation to the history; whether it is the best so far."""
        for name, value in (("step", step), ("train_loss", train_loss), ("val_loss", val_loss),
                            ("wall_s", self.elapsed())):
            self.meta["history"].setdefault(name, []).append(value)
        self.meta.update(train_loss=train_loss, val_loss=val_loss, eval_step=step)
        best = val_loss < self.meta["min_val_loss"]
        if best:
            self.meta.update(min_val_loss=val_loss, min_val_step=step)
        return best

    def save_best(self, step: int, params) -> None:
        """The evaluated params alone (with ema_decay averaged params, which no optimizer
        state belongs to): the file to sample from or to ship."""
        self._save(self.best_path, step, params=params)

    def save_latest(self, step: int, state) -> None:
        """The training state (params, optimizer state, rng): the file to resume from."""
        self._save(self.latest_path, step, params=state.params, opt_state=state.opt_state,
                   rng=state.rng)

    def _save(self, path: str, step: int, **arrays) -> None:
        self.meta.update(step=step, wall_s=self.elapsed())
        if self.is_main:
            checkpoint.save(path, hparams=self.hparams, vocab=self.vocab, meta=self.meta,
                            **arrays)

    def evaluates(self, val_chars: int, split_chars: int) -> None:
        """Says (and tells Aim) what each evaluation reads: the whole validation split, or a
        fixed sample of it, val_chars of its split_chars predicted characters."""
        whole = val_chars == split_chars
        self.meta["eval_val_chars"] = val_chars
        self.tracker.set("evaluation", {"val_chars": val_chars, "val_split_chars": split_chars,
                                        "sample": not whole})
        self.say(f"evaluation: the whole validation split ({val_chars:,} characters) and as "
                 "many training characters" if whole else
                 f"evaluation: a fixed sample of the validation split, {val_chars:,} of its "
                 f"{split_chars:,} characters (--eval_chars), and as many training "
                 "characters; eval.py reads the whole split")

    def stopped(self, step: int, signum: int | None) -> None:
        why = "" if signum is None else f"{signal.Signals(signum).name}: "
        self.say(f"{why}stopped at step {step}; saved {self.latest_path}. Resume with:\n"
                 f"  python train.py --resume={self.latest_path}")

    def say(self, text: str) -> None:
        if self.is_main:
            print(text, file=sys.stderr)

    def plot(self) -> None:
        """The loss plot, train_validation_loss.<hash>.png, once there are evaluations."""
        if self.meta["history"]["step"] and self.is_main:
            plot_losses(self.meta["history"], self.plot_path, f"run {self.hash}")


class Tracker:
    """The Aim run, or nothing: training goes on (with one warning) if Aim cannot open."""

    def __init__(self, config, run_hash: str | None = None):
        self.run = None
        if not config.aim:
            return
        try:
            import aim  # imported here: a run with --aim=False never pays for it
            # Create the repository first: two first runs on a fresh folder otherwise race.
            aim.Repo.from_path(config.aim_repo, init=True)
            self.run = aim.Run(run_hash=run_hash, repo=config.aim_repo,
                               experiment="nanogpt-haiku")
            self._text = aim.Text
        except Exception as e:  # any failure to open Aim must not stop training
            print(f"warning: Aim tracking is off: cannot open an Aim repository in "
                  f"{config.aim_repo!r} ({type(e).__name__}: {e}). Training goes on; pass "
                  "--aim_repo=<writable folder> to track, or --aim=False to silence this.",
                  file=sys.stderr)
            self.run = None

    @property
    def hash(self) -> str | None:
        return None if self.run is None else self.run.hash

    def set(self, key: str, value: dict) -> None:
        if self.run is not None:
            self.run[key] = value

    def track(self, step: int, context: dict | None = None, **metrics: float) -> None:
        if self.run is not None:
            for name, value in metrics.items():
                self.run.track(float(value), name=name, step=step, context=context or {})

    def track_text(self, step: int, name: str, text: str) -> None:
        if self.run is not None:
            self.run.track(self._text(text), name=name, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.close()


def library_versions() -> dict:
    packages = ("jax", "jaxlib", "dm-haiku", "optax", "numpy", "aim")
    return {"python": platform.python_version(),
            **{name: importlib.metadata.version(name) for name in packages}}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def params_paths(params_dir: str, run_hash: str) -> tuple[str, str]:
    """(latest, best) params files of a run, named as in the original project."""
    latest = os.path.join(params_dir, f"params.{run_hash}.pkl")
    return latest, latest + ".min_val.pkl"


def plot_losses(history: dict, path: str, title: str) -> None:
    """train_validation_loss.png: both curves against step and, where the history has its
    wall-clock times, validation loss against minutes; the minimum marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, val = history["step"], history["val_loss"]
    best = int(np.argmin(val))
    minutes = [s / 60 for s in history.get("wall_s", [])]
    with_time = len(minutes) == len(steps)  # files before wall_s have no times
    fig, axes = plt.subplots(1, 2 if with_time else 1, figsize=(14 if with_time else 8, 5),
                             squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, history["train_loss"], label="train")
    ax.plot(steps, val, label="validation")
    ax.scatter([steps[best]], [val[best]], color="red", zorder=3,
               label=f"min validation {val[best]:.4f} at step {steps[best]}")
    ax.set(xlabel="step", ylabel="loss (nats/char)", title=title)
    if with_time:
        ax = axes[0, 1]
        ax.plot(minutes, val, color="C1", label="validation")
        ax.scatter([minutes[best]], [val[best]], color="red", zorder=3,
                   label=f"min validation at {minutes[best]:.1f} min")
        ax.set(xlabel="minutes since the run started", ylabel="loss (nats/char)",
               title="validation loss against wall-clock time")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def plot_path(params_dir: str, run_hash: str) -> str:
    return os.path.join(params_dir, f"train_validation_loss.{run_hash}.png")


class NonFiniteLoss(Exception):
    """A loss that is NaN or infinite: training stops, the last good params files kept."""


class Speed:
    """Training tokens per second since the last evaluation (which it does not count)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.tokens_per_s = time.time(), 0, 0.0

    def measure(self, metrics=None) -> float:
        """Once the steps that return `metrics` have run: dispatch is asynchronous, so a
        clock read when the last step is merely queued would count its queueing alone."""
        jax.block_until_ready(metrics)
        self.tokens_per_s = self.steps * self.tokens_per_step / (time.time() - self.start)
        return self.tokens_per_s


def log_progress(run: Run, bar: tqdm, step: int, metrics: dict, tokens_per_s: float,
                 rates: dict[str, float]) -> None:
    """Every log_interval steps: the training loss (a host sync), checked; the bar; Aim with
    the learning rates of the update that made `step` (optimizer.current_rates)."""
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"the training loss is {loss} at step {step}: training stopped. The last good "
            f"params files are kept ({run.latest_path}); try a lower --learning_rate.")
    bar.set_postfix(loss=f"{loss:.3f}", val=f"{run.meta['val_loss'] or math.nan:.3f}",
                    tok_s=f"{tokens_per_s:.0f}")
    run.tracker.track(step, batch_loss=loss, grad_norm=metrics["grad_norm"],
                      tokens_per_s=tokens_per_s,
                      **rates)


def log_evaluation(run: Run, bar: tqdm, step: int, losses, tokens_per_s: float,
                   rates: dict[str, float],
                   sample=None, eval_s: float | None = None) -> None:
    """One grep-able line per evaluation (also through pipes), with the evaluation's seconds
    (`eval_s`, the first one's compile included); both losses and a text sample
    (`sample()`) to Aim."""
    train_loss, val_loss = losses
    if run.is_main:
        bar.write(f"step {step} | train {train_loss:.4f} | val {val_loss:.4f} | "
                  f"{tokens_per_s:.0f} tok/s | " + " | ".join(
                      f"{name} {rate:.2e}" for name, rate in rates.items())
                  + ("" if eval_s is None else f" | evaluated in {eval_s:.1f} s"))
        sys.stdout.flush()
    for subset, loss in (("train", train_loss), ("val", val_loss)):
        run.tracker.track(step, {"subset": subset}, loss=loss, bpc=loss / math.log(2))
    if sample is not None:
        run.tracker.track_text(step, "sample", sample())


def plot_only(path: str) -> None:
    """train.py --plot_only: redraws the loss plot of the run of params file `path`."""
    ckpt = checkpoint.load(path)
    if not ckpt.meta.get("history", {}).get("step"):
        raise UserError(f"{path!r} holds no evaluations to plot.")
    plot = plot_path(os.path.dirname(path), ckpt.meta["run_hash"])
    plot_losses(ckpt.meta["history"], plot, f"run {ckpt.meta['run_hash']}")
    print(plot)
