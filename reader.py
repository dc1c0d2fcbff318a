"""Reading a text through the model: the one answer to "what does character i see?".

Character i is predicted from what the model's sampler would show it:
- a streaming model (rotary positions, attention window W; position_encodings.is_streaming): every
  character before it. Only the last receptive_field of them can matter (each layer looks
  W - 1 positions further back), so a text of any length reads in bounded memory: a context
  through ring buffers of W positions (kv_cache.RingCache), one cached step per character
  after it, and a long text's logits in passes of STREAM_CHUNK positions, each read after the
  receptive_field positions before it; all equal one forward pass over the whole text.
- any other model (learned or sinusoidal positions): the last max_seq_len characters, its
  window, at positions 0..max_seq_len-1. While the text fits the window, each character is
  one cached step (keys and values of earlier positions kept); past it, every character
  shifts all positions, so the window is read again whole (only its last position's logits
  computed by the head, nanoGPT's inference trick).

Reader drives the cached model (transformer.build_cached) for sampling.py: `start` reads a
context, `steps` a chunk of characters that a function of the logits picks; `next_logits`
gives a whole text's logits by the same rule, for eval.py, distillation (objectives.py) and
visualize.py. This module decides what each character sees; kv_cache.py how keys are kept.
"""

import functools
from typing import Callable, Iterator, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import kernels
import kv_cache
import position_encodings
import transformer

PREFILL_CHUNK = 256  # context characters per jitted call of a streaming model's prefill
STREAM_CHUNK = 8192  # positions per forward pass of a streaming model's next_logits
# On the CPU, matmuls without XLA's YNNPACK kernels (kept for reductions): those ran the shipped
# model's 128 x 192 x 576 matmuls slower. Past the window it samples at 262 against 214 chars/s
# (same process, 2026-11-26), the same at the default HPARAMS; training is faster with them.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options() -> dict | None:
    """The sampling jits' compiler options on this backend: CPU_COMPILER_OPTIONS on a CPU."""
    return CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None


def receptive_field(hp: transformer.HParams) -> int | None:
    """How many of the last characters the next character's logits depend on (None without a
    window: every one). With a window W each decoder layer looks W - 1 positions further back,
    and an encoder one window more (decoder layer i cross-attends to encoder layer i)."""
    if hp.attention_window is None:
        return None
    return (hp.decoder_N + hp.use_encoder) * (hp.attention_window - 1) + 1


def attention_blocks(hp: transformer.HParams) -> dict[str, tuple[str, ...]]:
    """Each layer's attention blocks, by layer name (as in the params): an encoder layer
    self-attends; decoder layer i also cross-attends to encoder layer i, if there is one."""
    num_encoder = hp.encoder_N if hp.use_encoder else 0
    encoder = {f"encoder_{i}": ("self",) for i in range(num_encoder)}
    decoder = {f"decoder_{i}": ("self", "cross") if i < num_encoder else ("self",)
               for i in range(hp.decoder_N)}
    return {**encoder, **decoder}


def empty_cache(hp: transformer.HParams, batch_size: int) -> dict:
    """Empty caches for every attention block of the model: ring buffers of W positions for a
    streaming model, else max_seq_len slots."""
    streaming = position_encodings.is_streaming(hp)
    return kv_cache.init_cache(attention_blocks(hp), batch_size, hp.h, hp.d_model // hp.h,
                               hp.attention_window if streaming else hp.max_seq_len, streaming)


def build_last_logits(hp: transformer.HParams, vocab_size: int) -> hk.Transformed:
    """apply(params, None, window [B, S]) -> the logits [B, V] after its last character: the
    head reads the last position only."""
    forward = transformer.forward_fn(hp, vocab_size,
                                     output=lambda features, head: head(features[:, -1]))
    return hk.transform(lambda window: forward(window, False))


class ReadState(NamedTuple):
    """A text read so far, by one batch of streams."""
    window: jax.Array   # [B, S] int32: the last max_seq_len characters, left-aligned (a
                        # streaming model: unused, [B, 1])
    length: jax.Array   # [] int32: characters read (past the window: max_seq_len)
    cache: dict         # {layer: {block: KVCache or RingCache}}; KVCaches unused once the
                        # window is full
    logits: jax.Array   # [B, V] of the next character


class Reader:
    """The model's reading of a text as a sampler reads it, jitted: a context (`start`), then
    chunks of characters (`steps`, traced inside the caller's jit). Both take params with
    transposed copies (sampling_params). A whole text at once: next_logits."""

    def __init__(self, hp: transformer.HParams, vocab_size: int,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.hp, self.prefill_chunk = hp, prefill_chunk
        self.streaming = position_encodings.is_streaming(hp)
        self.cached = transformer.build_cached(hp, vocab_size)
        self.last_logits = build_last_logits(hp, vocab_size)
        options = compiler_options()
        self.prefill = jax.jit(self._prefill_window, compiler_options=options)
        self.read_chunk = jax.jit(self._read_context_chunk, compiler_options=options)

    def _prefill_window(self, params, window, cache, length):
        """A window [B, S] in one pass: its logits at position length - 1, its cache."""
        logits, cache = self.cached.apply(params, None, window, cache, 0)         # [B, S, V]
        return jax.lax.dynamic_index_in_dim(logits, length - 1, 1, keepdims=False), cache

    def _read_context_chunk(self, params, tokens, cache, start, end):
        """A streaming model reads context positions start..start+C-1 (tokens [B, C]; those
        from `end` on are padding) through its rings -> (logits [B, V] at end - 1, cache)."""
        logits, cache = self.cached.apply(params, None, tokens,
                                          kv_cache.start_prefill(cache, end), start)
        last = jnp.clip(end - 1 - start, 0, tokens.shape[1] - 1)
        return (jax.lax.dynamic_index_in_dim(logits, last, 1, keepdims=False),
                kv_cache.end_prefill(cache))

    def start(self, params, context_ids: np.ndarray, num_samples: int) -> ReadState:
        """The state after reading a context (at least one id) for num_samples streams: its
        last max_seq_len ids in one pass or, for a streaming model, its last receptive_field
        ids (all the next characters can see), prefill_chunk at a time: time and memory
        independent of the context's length."""
        context_ids = np.asarray(context_ids, np.int32)
        assert len(context_ids) >= 1, "the context needs at least one character"
        cache = empty_cache(self.hp, num_samples)
        if not self.streaming:
            S = self.hp.max_seq_len
            window = np.zeros((num_samples, S), np.int32)
            window[:, : len(context_ids[-S:])] = context_ids[-S:]
            length = jnp.int32(len(context_ids[-S:]))
            logits, cache = self.prefill(params, jnp.asarray(window), cache, length)
            return ReadState(jnp.asarray(window), length, cache, logits)
        n, C = len(context_ids), self.prefill_chunk
        first = max(0, n - receptive_field(self.hp))  # what came before cannot matter
        tail = np.zeros(-(-(n - first) // C) * C, np.int32)
        tail[:n - first] = context_ids[first:]
        for offset in range(0, n - first, C):
            chunk = jnp.asarray(np.tile(tail[offset:offset + C], (num_samples, 1)))
            logits, cache = self.read_chunk(params, chunk, cache, np.int32(first + offset),
                                             np.int32(n))
        return ReadState(jnp.zeros((num_samples, 1), jnp.int32), jnp.int32(n), cache, logits)

    def cached_until_full(self, length: int) -> bool:
        """Whether the next character after `length` read is one cached step (else the
        window is read again): always for a streaming model."""
        return self.streaming or length < self.hp.max_seq_len

    def steps(self, params, state: ReadState, pick: Callable, xs: jax.Array,
              cached: bool) -> tuple[ReadState, jax.Array]:
        """len(xs) characters, each pick(logits [B, V], x) -> ids [B] of the one before's
        logits, read by a lax.scan -> (state, ids [B, len(xs)]). cached (static: the host
        knows the length, cached_until_full) picks the path for the whole chunk: a lax.cond
        in the scan made XLA copy the weights at every character on the CPU. Cached steps
        write a small cache of the chunk's own, joined to the full one once at the end:
        written at every step, XLA:CPU copied the full cache each time."""
        step = self._cached_step if cached else self._window_step
        full_cache = state.cache
        if cached:
            state = state._replace(cache=kv_cache.start_chunk(state.cache, state.length,
                                                              len(xs)))

        def body(state, x):
            token = pick(state.logits, x)                                   # [B]
            return step(params, state, token), token

        state, tokens = jax.lax.scan(body, state, xs)
        if cached:
            state = state._replace(cache=kv_cache.end_chunk(full_cache, state.cache))
        return state, tokens.T

    def _cached_step(self, params, state: ReadState, token: jax.Array) -> ReadState:
        """token [B] at position `length`: one position through the model."""
        logits, cache = self.cached.apply(params, None, token[:, None], state.cache,
                                          state.length)                       # [B, 1, V]
        window = state.window if self.streaming else jax.lax.dynamic_update_slice(
            state.window, token[:, None], (0, state.length))
        return ReadState(window, state.length + 1, cache, logits[:, 0])

    def _window_step(self, params, state: ReadState, token: jax.Array) -> ReadState:
        """The window is full: drop its first character, append token, read it again."""
        window = jnp.concatenate([state.window[:, 1:], token[:, None]], axis=1)  # [B, S]
        logits = self.last_logits.apply(params, None, window)
        return state._replace(window=window, logits=logits)


def make_window_logits(hp: transformer.HParams, vocab_size: int, seq_len: int):
    """(params, ids [N], starts [B]) -> logits [B, seq_len, V] after each of
    ids[s : s + seq_len], jittable, for distillation's teachers on a training batch: a
    streaming model reads the receptive field before each window with it, so each row equals
    next_logits' of the whole text (up to rounding); any other model reads the window alone,
    as it was trained (positions 0..seq_len-1, seq_len at most max_seq_len)."""
    model = transformer.build(hp, vocab_size)
    context = receptive_field(hp) if position_encodings.is_streaming(hp) else 0

    def window_logits(params, ids, starts):
        low = jnp.maximum(starts - context, 0)                                # [B]
        at = low[:, None] + jnp.arange(context + seq_len)                     # [B, C+T]
        tokens = ids[jnp.minimum(at, ids.shape[0] - 1)].astype(jnp.int32)     # past the end:
        logits = model.apply(params, None, tokens, False)                     # unseen (causal)
        wanted = (starts - low)[:, None] + jnp.arange(seq_len)                # [B, T]
        return jnp.take_along_axis(logits, wanted[..., None], axis=1)         # [B, T, V]

    return window_logits


def iter_next_logits(hp: transformer.HParams, vocab_size: int, params, ids: np.ndarray,
                     batch_size: int = 64) -> Iterator[np.ndarray]:
    """next_logits in consecutive pieces [n, V], in bounded memory."""
    S, streaming = hp.max_seq_len, position_encodings.is_streaming(hp)
    params = jax.device_put(params)
    if streaming:
        chunk, context = STREAM_CHUNK, receptive_field(hp)
    else:  # positions 0..S-1 see all before them: one window; then one per character
        chunk, context = S, 0
    forward, last = _jitted_reads(hp, vocab_size)
    length = min(context + chunk, len(ids))
    for begin in range(0, len(ids) if streaming else min(S, len(ids)), chunk):
        low = max(0, begin - context)
        segment = ids[low: low + length]  # zero-padded at the end: causal, so unseen
        out = forward(params, np.pad(segment, (0, length - len(segment))))
        yield np.asarray(out[begin - low: min(begin + chunk, len(ids)) - low])
    if streaming or len(ids) <= S:
        return
    windows = np.lib.stride_tricks.sliding_window_view(ids, S)[1:]           # [N - S, S]
    for begin in range(0, len(windows), batch_size * 16):
        part = windows[begin: begin + batch_size * 16]
        pad = -len(part) % batch_size
        batches = np.concatenate([part, np.zeros((pad, S), part.dtype)]).reshape(
            -1, batch_size, S)
        yield np.asarray(last(params, jnp.asarray(batches))).reshape(
            -1, vocab_size)[: len(part)]


@functools.lru_cache(maxsize=8)
def _jitted_reads(hp: transformer.HParams, vocab_size: int):
    """(a pass over one text [T] -> logits [T, V], the last logits of batches of windows
    [NB, B, S] -> [NB, B, V]), jitted once per model: eval, visualize and several teachers
    reuse their compilations."""
    model, last_logits = transformer.build(hp, vocab_size), build_last_logits(hp, vocab_size)
    forward = jax.jit(lambda p, x: model.apply(p, None, x[None], False)[0])
    last = jax.jit(lambda p, xs: jax.lax.map(lambda x: last_logits.apply(p, None, x), xs))
    return forward, last


def next_logits(hp: transformer.HParams, vocab_size: int, params,
                ids: np.ndarray) -> np.ndarray:
    """[len(ids), V] float32: row i the logits of the character after ids[i], given what
    the sampler would give the model (this module's docstring)."""
    return np.concatenate(list(iter_next_logits(hp, vocab_size, params, ids)))


def sampling_params(params) -> hk.Params:
    """The params as `start` and `steps` read them: on the device, with transposed copies."""
    return kernels.add_transposed_weights(jax.device_put(params))
