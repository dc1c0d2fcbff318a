"""train.py's Config and its named recipes (PRESETS), in a module of their own because
bench.py times them too. `python train.py --preset=NAME` starts from a recipe; every other
--name=value still wins. The resolved config is saved in each params file.
"""

import math
from typing import NamedTuple

import jax

import data
import train_step
import transformer
from common import UserError




class Config(NamedTuple):
    batch_size: int = 32           # sequences per step, each max_seq_len characters
    max_iters: int = 15000         # optimizer steps in the run; the schedule spans them
    minutes: float = 0.0           # a budget of wall time instead (start-up and evaluations
                                   # included): without --preset its recipe (budget.py); the
                                   # rates decay as the time runs out (0: max_iters steps)
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
    ahead_loss: float = 0.0        # multi-token prediction: a training-only second head
                                   # predicts the character after next, its loss added at
                                   # this weight (objectives.py)
    ema_decay: float = 0.0         # evaluate (and keep as the best params) a moving average
                                   # of the params, this much of it kept per step (0: none)
    batches: str = "random"        # "random" windows, or "shuffled" passes over the text
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
    eval_interval: int = 500       # steps between full evaluations and params files
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
                        ema_decay=0.995, ahead_loss=0.3),
        transformer.HPARAMS._replace(d_model=256, h=4, d_ff=1024, decoder_N=6, dropout=0.1,
                                     positions="rotary", attention_window=128))
PRESETS = {
    "original": (CONFIG._replace(preset="original"), transformer.HPARAMS),
    "cpu": _CPU,
    "shakespeare": (_CPU[0]._replace(preset="shakespeare", max_iters=5600, eval_interval=400,
                                     source_file=data.TEXTS["tinyshakespeare"].file,
                                     ahead_loss=0.0),
                    _CPU[1]._replace(decoder_N=4)),
    "gpu": (_CPU[0]._replace(preset="gpu", batch_size=64, max_iters=5000, eval_interval=250),
            transformer.HPARAMS._replace(max_seq_len=256, dropout=0.2, positions="rotary",
                                         attention_window=256)),
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


def check_config(config: Config) -> None:
    """UserError naming the first field out of its range."""
    for name in ("batch_size", "max_iters", "eval_interval", "eval_batch_size",
                 "log_interval", "eval_chars", "min_char_count"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name}={getattr(config, name)}: must be >= 1.")
    if config.cpu_devices < 0 or (config.cpu_devices > jax.device_count() and
                                  jax.devices()[0].platform == "cpu"):
        raise UserError(f"--cpu_devices={config.cpu_devices}: must be from 0 (pick) to this "
                        f"host's {jax.device_count()} CPU devices (one per core).")
    devices = len(train_step.mesh_devices(config))
    for name in ("batch_size", "eval_batch_size"):
        if getattr(config, name) % devices:
            raise UserError(
                f"--{name}={getattr(config, name)} is not divisible by the {devices}"
                f" devices ({jax.devices()[0].platform}) it is split across: use a multiple "
                f"of {devices}.")
    if not config.learning_rate > 0:
        raise UserError(f"--learning_rate={config.learning_rate}: must be > 0.")
    if not 0 <= config.min_lr_ratio <= 1:
        raise UserError(f"--min_lr_ratio={config.min_lr_ratio}: must be in [0, 1].")
    if config.minutes < 0 or not math.isfinite(config.minutes):
        raise UserError(f"--minutes={config.minutes}: must be a positive number of minutes "
                        "(0: no budget, train max_iters steps).")
    if config.minutes and jax.process_count() > 1:
        raise UserError("--minutes with several hosts: their clocks would set different "
                        "learning rates; give --max_iters instead.")
    for name in ("warmup_iters", "sample_chars", "weight_decay", "weight_decay_final",
                 "grad_clip", "ahead_loss"):
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
