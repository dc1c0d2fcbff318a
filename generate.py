"""Seeded character sampling with a KV cache: `python generate.py [--field=value ...]`.

Two kinds of model, two ways to be exact:
- Learned or sinusoidal positions: the model sees what a plain windowed sampler shows it, the
  last max_seq_len characters. While the text fits the window, each new character costs one
  cached step (one position through the model, keys and values of earlier positions kept).
  Once the window is full, every new character shifts all positions by one, and with absolute
  positions no cached key or value stays valid (each depends on its position and, past the
  first layer, on the window it saw), so the window is re-prefilled: one full pass over
  max_seq_len characters per character, of which the last layer computes only what the last
  position's logits need.
- A streaming model (rotary positions, attention window W; transformer.streams): a query only
  sees the last W positions of its layer, and rotary scores depend on relative positions, so
  a key once cached stays valid for as long as a query can see it. Every character is one
  cached step through ring buffers of W positions (kv_cache.RingCache), forever, and the text
  equals one full forward pass over the whole text. Of a context only the last
  transformer.reach characters can matter (each layer looks W - 1 positions further back):
  those are read through the same rings PREFILL_CHUNK characters at a time, so a context of
  any length costs the same time and memory.
Each path is a jitted scan over a chunk of characters, with static shapes.

Character i of a stream is drawn with the key fold_in(key, i), so the text depends only on the
seed, the params and the context, not on the chunk size or on the cache.
"""

import sys
import time
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import checkpoint
import data
import kernels
import kv_cache
import transformer
from common import StopRequest, UserError, parse_overrides, run_main
from eval import DEFAULT_PARAMS, load_params


class Config(NamedTuple):
    params: str = DEFAULT_PARAMS             # params file to sample from
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

CHUNK = 16  # characters per jitted call: fewer dispatches, still streams smoothly
PREFILL_CHUNK = 256  # context characters per jitted call of a streaming model's prefill

# On the CPU, matmuls without XLA's YNNPACK kernels (kept for reductions): those ran the shipped
# model's 128 x 192 x 576 matmuls slower. Past the window it samples at 262 against 214 chars/s
# (same process, 2026-11-26), the same at the default HPARAMS; training is faster with them.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def sample_logits(key: jax.Array, logits: jax.Array, temperature: float,
                  top_k: int | None, top_p: float | None = None,
                  min_p: float | None = None) -> jax.Array:
    """One character id per row of logits [B, V], drawn by the rule of `pick`."""
    return pick(logits, jax.random.gumbel(key, logits.shape), temperature, top_k, top_p, min_p)


def pick(logits: jax.Array, noise: jax.Array, temperature: float, top_k: int | None,
         top_p: float | None = None, min_p: float | None = None) -> jax.Array:
    """sample_logits with its Gumbel noise [B, V] drawn beforehand: the argmax of logits plus
    noise is jax.random.categorical's draw, id for id.

    The rule, in this order, each step on what the one before left: divide the logits by
    `temperature`; keep the `top_k` likeliest characters; keep the smallest set of the
    likeliest whose probability reaches `top_p` (nucleus); keep those at least `min_p` times
    as likely as the likeliest. Characters tied at a cut stay in.
    """
    logits = logits.astype(jnp.float32) / temperature                   # [B, V]
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]           # [B, 1]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None and top_p < 1:
        probs = jnp.sort(jax.nn.softmax(logits), axis=-1)[:, ::-1]       # [B, V] descending
        before = jnp.cumsum(probs, axis=-1) - probs                      # mass of the likelier
        kept = jnp.sum(before < top_p, axis=-1, keepdims=True)          # [B, 1] >= 1
        last = jnp.take_along_axis(probs, kept - 1, axis=-1)             # the least kept
        logits = jnp.where(jax.nn.softmax(logits) < last, -jnp.inf, logits)
    if min_p is not None and min_p > 0:
        floor = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(min_p)  # p >= min_p * p_max
        logits = jnp.where(logits < floor, -jnp.inf, logits)
    return jnp.argmax(logits + noise, axis=-1).astype(jnp.int32)        # [B]


def empty_cache(hp: transformer.HParams, batch_size: int) -> dict:
    """Empty caches for every attention block of the model: ring buffers of W positions for a
    streaming model, else max_seq_len slots."""
    streaming = transformer.streams(hp)
    return kv_cache.init_cache(transformer.attention_blocks(hp), batch_size, hp.h,
                               hp.d_model // hp.h,
                               hp.attention_window if streaming else hp.max_seq_len, streaming)


class SamplerState(NamedTuple):
    window: jax.Array   # [B, S] int32: the last `length` characters, left-aligned (a streaming
                        # model: unused, [B, 1])
    length: jax.Array   # [] int32: characters in the window, 1..S (streaming: in the text)
    cache: dict         # {layer: {block: KVCache (streaming: RingCache)}}, ChunkCaches
                        # within a chunk; KVCaches are unused once the window is full
    logits: jax.Array   # [B, V] for the next character


class Sampler:
    """Jitted prefill and chunked sampling for one model and one sampling rule.

    stream and sample take the model's params. stream's steps, for callers that time them:
    start, then per chunk draw_noise and sample_chunk, with the params through
    kernels.add_transposed_weights (which stream does once).
    """

    def __init__(self, hparams: transformer.HParams, vocab_size: int,
                 temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, chunk: int = CHUNK,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.hp, self.vocab_size, self.chunk = hparams, vocab_size, chunk
        self.prefill_chunk = prefill_chunk  # context characters per read_chunk call
        self.streaming = transformer.streams(hparams)
        self.model = transformer.build_cached(hparams, vocab_size)
        self.full = transformer.build(hparams, vocab_size)  # once the window is full
        self.rule = (temperature, top_k, top_p, min_p)  # pick's
        options = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
        self.prefill = jax.jit(self._forward, compiler_options=options)
        self.read_chunk = jax.jit(self._read_chunk, compiler_options=options)
        self.sample_chunk = jax.jit(self._sample_chunk, static_argnames="cached",
                                    compiler_options=options)
        self.draw_noise = jax.jit(self._draw_noise, static_argnames=("size", "num_samples"))

    def _forward(self, params, window, cache, length):
        """Full pass over the window [B, S]: logits at position length-1, cache of all."""
        logits, cache = self.model.apply(params, None, window, cache, 0)  # [B, S, V]
        return jax.lax.dynamic_index_in_dim(logits, length - 1, 1, keepdims=False), cache

    def _read_chunk(self, params, tokens, cache, start, end):
        """A streaming model reads context positions start..start+C-1 (tokens [B, C]; those
        from `end` on are padding) through its RingCaches -> (logits [B, V] at position
        end - 1, if in this chunk, cache)."""
        logits, cache = self.model.apply(params, None, tokens,
                                         kv_cache.start_prefill(cache, end), start)  # [B, C, V]
        last = jnp.clip(end - 1 - start, 0, tokens.shape[1] - 1)
        return (jax.lax.dynamic_index_in_dim(logits, last, 1, keepdims=False),
                kv_cache.end_prefill(cache))

    def _cached_step(self, params, state: SamplerState, token: jax.Array) -> SamplerState:
        """Appends token [B] at position `length` (< S): one position through the model."""
        logits, cache = self.model.apply(params, None, token[:, None], state.cache,
                                         state.length)                          # [B, 1, V]
        window = state.window if self.streaming else jax.lax.dynamic_update_slice(
            state.window, token[:, None], (0, state.length))
        return SamplerState(window, state.length + 1, cache, logits[:, 0])

    def _slide_step(self, params, state: SamplerState, token: jax.Array) -> SamplerState:
        """The window is full: drop its first character, append token, re-prefill."""
        window = jnp.concatenate([state.window[:, 1:], token[:, None]], axis=1)  # [B, S]
        logits = self.full.apply(params, None, window, False, last_only=True)[:, 0]
        return SamplerState(window, state.length, state.cache, logits)

    def _draw_noise(self, key: jax.Array, first: jax.Array, size: int, num_samples: int):
        """The Gumbel noise [size, B, V] of characters first..first+size-1 of the streams.

        A jitted call of its own, so that stream() draws it while the previous chunk runs: on
        the CPU threefry is a rolled loop, which cost 75 us per character inside the scan body
        and about 2% of one-stream sampling beside it in the chunk's jit.
        """
        shape = (num_samples, self.vocab_size)
        return jax.vmap(lambda index: jax.random.gumbel(jax.random.fold_in(key, index), shape))(
            first + jnp.arange(size))

    def _sample_chunk(self, params, state: SamplerState, noise: jax.Array, cached: bool):
        """The next len(noise) characters, drawn with noise [size, B, V] from draw_noise:
        (state, tokens [B, size]).

        The host picks the path per chunk (`cached` is static): a lax.cond inside the scan
        made XLA copy the weights into the branch at every character on the CPU.
        """
        step = self._cached_step if cached else self._slide_step
        full_cache = state.cache
        if cached:  # the chunk's keys and values go to a small cache of their own
            state = state._replace(cache=kv_cache.start_chunk(state.cache, state.length,
                                                              len(noise)))

        def body(state, noise):
            token = pick(state.logits, noise, *self.rule)                      # [B]
            return step(params, state, token), token

        state, tokens = jax.lax.scan(body, state, noise)                 # noise [size, B, V]
        if cached:  # then join the full cache, in one write per chunk
            state = state._replace(cache=kv_cache.end_chunk(full_cache, state.cache))
        return state, tokens.T

    def start(self, params, context_ids: np.ndarray, num_samples: int) -> SamplerState:
        """The state after reading the context's last max_seq_len ids in one pass or, for a
        streaming model, the last transformer.reach of them (all that its next characters
        can see), prefill_chunk at a time: time and memory independent of the context's
        length. At least one id."""
        context_ids = np.asarray(context_ids, np.int32)
        assert len(context_ids) >= 1, "the context needs at least one character"
        cache = empty_cache(self.hp, num_samples)
        if self.streaming:
            # Only the last `reach` characters can change what follows: the text before them
            # is skipped, exactly (each kept one at its own position): any context costs
            # the same.
            n, C = len(context_ids), self.prefill_chunk
            first = max(0, n - transformer.reach(self.hp))
            tail = np.zeros(-(-(n - first) // C) * C, np.int32)
            tail[:n - first] = context_ids[first:]
            for offset in range(0, n - first, C):
                chunk = jnp.asarray(np.tile(tail[offset:offset + C], (num_samples, 1)))
                logits, cache = self.read_chunk(params, chunk, cache,
                                                np.int32(first + offset), np.int32(n))
            window = jnp.zeros((num_samples, 1), jnp.int32)  # unused: the rings hold it all
            return SamplerState(window, jnp.int32(n), cache, logits)
        S = self.hp.max_seq_len
        context_ids = context_ids[-S:]
        window = np.zeros((num_samples, S), np.int32)
        window[:, : len(context_ids)] = context_ids
        length = jnp.int32(len(context_ids))
        logits, cache = self.prefill(params, jnp.asarray(window), cache, length)
        return SamplerState(jnp.asarray(window), length, cache, logits)

    def stream(self, params, context_ids: np.ndarray, key: jax.Array,
               num_samples: int = 1) -> Iterator[np.ndarray]:
        """Yields chunks of sampled ids [num_samples, size], forever; the next chunk is
        already dispatched while the caller handles this one.

        Chunks are `chunk` characters, but single characters where the window fills up (the
        host knows the length: see chunk_size).
        """
        S = self.hp.max_seq_len
        params = kernels.add_transposed_weights(params)
        state = self.start(params, context_ids, num_samples)
        length = len(context_ids) if self.streaming else min(len(context_ids), S)
        first, pending = 0, None
        noise = self.draw_noise(key, np.int32(first), self.chunk_size(length), num_samples)
        while True:
            state, tokens = self.sample_chunk(params, state, noise,
                                              cached=self.streaming or length < S)
            first, length = first + len(noise), length + len(noise)
            noise = self.draw_noise(key, np.int32(first), self.chunk_size(length), num_samples)
            if pending is not None:
                yield np.asarray(pending)
            pending = tokens

    def chunk_size(self, length: int) -> int:
        """`chunk`, or 1 where fewer positions than that are free, so that every cached step
        has a free position (a streaming model's ring always has)."""
        if self.streaming:
            return self.chunk
        free = max(self.hp.max_seq_len - length, 0)
        return self.chunk if free >= self.chunk or not free else 1

    def sample(self, params, context_ids: np.ndarray, key: jax.Array, num_chars: int,
               num_samples: int = 1) -> np.ndarray:
        """num_chars sampled ids per stream: [num_samples, num_chars]."""
        if num_chars == 0:
            return np.zeros((num_samples, 0), np.int32)
        chunks, total = [], 0
        for chunk in self.stream(params, context_ids, key, num_samples):
            chunks.append(chunk)
            total += chunk.shape[1]
            if total >= num_chars:  # stop before the stream dispatches yet another chunk
                break
        return np.concatenate(chunks, axis=1)[:, :num_chars]


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
    ckpt = load_params(config.params)
    context, context_ids = read_context(config, ckpt.vocab)
    print(f"# devices {jax.devices()} | run {ckpt.meta.get('run_hash')} | seed {seed} | "
          f"{checkpoint.num_params(ckpt.params):,} params", file=sys.stderr)
    sampler = Sampler(ckpt.hparams, len(ckpt.vocab), config.temperature, config.top_k,
                      config.top_p, config.min_p)
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
    run_main(main)
