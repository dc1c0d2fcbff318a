"""A pre-norm character Transformer in Haiku, with an optional causal encoder and a KV cache.

Shapes, as in the comments below:
  B  batch                  T  query positions (time)       S  key positions
  D  d_model                H  heads                         K  key size (D / H)
  F  d_ff                   V  vocabulary size               N  layers

One model, two ways to call it (same parameters, same module names):
  build(hp, V).apply(params, rng, tokens, is_training)          -> logits         (train, eval)
  build_cached(hp, V).apply(params, None, tokens, cache, start) -> logits, cache  (sampling)
The first takes last_only=True for the last position's logits alone (sampling over a full
window): the last layer then computes keys and values at every position, the rest at one.
The second takes add_transposed_weights(params), which adds a transposed copy of some weights
for steps of a single row (batch 1, one position): see Linear.
The cached form writes the keys and values of positions start..start+T-1 into `cache` and lets
each query attend to every cached position <= its own, so a prefill (start=0, T tokens) followed
by one-token steps gives the same logits as one full forward pass. For a run of one-token
steps, start_chunk turns the cache into ChunkCaches that the steps only read (their own keys
and values go to a small cache), and end_chunk writes those back: C = the chunk's length.
"""

import functools
import math
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np


class HParams(NamedTuple):
    max_seq_len: int = 128      # context window in characters: positions 0..max_seq_len-1
    d_model: int = 384          # width of the residual stream (D)
    h: int = 6                  # attention heads (H); d_model must be divisible by h
    d_ff: int = 1536            # hidden width of the feed-forward block (F), 4 * d_model
    decoder_N: int = 6          # decoder layers: causal self-attention + feed-forward
    encoder_N: int = 1          # encoder layers, used only when use_encoder (<= decoder_N)
    use_encoder: bool = False   # decoder layer i < encoder_N cross-attends to encoder layer i
    dropout: float = 0.2        # one rate for embeddings, attention weights and branch outputs
                                # (rounded to a multiple of 1/256: see _dropout)
    positions: str = "learned"  # "learned" embeddings or fixed "sinusoidal" encodings


HPARAMS = HParams()


def validate(hp: HParams) -> HParams:
    """Raises ValueError naming the first invalid field; returns `hp` unchanged."""
    for field in ("max_seq_len", "d_model", "h", "d_ff", "decoder_N", "encoder_N"):
        value = getattr(hp, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"HParams.{field}={value!r}: must be an integer >= 1.")
    if hp.d_model % hp.h:
        raise ValueError(f"HParams.d_model={hp.d_model} must be divisible by h={hp.h}.")
    if not 0.0 <= hp.dropout < 1.0:
        raise ValueError(f"HParams.dropout={hp.dropout!r}: must be in [0, 1).")
    if hp.use_encoder and hp.encoder_N > hp.decoder_N:
        raise ValueError(
            f"HParams.encoder_N={hp.encoder_N}: each encoder layer feeds the decoder layer of "
            f"the same index, so it must be <= decoder_N={hp.decoder_N}.")
    if hp.positions not in ("learned", "sinusoidal"):
        raise ValueError(f"HParams.positions={hp.positions!r}: 'learned' or 'sinusoidal'.")
    return hp


def param_count(hp: HParams, vocab_size: int) -> int:
    """Number of parameters, by formula (tests check it against the initialized model)."""
    D, F, V, S = hp.d_model, hp.d_ff, vocab_size, hp.max_seq_len
    layer_norm = 2 * D
    attention = layer_norm + 4 * (D * D + D)          # LN, then q, k, v, out projections
    feed_forward = layer_norm + D * F + F + F * D + D  # LN, then D -> F -> D
    num_encoder = hp.encoder_N if hp.use_encoder else 0
    return (V * D + (S * D if hp.positions == "learned" else 0)     # embeddings
            + hp.decoder_N * (attention + feed_forward)
            + num_encoder * (attention + feed_forward)              # encoder layers
            + num_encoder * attention                               # cross-attention blocks
            + layer_norm + D * V + V)                               # final LN, unembedding


class KVCache(NamedTuple):
    """Keys and values of every position seen so far, for one attention block, in the layouts
    that a one-position step's matmuls read (read in others inside a loop, XLA transposes them
    at every step; transposed once per chunk instead, they cost about 1-2% of one-stream
    sampling)."""
    k: jax.Array  # [B, H, K, S]
    v: jax.Array  # [B, H, S, K]

    @staticmethod
    def empty(batch_size: int, num_heads: int, key_size: int, length: int,
              dtype=jnp.float32) -> "KVCache":
        """Zeros for `length` positions."""
        return KVCache(jnp.zeros((batch_size, num_heads, key_size, length), dtype),
                       jnp.zeros((batch_size, num_heads, length, key_size), dtype))

    @staticmethod
    def of(k: jax.Array, v: jax.Array) -> "KVCache":
        """Keys and values [B, T, H, K] in the cache's layouts."""
        return KVCache(k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3))

    def write(self, new: "KVCache", start) -> "KVCache":
        """This cache with `new`'s T positions written at positions start..start+T-1."""
        return KVCache(
            jax.lax.dynamic_update_slice(self.k, new.k.astype(self.k.dtype), (0, 0, 0, start)),
            jax.lax.dynamic_update_slice(self.v, new.v.astype(self.v.dtype), (0, 0, start, 0)))


class ChunkCache(NamedTuple):
    """For a chunk of one-position steps: a KVCache only read, and the chunk's own keys and
    values. Written at every step, the full cache was copied whole by XLA:CPU each time (it
    copies the operand of each dynamic_update_slice in a loop). start_chunk makes them,
    end_chunk writes `recent` into the full cache, once per chunk."""
    cache: KVCache    # positions < start
    recent: KVCache   # C positions start..start+C-1, filled step by step
    start: jax.Array  # [] int32


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


def init_cache(hp: HParams, batch_size: int, dtype=jnp.float32) -> tuple[KVCache, ...]:
    """Empty caches for every attention block, in the order the model uses them."""
    num_encoder = hp.encoder_N if hp.use_encoder else 0
    num_blocks = num_encoder + hp.decoder_N + num_encoder  # encoder self, decoder self, cross
    return tuple(KVCache.empty(batch_size, hp.h, hp.d_model // hp.h, hp.max_seq_len, dtype)
                 for _ in range(num_blocks))


def _layer_norm(name: str) -> hk.LayerNorm:
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)


def _dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
    """Inverted dropout drawing 8 random bits per element where hk.dropout draws 32.

    The keep/drop decisions are bytes of threefry words, four per word, so the costly PRNG
    runs a quarter as often (dropout masks were 10% of a CPU training step). The rate is
    rounded to a multiple of 1/256 (0.2 -> 51/256 = 0.199); kept values are scaled by the
    exact inverse keep probability, so the expectation is unchanged.
    """
    drop = min(round(rate * 256), 255)  # drop an element when its byte is < drop
    if not is_training or drop == 0:
        return x
    words = jax.random.bits(hk.next_rng_key(), (-(-x.size // 4),), jnp.uint32)
    bytes_ = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[:x.size]
    keep = bytes_.reshape(x.shape) >= drop
    return jnp.where(keep, x * (256 / (256 - drop)), 0).astype(x.dtype)


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.einsum of two operands, accumulated in float32 and returned in float32.

    For low-precision operands (bfloat16 under a jmp policy) the gradients are einsums of
    that precision too: JAX's own rule would pair the float32 cotangent with a bfloat16
    operand and run the backward matmuls (two thirds of the FLOPs) at float32 speed. Every
    index of an operand must also appear in the other operand or in the output.
    """
    if a.dtype == b.dtype == jnp.float32:
        return jnp.einsum(spec, a, b)
    return _low_precision_einsum(spec, a, b)


def _einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """Low-precision einsum accumulated in float32, operands ordered as the output's free
    indices are (the first one's first): XLA:CPU has no bfloat16 kernel for some of these
    contractions in the other order."""
    inputs, out = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    free = [c for c in out if (c in spec_a) != (c in spec_b)]
    if free and free[0] in spec_b:
        spec, a, b = f"{spec_b},{spec_a}->{out}", b, a
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_einsum(spec, a, b):
    return _einsum_f32(spec, a, b)


def _low_precision_einsum_fwd(spec, a, b):
    return _einsum_f32(spec, a, b), (a, b)


def _low_precision_einsum_bwd(spec, residuals, g):
    a, b = residuals                                    # d/da of "a,b->out" is "out,b->a"
    inputs, out = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    g = g.astype(a.dtype)
    return (_einsum_f32(f"{out},{spec_b}->{spec_a}", g, b).astype(a.dtype),
            _einsum_f32(f"{out},{spec_a}->{spec_b}", g, a).astype(b.dtype))


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, I] @ w [I, O] -> [M, O]: einsum("mi,io->mo", x, w) with its gradients written
    as the dot_generals XLA:CPU runs fastest in bfloat16 (jnp.einsum's lowering of the input
    gradient ran at float32 speed: 23 ms against 13 ms at M 4096, I 384, O 1536)."""
    if x.dtype == w.dtype == jnp.float32:
        return x @ w
    return _low_precision_matmul(x, w)


def _dot(a, b, contracting: tuple[int, int]) -> jax.Array:
    dims = (((contracting[0],), (contracting[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _low_precision_matmul(x, w):
    return _dot(x, w, (1, 0))                                   # [M, I] . [I, O] -> [M, O]


def _low_precision_matmul_fwd(x, w):
    return _low_precision_matmul(x, w), (x, w)


def _low_precision_matmul_bwd(residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)                                       # [M, O]
    grad_x = _dot(g, w, (1, 1))                                 # [M, O] . [I, O] -> [M, I]
    grad_w = _dot(x, g, (0, 0))                                 # [M, I] . [M, O] -> [I, O]
    return grad_x.astype(x.dtype), grad_w.astype(w.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


class Linear(hk.Linear):
    """hk.Linear (same parameters and initializers, always a bias) computed by `matmul`.

    Under a jmp policy (see build's `compute_dtype`) Haiku casts the input and parameters to
    the compute dtype before this call and the output to float32 after it.

    With `matvec` (the cached model), a single input row x [1, I] with I > O is multiplied by
    the weight's transposed copy "w_t" [O, I] (see add_transposed_weights). XLA:CPU computes
    x @ w by streaming w's rows, and long rows stream faster: ff_out's w_t has 1536-float rows
    where w has 384-float ones (22-28 against 15-16 GB/s; one-stream sampling took 11-13% less
    time per character). With more rows it is a matrix product, which ran slower on w_t.
    """

    def __init__(self, output_size: int, name: str, matvec: bool = False):
        super().__init__(output_size, name=name)
        self.matvec = matvec

    def __call__(self, inputs: jax.Array) -> jax.Array:
        *batch, self.input_size = inputs.shape
        x = inputs.reshape(-1, self.input_size)                          # [M, I]
        if self.matvec and x.shape[0] == 1 and _has_w_t(self.input_size, self.output_size):
            w_t = hk.get_parameter("w_t", [self.output_size, self.input_size], inputs.dtype,
                                   init=_missing_w_t)
            out = _dot(x, w_t, (1, 1))                                   # x @ w_t.T
        else:
            w = hk.get_parameter("w", [self.input_size, self.output_size], inputs.dtype,
                                 init=self.w_init or hk.initializers.TruncatedNormal(
                                     1.0 / np.sqrt(self.input_size)))
            out = matmul(x, w)
        b = hk.get_parameter("b", [self.output_size], inputs.dtype,
                             init=self.b_init or jnp.zeros)
        return (out + b).reshape(*batch, self.output_size)


def _has_w_t(input_size: int, output_size: int) -> bool:
    """Whether add_transposed_weights gives a Linear of these sizes a transposed copy: the
    transpose has the longer rows."""
    return input_size > output_size


def _missing_w_t(shape, dtype):
    raise ValueError("the cached model reads single rows by transposed weights 'w_t': give it "
                     "transformer.add_transposed_weights(params).")


def add_transposed_weights(params: hk.Params) -> hk.Params:
    """params (of build or build_cached) plus, for each Linear weight w [I, O] with I > O,
    its transpose "w_t" [O, I]: what the cached model reads for a single row (see Linear).
    build's apply ignores them."""
    return {name: {**p, "w_t": jnp.transpose(p["w"])}
            if "w" in p and _has_w_t(*p["w"].shape) else p
            for name, p in params.items()}


def _cast_to_compute(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The arrays in the compute dtype of Linear's jmp policy (as they are without one)."""
    policy = hk.mixed_precision.get_policy(Linear)
    return arrays if policy is None else policy.cast_to_compute(arrays)


class Attention(hk.Module):
    """Multi-head attention of queries from `x` over keys and values from `memory`.

    Causal by position: the query at position p sees keys at positions <= p. Self-attention
    (memory=None) projects x to queries, keys and values in one matmul; cross-attention
    projects the encoder output (at the same positions) to keys and values in one.
    """

    def __init__(self, hp: HParams, name: str):
        super().__init__(name=name)
        self.num_heads, self.key_size = hp.h, hp.d_model // hp.h
        self.dropout = hp.dropout

    def __call__(self, x: jax.Array, positions: jax.Array, is_training: bool,
                 cache: KVCache | ChunkCache | None = None, memory: jax.Array | None = None,
                 last_query: bool = False):
        """x [B, T, D] at `positions` attends over itself, or over memory (the encoder's
        output at `positions`), and over what the cache holds. With last_query (no cache)
        only the last of `positions` queries: the output is [B, 1, D] (cross-attention gets
        x at that position alone, memory at all of them)."""
        B, T, D = x.shape
        H, K = self.num_heads, self.key_size
        # Fused projections: one wide matmul runs faster than three narrow ones.
        if memory is None:
            qkv = Linear(3 * H * K, name="query_key_value")(x)          # [B, T, 3HK]
            q, k, v = jnp.split(qkv.reshape(B, T, 3 * H, K), 3, axis=2)    # [B, T, H, K]
        else:
            q = Linear(H * K, name="query")(x).reshape(B, T, H, K)      # [B, T, H, K]
            kv = Linear(2 * H * K, name="key_value")(memory)             # [B, S, 2HK]
            k, v = jnp.split(kv.reshape(B, -1, 2 * H, K), 2, axis=2)       # [B, S, H, K]
        if last_query:  # keys and values need every position, the query only the last
            q, positions = q[:, -1:], positions[-1:]                     # [B, 1, H, K]
        if isinstance(cache, ChunkCache):
            out, cache = self._attend_chunk(q, k, v, positions, cache)
        else:
            out, cache = self._attend(q, k, v, positions, cache, is_training)
        out = Linear(D, name="out")(out.reshape(B, q.shape[1], H * K))  # [B, T or 1, D]
        return _dropout(out, self.dropout, is_training), cache

    def _attend(self, q, k, v, positions, cache: KVCache | None, is_training: bool):
        """Causal attention of q over k, v [B, T, H, K] (written into `cache` at positions,
        then over all its S positions). -> (out [B, T, H, K], cache)."""
        if cache is not None:  # write this call's positions, attend over all S cached ones
            cache = cache.write(KVCache.of(k, v), positions[0])
            k, v = cache.k.transpose(0, 3, 1, 2), cache.v.transpose(0, 2, 1, 3)  # [B, S, H, K]
        key_positions = jnp.arange(k.shape[1])
        mask = key_positions[None, :] <= positions[:, None]             # [T, S]
        if is_training and self.dropout > 0:
            # Dropout on the attention weights needs them explicitly: no fused kernel.
            # Matmuls in the compute dtype of Linear's policy; softmax in float32.
            q, k, v = _cast_to_compute(q, k, v)
            logits = einsum("bthk,bshk->bhts", q, k) / math.sqrt(self.key_size)  # [B,H,T,S]
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            weights = _dropout(jax.nn.softmax(logits), self.dropout, is_training)
            weights, = _cast_to_compute(weights)
            out = einsum("bhts,bshk->bthk", weights, v)                  # [B, T, H, K]
        else:
            out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                               mask=mask[None, None])  # [B, T, H, K]
        return out, cache

    def _attend_chunk(self, q, k, v, positions, cache: ChunkCache):
        """Writes k, v [B, T, H, K] into cache.recent; q attends over cache.cache's positions
        < cache.start and the recent ones <= its own. -> (out [B, T, H, K], cache)."""
        recent = cache.recent.write(KVCache.of(k, v), positions[0] - cache.start)
        S, C = cache.cache.k.shape[-1], recent.k.shape[-1]
        old_mask = jnp.broadcast_to(jnp.arange(S) < cache.start, (len(positions), S))
        recent_mask = cache.start + jnp.arange(C) <= positions[:, None]
        mask = jnp.concatenate([old_mask, recent_mask], axis=1)           # [T, S + C]
        logits = jnp.concatenate([jnp.einsum("bthk,bhks->bhts", q, cache.cache.k),
                                  jnp.einsum("bthk,bhks->bhts", q, recent.k)], axis=-1)
        logits = jnp.where(mask, logits / math.sqrt(self.key_size),
                           jnp.finfo(logits.dtype).min)                  # [B, H, T, S + C]
        weights = jax.nn.softmax(logits)
        out = (jnp.einsum("bhts,bhsk->bthk", weights[..., :S], cache.cache.v)
               + jnp.einsum("bhts,bhsk->bthk", weights[..., S:], recent.v))  # [B, T, H, K]
        return out, cache._replace(recent=recent)


def _feed_forward(x: jax.Array, hp: HParams, is_training: bool, matvec: bool) -> jax.Array:
    h = jax.nn.relu(Linear(hp.d_ff, name="ff_in", matvec=matvec)(x))    # [B, T, F]
    return _dropout(Linear(hp.d_model, name="ff_out", matvec=matvec)(h), hp.dropout,
                    is_training)


class Layer(hk.Module):
    """Pre-norm layer: x + SelfAttention(LN(x)) [+ CrossAttention(LN(x), memory)] + FF(LN(x))."""

    def __init__(self, hp: HParams, name: str, matvec: bool = False):
        super().__init__(name=name)
        self.hp, self.matvec = hp, matvec

    def __call__(self, x, positions, is_training, memory=None, caches=(None, None),
                 last_query=False):
        """x [B, T, D] -> [B, T, D], or [B, 1, D]: the last position only, with last_query
        (what the last layer of a forward pass needs for the next character's logits)."""
        normed = _layer_norm("ln_self")(x)
        out, self_cache = Attention(self.hp, "self_attention")(
            normed, positions, is_training, caches[0], last_query=last_query)
        x = (x[:, -1:] if last_query else x) + out
        cross_cache = None
        if memory is not None:
            out, cross_cache = Attention(self.hp, "cross_attention")(
                _layer_norm("ln_cross")(x), positions, is_training, caches[1], memory,
                last_query=last_query)
            x = x + out
        x = x + _feed_forward(_layer_norm("ln_ff")(x), self.hp, is_training, self.matvec)
        return x, (self_cache, cross_cache)


def sinusoidal_encodings(max_seq_len: int, d_model: int) -> np.ndarray:
    """The fixed encodings of "Attention is all you need": sin on even, cos on odd features."""
    positions = np.arange(max_seq_len)[:, None]                    # [S, 1]
    rates = 1.0 / 10000 ** (np.arange(0, d_model, 2) / d_model)  # [D/2]
    table = np.zeros((max_seq_len, d_model), np.float32)
    table[:, 0::2] = np.sin(positions * rates)
    table[:, 1::2] = np.cos(positions * rates[: d_model // 2])
    return table                                                   # [S, D]


class Transformer(hk.Module):
    """Character Transformer: embeddings, [encoder,] decoder layers, final LN, logits.

    matvec: single rows go through the feed-forward blocks and the unembedding by the
    transposed weights of add_transposed_weights, which the params must then hold.
    """

    def __init__(self, hp: HParams, vocab_size: int, name: str = "transformer",
                 matvec: bool = False):
        super().__init__(name=name)
        self.hp, self.vocab_size, self.matvec = validate(hp), vocab_size, matvec

    def __call__(self, tokens, is_training, cache=None, start=0, last_only=False):
        """logits [B, T, V] of tokens [B, T] (with a cache: and the cache); last_only: the
        logits of the last position alone, [B, 1, V], computed without the rest of the last
        layer's outputs (no cache)."""
        hp = self.hp
        B, T = tokens.shape
        if T > hp.max_seq_len or (isinstance(start, int) and start + T > hp.max_seq_len):
            raise ValueError(f"positions {start}..{start + T - 1} exceed HParams.max_seq_len="
                             f"{hp.max_seq_len} (sequence length T={T}).")
        if last_only and cache is not None:
            raise ValueError("last_only computes no keys or values for a cache.")
        positions = start + jnp.arange(T)                                   # [T]
        embed_init = hk.initializers.TruncatedNormal(0.02)
        x = hk.Embed(self.vocab_size, hp.d_model, w_init=embed_init,
                     name="token_embed")(tokens)                            # [B, T, D]
        if hp.positions == "learned":
            table = hk.get_parameter("position_embed", [hp.max_seq_len, hp.d_model],
                                     init=embed_init)
        else:
            table = jnp.asarray(sinusoidal_encodings(hp.max_seq_len, hp.d_model))
        x = _dropout(x + table[positions], hp.dropout, is_training)        # [B, T, D]

        caches = iter(cache) if cache is not None else None
        take = lambda: next(caches) if caches is not None else None
        new_cache = []
        memories = []  # encoder layer i's output feeds decoder layer i's cross-attention
        if hp.use_encoder:
            h = x
            for i in range(hp.encoder_N):
                h, (c, _) = Layer(hp, f"encoder_{i}", self.matvec)(
                    h, positions, is_training, caches=(take(), None))
                memories.append(h)
                new_cache.append(c)
        for i in range(hp.decoder_N):
            memory = memories[i] if i < len(memories) else None
            layer_caches = (take(), take() if memory is not None else None)
            x, (c_self, c_cross) = Layer(hp, f"decoder_{i}", self.matvec)(
                x, positions, is_training, memory, layer_caches,
                last_query=last_only and i == hp.decoder_N - 1)
            new_cache += [c_self] + ([c_cross] if memory is not None else [])
        x = _layer_norm("ln_final")(x)
        logits = Linear(self.vocab_size, name="unembed", matvec=self.matvec)(x)  # [B, T|1, V]
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, tuple(new_cache))


def build(hp: HParams, vocab_size: int, compute_dtype: str = "float32") -> hk.Transformed:
    """apply(params, rng, tokens [B, T] int32, is_training) -> logits [B, T, V] float32;
    apply(..., last_only=True) -> the last position's logits [B, 1, V], for sampling.

    compute_dtype "bfloat16" puts Linear under a jmp policy (float32 parameters, bfloat16
    compute, float32 output), which attention's explicit path (training with dropout) follows:
    those matmuls take bfloat16 operands and accumulate in float32. LayerNorm, softmax, the
    residual stream and the loss stay float32.
    """
    validate(hp)
    policy = jmp.get_policy(f"params=float32,compute={compute_dtype},output=float32")

    def forward(tokens, is_training, last_only=False):
        with hk.mixed_precision.push_policy(Linear, policy):
            return Transformer(hp, vocab_size)(tokens, is_training, last_only=last_only)

    return hk.transform(forward)


def build_cached(hp: HParams, vocab_size: int) -> hk.Transformed:
    """apply(params, None, tokens [B, T], cache, start) -> (logits [B, T, V], cache).

    Inference only (no dropout). `start` is the position of tokens[:, 0]; the cache comes
    from init_cache and holds positions < start from earlier calls. A traced `start` cannot
    be checked: the caller keeps start + T <= max_seq_len (past it, the cache write clamps).
    The cache's entries may be ChunkCaches instead (one per block): the new keys and values
    go to their `recent` part. params: add_transposed_weights(params), whose copies a single
    row (B = T = 1) reads.
    """
    validate(hp)

    def forward(tokens, cache, start):
        return Transformer(hp, vocab_size, matvec=True)(tokens, False, cache, start)

    return hk.transform(forward)
