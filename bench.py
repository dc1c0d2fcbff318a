"""Benchmark: this machine's ceilings, training throughput and MFU, sampling speed, memory.

`python bench.py [--field=value ...]` (fields of bench.Config and transformer.HPARAMS) prints
a table; `--json=FILE` also writes it as flat JSON. Each section runs in a fresh subprocess so
that its peak resident memory is its own. Run it with nothing else on the machine: on a
2-core CPU any other process halves every figure.

Model FLOPs per trained token (nanoGPT's / PaLM's estimate):
  6 * P + 12 * N * T * D     (P parameters without the embeddings, N layers, T context, D width)
forward + backward of every matmul, plus the attention scores and weighted sum.
Training is timed for each --compute_dtypes value (train.py's --compute_dtype); its
MFU = achieved model FLOP/s / the measured peak matmul FLOP/s of that precision.

With --torch_python (a Python that has torch, in a venv of its own), the PyTorch yardstick
../shared/peers/torch_gpt.py trains a nanoGPT-shaped model of the same layers, width, heads,
feed-forward width, sequence length, batch and dropout, in bfloat16 autocast and in float32,
right after this project's training section; `train_vs_torch` is this project's headline
tokens/s over the yardstick's bfloat16 ones (`train_vs_torch_f32`: over its float32 ones).
`--preset=NAME` times train.py's preset of that name (its HPARAMS, batch size and optimizer),
`--minutes=N` the recipe `train.py --minutes=N` takes (recipes.BUDGETS);
`--optimizer` (train.py's: adamw or muon) times another: the yardstick trains with AdamW, so
`--optimizer=adamw` compares like with like (Muon's orthogonalization adds matmuls of its own,
outside the model FLOPs).

Sampling one stream with the KV cache reads every weight once per character, so its bound
is the copy bandwidth over the weight bytes, in characters per second.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import haiku as hk

import common
import kernels
import metrics
import model_checks
import objectives
import optimizer as optim
import position_encodings
import reader
import recipes
import sampling
import train_step
import transformer
from common import UserError, parse_overrides, run_main


class Config(NamedTuple):
    batch_size: int = 32          # training batch, sequences of max_seq_len characters
    train_steps: int = 10         # timed training steps (after 2 warm-up steps)
    compute_dtypes: str = "float32,bfloat16"  # train.Config.compute_dtype values to time
    num_samples: int = 8          # streams for the batch sampling figure
    params: str = ""              # sample from this params file (default: random init)
    generate_chars: int = 100_000  # a streaming params file: generate.py's run, end to end
    prefill_lengths: str = "1000,10000,100000,1030979"  # a streaming model: contexts read
                                  # (the last: the corpus's length)
    prefill_chunk: int = 0        # characters per prefill call (0: reader.PREFILL_CHUNK)
    preset: str = ""              # train.py's preset: its HPARAMS, batch size and optimizer
    minutes: float = 0.0          # or train.py's --minutes=N: its budget's recipe
    optimizer: str = ""           # train.py's --optimizer ("": the preset's, else CONFIG's)
    torch_python: str = ""        # a Python with torch: also run the PyTorch yardstick
    torch_script: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                     "shared", "peers", "torch_gpt.py")
    torch_seconds: float = 20.0   # the yardstick's training time per precision
    json: str = ""                # also write the results here as flat JSON
    section: str = ""             # internal: run one section and print its JSON


CONFIG = Config()


def timed(fn, repeats: int) -> list[float]:
    """Seconds per call of fn (which must block on its result), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_ceilings(config, hp) -> dict:
    """Peak jitted matmul FLOP/s in float32 and bfloat16 (float32 accumulation); memory
    bandwidth as a numpy copy (bytes read + written) and as a jitted reduction (read). Peaks:
    the best of 10 runs, so that MFU and bound fractions are not flattered by a slow run."""
    n = 2048
    out = {}
    for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
        matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        seconds = min(timed(lambda: matmul(a, b).block_until_ready(), 10))
        out[f"peak_{name}_gflops"] = 2 * n**3 / seconds / 1e9
    source = np.ones(256 * 2**20 // 4, np.float32)  # 256 MiB, far beyond the caches
    dest = np.empty_like(source)
    seconds = min(timed(lambda: np.copyto(dest, source), 10))
    out["copy_gb_per_s"] = 2 * source.nbytes / seconds / 1e9
    device_array = jnp.asarray(source)
    total = jax.jit(jnp.sum)
    seconds = min(timed(lambda: total(device_array).block_until_ready(), 10))
    out["read_gb_per_s"] = source.nbytes / seconds / 1e9
    return out


def param_count(hp: transformer.HParams, vocab_size: int) -> int:
    """The model's parameters, by formula (tests check it against the initialized model)."""
    D, F, V, S = hp.d_model, hp.d_ff, vocab_size, hp.max_seq_len
    layer_norm = 2 * D
    attention = layer_norm + 4 * (D * D + D)          # LN, then q, k, v, out projections
    attention += (D * hp.h + hp.h) if hp.attention_gate else 0  # a gate per head
    feed_forward = layer_norm + D * F + F + F * D + D  # LN, then D -> F -> D
    feed_forward += (D * F + F) if hp.activation == "swiglu" else 0  # the gated half
    blocks = reader.attention_blocks(hp)
    return (V * D + (S * D if hp.positions == "learned" else 0)     # embeddings
            + (hp.decoder_N * V * D if hp.value_embeddings else 0)  # a table a layer
            + (hp.decoder_N // 2 if hp.unet else 0)                 # a skip's weight
            + len(blocks) * feed_forward                            # one per layer
            + sum(map(len, blocks.values())) * attention            # self and cross
            + layer_norm + D * V + V)                               # final LN, unembedding


def flops_per_token(hp, vocab_size: int) -> float:
    """6 * (the parameters but the embedding tables) + 12 * attention blocks * T * D."""
    embeddings = vocab_size * hp.d_model + (
        hp.max_seq_len * hp.d_model if hp.positions == "learned" else 0)
    params = param_count(hp, vocab_size) - embeddings
    num_attention = sum(map(len, reader.attention_blocks(hp).values()))
    return 6 * params + 12 * num_attention * hp.max_seq_len * hp.d_model


def train_config_of(config: Config):
    """train.py's config for the timed steps: its CONFIG as written (what `python train.py`
    runs: an entry point's values, read here as train.py reads them) under the recipe of
    --preset or --minutes, with the batch size and --optimizer of this run."""
    import train

    base, recipe = train.CONFIG, recipe_of(config)
    if recipe:
        base = base._replace(**recipe.config)
    return base._replace(batch_size=config.batch_size,
                         optimizer=config.optimizer or base.optimizer)


def bench_train(config, hp) -> dict:
    """Per compute dtype: the real jitted train step (dropout on) on train.py's devices (on
    a CPU, AdamW's batch split over a device per core), median seconds per step; then the
    seconds of one evaluation as train.py runs it."""
    import data
    import encoding
    from jax.sharding import NamedSharding, PartitionSpec as P

    text = encoding.load(data.CORPUS_FILE)
    vocab, ids = text.vocab, text.ids  # as train.py holds them: uint8
    train_config = train_config_of(config)
    devices = train_step.mesh_devices(train_config)
    mesh = train_step.make_mesh(devices)
    replicated = NamedSharding(mesh, P())
    train_ids = jax.device_put(data.split(ids)[0], replicated)
    # The step also runs the after-next head of --ahead_loss, a second unembedding.
    flops = flops_per_token(hp, len(vocab)) + (
        6 * (hp.d_model * len(vocab) + len(vocab)) if train_config.ahead_loss else 0)
    out = {"flops_per_token": flops, "train_optimizer": train_config.optimizer,
           "train_devices": len(devices)}
    weights = objectives.Weights(train_config.ahead_loss)
    for dtype in config.compute_dtypes.split(","):
        loss = objectives.loss_fn(hp, len(vocab), weights, dtype)
        dummy = jnp.zeros((1, hp.max_seq_len), jnp.int32)
        optimizer = optim.make_optimizer(train_config._replace(compute_dtype=dtype),
                                         optim.hidden_matrices(loss, dummy, dummy))
        state = jax.device_put(train_step.init_state(
            train_config.prng_seed, hk.transform(loss), optimizer, hp.max_seq_len), replicated)
        step = train_step.make_train_step(hk.transform(loss), optimizer, config.batch_size,
                                          hp.max_seq_len, NamedSharding(mesh, P("data")))

        def run():
            nonlocal state
            state, metrics = step(state, train_ids)
            metrics["loss"].block_until_ready()

        run()  # compile
        seconds = statistics.median(timed(run, config.train_steps))
        tokens_per_s = config.batch_size * hp.max_seq_len / seconds
        out.update({f"train_{dtype}_step_s": seconds,
                    f"train_{dtype}_tokens_per_s": tokens_per_s,
                    f"train_{dtype}_gflops": tokens_per_s * flops / 1e9})
    # train.py's evaluation every eval_interval steps (float32: the validation split and as
    # many training windows of the corpus), the median of 3 after a compiling call.
    evaluate, _ = metrics.make_evaluate(hp, len(vocab), ids, train_config.eval_batch_size,
                                        NamedSharding(mesh, P(None, "data")),
                                        train_config.eval_chars)
    params = objectives.model_params(state.params)
    out["train_eval_s"] = statistics.median(
        timed(lambda: jax.block_until_ready(evaluate(params)), 3))
    return out


def _sampling_params(config, hp):
    if config.params:
        import checkpoint

        ckpt = checkpoint.load(config.params)
        return ckpt.params, ckpt.hparams, len(ckpt.vocab)
    params = jax.jit(transformer.build(hp, 88).init, static_argnums=2)(
        jax.random.PRNGKey(0), jnp.zeros((1, hp.max_seq_len), jnp.int32), False)
    return params, hp, 88


def bench_sample(config, hp) -> dict:
    """Characters per second of the sampler's two paths, timed chunk by chunk from a fixed
    state: cached steps (the window not yet full) for 1 and num_samples streams, and the
    sliding window (re-prefill per character); and of the original's way, a full forward
    pass per character from Python."""
    params, hp, vocab_size = _sampling_params(config, hp)
    params = jax.device_put(params)
    sampling_params = reader.sampling_params(params)
    sampler = sampling.Sampler(hp, vocab_size)
    streaming = sampler.reader.streaming
    key, S = jax.random.PRNGKey(0), hp.max_seq_len
    # Cached steps from a 1-character context; a streaming model's are cached past the
    # window too (from a context of max_seq_len >= W characters).
    size = sampling.CHUNK if streaming else min(sampling.CHUNK, S - 1)
    out = {}
    for name, context_len, cached, streams in (
            ("sample_cached_chars_per_s", 1, True, 1),
            ("sample_batch_cached_chars_per_s", 1, True, config.num_samples),
            ("sample_full_window_chars_per_s", S, streaming, 1)):
        state = sampler.reader.start(sampling_params, np.zeros(context_len, np.int32), streams)
        run = lambda: sampler.sample_chunk(  # each chunk after its noise (stream overlaps them)
            sampling_params, state, sampler.draw_noise(key, np.int32(0), size, streams),
            cached=cached)[1].block_until_ready()
        out[name] = streams * size / statistics.median(timed(run, 10))
    apply = jax.jit(transformer.build(hp, vocab_size).apply, static_argnums=3)
    window = jnp.zeros((1, S), jnp.int32)

    def full_forward():
        for i in range(size):
            logits = apply(params, None, window, False)[:, -1]
            sampling.sample_logits(jax.random.fold_in(key, i), logits, 1.0, None)
        logits.block_until_ready()

    out["sample_full_forward_chars_per_s"] = size / statistics.median(timed(full_forward, 3))
    out["weight_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params))  # each read once
    return out


def prefill_lengths(config) -> list[int]:
    """--prefill_lengths as sorted ints; UserError unless all are >= 1."""
    try:
        lengths = sorted(int(n) for n in config.prefill_lengths.split(","))
    except ValueError:
        lengths = [0]
    if lengths[0] < 1:
        raise UserError(f"--prefill_lengths={config.prefill_lengths!r}: comma-separated "
                        "context lengths >= 1.")
    return lengths


def bench_prefill(config, hp) -> dict:
    """A streaming model reading a context (reader.Reader.start, one stream) of each of
    prefill_lengths characters, shortest first, in one process: context characters/s (of
    which it reads the last reader.receptive_field, prefill_reach), and the peak resident
    memory so far after each, which stays flat if memory does not grow with the context's
    length. The ids are seeded random: the cost does not depend on them."""
    params, hp, vocab_size = _sampling_params(config, hp)
    if not position_encodings.is_streaming(hp):
        return {}
    params = reader.sampling_params(params)
    text_reader = reader.Reader(hp, vocab_size, config.prefill_chunk or reader.PREFILL_CHUNK)
    lengths = prefill_lengths(config)
    ids = np.random.default_rng(0).integers(0, vocab_size, max(lengths), dtype=np.int32)
    text_reader.start(params, ids[:1], 1).logits.block_until_ready()  # compile
    out = {"prefill_chunk": text_reader.prefill_chunk,
           "prefill_reach": reader.receptive_field(hp)}
    for n in lengths:
        start = time.perf_counter()
        text_reader.start(params, ids[:n], 1).logits.block_until_ready()
        out[f"prefill_{n}_chars_per_s"] = n / (time.perf_counter() - start)
        out[f"prefill_{n}_peak_rss_mb"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def bench_generate(config, hp) -> dict:
    """A streaming model's `generate.py --num_chars=N` end to end (start-up, compiling and
    printing included), for N = generate_chars / 5 and generate_chars: chars/s and peak
    resident memory, whose two values show whether it stays flat. Needs --params."""
    if not (config.params and position_encodings.is_streaming(hp)):
        return {}
    out = {}
    for run, num_chars in (("short", config.generate_chars // 5), ("long", config.generate_chars)):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          "generate.py"),
             f"--params={config.params}", f"--num_chars={num_chars}", "--prng_seed=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
        if result.returncode:
            raise SystemExit(f"generate.py failed:\n{result.stderr}")
        out[f"generate_{run}_peak_rss_mb"] = (  # the largest child so far: this one
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
        out["generate_chars_per_s"] = num_chars / seconds
    return out


def bench_torch(config, hp) -> dict:
    """The PyTorch yardstick's training tokens/s at this shape, in bfloat16 autocast and in
    float32 (it has learned positions and full causal attention whatever the HPARAMS say;
    no encoder). Needs --torch_python."""
    if not config.torch_python:
        return {}
    out = {}
    for precision in ("bf16", "f32"):
        args = [config.torch_python, config.torch_script, config.batch_size, hp.max_seq_len,
                hp.decoder_N, hp.d_model, hp.h, hp.d_ff, config.torch_seconds, precision,
                hp.dropout]
        result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
        rates = [line.split(":")[1] for line in result.stdout.splitlines()
                 if line.startswith("train_tok_s:")]
        if result.returncode or not rates:
            raise UserError(f"the PyTorch yardstick failed ({' '.join(map(str, args))}):\n"
                            f"{result.stderr.strip()[-2000:]}")
        out[f"torch_{precision}_tokens_per_s"] = float(rates[0])
    return out


SECTIONS = {"ceilings": bench_ceilings, "train": bench_train, "torch": bench_torch,
            "sample": bench_sample, "prefill": bench_prefill, "generate": bench_generate}


def run_section(name: str, argv) -> dict:
    """Runs one section in a subprocess; its JSON result plus its peak resident memory."""
    args = [a for a in argv if not a.startswith(("--json=", "--section="))]
    result = subprocess.run([sys.executable, os.path.abspath(__file__), f"--section={name}",
                             *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"bench section {name} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


PEAK_NAMES = {"float32": "f32", "bfloat16": "bf16"}


def recipe_of(config: Config) -> recipes.Recipe | None:
    """The recipe that --preset or --minutes names (None: CONFIG and HPARAMS as written)."""
    if config.minutes:
        return recipes.BUDGETS[recipes.budget_minutes(config.minutes)].recipe
    return recipes.PRESETS[config.preset] if config.preset else None


def resolve(argv) -> tuple[Config, transformer.HParams]:
    """This run's Config and the model's HPARAMS (from --params, --preset or --minutes,
    options still winning), checked: UserError names the first bad value."""
    config, hp = parse_overrides(argv, CONFIG, transformer.HPARAMS)
    if config.params and (config.preset or config.minutes):
        raise UserError("--params and a recipe (--preset, --minutes) both set the model: "
                        "give one of them.")
    if config.params:  # the model's HPARAMS come from the file; options still win
        import checkpoint

        config, hp = parse_overrides(argv, CONFIG, checkpoint.load(config.params).hparams)
    if config.preset and config.minutes:
        raise UserError("--preset and --minutes both name a recipe: give one of them.")
    if config.preset not in ("", *recipes.PRESETS):
        raise UserError(f"--preset={config.preset}: unknown preset. Valid presets: "
                        f"{', '.join(recipes.PRESETS)}.")
    recipes.check_minutes(config.minutes)
    if recipe := recipe_of(config):  # the recipe's HPARAMS and batch size; options win
        config, hp = parse_overrides(
            argv, CONFIG._replace(batch_size=recipe.config["batch_size"]),
            transformer.HPARAMS._replace(**recipe.hparams))
    try:
        model_checks.validate(hp)
    except ValueError as e:
        raise UserError(str(e)) from None
    prefill_lengths(config)  # checked here, before any section runs
    if config.prefill_chunk < 0:
        raise UserError(f"--prefill_chunk={config.prefill_chunk}: >= 1 (0: the default).")
    if hp.max_seq_len < 2:
        raise UserError("bench.py times cached sampling steps after a 1-character context: "
                        "it needs --max_seq_len >= 2.")
    if config.torch_python and not (os.path.isfile(config.torch_python)
                                    and os.access(config.torch_python, os.X_OK)):
        raise UserError(f"--torch_python={config.torch_python}: not an executable file (a "
                        "venv's python with torch, see ../shared/peers/torch_gpt.py).")
    if config.torch_python and not os.path.isfile(config.torch_script):
        raise UserError(f"--torch_script={config.torch_script}: no such file (the PyTorch "
                        "yardstick).")
    if config.optimizer not in ("", "adamw", "muon"):
        raise UserError(f"--optimizer={config.optimizer!r}: adamw or muon (train.py's).")
    bad = [d for d in config.compute_dtypes.split(",") if d not in PEAK_NAMES]
    if bad:
        raise UserError(f"--compute_dtypes={config.compute_dtypes!r}: a comma-separated list "
                        f"of {', '.join(PEAK_NAMES)}.")
    return config, hp


def main(argv) -> int:
    config, hp = resolve(argv)
    if config.section == "train":  # before JAX starts: train.py's devices
        train_step.split_cpu_cores()
    if config.section:
        out = SECTIONS[config.section](config, hp)
        out[f"{config.section}_peak_rss_mb"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(out))
        return 0
    results = {"device": str(jax.devices()[0]), "date": time.strftime("%Y-%m-%d"),
               "cpu_count": os.cpu_count()}
    for name in SECTIONS:
        print(f"# running {name} ...", file=sys.stderr)
        results.update(run_section(name, argv))
    dtypes = config.compute_dtypes.split(",")
    for dtype in dtypes:  # MFU against the measured peak of the precision in use
        results[f"train_{dtype}_mfu"] = (results[f"train_{dtype}_gflops"]
                                         / results[f"peak_{PEAK_NAMES[dtype]}_gflops"])
    # The headline figures: the precision train.py's default ("auto") picks here, if timed.
    chosen, why = kernels.choose_compute_dtype(train_config_of(config).compute_dtype)
    best = chosen if chosen in dtypes else dtypes[0]
    for key in ("step_s", "tokens_per_s", "gflops", "mfu"):
        results[f"train_{key}"] = results[f"train_{best}_{key}"]
    results["train_compute_dtype"] = best
    results["train_compute_dtype_why"] = why if best == chosen else "the first one timed"
    if "torch_bf16_tokens_per_s" in results:
        results["train_vs_torch"] = (results["train_tokens_per_s"]
                                     / results["torch_bf16_tokens_per_s"])
        results["train_vs_torch_f32"] = (results["train_tokens_per_s"]
                                         / results["torch_f32_tokens_per_s"])
    results["sample_bandwidth_bound_chars_per_s"] = (
        results["copy_gb_per_s"] * 1e9 / results["weight_bytes"])
    results["sample_fraction_of_bound"] = (
        results["sample_cached_chars_per_s"] / results["sample_bandwidth_bound_chars_per_s"])
    results["sample_chars_per_s"] = results["sample_cached_chars_per_s"]
    print_table(results, hp, config)
    if config.json:
        common.atomic_write(config.json, json.dumps(results, indent=1).encode())
    return 0


def print_table(r: dict, hp, config) -> None:
    past_share = r["sample_full_window_chars_per_s"] / r["sample_cached_chars_per_s"]
    rows = [
        ("device", f"{r['device']} ({r['cpu_count']} cores), {r['date']}"),
        ("model", f"d_model {hp.d_model}, {hp.decoder_N} layers, {hp.h} heads, d_ff {hp.d_ff},"
                  f" T {hp.max_seq_len}, batch {config.batch_size}, {r['train_optimizer']}, "
                  f"{r['train_devices']} device(s)"),
        ("matmul peak f32 / bf16", f"{r['peak_f32_gflops']:.0f} / {r['peak_bf16_gflops']:.0f}"
                                   " GFLOP/s"),
        ("memory bandwidth copy / read", f"{r['copy_gb_per_s']:.1f} / "
                                         f"{r['read_gb_per_s']:.1f} GB/s"),
        ("model FLOPs per token", f"{r['flops_per_token'] / 1e6:.1f} MFLOP"),
        *[(f"train, {d} matmuls", f"{r[f'train_{d}_tokens_per_s']:.0f} tokens/s "
                                  f"({r[f'train_{d}_step_s']:.3f} s/step), "
                                  f"{r[f'train_{d}_gflops']:.0f} GFLOP/s, MFU "
                                  f"{100 * r[f'train_{d}_mfu']:.1f}% of {PEAK_NAMES[d]} peak")
          for d in config.compute_dtypes.split(",")],
        ("train, headline precision", f"{r['train_compute_dtype']} "
                                      f"({r['train_compute_dtype_why']})"),
        ("one evaluation (train.py's)", f"{r['train_eval_s']:.1f} s, as long as "
                                        f"{r['train_eval_s'] / r['train_step_s']:.1f} steps"),
        *([("PyTorch yardstick bf16 / f32", f"{r['torch_bf16_tokens_per_s']:.0f} / "
                                             f"{r['torch_f32_tokens_per_s']:.0f} tokens/s"),
           ("train vs PyTorch bf16 / f32", f"{r['train_vs_torch']:.2f}x / "
                                           f"{r['train_vs_torch_f32']:.2f}x")]
          if "train_vs_torch" in r else []),
        ("sample, cached, 1 stream", f"{r['sample_cached_chars_per_s']:.0f} chars/s "
                                     f"({100 * r['sample_fraction_of_bound']:.0f}% of the "
                                     f"{r['sample_bandwidth_bound_chars_per_s']:.0f} chars/s "
                                     "bandwidth bound)"),
        (f"sample, cached, {config.num_samples} streams",
         f"{r['sample_batch_cached_chars_per_s']:.0f} chars/s in all"),
        ("sample, past the window (cached)" if position_encodings.is_streaming(hp) else
         "sample, window full (re-prefill)",
         f"{r['sample_full_window_chars_per_s']:.0f} chars/s ({100 * past_share:.0f}% of cached)"),
        ("sample, full forward per char", f"{r['sample_full_forward_chars_per_s']:.0f} chars/s"),
        ("peak RSS ceilings / train / sample",
         f"{r['ceilings_peak_rss_mb']:.0f} / {r['train_peak_rss_mb']:.0f} / "
         f"{r['sample_peak_rss_mb']:.0f} MB"),
    ]
    if "generate_chars_per_s" in r:
        rows.append((f"generate.py, {config.generate_chars:,} chars",
                     f"{r['generate_chars_per_s']:.0f} chars/s end to end; peak RSS "
                     f"{r['generate_short_peak_rss_mb']:.0f} MB at "
                     f"{config.generate_chars // 5:,} chars, "
                     f"{r['generate_long_peak_rss_mb']:.0f} MB at {config.generate_chars:,}"))
    for n in prefill_lengths(config):
        if f"prefill_{n}_chars_per_s" in r:
            rows.append((f"prefill, a context of {n:,} chars",
                         f"{r[f'prefill_{n}_chars_per_s']:.0f} chars/s, peak RSS "
                         f"{r[f'prefill_{n}_peak_rss_mb']:.0f} MB so far (reads the last "
                         f"{min(n, r['prefill_reach']):,} in chunks of {r['prefill_chunk']})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    import train

    run_main(main, __doc__, [CONFIG, transformer.HPARAMS],
             {name: recipes.apply(recipe, train.CONFIG, transformer.HPARAMS)[:2]
              for name, recipe in recipes.PRESETS.items()})
