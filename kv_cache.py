"""KV caches: what the cached model (transformer.build_cached) keeps between sampling steps.

The data's path: the model's attention blocks project each new position to keys and values
and hand them, with the queries, to `attend`: the cache stores them (`update`) and returns
the blocks of keys and values it holds, and `attend` scores the queries over those blocks by
transformer.attention's formula, in the layouts the cache keeps. reader.Reader owns the
caches: it makes them (init_cache: {layer: {block: cache}}, one per attention block), passes
them through the model, for a chunk of one-position steps swaps each for a ChunkCache
(start_chunk ... end_chunk), and reads a streaming model's context through them in chunks of
one size, the last padded (start_prefill ... end_prefill), so that a context of any length
costs the same memory. This module defines the caches and the keys and values they hold
(KeysValues); it does not import the model that drives them.

Two kinds, by model:
  KVCache    learned or sinusoidal positions: position p in slot p of max_seq_len slots.
  RingCache  a streaming model (rotary positions, attention window W): the last W positions,
             position p in slot p mod W, forever, in constant memory.
Both keep keys as [B, H, K, S] and values as [B, H, S, K], the layouts a one-position step's
matmuls read, and score a step's queries block by block: read in other layouts, or joined
into one sequence for transformer.attention, the cache was copied at every step (one-stream
sampling 22% slower: docs/benchmarks.md, "One attention story").
"""

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NO_POSITION = np.iinfo(np.int32).max  # the position of an empty cache slot: no query sees it


class KeysValues(NamedTuple):
    """Keys and values of S positions, in the layouts attention's matmuls read."""
    k: jax.Array          # [B, H, K, S]
    v: jax.Array          # [B, H, S, K]
    positions: jax.Array  # [S] int32: each key's position (which queries see it: visible)

    @staticmethod
    def of(k: jax.Array, v: jax.Array, positions: jax.Array) -> "KeysValues":  # [B, S, H, K]
        return KeysValues(k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), positions)


def _zeros(batch_size, num_heads, key_size, length, dtype):
    return (jnp.zeros((batch_size, num_heads, key_size, length), dtype),
            jnp.zeros((batch_size, num_heads, length, key_size), dtype))


class KVCache(NamedTuple):
    """Keys and values of every position seen so far, for one attention block: position p in
    slot p of S = max_seq_len."""
    k: jax.Array  # [B, H, K, S]
    v: jax.Array  # [B, H, S, K]

    @staticmethod
    def empty(batch_size: int, num_heads: int, key_size: int, length: int,
              dtype=jnp.float32) -> "KVCache":
        """Zeros for `length` positions."""
        return KVCache(*_zeros(batch_size, num_heads, key_size, length, dtype))

    def write(self, new: KeysValues, slot) -> "KVCache":
        """This cache with `new`'s T positions written in slots slot..slot+T-1."""
        return KVCache(
            jax.lax.dynamic_update_slice(self.k, new.k.astype(self.k.dtype), (0, 0, 0, slot)),
            jax.lax.dynamic_update_slice(self.v, new.v.astype(self.v.dtype), (0, 0, slot, 0)))

    def append(self, new: KeysValues) -> "KVCache":
        """`new` (consecutive positions) written in the slots of its positions."""
        return self.write(new, new.positions[0])

    def read(self, end) -> KeysValues:
        """What the cache holds for queries at positions >= end, written up to end."""
        slots = jnp.arange(self.k.shape[-1])
        return KeysValues(self.k, self.v, jnp.where(slots < end, slots, NO_POSITION))

    def update(self, new: KeysValues) -> tuple["KVCache", tuple[KeysValues, ...]]:
        """Writes `new` -> (cache, the keys and values to attend over: every slot, at its
        position; causality hides the ones not yet written)."""
        cache = self.append(new)
        return cache, (KeysValues(cache.k, cache.v, jnp.arange(self.k.shape[-1])),)


class RingCache(NamedTuple):
    """The last W positions of one attention block of a streaming model: position p in slot
    p mod W (a ring buffer: dynamic_update_slice clamps at the end instead of wrapping)."""
    k: jax.Array          # [B, H, K, W]
    v: jax.Array          # [B, H, W, K]
    positions: jax.Array  # [W] int32: the position in each slot, NO_POSITION while empty

    @staticmethod
    def empty(batch_size: int, num_heads: int, key_size: int, window: int,
              dtype=jnp.float32) -> "RingCache":
        return RingCache(*_zeros(batch_size, num_heads, key_size, window, dtype),
                         jnp.full((window,), NO_POSITION, jnp.int32))

    def append(self, new: KeysValues) -> "RingCache":
        """`new`'s positions in their slots: of more than W, the last W; entries at
        NO_POSITION (a padded chunk's, see PrefillCache) are not kept."""
        T, W = new.positions.shape[0], self.positions.shape[0]
        k, v = new.k.astype(self.k.dtype), new.v.astype(self.v.dtype)
        if T == 1:  # one slot: a dynamic_update_slice, which XLA does in place
            slot = new.positions[0] % W
            return RingCache(jax.lax.dynamic_update_slice(self.k, k, (0, 0, 0, slot)),
                             jax.lax.dynamic_update_slice(self.v, v, (0, 0, slot, 0)),
                             jax.lax.dynamic_update_slice(self.positions, new.positions,
                                                          (slot,)))
        real = new.positions != NO_POSITION
        newest = jnp.max(jnp.where(real, new.positions, -1))
        keep = real & (new.positions > newest - W)           # the last W real positions
        slots = jnp.where(keep, new.positions % W, W)        # W is out of range: dropped
        return RingCache(self.k.at[..., slots].set(k, mode="drop"),
                         self.v.at[:, :, slots].set(v, mode="drop"),
                         self.positions.at[slots].set(new.positions, mode="drop"))

    def read(self, end=None) -> KeysValues:
        return KeysValues(self.k, self.v, self.positions)

    def update(self, new: KeysValues) -> tuple["RingCache", tuple[KeysValues, ...]]:
        """-> (cache with `new` appended, the blocks to attend over: what the ring held, and
        `new`; the window hides what is too old)."""
        return self.append(new), (self.read(), new)


class ChunkCache(NamedTuple):
    """For a chunk of one-position steps: a KVCache or RingCache only read, and the chunk's
    own keys and values. Written at every step, the full cache was copied whole by XLA:CPU
    each time (it copies the operand of each dynamic_update_slice in a loop). start_chunk
    makes them, end_chunk appends `recent` to the full cache, once per chunk."""
    cache: KVCache | RingCache  # positions < start
    recent: KVCache             # C positions start..start+C-1, filled step by step
    start: jax.Array            # [] int32

    def update(self, new: KeysValues) -> tuple["ChunkCache", tuple[KeysValues, ...]]:
        """Writes `new` into `recent` -> (cache, two blocks to attend over: the full cache's
        positions < start, and the chunk's own)."""
        recent = self.recent.write(new, new.positions[0] - self.start)
        return self._replace(recent=recent), (
            self.cache.read(self.start),
            KeysValues(recent.k, recent.v, self.start + jnp.arange(recent.k.shape[-1])))


class PrefillCache(NamedTuple):
    """For reading a context in chunks of a fixed size through a RingCache (one compiled
    shape for any length): the last chunk is padded, and its positions >= `end` are neither
    seen by any query nor kept by the ring."""
    cache: RingCache
    end: jax.Array  # [] int32: the context's length

    def update(self, new: KeysValues) -> tuple["PrefillCache", tuple[KeysValues, ...]]:
        new = new._replace(positions=jnp.where(new.positions < self.end, new.positions,
                                               NO_POSITION))
        cache, blocks = self.cache.update(new)
        return self._replace(cache=cache), blocks


def attend(cache, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
           visible: Callable) -> tuple:
    """Keys and values k, v [B, T, H, K] at `positions` [T] kept in `cache` (any kind above);
    -> (cache, out [B, T, H, K]): queries q [B, T, H, K] attended over all the cache holds,
    each seeing the keys visible(key_positions) [T, S] allows: transformer.attention's
    formula without dropout, softmax(q k / sqrt(K)) v, here over the cache's blocks."""
    cache, blocks = cache.update(KeysValues.of(k, v, positions))
    mask = visible(jnp.concatenate([b.positions for b in blocks]))         # [T, S]
    if len(blocks) == 1:  # XLA's fused kernel, on the keys in the model's layout
        k, v = blocks[0].k.transpose(0, 3, 1, 2), blocks[0].v.transpose(0, 2, 1, 3)
        return cache, jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                                   mask=mask[None, None])
    scores = jnp.concatenate([jnp.einsum("bthk,bhks->bhts", q, b.k.astype(q.dtype))
                              for b in blocks], axis=-1)                  # [B, H, T, S]
    scores = jnp.where(mask, scores / math.sqrt(q.shape[-1]), jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores).astype(q.dtype)
    splits = np.cumsum([b.v.shape[2] for b in blocks])[:-1]
    first, *rest = [jnp.einsum("bhts,bhsk->bthk", w, b.v.astype(q.dtype))  # [B, T, H, K]
                    for w, b in zip(jnp.split(weights, splits, axis=-1), blocks)]
    return cache, sum(rest, first)


def init_cache(blocks: dict[str, tuple[str, ...]], batch_size: int, num_heads: int,
               key_size: int, length: int, ring: bool, dtype=jnp.float32) -> dict:
    """Empty caches, {layer: {block: cache}} for the attention blocks `blocks` names
    (reader.attention_blocks): RingCaches of `length` = W positions for a streaming
    model (ring), else KVCaches of `length` = max_seq_len."""
    empty = RingCache.empty if ring else KVCache.empty
    return {layer: {block: empty(batch_size, num_heads, key_size, length, dtype)
                    for block in names}
            for layer, names in blocks.items()}


def _is_cache(x) -> bool:
    return isinstance(x, (KVCache, RingCache, ChunkCache, PrefillCache))


def _each(fn, cache: dict, *others: dict) -> dict:
    """fn applied to each attention block's cache (and the others' at the same place)."""
    return jax.tree.map(fn, cache, *others, is_leaf=_is_cache)


def start_chunk(cache: dict, start, length: int) -> dict:
    """ChunkCaches over `cache` for `length` one-position steps from position `start`."""
    def chunk(c) -> ChunkCache:
        B, H, K, _ = c.k.shape
        return ChunkCache(c, KVCache.empty(B, H, K, length, c.k.dtype), start)
    return _each(chunk, cache)


def end_chunk(cache: dict, chunks: dict) -> dict:
    """`cache` (as given to start_chunk) with the chunk's keys and values appended."""
    return _each(lambda full, c: full.append(KeysValues(
        c.recent.k, c.recent.v, c.start + jnp.arange(c.recent.k.shape[-1]))), cache, chunks)


def start_prefill(cache: dict, end) -> dict:
    """PrefillCaches over RingCaches `cache`, for a chunk of a context `end` long."""
    return _each(lambda c: PrefillCache(c, end), cache)


def end_prefill(cache: dict) -> dict:
    return _each(lambda c: c.cache, cache)
