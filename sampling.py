"""Seeded character sampling: the rule that picks a character from the logits, and Sampler,
which streams characters from a model by that rule (reader.py reads them through the model).

Character i of a stream is drawn with the key fold_in(key, i), so the text depends only on the
seed, the params and the context, not on the chunk size or on the cache.
"""

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

import reader
import transformer

CHUNK = 16  # characters per jitted call: fewer dispatches, still streams smoothly


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


class Sampler:
    """Streams of characters from one model by one sampling rule, chunk by chunk.

    For callers that time its parts: reader.start (Sampler.reader), then per chunk draw_noise
    and sample_chunk, with reader.sampling_params(params).
    """

    def __init__(self, hparams: transformer.HParams, vocab_size: int,
                 temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, chunk: int = CHUNK,
                 prefill_chunk: int = reader.PREFILL_CHUNK):
        self.reader = reader.Reader(hparams, vocab_size, prefill_chunk)
        self.vocab_size, self.chunk = vocab_size, chunk
        self.rule = (temperature, top_k, top_p, min_p)  # pick's
        self.sample_chunk = jax.jit(self._sample_chunk, static_argnames="cached",
                                    compiler_options=reader.compiler_options())
        self.draw_noise = jax.jit(self._draw_noise, static_argnames=("size", "num_samples"))

    def _draw_noise(self, key: jax.Array, first: jax.Array, size: int, num_samples: int):
        """The Gumbel noise [size, B, V] of characters first..first+size-1 of the streams.

        A jitted call of its own, so that stream() draws it while the previous chunk runs: on
        the CPU threefry is a rolled loop, which cost 75 us per character inside the scan body
        and about 2% of one-stream sampling beside it in the chunk's jit.
        """
        shape = (num_samples, self.vocab_size)
        return jax.vmap(lambda index: jax.random.gumbel(jax.random.fold_in(key, index), shape))(
            first + jnp.arange(size))

    def _sample_chunk(self, params, state: reader.ReadState, noise: jax.Array, cached: bool):
        """The next len(noise) characters, drawn with noise [size, B, V] from draw_noise:
        (state, ids [B, size])."""
        return self.reader.steps(params, state, lambda logits, x: pick(logits, x, *self.rule),
                                 noise, cached)

    def chunk_size(self, length: int) -> int:
        """`chunk`, or 1 where fewer positions than that are free, so that every cached step
        has a free position (a streaming model's ring always has)."""
        if self.reader.streaming:
            return self.chunk
        free = max(self.reader.hp.max_seq_len - length, 0)
        return self.chunk if free >= self.chunk or not free else 1

    def stream(self, params, context_ids: np.ndarray, key: jax.Array,
               num_samples: int = 1) -> Iterator[np.ndarray]:
        """Yields chunks of sampled ids [num_samples, size], forever; the next chunk is
        already dispatched while the caller handles this one. Chunks are `chunk` characters,
        but single ones where the window fills up (chunk_size)."""
        params = reader.sampling_params(params)
        state = self.reader.start(params, context_ids, num_samples)
        read = len(context_ids) if self.reader.streaming else min(
            len(context_ids), self.reader.hp.max_seq_len)  # the host's count, for static paths
        sampled, pending = 0, None
        while True:
            noise = self.draw_noise(key, np.int32(sampled), self.chunk_size(read + sampled),
                                    num_samples)
            state, tokens = self.sample_chunk(
                params, state, noise, cached=self.reader.cached_until_full(read + sampled))
            sampled += len(noise)
            if pending is not None:
                yield np.asarray(pending)
            pending = tokens

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
