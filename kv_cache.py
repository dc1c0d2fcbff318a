"""KV caches: what the cached model (transformer.build_cached) keeps between sampling steps.

The data's path: the model's attention blocks project each new position to keys and values
and hand them to their cache (`update`); the cache stores them and returns the blocks of keys
and values that the new queries attend over (transformer.attend). generate.Sampler owns the
caches: it makes them (init_cache), passes them through the model, and for a chunk of
one-position steps swaps each for a ChunkCache (start_chunk ... end_chunk).

Both keep keys as [B, H, K, S] and values as [B, H, S, K], the layouts a one-position step's
matmuls read: read in others inside a loop, XLA transposes them at every step; transposed
once per chunk instead, they cost about 1-2% of one-stream sampling.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

import transformer
from transformer import KeysValues

UNWRITTEN = jnp.iinfo(jnp.int32).max  # the key position of an empty slot: no query sees it


class KVCache(NamedTuple):
    """Keys and values of every position seen so far, for one attention block: position p in
    slot p of S = max_seq_len."""
    k: jax.Array  # [B, H, K, S]
    v: jax.Array  # [B, H, S, K]

    @staticmethod
    def empty(batch_size: int, num_heads: int, key_size: int, length: int,
              dtype=jnp.float32) -> "KVCache":
        """Zeros for `length` positions."""
        return KVCache(jnp.zeros((batch_size, num_heads, key_size, length), dtype),
                       jnp.zeros((batch_size, num_heads, length, key_size), dtype))

    def write(self, new: KeysValues, start) -> "KVCache":
        """This cache with `new`'s T positions written in slots start..start+T-1."""
        return KVCache(
            jax.lax.dynamic_update_slice(self.k, new.k.astype(self.k.dtype), (0, 0, 0, start)),
            jax.lax.dynamic_update_slice(self.v, new.v.astype(self.v.dtype), (0, 0, start, 0)))

    def update(self, new: KeysValues) -> tuple["KVCache", tuple[KeysValues, ...]]:
        """Writes `new` (consecutive positions) -> (cache, the keys and values to attend
        over: every slot, at its position; causality hides the ones not yet written)."""
        cache = self.write(new, new.positions[0])
        return cache, (KeysValues(cache.k, cache.v, jnp.arange(self.k.shape[-1])),)


class ChunkCache(NamedTuple):
    """For a chunk of one-position steps: a KVCache only read, and the chunk's own keys and
    values. Written at every step, the full cache was copied whole by XLA:CPU each time (it
    copies the operand of each dynamic_update_slice in a loop). start_chunk makes them,
    end_chunk writes `recent` into the full cache, once per chunk."""
    cache: KVCache    # positions < start
    recent: KVCache   # C positions start..start+C-1, filled step by step
    start: jax.Array  # [] int32

    def update(self, new: KeysValues) -> tuple["ChunkCache", tuple[KeysValues, ...]]:
        """Writes `new` into `recent` -> (cache, two blocks to attend over: the full cache's
        positions < start, and the chunk's own)."""
        recent = self.recent.write(new, new.positions[0] - self.start)
        S, C = self.cache.k.shape[-1], recent.k.shape[-1]
        slots = jnp.arange(S)
        return self._replace(recent=recent), (
            KeysValues(self.cache.k, self.cache.v, jnp.where(slots < self.start, slots,
                                                             UNWRITTEN)),
            KeysValues(recent.k, recent.v, self.start + jnp.arange(C)))


def init_cache(hp: transformer.HParams, batch_size: int,
               dtype=jnp.float32) -> tuple[KVCache, ...]:
    """Empty caches for every attention block, in the order the model uses them."""
    num_encoder = hp.encoder_N if hp.use_encoder else 0
    num_blocks = num_encoder + hp.decoder_N + num_encoder  # encoder self, decoder self, cross
    return tuple(KVCache.empty(batch_size, hp.h, hp.d_model // hp.h, hp.max_seq_len, dtype)
                 for _ in range(num_blocks))


def start_chunk(cache: tuple[KVCache, ...], start, length: int) -> tuple[ChunkCache, ...]:
    """ChunkCaches over `cache` for `length` one-position steps from position `start`."""
    def chunk(c: KVCache) -> ChunkCache:
        B, H, K, _ = c.k.shape
        return ChunkCache(c, KVCache.empty(B, H, K, length, c.k.dtype), start)
    return tuple(map(chunk, cache))


def end_chunk(cache: tuple[KVCache, ...],
              chunks: tuple[ChunkCache, ...]) -> tuple[KVCache, ...]:
    """`cache` (as given to start_chunk) with the chunk's keys and values written in."""
    return tuple(full.write(c.recent, c.start) for full, c in zip(cache, chunks))
