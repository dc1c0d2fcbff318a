"""Train the character Transformer: `python train.py [--field=value ...]`.

Each step is one jitted function (sample a batch on the device, forward with dropout, AdamW
update). Every eval_interval steps: the loss over the whole validation split and as many
training windows, the latest params file, the best one (`.min_val.pkl`) when validation
improves, one log line, and Aim metrics with a text sample. Ctrl-C or SIGTERM saves the latest
params file and prints how to resume.
"""

import math
import os
import sys
import time
from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import checkpoint
import data
import distill
import eval as evaluation
import generate
import kernels
import transformer
from common import StopRequest, UserError, format_config, parse_overrides, run_main
from run import Run, params_paths, plot_losses, plot_path  # noqa: F401 (train.params_paths)


class Config(NamedTuple):
    batch_size: int = 32           # sequences per step, each max_seq_len characters
    max_iters: int = 15000         # optimizer steps in the run; the schedule spans them
    learning_rate: float = 3e-4    # peak AdamW learning rate, reached after warmup_iters
    warmup_iters: int = 200        # linear warmup from 0: early Adam steps are noisy
    schedule: str = "cosine"       # after warmup: "cosine" decay, or "wsd" (warmup-stable-
                                   # decay: constant, then linear over the last decay_fraction)
    decay_fraction: float = 0.2    # "wsd": the share of max_iters spent decaying
    min_lr_ratio: float = 0.1      # the decay ends at learning_rate * min_lr_ratio
    optimizer: str = "adamw"       # "adamw", or "muon": Muon on the hidden weight matrices,
                                   # AdamW (learning_rate) on embeddings, unembedding, biases, gains
    muon_learning_rate: float = 0.02  # "muon": the peak learning rate of its matrices
    weight_decay: float = 0.1      # decoupled decay: AdamW's on matrices and embeddings;
                                   # Muon's on its matrices (none on its AdamW part)
    weight_decay_final: float | None = None  # None: weight_decay throughout; else the decay
                                   # moves linearly from weight_decay to this over max_iters
    beta2: float = 0.99            # Adam's second-moment decay: small batches, noisy grads
    grad_clip: float = 1.0         # clip the global gradient norm to this (0: no clipping)
    ema_decay: float = 0.0         # evaluate (and keep as the best params) a moving average
                                   # of the params, this much of it kept per step (0: none)
    batches: str = "random"        # "random" windows, or "shuffled" passes over the text
    teachers: str = ""             # params files (comma-separated) trained on this text:
                                   # distil their ensemble into this model (distill.py)
    distill_weight: float = 0.5    # with teachers: the weight of the cross-entropy against
                                   # their averaged predictions (the rest: the next character)
    compute_dtype: str = "auto"    # training matmuls' operands (float32 accumulation and
                                   # params either way): "bfloat16", "float32", or "auto":
                                   # bfloat16 where it runs natively (README, "Precision")
    prng_seed: int = 6436          # initialization, batches and dropout all follow from it
    source_file: str = data.CORPUS_FILE  # any UTF-8 text: the first 90% trains, the rest
                                   # validates (the fetched known texts: SHA-256 checked)
    eval_interval: int = 500       # steps between full evaluations and params files
    eval_batch_size: int = 32      # windows per step of the evaluation lax.map
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
    preset: str = "auto"           # named recipe (PRESETS) whose settings replace these;
                                   # "auto": "cpu" on a CPU, "gpu" on a GPU (choose_preset)


CONFIG = Config()

# Named recipes: `--preset=NAME` starts from its settings; other --name=value still win.
# "original" is the defaults above, the original project's settings (a GPU-sized model with
# learned positions, AdamW, random windows). "cpu" is the best recipe found for 60 minutes
# on a 2-core CPU (README, "Results"): a 6 x 256 streaming model (rotary positions, a
# 128-character window) with heavy weight decay under Muon (0.3: it pays late in the hour),
# a second head trained on the character after next (ahead_loss 0.3), 4,000 steps sized for
# a 2-core Zen 5 (about 50 minutes there; a slower CPU takes longer): it shipped the
# Cervantes params. "shakespeare" is the recipe that shipped the Tiny Shakespeare params: 4
# layers, no second head, 5,600 steps (also about 50 minutes on a Zen 5), and fewer
# evaluations (`make shakespeare` fetches the text). "gpu" is the cpu recipe's methods sized
# for a GPU, nanoGPT's shakespeare_char shape (6 x 384, dropout 0.2, 256 characters, batch
# 64, 5,000 steps) as a streaming model: its time is unmeasured (no GPU was at hand); the
# tests check that it lowers for CUDA.
_CPU = (CONFIG._replace(preset="cpu", batch_size=32, max_iters=4000, learning_rate=3e-3,
                        warmup_iters=100, schedule="wsd", decay_fraction=1.0,
                        min_lr_ratio=0.0, optimizer="muon", muon_learning_rate=0.01,
                        weight_decay=0.3, batches="shuffled", eval_interval=200,
                        ema_decay=0.995),
        transformer.HPARAMS._replace(d_model=256, h=4, d_ff=1024, decoder_N=6, dropout=0.1,
                                     positions="rotary", attention_window=128,
                                     ahead_loss=0.3))
PRESETS = {
    "original": (CONFIG._replace(preset="original"), transformer.HPARAMS),
    "cpu": _CPU,
    "shakespeare": (_CPU[0]._replace(preset="shakespeare", max_iters=5600, eval_interval=400,
                                     source_file=data.TEXTS["tinyshakespeare"].file),
                    _CPU[1]._replace(decoder_N=4, ahead_loss=0.0)),
    "gpu": (_CPU[0]._replace(preset="gpu", batch_size=64, max_iters=5000, eval_interval=250),
            transformer.HPARAMS._replace(max_seq_len=256, dropout=0.2, positions="rotary",
                                         attention_window=256, ahead_loss=0.3)),
}


def choose_preset(requested: str, platform: str | None = None) -> tuple[str, str]:
    """(preset, why) for Config.preset: a name as asked; "auto" the recipe for the machine
    JAX runs on ("cpu" on a CPU, "gpu" on a GPU or TPU). platform defaults to this one's."""
    if requested != "auto":
        return requested, "--preset"
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return "cpu", ("auto: JAX runs on the CPU: the recipe for an hour on 2 Zen 5 cores "
                       "(a 6 x 256 streaming model; slower CPUs take longer)")
    return "gpu", (f"auto: JAX runs on {platform}: the GPU recipe (a 6 x 384 streaming "
                   "model; its time is unmeasured)")


class TrainState(NamedTuple):
    params: hk.Params
    opt_state: optax.OptState
    rng: jax.Array
    step: jax.Array  # [] int32: optimizer steps taken


class NonFiniteLoss(Exception):
    pass


def make_schedule(config: Config, peak: float | None = None) -> optax.Schedule:
    """Linear warmup from 0 to `peak` (default learning_rate), then to peak * min_lr_ratio at
    max_iters: by cosine decay, or ("wsd") constant until the last decay_fraction of the
    steps and linear from there."""
    peak = config.learning_rate if peak is None else peak
    end, warmup = peak * config.min_lr_ratio, config.warmup_iters
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(config.max_iters, warmup + 1), end_value=end)
    decay_start = max(warmup, round(config.max_iters * (1 - config.decay_fraction)))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
         optax.linear_schedule(peak, end, max(config.max_iters - decay_start, 1))],
        boundaries=[warmup, decay_start])


def learning_rates(config: Config) -> dict[str, optax.Schedule]:
    """Each optimizer part's schedule under its config name: learning_rate (AdamW: all the
    params, or under Muon its AdamW part) and, with Muon, muon_learning_rate."""
    rates = {"learning_rate": make_schedule(config)}
    if config.optimizer == "muon":
        rates["muon_learning_rate"] = make_schedule(config, config.muon_learning_rate)
    return rates


def embedding_or_unembedding(path) -> bool:
    names = [getattr(key, "key", "") for key in path]
    return any(name.endswith(("token_embed", "unembed", "unembed_ahead"))
               or name == "position_embed" for name in names)


def make_weight_decay(config: Config) -> float | optax.Schedule:
    """weight_decay, or (weight_decay_final) a linear schedule from it to weight_decay_final
    at max_iters: the decay is multiplied by the learning rate, so with a learning rate that
    falls to zero a rising decay keeps regularizing as the model anneals."""
    if config.weight_decay_final is None:
        return config.weight_decay
    return optax.linear_schedule(config.weight_decay, config.weight_decay_final,
                                 config.max_iters)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """Clipping, then AdamW; or Muon for the hidden weight matrices (attention projections
    and feed-forward weights: each update orthogonalized), with its AdamW part for the
    embeddings, the unembedding, biases and gains (optax.contrib.muon). With ema_decay, an
    average of the params (average_params) rides along as the last state."""
    # Decay weight matrices and embeddings, not biases or LayerNorm gains.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    clip = (optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0
            else optax.identity())
    decay = make_weight_decay(config)
    if config.optimizer == "adamw":
        optimizer = optax.chain(clip, optax.adamw(
            make_schedule(config), b1=0.9, b2=config.beta2, weight_decay=decay,
            mask=decay_mask))
    else:
        muon_dims = lambda params: jax.tree.map_with_path(  # None: to the AdamW part
            lambda path, p: None if p.ndim != 2 or embedding_or_unembedding(path)
            else optax.contrib.MuonDimensionNumbers(), params)
        # Muon orthogonalizes its momentum in the momentum's dtype: with bfloat16 compute,
        # gradients and first moments in bfloat16 halve the cost of its Newton-Schulz
        # matmuls (as the reference Muon runs them); second moments and params stay float32.
        low = kernels.choose_compute_dtype(config.compute_dtype)[0] == "bfloat16"
        to_compute_dtype = (optax.stateless(lambda g, _: optax.tree.cast(g, jnp.bfloat16))
                            if low else optax.identity())
        optimizer = optax.chain(clip, to_compute_dtype, optax.contrib.muon(
            make_schedule(config, config.muon_learning_rate), weight_decay=decay,
            adam_learning_rate=make_schedule(config), adam_b2=config.beta2,
            muon_weight_dimension_numbers=muon_dims, mu_dtype=jnp.bfloat16 if low else None))
    if config.ema_decay == 0:
        return optimizer
    return optax.chain(optimizer, average_params(config.ema_decay))


def average_params(decay: float) -> optax.GradientTransformation:
    """Chained last, it passes the updates through and keeps an exponential moving average
    of the params they make (optax.ema of the iterates): a cheap stand-in for annealing the
    learning rate, good at any step (see evaluated_params)."""
    ema = optax.ema(decay)

    def update(updates, state, params):
        _, state = ema.update(optax.apply_updates(params, updates), state)
        return updates, state

    return optax.GradientTransformation(ema.init, update)


def evaluated_params(config: Config, state: TrainState) -> hk.Params:
    """What evaluation scores and the min-validation file keeps: the params or, with
    ema_decay, their debiased moving average (the averaged state is the optimizer's last)."""
    if config.ema_decay == 0:
        return state.params
    average = state.opt_state[-1]
    return optax.tree.bias_correction(average.ema, config.ema_decay, average.count)


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of every process: data parallelism splits the batch."""
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def make_train_step(model: hk.Transformed, optimizer, batch_size: int, seq_len: int,
                    batch_sharding: jax.sharding.Sharding | None = None,
                    shuffle_key: jax.Array | None = None, ahead_loss: float = 0.0,
                    distill_weight: float = 0.0):
    """jitted (state, train_ids[, teacher]) -> (state, metrics): one optimizer step on a
    batch of random windows or, with `shuffle_key`, on the next batch of
    data.shuffled_starts's passes.

    With `batch_sharding`, the batch is split across the mesh and, since the state is
    replicated, XLA all-reduces the gradients: plain data parallelism. With `ahead_loss`
    (HParams.ahead_loss), the loss minimized adds that weight times the cross-entropy of the
    model's second head on the character after next. With `teacher` ([len(train_ids) - 1,
    V]: distill.teacher_targets), `distill_weight` of the next character's cross-entropy is
    taken against the teachers' distribution instead. metrics["loss"] is the next
    character's alone, as evaluation measures it.
    """
    def loss_fn(params, rng, inputs, targets, soft_targets):
        if ahead_loss:
            logits, after_next = model.apply(params, rng, inputs, True, ahead=True)
        else:
            logits = model.apply(params, rng, inputs, True)                  # [B, T, V]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        objective = loss
        if soft_targets is not None:
            soft = optax.softmax_cross_entropy(logits, soft_targets).mean()
            objective = (1 - distill_weight) * loss + distill_weight * soft
        if ahead_loss:
            objective += ahead_loss * optax.softmax_cross_entropy_with_integer_labels(
                after_next[:, :-1], targets[:, 1:]).mean()
        return objective, loss

    def train_step(state: TrainState, train_ids: jax.Array, teacher: jax.Array | None = None):
        rng, batch_key, dropout_key = jax.random.split(state.rng, 3)
        if shuffle_key is None:
            starts = data.sample_starts(batch_key, train_ids.shape[0], batch_size, seq_len)
        else:
            starts = data.shuffled_starts(shuffle_key, state.step, train_ids.shape[0],
                                          batch_size, seq_len)
        inputs, targets = data.window_batch(train_ids, starts, seq_len)
        soft_targets = (None if teacher is None else
                        teacher[starts[:, None] + jnp.arange(seq_len)])     # [B, T, V]
        if batch_sharding is not None:
            inputs, targets, soft_targets = jax.lax.with_sharding_constraint(
                (inputs, targets, soft_targets), batch_sharding)
        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, dropout_key, inputs, targets, soft_targets)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(params, opt_state, rng, state.step + 1), metrics

    return jax.jit(train_step, donate_argnums=0)


def check_config(config: Config) -> None:
    for name in ("batch_size", "max_iters", "eval_interval", "eval_batch_size",
                 "log_interval"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name}={getattr(config, name)}: must be >= 1.")
    for name in ("batch_size", "eval_batch_size"):
        if getattr(config, name) % jax.device_count():
            raise UserError(
                f"--{name}={getattr(config, name)} is not divisible by the {jax.device_count()}"
                f" devices ({jax.devices()[0].platform}) it is split across: use a multiple "
                f"of {jax.device_count()}.")
    if not config.learning_rate > 0:
        raise UserError(f"--learning_rate={config.learning_rate}: must be > 0.")
    if not 0 <= config.min_lr_ratio <= 1:
        raise UserError(f"--min_lr_ratio={config.min_lr_ratio}: must be in [0, 1].")
    for name in ("warmup_iters", "sample_chars", "weight_decay", "weight_decay_final",
                 "grad_clip"):
        value = getattr(config, name)
        if value is not None and value < 0:  # None: weight_decay_final unset
            raise UserError(f"--{name}={value}: must be >= 0.")
    for name, values in (("compute_dtype", ("auto", "bfloat16", "float32")),
                         ("optimizer", ("adamw", "muon")), ("schedule", ("cosine", "wsd")),
                         ("batches", ("random", "shuffled"))):
        if getattr(config, name) not in values:
            raise UserError(f"--{name}={getattr(config, name)!r}: one of {', '.join(values)}.")
    if not config.muon_learning_rate > 0:
        raise UserError(f"--muon_learning_rate={config.muon_learning_rate}: must be > 0.")
    if not 0 < config.decay_fraction <= 1:
        raise UserError(f"--decay_fraction={config.decay_fraction}: must be in (0, 1].")
    if not 0 <= config.ema_decay < 1:
        raise UserError(f"--ema_decay={config.ema_decay}: must be in [0, 1).")
    if not 0 <= config.distill_weight <= 1:
        raise UserError(f"--distill_weight={config.distill_weight}: must be in [0, 1].")


class Start(NamedTuple):
    """Where a run begins: fresh from the seed, or from a params file."""
    state: TrainState
    hparams: transformer.HParams
    vocab: str
    meta: dict  # run_hash, min_val_loss, min_val_step, history, ... (empty when fresh)


def fresh_start(config, hparams, vocab, model, optimizer) -> Start:
    init_key, rng = jax.random.split(jax.random.PRNGKey(config.prng_seed))
    dummy = jnp.zeros((1, hparams.max_seq_len), jnp.int32)
    params = jax.jit(model.init, static_argnums=2)(init_key, dummy, False)  # one compile
    return Start(TrainState(params, optimizer.init(params), rng, jnp.int32(0)), hparams,
                 vocab, {})


def resume_start(config, hparams, optimizer) -> Start:
    if config.resume.endswith(".min_val.pkl"):
        raise UserError(
            f"--resume={config.resume}: a .min_val.pkl file holds a run's best params (with "
            f"--ema_decay, their average), not its training state. Resume from the run's "
            f"latest file: --resume={config.resume.removesuffix('.min_val.pkl')}")
    ckpt = checkpoint.load(config.resume)
    if hparams not in (transformer.HPARAMS, ckpt.hparams):
        raise UserError(f"--resume={config.resume}: the model's HPARAMS come from the params "
                        f"file ({ckpt.hparams}); drop the model overrides.")
    if ckpt.opt_state is None or ckpt.rng is None:
        raise UserError(f"--resume={config.resume}: the file has no optimizer state or rng "
                        "(a shipped params file?); resume from a training run's file.")
    params = jax.device_put(ckpt.params)
    expected = jax.eval_shape(optimizer.init, params)  # shapes only: no compute
    structure = jax.tree.structure(expected)
    if [x.shape for x in jax.tree.leaves(expected)] != [np.shape(x) for x in ckpt.opt_state]:
        raise UserError(f"--resume={config.resume}: its optimizer state does not match this "
                        "optimizer (was weight decay, clipping or ema_decay switched on or "
                        "off?).")
    # In this optimizer's dtypes: a run resumed where "auto" chooses another compute dtype.
    opt_state = jax.tree.unflatten(structure, [jnp.asarray(x, e.dtype) for x, e in zip(
        ckpt.opt_state, jax.tree.leaves(expected))])
    state = TrainState(params, opt_state, jnp.asarray(ckpt.rng), jnp.int32(ckpt.meta["step"]))
    return Start(state, ckpt.hparams, ckpt.vocab, ckpt.meta)


class Setup(NamedTuple):
    """What the loop needs: set_up makes it."""
    hparams: transformer.HParams  # the run's (a resumed run's come from its file)
    state: TrainState             # on the devices, replicated
    train_step: Callable          # jitted (state, train_ids, teacher) -> (state, metrics)
    train_ids: jax.Array          # the training split, on every device
    teacher: jax.Array | None     # with --teachers: their averaged predictions of train_ids
    evaluate: Callable            # params -> (train_loss, val_loss) over the fixed windows
    sample: Callable | None       # (params, step) -> a text sample for Aim, or None
    run: Run


def set_up(config: Config, hparams: transformer.HParams, entered: float) -> Setup:
    """The text (checked), the starting state (fresh or resumed), the jitted step and the
    evaluation on the devices' mesh, and the run's record."""
    text = data.read_text(config.source_file)
    optimizer = make_optimizer(config)
    if config.resume:
        start = resume_start(config, hparams, optimizer)
    else:
        vocab = data.build_vocab(text)
        start = fresh_start(config, hparams, vocab, transformer.build(hparams, len(vocab)),
                            optimizer)
    hparams, vocab = start.hparams, start.vocab  # a resumed run's come from its file
    eval_seq_len = evaluation.window_len(hparams)
    data.check_splits(config.source_file, len(text), hparams.max_seq_len + 1, eval_seq_len + 1)
    ids = data.encode(text, vocab)
    train_ids, _ = data.split(ids)
    if (config.batches == "shuffled"
            and data.windows_per_pass(len(train_ids), hparams.max_seq_len) < config.batch_size):
        raise UserError(f"--batches=shuffled: the training split holds fewer than "
                        f"batch_size={config.batch_size} windows of {hparams.max_seq_len}.")
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    compute_dtype, why = kernels.choose_compute_dtype(config.compute_dtype)
    shuffle_key = (jax.random.fold_in(jax.random.PRNGKey(config.prng_seed), 1)
                   if config.batches == "shuffled" else None)
    train_step = make_train_step(transformer.build(hparams, len(vocab), compute_dtype),
                                 optimizer, config.batch_size, hparams.max_seq_len,
                                 NamedSharding(mesh, P("data")), shuffle_key,
                                 hparams.ahead_loss, config.distill_weight)
    state = jax.tree.map(lambda x: data.put(np.asarray(x), replicated), start.state)
    run = Run(config, hparams, vocab, start.meta, compute_dtype,
              started=entered - start.meta.get("wall_s", 0.0),  # the run's, compiles included
              is_main=jax.process_index() == 0)  # only process 0 writes files and tracks
    run.say(f"run {run.hash}: {checkpoint.num_params(state.params):,} params, {len(vocab)} "
            f"characters, steps {int(state.step)} -> {config.max_iters}, params files "
            f"{run.latest_path}[.min_val.pkl]\ncompute dtype: {compute_dtype} ({why})")
    evaluate = make_evaluate(hparams, len(vocab), ids, config.eval_batch_size, mesh)
    sample = (make_sample(hparams, vocab, config.sample_chars)
              if config.sample_chars and run.tracker.run is not None else None)
    teacher = None
    if config.teachers:
        teacher = data.put(distill.teacher_targets(config.teachers, train_ids, vocab,
                                                   compute_dtype), replicated)
        run.say(f"teachers: {config.teachers} (distill_weight {config.distill_weight})")
    return Setup(hparams, state, train_step, data.put(train_ids, replicated), teacher,
                 evaluate, sample, run)


def make_evaluate(hparams: transformer.HParams, vocab_size: int, ids: np.ndarray,
                  batch_size: int, mesh: jax.sharding.Mesh) -> Callable:
    """params -> (train_loss, val_loss): the whole validation split, and as many training
    windows, in eval.py's windows and float32, the batches split across the mesh
    ([batches, batch, T])."""
    windows = evaluation.split_windows(ids, evaluation.window_len(hparams))
    sharding = NamedSharding(mesh, P(None, "data"))
    train_batches, val_batches = (data.batch_windows(w, batch_size, sharding)
                                  for w in windows)
    window_loss = evaluation.make_window_loss(transformer.build(hparams, vocab_size))
    return lambda params: (evaluation.mean_loss(window_loss, params, train_batches),
                           evaluation.mean_loss(window_loss, params, val_batches))


def make_sample(hparams: transformer.HParams, vocab: str, num_chars: int) -> Callable:
    """(params, step) -> num_chars sampled from a newline, seeded by the step."""
    sampler = generate.Sampler(hparams, len(vocab))
    newline = data.encode("\n", vocab) if "\n" in vocab else np.zeros(1, np.int32)

    def sample(params, step: int) -> str:
        # Host copies: process 0 samples alone, outside the multi-process computation.
        ids = sampler.sample(jax.device_get(params), newline, jax.random.PRNGKey(step),
                             num_chars)
        return data.decode(ids, vocab)

    return sample


class Speed:
    """Training tokens per second since the last evaluation (which it does not count)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.tokens_per_s = time.time(), 0, 0.0

    def measure(self) -> float:
        self.tokens_per_s = self.steps * self.tokens_per_step / (time.time() - self.start)
        return self.tokens_per_s


def log_progress(run: Run, bar: tqdm, step: int, metrics: dict, tokens_per_s: float,
                 rates: dict) -> None:
    """Every log_interval steps: the training loss (a host sync), checked; the bar; Aim."""
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"the training loss is {loss} at step {step}: training stopped. The last good "
            f"params files are kept ({run.latest_path}); try a lower --learning_rate.")
    bar.set_postfix(loss=f"{loss:.3f}", val=f"{run.meta['val_loss'] or math.nan:.3f}",
                    tok_s=f"{tokens_per_s:.0f}")
    run.tracker.track(step, batch_loss=loss, grad_norm=metrics["grad_norm"],
                      tokens_per_s=tokens_per_s,
                      **{name: rate(step - 1) for name, rate in rates.items()})


def evaluate(setup: Setup, config: Config, state: TrainState, step: int):
    """-> (the evaluated params, (train_loss, val_loss)); a non-finite loss stops the run."""
    params = evaluated_params(config, state)
    train_loss, val_loss = setup.evaluate(params)
    if not math.isfinite(val_loss):
        raise NonFiniteLoss(f"the validation loss is {val_loss} at step {step}: training "
                            f"stopped; {setup.run.latest_path} is kept.")
    return params, (train_loss, val_loss)


def save_checkpoints(run: Run, step: int, state: TrainState, params, losses) -> None:
    """The best file when validation improves (the evaluated params), then the latest."""
    if run.record(step, *losses):
        run.save_best(step, params)
    run.save_latest(step, state)


def log_evaluation(run: Run, bar: tqdm, step: int, losses, tokens_per_s: float, rates: dict,
                   sample: Callable | None) -> None:
    """One grep-able line per evaluation (also through pipes); both losses and a text
    sample (`sample()`) to Aim."""
    train_loss, val_loss = losses
    if run.is_main:
        bar.write(f"step {step} | train {train_loss:.4f} | val {val_loss:.4f} | "
                  f"{tokens_per_s:.0f} tok/s | " + " | ".join(
                      f"{name} {rate(step - 1):.2e}" for name, rate in rates.items()))
        sys.stdout.flush()
    for subset, loss in (("train", train_loss), ("val", val_loss)):
        run.tracker.track(step, {"subset": subset}, loss=loss, bpc=loss / math.log(2))
    if sample is not None:
        run.tracker.track_text(step, "sample", sample())


def train(config: Config, hparams: transformer.HParams, stop_at: int | None = None) -> dict:
    """Runs training to config.max_iters (or to step `stop_at`, saving as an interrupt does):
    step -> evaluate -> checkpoint -> log. Returns the run's meta: step, losses,
    min_val_loss, history, run_hash, ..."""
    setup = set_up(config, hparams, entered=time.time())
    state, run, step = setup.state, setup.run, int(setup.state.step)
    rates, speed = learning_rates(config), Speed(config.batch_size * setup.hparams.max_seq_len)
    bar = tqdm(total=config.max_iters, initial=step, unit="step", dynamic_ncols=True,
               disable=not (sys.stderr.isatty() and run.is_main))
    try:
        with StopRequest() as stop:
            while step < config.max_iters and stop.signum is None and step != stop_at:
                state, metrics = setup.train_step(state, setup.train_ids, setup.teacher)
                step += 1
                speed.steps += 1
                bar.update(1)
                if step % config.log_interval == 0 or step % config.eval_interval == 0:
                    log_progress(run, bar, step, metrics, speed.measure(), rates)
                if step % config.eval_interval == 0 or step == config.max_iters:
                    params, losses = evaluate(setup, config, state, step)
                    save_checkpoints(run, step, state, params, losses)
                    log_evaluation(run, bar, step, losses, speed.tokens_per_s, rates,
                                   setup.sample and (lambda: setup.sample(params, step)))
                    speed.reset()
            bar.close()
            if step < config.max_iters:  # stopped early: by a signal, or at stop_at
                run.save_latest(step, state)
                run.stopped(step, stop.signum)
    finally:  # also on a NaN loss or an error: the Aim run is closed, not left open
        run.tracker.close()
    run.plot()
    run.meta["step"] = step
    return run.meta


def resolve(argv) -> tuple[Config, transformer.HParams]:
    """The run's config and HPARAMS: the arguments over the preset's settings (choose_preset)
    or, with --resume, over the config saved in the params file (and its HPARAMS), so that a
    resumed run keeps its schedule without repeating its options."""
    config, _ = parse_overrides(argv, CONFIG, transformer.HPARAMS)
    if config.resume:
        ckpt = checkpoint.load(config.resume)
        saved = {k: v for k, v in ckpt.meta.get("config", {}).items() if k in Config._fields}
        return parse_overrides(argv, CONFIG._replace(**saved), ckpt.hparams)
    name, _ = choose_preset(config.preset)
    if name not in PRESETS:
        raise UserError(f"--preset={name}: unknown preset. Valid presets: auto, "
                        f"{', '.join(PRESETS)}.")
    config, hparams = parse_overrides(argv, *PRESETS[name])
    return config._replace(preset=name), hparams


def start_distributed(config: Config) -> None:
    jax.distributed.initialize(config.coordinator_address or None, config.num_processes,
                               config.process_id)


def main(argv) -> int:
    requested, _ = parse_overrides(argv, CONFIG, transformer.HPARAMS)
    if requested.distributed:  # before any other JAX call (choose_preset asks for the backend)
        start_distributed(requested)
    config, hparams = resolve(argv)
    if config.plot_only:
        ckpt = checkpoint.load(config.plot_only)
        if not ckpt.meta.get("history", {}).get("step"):
            raise UserError(f"{config.plot_only!r} holds no evaluations to plot.")
        path = plot_path(os.path.dirname(config.plot_only), ckpt.meta["run_hash"])
        plot_losses(ckpt.meta["history"], path, f"run {ckpt.meta['run_hash']}")
        print(path)
        return 0
    if config.distributed and not requested.distributed:  # saved in the file it resumes
        start_distributed(config)
    check_config(config)
    try:
        transformer.validate(hparams)
    except ValueError as e:
        raise UserError(str(e)) from None
    why = "the resumed run's" if config.resume else choose_preset(requested.preset)[1]
    print(f"devices: {jax.devices()}\npreset: {config.preset} ({why})\nconfig:\n"
          f"{format_config(config)}\nhparams:\n{format_config(hparams)}", file=sys.stderr)
    try:
        meta = train(config, hparams)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: min val loss {meta['min_val_loss']:.4f} at step {meta['min_val_step']}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
