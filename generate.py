"""Sample text from a params file: `python generate.py [--field=value ...]`.

Writes the context, then the sampled characters, to stdout as they come, until num_chars or
Ctrl-C. sampling.py holds the rule (temperature, top-k, top-p, min-p) and the Sampler;
reader.py how each model reads its context and each new character (a streaming model in
constant memory, at any length). The text depends only on the seed, the params and the
context.
"""

import sys
import time
from typing import NamedTuple

import jax
import numpy as np

import checkpoint
import data
import sampling
from common import StopRequest, UserError, parse_overrides, run_main


class Config(NamedTuple):
    params: str = checkpoint.DEFAULT_PARAMS  # params file to sample from
    prng_seed: int | None = None             # sampling seed; None: the current UNIX time
    context_file: str = "eval_context.txt"   # text the samples continue (UTF-8)
    context: str | None = None               # that text inline, instead of context_file
    num_chars: int | None = None             # characters to sample; None: until Ctrl-C
    temperature: float = 1.0                 # divides the logits: < 1 sharper, > 1 flatter
    top_k: int | None = None                 # sample among the k likeliest characters only
    top_p: float | None = None               # then among the fewest likeliest that hold p of
                                             # the probability (nucleus)
    min_p: float | None = None               # then among those at least min_p times as
                                             # likely as the likeliest
    num_samples: int = 1                     # independent streams sampled together


CONFIG = Config()

def read_context(config, vocab: str) -> tuple[str, np.ndarray]:
    """The context text (config.context, else the file config.context_file), normalized as
    training reads text (data.normalize), and its ids; an empty context starts from a
    newline. The default file is Cervantes: for a model of another text that lacks some of
    its characters, sampling starts from a newline (or the vocabulary's first character)
    instead, with a note on stderr."""
    where = "--context"
    if config.context is not None:
        text = config.context
    else:
        where = f"context file {config.context_file!r}"
        try:
            with open(config.context_file, encoding="utf-8", newline="") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {where}: {e}.") from None
    text = data.normalize(text) or "\n"
    try:
        return text, data.encode(text, vocab)
    except UserError as e:
        if config.context is None and config.context_file == CONFIG.context_file:
            start = "\n" if "\n" in vocab else vocab[0]
            print(f"# the default {where} holds characters this model's text lacks: "
                  f"sampling from {start!r} (pass --context or --context_file to choose)",
                  file=sys.stderr)
            return read_context(config._replace(context=start), vocab)
        raise UserError(f"{where}: {e} Remove them or use another context.") from None


def check_sampling_config(config) -> None:
    if not config.temperature > 0:
        raise UserError(f"--temperature={config.temperature}: must be > 0.")
    if config.top_k is not None and config.top_k < 1:
        raise UserError(f"--top_k={config.top_k}: must be >= 1 (or None for no limit).")
    if config.top_p is not None and not 0 < config.top_p <= 1:
        raise UserError(f"--top_p={config.top_p}: must be in (0, 1] (or None for no limit).")
    if config.min_p is not None and not 0 <= config.min_p <= 1:
        raise UserError(f"--min_p={config.min_p}: must be in [0, 1] (or None for no limit).")
    if config.num_chars is not None and config.num_chars < 0:
        raise UserError(f"--num_chars={config.num_chars}: must be >= 0 (or None).")
    if config.num_samples < 1:
        raise UserError(f"--num_samples={config.num_samples}: must be >= 1.")
    if config.num_samples > 1 and config.num_chars is None:
        raise UserError("--num_samples > 1 prints each sample when it is complete, so it "
                        "needs --num_chars.")


def main(argv) -> int:
    (config,) = parse_overrides(argv, CONFIG)
    check_sampling_config(config)
    seed = int(time.time()) if config.prng_seed is None else config.prng_seed
    ckpt = checkpoint.load(config.params)
    context, context_ids = read_context(config, ckpt.vocab)
    print(f"# devices {jax.devices()} | run {ckpt.meta.get('run_hash')} | seed {seed} | "
          f"{checkpoint.num_params(ckpt.params):,} params", file=sys.stderr)
    sampler = sampling.Sampler(ckpt.hparams, len(ckpt.vocab), config.temperature,
                               config.top_k, config.top_p, config.min_p)
    params = jax.device_put(ckpt.params)
    key = jax.random.PRNGKey(seed)
    try:
        if config.num_samples == 1:
            sys.stdout.write(context)
            sys.stdout.flush()
            written = 0
            with StopRequest() as stop:  # Ctrl-C ends the stream after the current chunk
                for chunk in sampler.stream(params, context_ids, key):
                    take = chunk.shape[1] if config.num_chars is None else min(
                        chunk.shape[1], config.num_chars - written)
                    sys.stdout.write(data.decode(chunk[0, :take], ckpt.vocab))
                    sys.stdout.flush()
                    written += take
                    if written == config.num_chars or stop.signum is not None:
                        break
        else:
            ids = sampler.sample(params, context_ids, key, config.num_chars,
                                 config.num_samples)
            for i, row in enumerate(ids):
                sys.stdout.write(f"--- sample {i + 1} ---\n{context}"
                                 f"{data.decode(row, ckpt.vocab)}\n")
        sys.stdout.write("\n")
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    run_main(main, __doc__, [CONFIG])
