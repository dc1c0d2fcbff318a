"""The optimizer, built from train.py's Config: learning-rate schedules, weight decay and its
schedule, clipping, AdamW or Muon (optax.contrib.muon on the hidden weight matrices), and an
averaged copy of the params riding along as the optimizer's last state.
"""

import functools
from typing import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import optax

import kernels


def make_schedule(config, peak: float | None = None) -> optax.Schedule:
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


def make_decay(config, peak: float | None = None) -> optax.Schedule:
    """The rate as a function of a budget's progress (0 to 1: the share of its time spent),
    no warmup: from `peak` (default learning_rate) to peak * min_lr_ratio at 1, by cosine
    decay or ("wsd") constant until 1 - decay_fraction and linear from there."""
    peak = config.learning_rate if peak is None else peak
    end = peak * config.min_lr_ratio
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(peak, decay_steps=1, alpha=config.min_lr_ratio)
    return optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, end, config.decay_fraction)],
        boundaries=[1 - config.decay_fraction])


class Clocked:
    """An optax.StatefulSchedule of a timed run (train.py --minutes): `decay` of the update's
    extra argument `progress` (the share of the budget spent, from the host's clock), times
    a linear warmup over the first `warmup` steps (its state: the steps taken)."""

    def __init__(self, decay: optax.Schedule, warmup: int):
        self.decay, self.warmup = decay, warmup

    def init(self) -> jax.Array:
        return jnp.zeros([], jnp.int32)

    def update(self, count: jax.Array, progress: jax.Array = 0.0) -> jax.Array:
        return count + 1

    def __call__(self, count: jax.Array, progress: jax.Array = 0.0) -> jax.Array:
        return self.decay(progress) * (jnp.minimum(count / self.warmup, 1.0)
                                       if self.warmup else 1.0)


def learning_rates(config) -> dict:
    """Each optimizer part's rate under its config name: learning_rate (AdamW: all the
    params, or under Muon its AdamW part) and, with Muon, muon_learning_rate: schedules of
    the step or, with config.minutes, Clocked rates of the budget's progress."""
    peaks = {"learning_rate": config.learning_rate}
    if config.optimizer == "muon":
        peaks["muon_learning_rate"] = config.muon_learning_rate
    if config.minutes:
        return {name: Clocked(make_decay(config, peak), config.warmup_iters)
                for name, peak in peaks.items()}
    return {name: make_schedule(config, peak) for name, peak in peaks.items()}


def make_weight_decay(config) -> float | optax.Schedule | Clocked:
    """weight_decay, or (weight_decay_final) a linear schedule from it to weight_decay_final
    at max_iters (with config.minutes: at the budget's end): the decay is multiplied by the
    learning rate, so with a learning rate that falls to zero a rising decay keeps
    regularizing as the model anneals."""
    if config.weight_decay_final is None:
        return config.weight_decay
    if config.minutes:
        return Clocked(optax.linear_schedule(config.weight_decay, config.weight_decay_final,
                                             1), warmup=0)
    return optax.linear_schedule(config.weight_decay, config.weight_decay_final,
                                 config.max_iters)


def hidden_matrices(forward: Callable, *example_args) -> dict:
    """{module: {name: bool}} over the params that `forward` (a function to hk.transform)
    creates: True for the weight matrix of each kernels.Linear, the hidden layers' matrices
    that Muon orthogonalizes; False for embeddings, logits heads (kernels.Logits), biases and
    LayerNorm gains. Read from how each parameter is created: shapes only, nothing runs."""
    kinds = {}

    def record(next_creator, shape, dtype, init, context):
        kinds.setdefault(context.module_name, {})[context.name] = (
            type(context.module) is kernels.Linear and len(shape) == 2)
        return next_creator(shape, dtype, init)

    def init(*args):
        with hk.custom_creator(record):
            return forward(*args)

    jax.eval_shape(hk.transform(init).init, jax.random.PRNGKey(0), *example_args)
    return kinds


def make_optimizer(config, hidden: dict) -> optax.GradientTransformation:
    """Clipping, then AdamW; or Muon for the hidden weight matrices (`hidden`, from
    hidden_matrices: each update orthogonalized), with its AdamW part for the embeddings, the
    logits heads, biases and gains (optax.contrib.muon). With ema_decay, an average of the
    params (average_params) rides along as the last state. With config.minutes its rates are
    Clocked, set by optax.inject_hyperparams from the update's extra argument `progress`."""
    rates = {"weight_decay": make_weight_decay(config), **learning_rates(config)}
    if config.minutes:
        return optax.inject_hyperparams(functools.partial(_chain, config, hidden))(**rates)
    return _chain(config, hidden, **rates)


def _chain(config, hidden: dict, learning_rate, weight_decay, muon_learning_rate=None):
    # Decay weight matrices and embeddings, not biases or LayerNorm gains.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    clip = (optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0
            else optax.identity())
    if config.optimizer == "adamw":
        optimizer = optax.chain(clip, optax.adamw(
            learning_rate, b1=0.9, b2=config.beta2, weight_decay=weight_decay,
            mask=decay_mask))
    else:
        muon_dims = jax.tree.map(  # None: to the AdamW part
            lambda matrix: optax.contrib.MuonDimensionNumbers() if matrix else None, hidden)
        # Muon orthogonalizes its momentum in the momentum's dtype: with bfloat16 compute,
        # gradients and first moments in bfloat16 halve the cost of its Newton-Schulz
        # matmuls (as the reference Muon runs them); second moments and params stay float32.
        low = kernels.choose_compute_dtype(config.compute_dtype)[0] == "bfloat16"
        to_compute_dtype = (optax.stateless(lambda g, _: optax.tree.cast(g, jnp.bfloat16))
                            if low else optax.identity())
        optimizer = optax.chain(clip, to_compute_dtype, optax.contrib.muon(
            muon_learning_rate, ns_steps=config.muon_ns_steps, weight_decay=weight_decay,
            adam_learning_rate=learning_rate, adam_b2=config.beta2,
            muon_weight_dimension_numbers=muon_dims,
            mu_dtype=jnp.bfloat16 if low else None))
    if config.ema_decay == 0:
        return optimizer
    return optax.chain(optimizer, average_params(config.ema_decay))


def average_params(decay: float) -> optax.GradientTransformation:
    """Chained last, it passes the updates through and keeps an exponential moving average
    of the params they make (optax.ema of the iterates): a cheap stand-in for annealing the
    learning rate, good at any step (see averaged)."""
    ema = optax.ema(decay)

    def update(updates, state, params):
        _, state = ema.update(optax.apply_updates(params, updates), state)
        return updates, state

    return optax.GradientTransformation(ema.init, update)


def evaluated_params(config, params: hk.Params, opt_state) -> hk.Params:
    """What evaluation scores and the min-validation file keeps: the params or, with
    ema_decay, their debiased moving average (the averaged state is the optimizer's last);
    before the first step, when the average is empty, the params."""
    if config.ema_decay == 0:
        return params
    average = (opt_state.inner_state if config.minutes else opt_state)[-1]
    debiased = optax.tree.bias_correction(average.ema, config.ema_decay, average.count)
    return jax.tree.map(lambda a, p: jnp.where(average.count > 0, a, p), debiased, params)


def current_rates(config, opt_state, step: int) -> dict[str, float]:
    """The learning rates of `step` (learning_rates' names): with config.minutes those the
    last update used (its injected hyperparams), else the schedules' at step - 1."""
    if config.minutes:
        return {name: float(opt_state.hyperparams[name]) for name in learning_rates(config)}
    return {name: float(rate(step - 1)) for name, rate in learning_rates(config).items()}
