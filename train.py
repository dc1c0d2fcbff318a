"""Train the character Transformer: `python train.py [--field=value ...]`.

Each step is one jitted function (draw a batch on the device, the objectives' loss with
dropout, the optimizer's update). Every eval_interval steps: the loss over the validation
split (a fixed sample of it past eval_chars characters) and as many training windows, the
latest params file, the best one (`.min_val.pkl`) when validation improves, one log line,
and Aim metrics with a text sample. `--minutes=N` trains for N minutes of wall time instead
(budget.py: the steps, the evaluations). Ctrl-C or SIGTERM saves the latest params file and
prints how to resume. The run is CONFIG below and transformer.HPARAMS as written; named
recipes (--preset, --minutes' choice): recipes.py. The text as ids: encoding.py; the step: train_step.py; its loss: objectives.py; the optimizer:
optimizer.py; the run's files, log and plot: run.py.
"""

import time

STARTED = time.time()  # before the other imports (seconds): a --minutes budget counts them

import functools
import os
import sys
from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import budget
import checkpoint
import data
import encoding
import kernels
import metrics
import model_checks
import objectives
import sampling
import transformer
from common import (StopRequest, UserError, describe, format_config, parse_overrides,
                    run_main)
from optimizer import current_rates, evaluated_params, hidden_matrices, make_optimizer
from recipes import PRESETS, apply, check_config, resolve
from run import (NonFiniteLoss, Run, Speed, log_evaluation, log_progress,
                 params_paths, plot_only)  # noqa: F401 (train.params_paths)
from train_step import (TrainState, init_state, make_mesh, make_train_step, mesh_devices,
                        resumed_state, split_cpu_cores)


class Config(NamedTuple):
    """The run. `python train.py` trains these values (and transformer.HPARAMS) as written:
    the recipe of the shipped Cervantes params. --name=value changes one for a run; a named
    recipe (--preset, --minutes) replaces some, each printed (recipes.py)."""
    batch_size: int = 32           # sequences per step, each max_seq_len characters
    max_iters: int = 4000          # optimizer steps in the run; the schedule spans them
    minutes: float = 0.0           # a budget of wall time instead (start-up and evaluations
                                   # included): the rates decay as the time runs out; without
                                   # --preset the budget's recipe (recipes.BUDGETS); 0: none
    learning_rate: float = 3e-3    # peak AdamW learning rate (under Muon: of its AdamW part)
    warmup_iters: int = 100        # linear warmup from 0: early Adam steps are noisy
    schedule: str = "wsd"          # after warmup: "cosine" decay, or "wsd" (warmup-stable-
                                   # decay: constant, then linear over the last decay_fraction)
    decay_fraction: float = 1.0    # "wsd": the share of max_iters spent decaying
    min_lr_ratio: float = 0.0      # the decay ends at learning_rate * min_lr_ratio
    optimizer: str = "muon"        # "adamw", or "muon": Muon on the hidden weight matrices,
                                   # AdamW (learning_rate) on embeddings, unembedding, biases, gains
    muon_learning_rate: float = 0.01  # "muon": the peak learning rate of its matrices
    muon_ns_steps: int = 5         # "muon": Newton-Schulz iterations orthogonalizing each
                                   # update of its matrices (fewer: cheaper, rougher)
    weight_decay: float = 0.3      # decoupled decay: AdamW's on matrices and embeddings;
                                   # Muon's on its matrices (none on its AdamW part)
    weight_decay_final: float | None = None  # None: weight_decay throughout; else the decay
                                   # moves linearly from weight_decay to this over max_iters
    beta2: float = 0.99            # Adam's second-moment decay: small batches, noisy grads
    grad_clip: float = 1.0         # clip the global gradient norm to this (0: no clipping)
    ahead_loss: float = 0.3        # multi-token prediction: a training-only second head
                                   # predicts the character after next, its loss added at
                                   # this weight (objectives.py; 0: none)
    ema_decay: float = 0.995       # evaluate (and keep as the best params) a moving average
                                   # of the params, this much of it kept per step (0: none)
    batches: str = "shuffled"      # "random" windows, or "shuffled" passes over the text
    teachers: str = ""             # params files (comma-separated) trained on this text:
                                   # distil their ensemble into this model (objectives.py)
    distill_weight: float = 0.5    # with teachers: the weight of the cross-entropy against
                                   # their averaged predictions (the rest: the next character)
    compute_dtype: str = "auto"    # training matmuls' operands (float32 accumulation and
                                   # params either way): "bfloat16", "float32", or "auto":
                                   # bfloat16 where it runs natively (README, "Precision")
    prng_seed: int = 6436          # initialization, batches and dropout all follow from it
    source_file: str = data.CORPUS_FILE  # any UTF-8 text: the first 90% trains, the rest
                                   # validates (the fetched known texts: SHA-256 checked)
    min_char_count: int = 1        # the vocabulary: the characters seen at least this often;
                                   # the rest read as one unknown symbol (encoding.py)
    eval_interval: int = 200       # steps between full evaluations and params files
    eval_batch_size: int = 32      # windows per step of the evaluation lax.map
    eval_chars: int = 111_616      # characters each evaluation reads of the validation split:
                                   # the whole split if it is no longer (Cervantes', Tiny
                                   # Shakespeare's: 872 windows of 128, the larger), else
                                   # evenly spread windows, the same in every run of a text;
                                   # as many of the training split. eval.py reads it whole
    cpu_devices: int = 0           # on one CPU host, the per-core devices the batch is split
                                   # across (0: as many as divide the batches with AdamW,
                                   # one with Muon: train_step.mesh_devices)
    log_interval: int = 10         # steps between progress updates (each syncs the host)
    resume: str = ""               # params file (`params/params.<hash>.pkl`) to continue
    params_dir: str = "params"     # where params files and the loss plot go
    aim: bool = True               # track the run in Aim (`aim up` to browse)
    aim_repo: str = "."            # folder holding the Aim repository `.aim`
    sample_chars: int = 200        # characters sampled for Aim at each evaluation (0: none)
    plot_only: str = ""            # params file: redraw its run's loss plot and exit
    distributed: bool = False      # several hosts: jax.distributed.initialize() first
    coordinator_address: str = ""  # host:port of process 0 ("": from the environment)
    num_processes: int | None = None  # processes in all (None: from the environment)
    process_id: int | None = None  # this process (None: from the environment)
    preset: str = ""               # a named recipe (recipes.PRESETS) over these values, each
                                   # field it replaces printed; "none": these even with --minutes


CONFIG = Config()


def read_text(config: Config, hparams: transformer.HParams, vocab: str | None):
    """config.source_file as ids (encoding.load: against a resumed run's `vocab`, else its
    own), checked to hold the windows that training and evaluation cut; its note says how
    long reading it took."""
    began = time.time()
    text = encoding.load(config.source_file, vocab, config.min_char_count)
    data.check_splits(config.source_file, len(text.ids), hparams.max_seq_len + 1,
                      metrics.window_len(hparams) + 1)
    num_train = len(data.split(text.ids)[0])
    if (config.batches == "shuffled"
            and data.windows_per_pass(num_train, hparams.max_seq_len) < config.batch_size):
        raise UserError(f"--batches=shuffled: the training split holds fewer than "
                        f"batch_size={config.batch_size} windows of {hparams.max_seq_len}.")
    return text._replace(note=f"{text.note} (text read in {time.time() - began:.1f} s)")


class Setup(NamedTuple):
    """What the loop needs: set_up makes it."""
    config: Config
    hparams: transformer.HParams  # the run's (a resumed run's come from its file)
    state: TrainState             # on the devices, replicated
    train_step: Callable          # jitted (state, train_ids, teachers) -> (state, metrics)
    train_ids: jax.Array          # the training split, on every device
    teachers: tuple | None        # with --teachers: their tables or params (objectives.py)
    evaluate: Callable            # params -> (train_loss, val_loss) over the fixed windows
    sample: Callable | None       # (params, step) -> a text sample for Aim, or None
    run: Run


def set_up(config: Config, hparams: transformer.HParams, entered: float) -> Setup:
    """The text (checked), the starting state (fresh or resumed), the jitted step and the
    evaluation on the devices' mesh, and the run's record."""
    ckpt = checkpoint.load(config.resume) if config.resume else None
    if ckpt is not None and hparams not in (transformer.HPARAMS, ckpt.hparams):
        raise UserError(f"--resume={config.resume}: the model's HPARAMS come from the params "
                        f"file ({ckpt.hparams}); drop the model overrides.")
    hparams = ckpt.hparams if ckpt else hparams
    text = None if ckpt else read_text(config, hparams, None)  # a fresh run's vocabulary
    vocab = ckpt.vocab if ckpt else text.vocab
    compute_dtype, why = kernels.choose_compute_dtype(config.compute_dtype)
    weights = objectives.Weights(config.ahead_loss, config.distill_weight)
    loss_fn = objectives.loss_fn(hparams, len(vocab), weights, compute_dtype)
    loss = hk.transform(loss_fn)
    dummy = jnp.zeros((1, hparams.max_seq_len), jnp.int32)
    optimizer = make_optimizer(config, hidden_matrices(loss_fn, dummy, dummy))
    state = (resumed_state(config, ckpt, optimizer) if ckpt else
             init_state(config.prng_seed, loss, optimizer, hparams.max_seq_len))
    if text is None:  # a resumed run's, once its state is checked
        text = read_text(config, hparams, vocab)
    ids = text.ids
    train_ids, val_ids = data.split(ids)
    teachers = (objectives.make_teachers(config.teachers, vocab, hparams.max_seq_len,
                                         train_ids) if config.teachers else None)
    mesh = make_mesh(mesh_devices(config))
    replicated = NamedSharding(mesh, P())
    put = lambda tree: jax.tree.map(lambda x: data.put(np.asarray(x), replicated), tree)
    shuffle_key = (jax.random.fold_in(jax.random.PRNGKey(config.prng_seed), 1)
                   if config.batches == "shuffled" else None)
    train_step = make_train_step(loss, optimizer, config.batch_size, hparams.max_seq_len,
                                 NamedSharding(mesh, P("data")), shuffle_key,
                                 teachers and teachers.targets)
    state = put(state)
    run = Run(config, hparams, vocab, ckpt.meta if ckpt else {}, compute_dtype,
              started=entered - (ckpt.meta.get("wall_s", 0.0) if ckpt else 0.0),
              is_main=jax.process_index() == 0)  # only process 0 writes files and tracks
    until = f"{config.minutes:g} minutes" if config.minutes else config.max_iters
    run.say(f"run {run.hash}: {checkpoint.num_params(state.params):,} params, {text.note}, "
            f"steps {int(state.step)} -> {until}, params files {run.latest_path}[.min_val.pkl]"
            f"\ncompute dtype: {compute_dtype} ({why})")
    evaluate, val_chars = metrics.make_evaluate(hparams, len(vocab), ids,
                                                config.eval_batch_size,
                                                NamedSharding(mesh, P(None, "data")),
                                                config.eval_chars)
    run.evaluates(val_chars, len(val_ids) - 1)
    if teachers:
        run.say(f"teachers: {config.teachers} (distill_weight {config.distill_weight})")
    sample = (make_sample(hparams, vocab, config.sample_chars)
              if config.sample_chars and run.tracker.run is not None else None)
    return Setup(config, hparams, state, train_step, put(train_ids),
                 teachers and put(teachers.params), evaluate, sample, run)


def make_sample(hparams: transformer.HParams, vocab: str, num_chars: int) -> Callable:
    """(params, step) -> num_chars sampled from a newline, seeded by the step."""
    sampler = sampling.Sampler(hparams, len(vocab))
    newline = data.encode("\n", vocab) if "\n" in vocab else np.zeros(1, np.int32)

    def sample(params, step: int) -> str:
        # Host copies: process 0 samples alone, outside the multi-process computation.
        ids = sampler.sample(jax.device_get(params), newline, jax.random.PRNGKey(step),
                             num_chars)
        return data.decode(ids, vocab)

    return sample


def evaluate_state(setup: Setup, state: TrainState, step: int):
    """-> (the evaluated params: the model's, averaged with ema_decay; (train_loss,
    val_loss)); a non-finite loss stops the run."""
    params = objectives.model_params(
        evaluated_params(setup.config, state.params, state.opt_state))
    train_loss, val_loss = setup.evaluate(params)
    if not np.isfinite(val_loss):
        raise NonFiniteLoss(f"the validation loss is {val_loss} at step {step}: training "
                            f"stopped; {setup.run.latest_path} is kept.")
    return params, (train_loss, val_loss)


def save_checkpoints(run: Run, step: int, state: TrainState, params, losses) -> None:
    """The best file when validation improves (the evaluated params), then the latest."""
    if run.record(step, *losses):
        run.save_best(step, params)
    run.save_latest(step, state)


def train(config: Config, hparams: transformer.HParams, stop_at: int | None = None,
          started: float | None = None) -> dict:
    """Runs training to config.max_iters, or for config.minutes from `started` (default: now;
    budget.py), or to step `stop_at` (saving as an interrupt does): step -> evaluate ->
    checkpoint -> log. Returns the run's meta: step, losses, min_val_loss, history, ..."""
    setup = set_up(config, hparams, entered=started or time.time())
    state, run, step = setup.state, setup.run, int(setup.state.step)
    plan = budget.plan(config, run.started)
    speed = Speed(config.batch_size * setup.hparams.max_seq_len)
    bar = tqdm(total=plan.total, initial=step, unit="step", dynamic_ncols=True,
               disable=not (sys.stderr.isatty() and run.is_main))
    step_metrics = None
    try:
        with StopRequest() as stop:
            evaluates = isinstance(plan, budget.Clock)  # a timed run times one first
            while True:
                if evaluates:
                    if step_metrics is not None:  # before each evaluation: a sync
                        log_progress(run, bar, step, step_metrics, speed.measure(step_metrics),
                                     current_rates(config, state.opt_state, step))
                    evaluate_and_save(setup, state, step, plan, speed, bar)
                if plan.finished(step) or stop.signum is not None or step == stop_at:
                    break
                state, step_metrics = setup.train_step(state, setup.train_ids, setup.teachers,
                                                       plan.progress(step_metrics))
                step += 1
                speed.steps += 1
                bar.update(1)
                evaluates = plan.evaluates(step)
                if step % config.log_interval == 0 and not evaluates:
                    log_progress(run, bar, step, step_metrics, speed.measure(step_metrics),
                                 current_rates(config, state.opt_state, step))
            bar.close()
            if not plan.finished(step):  # stopped early: by a signal, or at stop_at
                run.save_latest(step, state)
                run.stopped(step, stop.signum)
    finally:  # also on a NaN loss or an error: the Aim run is closed, not left open
        run.tracker.close()
    run.plot()
    run.meta["step"] = step
    return run.meta


def evaluate_and_save(setup: Setup, state: TrainState, step: int, plan, speed: Speed,
                      bar: tqdm) -> None:
    """An evaluation: the params files, its log line and Aim; its time to the plan."""
    began = time.time()
    with budget.CompileTime() as compiling:
        params, losses = evaluate_state(setup, state, step)
    eval_s = time.time() - began
    save_checkpoints(setup.run, step, state, params, losses)
    log_evaluation(setup.run, bar, step, losses, speed.tokens_per_s,
                   current_rates(setup.config, state.opt_state, step),
                   setup.sample and (lambda: setup.sample(params, step)), eval_s)
    plan.evaluated(eval_s - compiling.seconds)  # as the last one, compiled by then, will take
    speed.reset()


def gpu_hint(config: Config) -> str:
    """On a GPU, without a preset: the line that names the GPU-sized recipe."""
    platform = jax.default_backend()
    if config.preset or config.resume or platform == "cpu":
        return ""
    return (f"on {platform}: --preset=gpu trains the GPU-sized recipe "
            f"({describe(*apply(PRESETS['gpu'], CONFIG, transformer.HPARAMS)[:2])})\n")


def start_distributed(config: Config) -> None:
    jax.distributed.initialize(config.coordinator_address or None, config.num_processes,
                               config.process_id)


def main(argv, started: float | None = None) -> int:
    """`started`: when the process started (a --minutes budget counts from it)."""
    requested, _ = parse_overrides(argv, CONFIG, transformer.HPARAMS)
    if requested.distributed:  # before any other JAX call
        start_distributed(requested)
    elif not requested.resume:  # a resumed run's: as saved in its file, below
        split_cpu_cores()
    config, hparams, said = resolve(argv, CONFIG, transformer.HPARAMS)
    if config.plot_only:
        plot_only(config.plot_only)
        return 0
    if config.resume and not requested.distributed:  # as saved in the file it resumes
        if config.distributed:
            start_distributed(config)
        else:
            split_cpu_cores()
    check_config(config)
    try:
        model_checks.validate(hparams)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"devices: {mesh_devices(config)}\n{said}\n{gpu_hint(config)}config:\n"
          f"{format_config(config)}\n"
          f"hparams:\n{format_config(hparams)}", file=sys.stderr)
    try:
        meta = train(config, hparams, started=started)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: min val loss {meta['min_val_loss']:.4f} at step {meta['min_val_step']}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(functools.partial(main, started=STARTED), __doc__, [CONFIG, transformer.HPARAMS],
             {name: apply(recipe, CONFIG, transformer.HPARAMS)[:2]
              for name, recipe in PRESETS.items()})
