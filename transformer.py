"""A pre-norm character Transformer in Haiku, with an optional causal encoder.

Shapes:  B batch  T query positions  S key positions  D d_model  H heads  K key size (D / H)
         F d_ff   V vocabulary size  N layers         W attention window

Read top to bottom: HParams, attention, the layer, the Transformer (features, head) and its
two call forms: build(hp, V).apply(params, rng, tokens, is_training) -> logits (training,
evaluation) and build_cached(hp, V).apply(params, None, tokens, cache, start) -> (logits,
cache) (reader.py: an attention block's cache, kv_cache.py, keeps its keys and values). Also:
position_encodings.py; objectives.py reads `features`; kernels.py (build's `speed`) runs the
arithmetic fast without changing what is computed here.
"""

import math
from typing import NamedTuple, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import kernels
import position_encodings
from kernels import Linear
from kv_cache import NO_POSITION, KeysValues


class HParams(NamedTuple):
    """The model. `python train.py` trains these values as written: the shipped Cervantes
    model's. A params file carries its own (checkpoint.py)."""
    max_seq_len: int = 128      # training sequence length; without attention_window also the
                                # context: positions 0..max_seq_len-1
    d_model: int = 256          # width of the residual stream (D)
    h: int = 4                  # attention heads (H); d_model must be divisible by h
    d_ff: int = 1024            # hidden width of the feed-forward block (F), 4 * d_model
    decoder_N: int = 6          # decoder layers: causal self-attention + feed-forward
    encoder_N: int = 1          # encoder layers, used only when use_encoder (<= decoder_N)
    use_encoder: bool = False   # decoder layer i < encoder_N cross-attends to encoder layer i
    dropout: float = 0.1        # of embeddings, attention weights, branches (kernels.dropout)
    activation: str = "relu"    # the feed-forward block's: "relu", or "relu2", its square
                                # (So et al. 2021, "Primer"; modded-nanogpt's)
    positions: str = "rotary"   # "learned" embeddings, fixed "sinusoidal" encodings, or
                                # "rotary": queries and keys rotated by position (RoPE)
    attention_window: int | None = 128  # W: a query sees itself and the W - 1 positions
                                # before it (None: all). With rotary: a streaming model
    stochastic_depth: float = 0.0  # while training, drop a sequence's residual branches of
                                # the last layer at this rate, of layer i of N at (i+1)/N of it


HPARAMS = HParams()
ACTIVATIONS = {"relu": jax.nn.relu, "relu2": lambda x: jnp.square(jax.nn.relu(x))}


def validate(hp: HParams) -> HParams:
    """Raises ValueError naming the first invalid field; returns `hp` unchanged."""
    is_count = lambda value: isinstance(value, int) and not isinstance(value, bool) and value > 0
    for field in ("max_seq_len", "d_model", "h", "d_ff", "decoder_N", "encoder_N"):
        if not is_count(getattr(hp, field)):
            raise ValueError(f"HParams.{field}={getattr(hp, field)!r}: must be an integer >= 1.")
    if hp.d_model % hp.h:
        raise ValueError(f"HParams.d_model={hp.d_model} must be divisible by h={hp.h}.")
    for field in ("dropout", "stochastic_depth"):
        if not 0.0 <= getattr(hp, field) < 1.0:
            raise ValueError(f"HParams.{field}={getattr(hp, field)!r}: must be in [0, 1).")
    if hp.use_encoder and hp.encoder_N > hp.decoder_N:
        raise ValueError(
            f"HParams.encoder_N={hp.encoder_N}: each encoder layer feeds the decoder layer of "
            f"the same index, so it must be <= decoder_N={hp.decoder_N}.")
    if hp.activation not in ACTIVATIONS:
        raise ValueError(f"HParams.activation={hp.activation!r}: {' or '.join(ACTIVATIONS)}.")
    if hp.positions not in ("learned", "sinusoidal", "rotary"):
        raise ValueError(f"HParams.positions={hp.positions!r}: learned, sinusoidal or rotary.")
    if hp.positions == "rotary" and (hp.d_model // hp.h) % 2:
        raise ValueError(f"HParams.positions='rotary' rotates pairs of features: the key size "
                         f"d_model / h = {hp.d_model // hp.h} must be even.")
    if not (hp.attention_window is None or is_count(hp.attention_window)):
        raise ValueError(f"HParams.attention_window={hp.attention_window!r}: an integer >= 1, "
                         "or None.")
    return hp


def is_streaming(hp: HParams) -> bool:
    """Rotary positions and a window: each layer sees the last W positions, relatively, so
    the model reads any length, one cached step a character (reader.py)."""
    return hp.positions == "rotary" and hp.attention_window is not None


def visible(query_positions: jax.Array, key_positions: jax.Array, window: int | None):
    """[T, S]: whether each query sees each key: the key is at the query's position or
    before it, and (with a window W) fewer than W positions before it."""
    offset = query_positions[:, None] - key_positions[None, :]             # [T, S]
    return (offset >= 0) if window is None else (offset >= 0) & (offset < window)


def attend(q: jax.Array, positions: jax.Array, blocks: Sequence[KeysValues],
           window: int | None, dropout: float) -> jax.Array:
    """Queries q [B, T, H, K] at `positions` [T] over the keys and values of every block (one,
    or a cache's several), `dropout` on the weights -> [B, T, H, K]. The formula is
    softmax_attention; XLA's fused kernel computes it where no weight is dropped; a long
    windowed sequence goes in W-bands (kernels.in_bands: T * 2W scores, not T^2)."""
    if len(blocks) > 1:  # a cache's blocks
        return softmax_attention(q, positions, blocks, window, dropout)
    block = blocks[0]
    if window is not None and q.shape[1] > 2 * window:
        band = lambda q, qp, k, v, kp: attend(q, qp, (KeysValues(k, v, kp),), window, dropout)
        return kernels.in_bands(band, q, positions, *block, window, NO_POSITION,
                                split_rng=dropout > 0)
    if not dropout:
        return kernels.fused_attention(q, block.k, block.v,
                                       visible(positions, block.positions, window))
    return softmax_attention(q, positions, blocks, window, dropout)


def softmax_attention(q: jax.Array, positions: jax.Array, blocks: Sequence[KeysValues],
                      window: int | None, dropout: float) -> jax.Array:
    """softmax(q k / sqrt(K)) v, each query over the keys it sees (`visible`), with `dropout`
    on the attention weights; the blocks' keys are scored together, as one sequence."""
    weights = kernels.dropout(attention_weights(q, positions, blocks, window), dropout,
                              dropout > 0)                                 # [B, H, T, S]
    weights, *values = (x.astype(q.dtype) for x in (weights, *(b.v for b in blocks)))
    splits = np.cumsum([v.shape[2] for v in values])[:-1]
    first, *rest = [kernels.einsum("bhts,bhsk->bthk", w, v)               # [B, T, H, K]
                    for w, v in zip(jnp.split(weights, splits, axis=-1), values)]
    return sum(rest, first)


def attention_weights(q: jax.Array, positions: jax.Array, blocks: Sequence[KeysValues],
                      window: int | None) -> jax.Array:
    """[B, H, T, S]: softmax(q k / sqrt(K)) of queries q [B, T, H, K] at `positions` over the
    keys of every block, in order; 0 where a query does not see a key (`visible`). Each row
    sums to one. Its matmuls' operands in q's dtype, accumulated and softmaxed in float32."""
    masks = [visible(positions, b.positions, window) for b in blocks]       # [T, S] each
    logits = jnp.concatenate([kernels.einsum("bthk,bhks->bhts", q, b.k.astype(q.dtype))
                              for b in blocks], axis=-1)                   # [B, H, T, S]
    logits = jnp.where(jnp.concatenate(masks, axis=1), logits / math.sqrt(q.shape[-1]),
                       jnp.finfo(logits.dtype).min)
    return jax.nn.softmax(logits)


class Attention(hk.Module):
    """Multi-head attention of queries from `x` over keys and values from itself or, for
    cross-attention, from `memory` (the encoder's output); causal by position (`visible`)."""

    def __init__(self, hp: HParams, name: str):
        super().__init__(name=name)
        self.num_heads, self.key_size = hp.h, hp.d_model // hp.h
        self.dropout, self.window, self.rotary = hp.dropout, hp.attention_window, (
            hp.positions == "rotary")

    @hk.experimental.name_like("__call__")  # its Linears keep their names (no "~project")
    def project(self, x, positions, memory=None):
        """(queries [B, T, H, K], KeysValues) of x [B, T, D] (keys and values: of memory, if
        given), rotated by position if rotary. A method of its own for visualize.py, which
        reads what each block scores through hk.intercept_methods."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.key_size
        # Fused projections: one wide matmul runs faster than three narrow ones.
        if memory is None:
            qkv = Linear(3 * H * K, name="query_key_value")(x)          # [B, T, 3HK]
            q, k, v = jnp.split(qkv.reshape(B, T, 3 * H, K), 3, axis=2)    # [B, T, H, K]
        else:
            q = Linear(H * K, name="query")(x).reshape(B, T, H, K)      # [B, T, H, K]
            kv = Linear(2 * H * K, name="key_value")(memory)             # [B, T, 2HK]
            k, v = jnp.split(kv.reshape(B, T, 2 * H, K), 2, axis=2)        # [B, T, H, K]
        if self.rotary:  # keys are cached rotated
            angles = position_encodings.rotary_angles(positions, K)             # [T, K/2]
            q, k = (position_encodings.rotate(x, *angles) for x in (q, k))
        return q, KeysValues.of(k, v, positions)            # [B, H, K, T], [B, H, T, K]

    def __call__(self, x, positions, is_training, cache=None, memory=None):
        """x [B, T, D] at `positions` [T] attends over itself (or memory, the encoder's
        output at the same positions) and what the cache holds -> (out [B, T, D], the cache
        updated: kv_cache.py; None without one)."""
        B, T, D = x.shape
        q, new = self.project(x, positions, memory)
        blocks = (new,)
        if cache is not None:  # the cache keeps the new keys and values, says what to see
            cache, blocks = cache.update(new)
        out = attend(q, positions, blocks, self.window,
                     self.dropout if is_training else 0.0)               # [B, T, H, K]
        out = Linear(D, name="out")(out.reshape(B, T, D))               # [B, T, D]
        return kernels.dropout(out, self.dropout, is_training), cache


def layer_norm(name: str) -> hk.LayerNorm:
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)


def feed_forward(x: jax.Array, hp: HParams, is_training: bool) -> jax.Array:
    h = ACTIVATIONS[hp.activation](Linear(hp.d_ff, name="ff_in")(x))     # [B, T, F]
    return kernels.dropout(Linear(hp.d_model, name="ff_out")(h), hp.dropout,
                           is_training)                                   # [B, T, D]


def drop_branch(out: jax.Array, rate: float, is_training: bool) -> jax.Array:
    """Stochastic depth (Huang et al. 2016): while training, a residual branch's output
    [B, T, D] is dropped for a whole sequence at `rate`, the kept ones scaled by 1/(1-rate)."""
    if not is_training or rate == 0:
        return out
    return hk.dropout(hk.next_rng_key(), rate, out, broadcast_dims=(1, 2))


class Layer(hk.Module):
    """Pre-norm layer: x + SelfAttention(LN(x)) [+ CrossAttention(LN(x), memory)] + FF(LN(x));
    each branch dropped whole for a sequence at `drop_rate` while training (drop_branch)."""

    def __init__(self, hp: HParams, name: str, drop_rate: float = 0.0):
        super().__init__(name=name)
        self.hp, self.drop_rate = hp, drop_rate

    def __call__(self, x, positions, is_training, memory=None, cache=None):
        """x [B, T, D] -> ([B, T, D], cache: {"self": ..., "cross": ...} or None)."""
        cache, new_cache = cache or {}, {}
        branch = lambda out: drop_branch(out, self.drop_rate, is_training)
        out, new_cache["self"] = Attention(self.hp, "self_attention")(
            layer_norm("ln_self")(x), positions, is_training, cache.get("self"))
        x = x + branch(out)
        if memory is not None:
            out, new_cache["cross"] = Attention(self.hp, "cross_attention")(
                layer_norm("ln_cross")(x), positions, is_training, cache.get("cross"), memory)
            x = x + branch(out)
        x = x + branch(feed_forward(layer_norm("ln_ff")(x), self.hp, is_training))
        return x, new_cache


class Transformer(hk.Module):
    """Character Transformer: embeddings, [encoder,] decoder layers, final LN, logits."""

    def __init__(self, hp: HParams, vocab_size: int, name: str = "transformer"):
        super().__init__(name=name)
        self.hp, self.vocab_size = validate(hp), vocab_size

    def __call__(self, tokens: jax.Array, is_training: bool) -> jax.Array:
        """tokens [B, T] at positions 0..T-1 -> logits [B, T, V]."""
        return self.head(self.features(tokens, is_training)[0])

    @hk.experimental.name_like("__call__")
    def head(self, x: jax.Array) -> jax.Array:
        """features [B, T, D] -> logits [B, T, V] (float32 whatever the compute dtype)."""
        return kernels.Logits(self.vocab_size, name="unembed")(x)

    @hk.experimental.name_like("__call__")
    def features(self, tokens, is_training, cache=None, start=0) -> tuple[jax.Array, dict]:
        """What the head reads: the final LayerNorm's output [B, T, D] for tokens [B, T] at
        positions start..start+T-1, and the cache ({layer: {block: cache}}) updated."""
        hp = self.hp
        B, T = tokens.shape
        last = start + T if isinstance(start, int) else T  # a traced start: unchecked
        if not is_streaming(hp) and last > hp.max_seq_len:
            raise ValueError(f"positions {start}..{start + T - 1} exceed HParams.max_seq_len="
                             f"{hp.max_seq_len} (sequence length T={T}).")
        positions = start + jnp.arange(T)                                   # [T]
        embed_init = hk.initializers.TruncatedNormal(0.02)
        x = hk.Embed(self.vocab_size, hp.d_model, w_init=embed_init,
                     name="token_embed")(tokens)                            # [B, T, D]
        if hp.positions == "learned":
            x += hk.get_parameter("position_embed", [hp.max_seq_len, hp.d_model],
                                  init=embed_init)[positions]
        elif hp.positions == "sinusoidal":
            x += jnp.asarray(position_encodings.sinusoidal(hp.max_seq_len,
                                                           hp.d_model))[positions]
        x = kernels.dropout(x, hp.dropout, is_training)                     # [B, T, D]
        layer = lambda kind, i, n: Layer(hp, f"{kind}_{i}", hp.stochastic_depth * (i + 1) / n)
        new_cache, memories, h = {}, [], x  # encoder layer i feeds decoder layer i
        for i in range(hp.encoder_N if hp.use_encoder else 0):
            h, new_cache[f"encoder_{i}"] = layer("encoder", i, hp.encoder_N)(
                h, positions, is_training, cache=cache and cache[f"encoder_{i}"])
            memories.append(h)
        for i in range(hp.decoder_N):
            x, new_cache[f"decoder_{i}"] = layer("decoder", i, hp.decoder_N)(
                x, positions, is_training, memories[i] if i < len(memories) else None,
                cache and cache[f"decoder_{i}"])
        return layer_norm("ln_final")(x), new_cache


def build(hp: HParams, vocab_size: int, speed=kernels.Speed()) -> hk.Transformed:
    """apply(params, rng, tokens [B, T] int32, is_training) -> logits [B, T, V] float32,
    computed as `speed` says (kernels.Speed: bfloat16 matmuls, for training)."""
    validate(hp)

    def forward(tokens, is_training):
        with kernels.running(speed):
            return Transformer(hp, vocab_size)(tokens, is_training)

    return hk.transform(forward)


def build_cached(hp: HParams, vocab_size: int) -> hk.Transformed:
    """apply(params, None, tokens [B, T], cache, start) -> (logits [B, T, V], cache), for
    inference: tokens at positions start.., after those the cache ({layer: {block: cache}},
    kv_cache.init_cache) holds. A traced `start` is unchecked: the caller keeps start + T <=
    max_seq_len. params: with kernels.add_transposed_weights (a single row reads them)."""
    validate(hp)

    def forward(tokens, cache, start):
        with kernels.running(kernels.Speed(transposed_weights=True)):
            model = Transformer(hp, vocab_size)
            x, cache = model.features(tokens, False, cache, start)
            return model.head(x), cache

    return hk.transform(forward)
