"""One training step, jitted: the state it carries, its start from a seed, the update (a
batch drawn on the device, the objectives' gradients, the optimizer), split across devices.
train.py runs it in its loop; bench.py times it.
"""

import os
from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import data
from common import UserError


class TrainState(NamedTuple):
    params: hk.Params
    opt_state: optax.OptState
    rng: jax.Array
    step: jax.Array  # [] int32: optimizer steps taken


_XLA_COUNT = "xla_force_host_platform_device_count"  # XLA_FLAGS' own CPU device count


def split_cpu_cores() -> None:
    """One JAX CPU device per core (jax_num_cpu_devices), so that a run on one CPU host can
    split its batch over its cores (mesh_devices) as data parallelism splits it over GPUs.
    Called before JAX starts its backends; it leaves XLA_FLAGS' own device count, and a
    backend already started (tests, notebooks) keeps the devices it has."""
    if _XLA_COUNT in os.environ.get("XLA_FLAGS", ""):
        return
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # the backends have started: the devices stay as they are
        pass


def mesh_devices(config) -> list:
    """The devices a run (recipes.Config) splits its batch across: every device of a GPU or
    TPU, of several hosts, or of XLA_FLAGS' count; on one CPU host split by core, the first
    config.cpu_devices, or with 0 as many as divide the batches with AdamW and one with
    Muon. XLA:CPU gives a small model's many small operations little of a second core, and
    per-core devices use it (docs/benchmarks.md: 4 x 128, batch 12, AdamW, 2 cores: 15-48%
    more tokens a second); Muon's update, which every device repeats, took the gain away
    (the cpu preset: 5% fewer)."""
    devices = jax.devices()
    if devices[0].platform != "cpu" or jax.process_count() > 1:
        return devices
    if config.cpu_devices:
        return devices[:config.cpu_devices]
    if _XLA_COUNT in os.environ.get("XLA_FLAGS", ""):
        return devices
    if config.optimizer != "adamw":
        return devices[:1]
    return devices[:max(n for n in range(1, len(devices) + 1)
                        if config.batch_size % n == 0 and config.eval_batch_size % n == 0)]


def make_mesh(devices: list | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over `devices` (default: every device of every process): data parallelism
    splits the batch."""
    devices = devices or jax.devices()
    return jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def make_train_step(loss: hk.Transformed, optimizer, batch_size: int, seq_len: int,
                    batch_sharding: jax.sharding.Sharding | None = None,
                    shuffle_key: jax.Array | None = None, soft_targets: Callable | None = None):
    """jitted (state, train_ids[, teacher_params, progress]) -> (state, metrics): one
    optimizer step of `loss` (objectives.build_loss) on a batch of random windows or, with
    `shuffle_key`, on the next batch of data.shuffled_starts's passes; `progress` (a timed
    run's share of its time spent) sets the optimizer's Clocked rates; `soft_targets`
    (objectives.Teachers' targets: (teacher_params, train_ids, starts) -> [B, T, V]) gives
    each position's soft target. metrics["loss"] is the next character's alone, as
    evaluation measures it.

    With `batch_sharding`, the batch is split across the mesh and, since the state is
    replicated, XLA all-reduces the gradients: plain data parallelism.
    """
    def train_step(state: TrainState, train_ids: jax.Array, teacher_params=None,
                   progress=None):
        rng, batch_key, dropout_key = jax.random.split(state.rng, 3)
        if shuffle_key is None:
            starts = data.sample_starts(batch_key, train_ids.shape[0], batch_size, seq_len)
        else:
            starts = data.shuffled_starts(shuffle_key, state.step, train_ids.shape[0],
                                          batch_size, seq_len)
        if batch_sharding is not None:  # each device reads its share of the windows
            starts = jax.lax.with_sharding_constraint(starts, batch_sharding)
        inputs, targets = data.window_batch(train_ids, starts, seq_len)
        soft = (None if teacher_params is None else
                soft_targets(teacher_params, train_ids, starts))                 # [B, T, V]
        if batch_sharding is not None:
            inputs, targets, soft = jax.lax.with_sharding_constraint(
                (inputs, targets, soft), batch_sharding)
        (_, next_loss), grads = jax.value_and_grad(loss.apply, has_aux=True)(
            state.params, dropout_key, inputs, targets, soft)
        extra = {} if progress is None else {"progress": progress}  # a timed run's rates
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": next_loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(params, opt_state, rng, state.step + 1), metrics

    return jax.jit(train_step, donate_argnums=0)


def init_state(seed: int, loss: hk.Transformed, optimizer, seq_len: int) -> TrainState:
    """The state at step 0: params drawn from `seed` (objectives.build_loss's, initialized
    without dropout), the optimizer's state, the training rng."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    params = jax.jit(loss.init, static_argnums=4)(init_key, dummy, dummy, None, False)
    return TrainState(params, optimizer.init(params), rng, jnp.int32(0))


def resumed_state(config, ckpt, optimizer) -> TrainState:
    """The training state of the params file config.resume (`ckpt`, a checkpoint.Checkpoint),
    checked against this run's optimizer; UserError where it cannot continue."""
    if ckpt.opt_state is None or ckpt.rng is None:
        raise UserError(f"--resume={config.resume}: the file has no optimizer state or rng "
                        "(a shipped params file?); resume from a training run's file.")
    if ckpt.meta.get("resumes_at_commit"):
        raise UserError(f"--resume={config.resume}: written before the after-next head "
                        "became an objective of its own; resume it at commit "
                        f"{ckpt.meta['resumes_at_commit']} (`git checkout "
                        f"{ckpt.meta['resumes_at_commit']}`).")
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
    return TrainState(params, opt_state, jnp.asarray(ckpt.rng), jnp.int32(ckpt.meta["step"]))
