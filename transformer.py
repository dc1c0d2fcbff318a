"""A pre-norm character Transformer in Haiku, with an optional causal encoder.

Shapes:  B batch  T query positions  S key positions  D d_model  H heads  K key size (D / H)
         F d_ff   V vocabulary size  N layers         W attention window
Queries are [B, T, H, K], keys and values [B, S, H, K] (S = T, but for a sampler's cache).

Read top to bottom: HParams; what each query sees (`visible`) and the formula (`attention`);
the layer; the Transformer (features, head); the builders: forward_fn, build (apply(params,
rng, tokens, is_training) -> logits) and build_cached for sampling (reader.py drives it,
kv_cache.py keeps keys and values). kernels.py runs the arithmetic fast, computing the same.
"""

import math
from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

import kernels
import kv_cache
import model_checks
import position_encodings
from kernels import Linear


class HParams(NamedTuple):
    """The model. `python train.py` trains these values as written: the shipped Cervantes
    model's. A params file carries its own (checkpoint.py); model_checks.py checks them."""
    max_seq_len: int = 128      # training sequence length; without attention_window also the
                                # context: positions 0..max_seq_len-1
    d_model: int = 256          # width of the residual stream (D)
    h: int = 4                  # attention heads (H); d_model must be divisible by h
    d_ff: int = 1024            # hidden width of the feed-forward block (F), 4 * d_model
    decoder_N: int = 6          # decoder layers: causal self-attention + feed-forward
    encoder_N: int = 1          # encoder layers, used only when use_encoder (<= decoder_N)
    use_encoder: bool = False   # decoder layer i < encoder_N cross-attends to encoder layer i
    dropout: float = 0.1        # of embeddings, attention weights, branches (kernels.dropout)
    activation: str = "relu"    # the feed-forward block's: "relu"; "relu2", its square (So et
                                # al. 2021, "Primer"); "swiglu" (Shazeer 2020): d_ff gated by d_ff
    positions: str = "rotary"   # "learned" embeddings, fixed "sinusoidal" encodings, or
                                # "rotary": queries and keys rotated by position (RoPE)
    attention_window: int | None = 128  # W: a query sees itself and the W - 1 positions
                                # before it (None: all). With rotary: a streaming model
    stochastic_depth: float = 0.0  # while training, drop a sequence's residual branches of
                                # the last layer at this rate, of layer i of N at (i+1)/N of it
    attention_gate: bool = False  # scale each head's output by a sigmoid gate of the block's
                                # input (Qiu et al. 2025, "Gated Attention for LLMs")
    value_embeddings: bool = False  # add to each decoder layer's values an embedding of the
                                # token itself, a table per layer (modded-nanogpt's)
    unet: bool = False          # the decoder's second half adds learned multiples of the first
                                # half's outputs, mirrored: U-Net skips (modded-nanogpt's)


HPARAMS = HParams()


def visible(query_positions: jax.Array, key_positions: jax.Array, window: int | None):
    """The mask [T, S]: whether each query sees each key. A query sees the keys at its own
    position and before it (causal) and, with a window W, fewer than W positions before it."""
    offset = query_positions[:, None] - key_positions[None, :]             # [T, S]
    return (offset >= 0) if window is None else (offset >= 0) & (offset < window)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              dropout_rate: float = 0.0) -> jax.Array:
    """Scaled dot-product attention: softmax(q k / sqrt(K)) v, each query over the keys the
    mask [T, S] lets it see, with dropout on the weights at dropout_rate (training).
    q [B, T, H, K], k and v [B, S, H, K] -> [B, T, H, K]."""
    if dropout_rate == 0:
        # Without dropout, XLA's fused kernel (jax.nn.dot_product_attention) computes the
        # same formula without keeping the weights [B, H, T, S]: evaluation, sampling.
        return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                            mask=mask[None, None],
                                            scale=1 / math.sqrt(q.shape[-1]))
    weights = kernels.dropout(attention_weights(q, k, mask), dropout_rate,
                              is_training=True)                            # [B, H, T, S]
    return kernels.einsum("bhts,bshk->bthk", weights.astype(q.dtype),
                          v.astype(q.dtype))                               # [B, T, H, K]


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, H, T, S]: softmax(q k / sqrt(K)) where the mask [T, S] lets a query see a key, 0
    elsewhere; each row sums to one. The scores are accumulated and softmaxed in float32."""
    scores = kernels.einsum("bthk,bshk->bhts", q, k.astype(q.dtype))      # [B, H, T, S]
    scores = jnp.where(mask, scores / math.sqrt(q.shape[-1]), jnp.finfo(scores.dtype).min)
    return jax.nn.softmax(scores)


class Attention(hk.Module):
    """Multi-head attention of queries from `x` over keys and values from itself or, for
    cross-attention, from `memory` (the encoder's output); causal by position (`visible`)."""

    def __init__(self, hp: HParams, name: str):
        super().__init__(name=name)
        self.hp = hp

    @hk.experimental.name_like("__call__")  # its Linears keep their names (no "~project")
    def project(self, x, positions, memory=None, values=None):
        """Queries, keys and values [B, T, H, K] of x [B, T, D] (keys and values: of memory,
        if given; `values` [B, T, D] added to the values), rotated by position if rotary. A
        method of its own for visualize.py, which reads what each block scores through
        hk.intercept_methods."""
        B, T, _ = x.shape
        H, K = self.hp.h, self.hp.d_model // self.hp.h
        # Fused projections: one wide matmul runs faster than three narrow ones.
        if memory is None:
            qkv = Linear(3 * H * K, name="query_key_value")(x)          # [B, T, 3HK]
            q, k, v = jnp.split(qkv.reshape(B, T, 3 * H, K), 3, axis=2)    # [B, T, H, K]
        else:
            q = Linear(H * K, name="query")(x).reshape(B, T, H, K)      # [B, T, H, K]
            kv = Linear(2 * H * K, name="key_value")(memory)             # [B, T, 2HK]
            k, v = jnp.split(kv.reshape(B, T, 2 * H, K), 2, axis=2)        # [B, T, H, K]
        if values is not None:  # value embeddings
            v = v + values.reshape(B, T, H, K).astype(v.dtype)
        if self.hp.positions == "rotary":  # keys are cached rotated
            cos, sin = position_encodings.rotary_angles(positions, K)          # [T, K/2]
            q = position_encodings.rotate(q, cos, sin)
            k = position_encodings.rotate(k, cos, sin)
        return q, k, v

    def __call__(self, x, positions, is_training, cache=None, memory=None, values=None):
        """x [B, T, D] at `positions` [T] attends over itself (or memory, the encoder's
        output at the same positions) and what the cache holds -> (out [B, T, D], the cache
        updated: kv_cache.py; None without one)."""
        B, T, D = x.shape
        W = self.hp.attention_window
        q, k, v = self.project(x, positions, memory, values)              # [B, T, H, K]
        rate = self.hp.dropout if is_training else 0.0

        def attend(q, k, v, query_positions, key_positions):
            mask = visible(query_positions, key_positions, W)              # [T, S]
            return attention(q, k, v, mask, rate)                          # [B, T, H, K]

        if cache is not None:  # sampling: the cache keeps k, v and scores q over all it holds
            cache, out = kv_cache.attend(cache, q, k, v, positions,
                                         lambda key_positions: visible(positions, key_positions, W))
        elif W is not None and T > 2 * W:
            # A long text (eval's whole split) in W-bands: T * 2W scores instead of T^2.
            out = kernels.in_bands(attend, q, k, v, positions, W, rate > 0)
        else:
            out = attend(q, k, v, positions, positions)
        if self.hp.attention_gate:  # each head's output times sigmoid(x W + b), in (0, 1)
            out = out * jax.nn.sigmoid(Linear(self.hp.h, name="gate")(x))[..., None]
        out = Linear(D, name="out")(out.reshape(B, T, D))               # [B, T, D]
        return kernels.dropout(out, self.hp.dropout, is_training), cache


def layer_norm(name: str) -> hk.LayerNorm:
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)


def feed_forward(x: jax.Array, hp: HParams, is_training: bool) -> jax.Array:
    """D -> F -> D: relu(x W1) W2, its square for relu2, or with swiglu (silu(x W1) * x V) W2."""
    if hp.activation == "swiglu":
        gate, h = jnp.split(Linear(2 * hp.d_ff, name="ff_in")(x), 2, axis=-1)  # [B, T, F]
        h = jax.nn.silu(gate) * h
    else:
        h = jax.nn.relu(Linear(hp.d_ff, name="ff_in")(x))                  # [B, T, F]
        h = jnp.square(h) if hp.activation == "relu2" else h
    return kernels.dropout(Linear(hp.d_model, name="ff_out")(h), hp.dropout,
                           is_training)                                   # [B, T, D]


class Layer(hk.Module):
    """Pre-norm layer: x + SelfAttention(LN(x)) [+ CrossAttention(LN(x), memory)] + FF(LN(x));
    each branch dropped whole for a sequence at `drop_rate` while training
    (kernels.drop_branch)."""

    def __init__(self, hp: HParams, name: str, drop_rate: float = 0.0):
        super().__init__(name=name)
        self.hp = hp
        self.drop_rate = drop_rate

    def __call__(self, x, positions, is_training, memory=None, cache=None, values=None):
        """x [B, T, D] -> ([B, T, D], cache: {"self": ..., "cross": ...} or None); `values`
        [B, T, D]: value embeddings for self-attention."""
        cache = cache or {}
        new_cache = {}
        branch = lambda out: kernels.drop_branch(out, self.drop_rate, is_training)
        out, new_cache["self"] = Attention(self.hp, "self_attention")(
            layer_norm("ln_self")(x), positions, is_training, cache.get("self"), values=values)
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
        self.hp = model_checks.validate(hp)
        self.vocab_size = vocab_size

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
        if not position_encodings.is_streaming(hp) and last > hp.max_seq_len:
            raise ValueError(f"positions {start}..{start + T - 1} exceed HParams.max_seq_len="
                             f"{hp.max_seq_len} (sequence length T={T}).")
        positions = start + jnp.arange(T)                                   # [T]
        x = hk.Embed(self.vocab_size, hp.d_model, w_init=position_encodings.EMBED_INIT,
                     name="token_embed")(tokens)                            # [B, T, D]
        # Learned or sinusoidal positions are added here; rotary ones turn q and k (project).
        x = position_encodings.add(x, positions, hp.positions, hp.max_seq_len)
        x = kernels.dropout(x, hp.dropout, is_training)                     # [B, T, D]
        layer = lambda kind, i, n: Layer(hp, f"{kind}_{i}", hp.stochastic_depth * (i + 1) / n)
        new_cache = {}
        memories = []  # encoder layer i feeds decoder layer i
        h = x
        for i in range(hp.encoder_N if hp.use_encoder else 0):
            h, new_cache[f"encoder_{i}"] = layer("encoder", i, hp.encoder_N)(
                h, positions, is_training, cache=cache and cache[f"encoder_{i}"])
            memories.append(h)
        skips = []  # with unet: the first half's outputs, for the second half, last first
        for i in range(hp.decoder_N):
            if hp.unet and i >= hp.decoder_N - hp.decoder_N // 2:
                x = x + hk.get_parameter(f"skip_{i}", [], init=jnp.ones) * skips.pop()
            values = hk.Embed(self.vocab_size, hp.d_model, w_init=position_encodings.EMBED_INIT,
                              name=f"value_embed_{i}")(tokens) if hp.value_embeddings else None
            x, new_cache[f"decoder_{i}"] = layer("decoder", i, hp.decoder_N)(
                x, positions, is_training, memories[i] if i < len(memories) else None,
                cache and cache[f"decoder_{i}"], values)                  # values [B, T, D]
            if hp.unet and i < hp.decoder_N // 2:
                skips.append(x)
        return layer_norm("ln_final")(x), new_cache


def forward_fn(hp: HParams, vocab_size: int, compute_dtype: str = "float32",
               output: Callable | None = None) -> Callable:
    """The model as a function for hk.transform: (tokens [B, T] int32, is_training, *args)
    -> logits [B, T, V] float32; or, given `output`, output(features [B, T, D], head, *args):
    the hook by which training objectives (objectives.py) add their heads and losses in the
    same transform, and the reader computes the last position's logits alone.

    Precision is Haiku's mixed-precision policy, set here: every Linear casts its input and
    params to compute_dtype ("bfloat16" for training where it runs natively) and returns
    that dtype, accumulating in float32 (kernels.matmul); the head returns float32 logits;
    params, LayerNorm, softmax and the residual stream stay float32."""
    model_checks.validate(hp)
    output = output or (lambda features, head: head(features))

    def forward(tokens, is_training, *args):
        with kernels.precision(compute_dtype):
            model = Transformer(hp, vocab_size)
            features, _ = model.features(tokens, is_training)
            return output(features, model.head, *args)

    return forward


def build(hp: HParams, vocab_size: int, compute_dtype: str = "float32") -> hk.Transformed:
    """apply(params, rng, tokens [B, T] int32, is_training) -> logits [B, T, V] float32: what
    training, evaluation and the learner's page compute (forward_fn)."""
    return hk.transform(forward_fn(hp, vocab_size, compute_dtype))


def build_cached(hp: HParams, vocab_size: int) -> hk.Transformed:
    """apply(params, None, tokens [B, T], cache, start) -> (logits [B, T, V], cache), for
    sampling: tokens at positions start.., after those the cache ({layer: {block: cache}},
    kv_cache.init_cache) holds, in float32. A traced `start` is unchecked: the caller keeps
    start + T <= max_seq_len. Given params with kernels.add_transposed_weights, a single
    row reads the transposed copies (kernels.Linear). HParams are checked by Transformer."""

    def forward(tokens, cache, start):
        model = Transformer(hp, vocab_size)
        features, cache = model.features(tokens, False, cache, start)
        return model.head(features), cache

    return hk.transform(forward)
