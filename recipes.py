"""Named recipes: settings of train.py's CONFIG and transformer.py's HPARAMS that a run takes
only when asked for. `python train.py` trains CONFIG and HPARAMS as written; `--preset=NAME`
starts from PRESETS[NAME] instead, and `--minutes=N` from the recipe found for N minutes
(BUDGETS). A recipe prints each field it replaces (resolve), and options on the command line
win over it. Also check_config, the checks of a run's config. train.py, bench.py and the
tests read the recipes here; the values a user edits live in train.py and transformer.py.
"""

import math
from typing import NamedTuple

import jax

import checkpoint
import data
import train_step
from common import UserError, parse_overrides


class Recipe(NamedTuple):
    config: dict   # fields of train.Config it sets
    hparams: dict  # fields of transformer.HParams it sets


# The original project's settings, over every field a recipe sets: a GPU-sized model with
# learned positions, AdamW with cosine decay, random windows. Each field added since was added
# switched off, at its value here: a params file (checkpoint.load) or a resumed run's config
# that lacks a field was trained with this value.
ORIGINAL = Recipe(
    config=dict(
        batch_size=32,
        max_iters=15000,
        learning_rate=3e-4,
        warmup_iters=200,
        schedule="cosine",
        decay_fraction=0.2,
        min_lr_ratio=0.1,
        optimizer="adamw",
        muon_learning_rate=0.02,
        muon_ns_steps=5,
        weight_decay=0.1,
        weight_decay_final=None,
        beta2=0.99,
        grad_clip=1.0,
        ahead_loss=0.0,
        ema_decay=0.0,
        batches="random",
        eval_interval=500,
    ),
    hparams=checkpoint.ORIGINAL_HPARAMS,
)

# The recipe that trained the shipped Cervantes params (README, "Results"), and so CONFIG and
# HPARAMS as written: a 6 x 256 streaming model (rotary positions, a 128-character window)
# with heavy weight decay under Muon (0.3: it pays late in the hour), a second head trained
# on the character after next, 4,000 steps sized for a 2-core Zen 5 (about 50 minutes there).
CPU = Recipe(
    config=ORIGINAL.config | dict(
        max_iters=4000,
        learning_rate=3e-3,
        warmup_iters=100,
        schedule="wsd",
        decay_fraction=1.0,
        min_lr_ratio=0.0,
        optimizer="muon",
        muon_learning_rate=0.01,
        weight_decay=0.3,
        ahead_loss=0.3,
        ema_decay=0.995,
        batches="shuffled",
        eval_interval=200,
    ),
    hparams=ORIGINAL.hparams | dict(
        d_model=256,
        h=4,
        d_ff=1024,
        dropout=0.1,
        positions="rotary",
        attention_window=128,
    ),
)

PRESETS = {
    "original": ORIGINAL,
    "cpu": CPU,
    # The Tiny Shakespeare params' recipe (`make shakespeare` fetches the text): 4 layers, no
    # second head, 5,600 steps (also about 50 minutes on a Zen 5), fewer evaluations.
    "shakespeare": Recipe(
        config=CPU.config | dict(
            max_iters=5600,
            eval_interval=400,
            ahead_loss=0.0,
            source_file=data.TEXTS["tinyshakespeare"].file,
        ),
        hparams=CPU.hparams | dict(decoder_N=4),
    ),
    # The cpu recipe's methods at nanoGPT's shakespeare_char size (6 x 384, dropout 0.2, 256
    # characters, batch 64, 5,000 steps) as a streaming model: its time is unmeasured (no GPU
    # was at hand); the tests check that it lowers for CUDA.
    "gpu": Recipe(
        config=CPU.config | dict(batch_size=64, max_iters=5000, eval_interval=250),
        hparams=ORIGINAL.hparams | dict(
            max_seq_len=256,
            dropout=0.2,
            positions="rotary",
            attention_window=256,
        ),
    ),
}


class Budget(NamedTuple):
    recipe: Recipe
    evaluations: int  # spread over the run, besides the first (which times one)


# The recipe for each budget of `--minutes` (a shorter budget gets the 2-minute recipe, one
# between two the shorter one's). Found on Tiny Shakespeare and Cervantes on a 2-core AMD
# EPYC Zen 4 (docs/results.md, "Budgets"): a 4 x 128 streaming model reading 64 characters
# (a wider one trains too few characters in the time), Muon, no dropout, the learning rates
# falling linearly to zero over the whole run; measured at 2, 5, 10 and 20 minutes, where it
# gains little over 10 (it overfits). Its feed-forward blocks are SwiGLU of width 344, about
# ReLU's parameters at 512 (docs/results.md, "Round five"). An hour takes the cpu preset's
# recipe. A clock paces a timed run: the recipes leave max_iters and eval_interval as they are.
_untimed = lambda settings: {name: value for name, value in settings.items()
                             if name not in ("max_iters", "eval_interval")}
_SHORT = _untimed(ORIGINAL.config) | dict(
    optimizer="muon",
    schedule="wsd",
    decay_fraction=1.0,
    min_lr_ratio=0.0,
    batches="shuffled",
    warmup_iters=50,
    learning_rate=3e-3,
    muon_learning_rate=0.02,
    weight_decay=0.1,
)
_SMALL = ORIGINAL.hparams | dict(
    d_model=128,
    h=4,
    d_ff=344,
    activation="swiglu",
    decoder_N=4,
    dropout=0.0,
    max_seq_len=64,
    positions="rotary",
    attention_window=64,
)
BUDGETS = {
    2: Budget(Recipe(_SHORT | dict(batch_size=16), _SMALL), evaluations=1),
    5: Budget(Recipe(_SHORT, _SMALL), evaluations=2),
    10: Budget(Recipe(_SHORT, _SMALL), evaluations=2),
    20: Budget(Recipe(_SHORT, _SMALL), evaluations=4),
    60: Budget(Recipe(_untimed(CPU.config), CPU.hparams), evaluations=10),
}


def check_minutes(minutes: float) -> None:
    """--minutes (train.py's and bench.py's): 0, or a positive, finite number of minutes."""
    if minutes < 0 or not math.isfinite(minutes):
        raise UserError(f"--minutes={minutes}: must be a positive number of minutes "
                        "(0: no budget, train max_iters steps).")


def budget_minutes(minutes: float) -> int:
    """The BUDGETS entry for `minutes`: the longest not above it, else the shortest."""
    return max([m for m in BUDGETS if m <= minutes], default=min(BUDGETS))


def apply(recipe: Recipe, config, hparams) -> tuple:
    """(config, hparams, replaced): `recipe`'s settings over config and hparams, and a line
    `name old -> new` for each field whose value it changes."""
    replaced = [f"{name} {getattr(written, name)!r} -> {value!r}"
                for settings, written in ((recipe.config, config), (recipe.hparams, hparams))
                for name, value in settings.items() if getattr(written, name) != value]
    return config._replace(**recipe.config), hparams._replace(**recipe.hparams), replaced


def resolve(argv, config, hparams) -> tuple:
    """(config, hparams, said): the run that `argv` asks for, given CONFIG and HPARAMS as
    written, and the lines that say so. No recipe: them, with the options. `--preset=NAME`,
    or `--minutes=N` without --preset: the recipe's settings over them, then the options,
    and a line for each field the recipe replaces (an option's field aside: the option
    wins). `--resume=FILE`: the config saved in the file (a field it lacks: ORIGINAL's) and
    its HPARAMS, then the options."""
    requested, _ = parse_overrides(argv, config, hparams)
    if requested.resume:
        if requested.resume.endswith(".min_val.pkl"):
            raise UserError(
                f"--resume={requested.resume}: a .min_val.pkl file holds a run's best params "
                "(with --ema_decay, their average), not its training state. Resume from the "
                f"run's latest file: --resume={requested.resume.removesuffix('.min_val.pkl')}")
        ckpt = checkpoint.load(requested.resume)
        saved = ORIGINAL.config | ckpt.meta.get("config", {})
        saved = {k: v for k, v in saved.items() if k in config._fields}
        config, hparams = parse_overrides(argv, config._replace(**saved), ckpt.hparams)
        return config, hparams, f"preset: the resumed run's, as saved in {requested.resume}"
    name = requested.preset
    if not name and requested.minutes:  # --minutes alone: its budget's recipe
        minutes = budget_minutes(requested.minutes)
        recipe, name = BUDGETS[minutes].recipe, f"minutes{minutes}"
        why = (f"--minutes={requested.minutes:g}: the {minutes}-minute recipe of "
               "docs/results.md, \"Budgets\"; --preset=none trains CONFIG and HPARAMS as "
               f"written for {requested.minutes:g} minutes instead")
    elif name in ("", "none"):
        return (*parse_overrides(argv, config, hparams),
                "preset: none (CONFIG in train.py and HPARAMS in transformer.py as written)")
    elif name in PRESETS:
        recipe, why = PRESETS[name], f"--preset={name}"
    else:
        raise UserError(f"--preset={name}: unknown preset. Valid presets: none, "
                        f"{', '.join(PRESETS)}.")
    given = {arg.removeprefix("--").partition("=")[0] for arg in argv}
    config, hparams, replaced = apply(recipe, config, hparams)
    replaced = [line for line in replaced if line.split()[0] not in given]
    config, hparams = parse_overrides(argv, config._replace(preset=name), hparams)
    lines = "".join(f"\n  {line}" for line in replaced) or " nothing"
    return config, hparams, (f"preset: {name} ({why})\nit replaces, of CONFIG and HPARAMS as "
                             f"written:{lines}")


def check_config(config) -> None:
    """UserError naming the first field of train.py's config out of its range."""
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
    check_minutes(config.minutes)
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
    if config.muon_ns_steps < 1:
        raise UserError(f"--muon_ns_steps={config.muon_ns_steps}: must be >= 1.")
    if not 0 < config.decay_fraction <= 1:
        raise UserError(f"--decay_fraction={config.decay_fraction}: must be in (0, 1].")
    if not 0 <= config.ema_decay < 1:
        raise UserError(f"--ema_decay={config.ema_decay}: must be in [0, 1).")
    if not 0 <= config.distill_weight <= 1:
        raise UserError(f"--distill_weight={config.distill_weight}: must be in [0, 1].")
