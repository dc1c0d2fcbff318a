"""A pre-norm character Transformer in Haiku, with an optional causal encoder.

Shapes:  B batch  T query positions  S key positions  D d_model  H heads  K key size (D / H)
         F d_ff   V vocabulary size  N layers         W attention window

Read top to bottom: HParams, attention (its core `attend`, rotary positions, the module),
the feed-forward block, the layer, the Transformer, and the two ways to call it (the same
parameters):
  build(hp, V).apply(params, rng, tokens, is_training)          -> logits         (train, eval)
  build_cached(hp, V).apply(params, None, tokens, cache, start) -> logits, cache  (sampling)
The cached form hands each attention block's new keys and values to its cache (kv_cache.py),
which returns what the queries attend over; generate.py's Sampler drives it. How the
arithmetic runs fast lives in kernels.py: none of it changes what is computed here.
"""

import math
from typing import NamedTuple, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np

import kernels
from kernels import Linear
from kv_cache import NO_POSITION, KeysValues


class HParams(NamedTuple):
    max_seq_len: int = 128      # training sequence length; without attention_window also the
                                # context: positions 0..max_seq_len-1
    d_model: int = 384          # width of the residual stream (D)
    h: int = 6                  # attention heads (H); d_model must be divisible by h
    d_ff: int = 1536            # hidden width of the feed-forward block (F), 4 * d_model
    decoder_N: int = 6          # decoder layers: causal self-attention + feed-forward
    encoder_N: int = 1          # encoder layers, used only when use_encoder (<= decoder_N)
    use_encoder: bool = False   # decoder layer i < encoder_N cross-attends to encoder layer i
    dropout: float = 0.2        # one rate for embeddings, attention weights and branch outputs
                                # (rounded to a multiple of 1/256: see kernels.dropout)
    activation: str = "relu"    # the feed-forward block's: "relu", or "relu2", its square
                                # (So et al. 2021, "Primer"; modded-nanogpt's)
    positions: str = "learned"  # "learned" embeddings, fixed "sinusoidal" encodings, or
                                # "rotary": queries and keys rotated by position (RoPE)
    attention_window: int | None = None  # W: a query sees itself and the W - 1 positions
                                # before it; None: every earlier one. Rotary and a window
                                # make a streaming model: any length, one cached step a char
    stochastic_depth: float = 0.0  # while training, drop each sequence's residual branches
                                # (attention, feed-forward) of a layer: the last layer at this
                                # rate, layer i of N at (i + 1) / N of it (stochastic depth)
    ahead_loss: float = 0.0     # multi-token prediction: while training, a second head
                                # predicts the character after next, its loss added at this
                                # weight (train.make_train_step); unused at inference


HPARAMS = HParams()
ACTIVATIONS = {"relu": jax.nn.relu, "relu2": lambda x: jnp.square(jax.nn.relu(x))}


def validate(hp: HParams) -> HParams:
    """Raises ValueError naming the first invalid field; returns `hp` unchanged."""
    for field in ("max_seq_len", "d_model", "h", "d_ff", "decoder_N", "encoder_N"):
        value = getattr(hp, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"HParams.{field}={value!r}: must be an integer >= 1.")
    if hp.d_model % hp.h:
        raise ValueError(f"HParams.d_model={hp.d_model} must be divisible by h={hp.h}.")
    for field in ("dropout", "stochastic_depth"):
        if not 0.0 <= getattr(hp, field) < 1.0:
            raise ValueError(f"HParams.{field}={getattr(hp, field)!r}: must be in [0, 1).")
    if not hp.ahead_loss >= 0:
        raise ValueError(f"HParams.ahead_loss={hp.ahead_loss!r}: must be >= 0.")
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
    window = hp.attention_window
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                               or window < 1):
        raise ValueError(f"HParams.attention_window={window!r}: an integer >= 1, or None.")
    return hp


def streams(hp: HParams) -> bool:
    """Rotary positions and a window: each layer sees the last W positions, relatively, so
    the model takes any length and its sampler keeps W positions per attention block."""
    return hp.positions == "rotary" and hp.attention_window is not None


def reach(hp: HParams) -> int | None:
    """How many of the last characters the next character's logits depend on: with a window
    W, each decoder layer looks W - 1 positions further back, and an encoder one window more
    (decoder layer i, W - 1 back, cross-attends to encoder layer i, i + 1 windows back), so a
    streaming model's sampler need read no more of a context than this, exactly. None
    without a window: every character counts."""
    if hp.attention_window is None:
        return None
    return (hp.decoder_N + hp.use_encoder) * (hp.attention_window - 1) + 1


def attention_blocks(hp: HParams) -> dict[str, tuple[str, ...]]:
    """Each layer's attention blocks, by layer name (as in the params): an encoder layer
    self-attends; decoder layer i also cross-attends to encoder layer i, if there is one."""
    num_encoder = hp.encoder_N if hp.use_encoder else 0
    encoder = {f"encoder_{i}": ("self",) for i in range(num_encoder)}
    decoder = {f"decoder_{i}": ("self", "cross") if i < num_encoder else ("self",)
               for i in range(hp.decoder_N)}
    return {**encoder, **decoder}


def param_count(hp: HParams, vocab_size: int) -> int:
    """Number of parameters, by formula (tests check it against the initialized model)."""
    D, F, V, S = hp.d_model, hp.d_ff, vocab_size, hp.max_seq_len
    layer_norm = 2 * D
    attention = layer_norm + 4 * (D * D + D)          # LN, then q, k, v, out projections
    feed_forward = layer_norm + D * F + F + F * D + D  # LN, then D -> F -> D
    blocks = attention_blocks(hp)
    return (V * D + (S * D if hp.positions == "learned" else 0)     # embeddings
            + len(blocks) * feed_forward                            # one per layer
            + sum(map(len, blocks.values())) * attention            # self and cross
            + layer_norm + D * V + V                                # final LN, unembedding
            + (D * V + V if hp.ahead_loss else 0))                  # the head after next


def visible(query_positions: jax.Array, key_positions: jax.Array,
            window: int | None) -> jax.Array:
    """[T, S]: whether each query sees each key: the key is at the query's position or
    before it, and (with a window W) fewer than W positions before it."""
    offset = query_positions[:, None] - key_positions[None, :]             # [T, S]
    return (offset >= 0) if window is None else (offset >= 0) & (offset < window)


def attend(q: jax.Array, positions: jax.Array, blocks: Sequence[KeysValues],
           window: int | None, dropout: float, is_training: bool,
           dtype=jnp.float32) -> jax.Array:
    """Attention: queries q [B, T, H, K] at `positions` [T] over the keys and values of every
    block (one, or a cache's several) -> [B, T, H, K]. The formula is softmax_attention, its
    matmuls' operands in `dtype` (float32 accumulation); the fast paths that compute it are
    chosen here, and only here."""
    dropout = dropout if is_training else 0.0  # dropout acts on the weights while training
    one_block = len(blocks) == 1
    # XLA's fused kernel where no attention weight is dropped, else the formula as written.
    core = fused_attention if one_block and not dropout else softmax_attention
    if window is not None and one_block and q.shape[1] > 2 * window:  # long: in W-bands
        band = lambda q, qp, k, v, kp: core(q, qp, (KeysValues(k, v, kp),), window, dropout,
                                            dtype)
        return kernels.in_bands(band, q, positions, *blocks[0], window, NO_POSITION,
                                split_rng=dropout > 0)
    return core(q, positions, blocks, window, dropout, dtype)


def softmax_attention(q: jax.Array, positions: jax.Array, blocks: Sequence[KeysValues],
                      window: int | None, dropout: float, dtype=jnp.float32) -> jax.Array:
    """softmax(q k / sqrt(K)) v, each query over the keys it sees (`visible`), with `dropout`
    on the attention weights; the blocks' keys are scored together, as one sequence."""
    weights = kernels.dropout(attention_weights(q, positions, blocks, window, dtype), dropout,
                              dropout > 0)                                 # [B, H, T, S]
    weights, *values = (x.astype(dtype) for x in (weights, *(b.v for b in blocks)))
    splits = np.cumsum([v.shape[2] for v in values])[:-1]
    first, *rest = [kernels.einsum("bhts,bhsk->bthk", w, v)               # [B, T, H, K]
                    for w, v in zip(jnp.split(weights, splits, axis=-1), values)]
    return sum(rest, first)


def attention_weights(q: jax.Array, positions: jax.Array, blocks: Sequence[KeysValues],
                      window: int | None, dtype=jnp.float32) -> jax.Array:
    """[B, H, T, S]: softmax(q k / sqrt(K)) of queries q [B, T, H, K] at `positions` over the
    keys of every block, in order; 0 where a query does not see a key (`visible`). Each
    row sums to one. Its matmuls' operands in dtype, accumulated in float32; softmax in
    float32."""
    masks = [visible(positions, b.positions, window) for b in blocks]       # [T, S] each
    q, *keys = (x.astype(dtype) for x in (q, *(b.k for b in blocks)))
    logits = jnp.concatenate([kernels.einsum("bthk,bhks->bhts", q, k) for k in keys],
                             axis=-1)                                      # [B, H, T, S]
    logits = jnp.where(jnp.concatenate(masks, axis=1), logits / math.sqrt(q.shape[-1]),
                       jnp.finfo(logits.dtype).min)
    return jax.nn.softmax(logits)


def fused_attention(q: jax.Array, positions: jax.Array, blocks: Sequence[KeysValues],
                    window: int | None, dropout: float = 0.0, dtype=None) -> jax.Array:
    """softmax_attention of one block without dropout, by kernels.fused_attention (its
    matmuls' operands in the queries' dtype, the Linears' output dtype, whatever `dtype`)."""
    (block,) = blocks
    assert dropout == 0, "the fused kernel keeps no attention weights to drop"
    return kernels.fused_attention(q, block.k, block.v,
                                   visible(positions, block.positions, window))


def rotary_angles(positions: jax.Array, key_size: int) -> tuple[jax.Array, jax.Array]:
    """cos and sin [T, K/2] of the rotary angles position * theta_i, theta_i = 10000^(-2i/K).

    Exact at any position: each theta_i is rounded to a multiple of 2 pi / 2^32, so the angle
    is an integer phase (position * m_i) mod 2^32, which uint32 arithmetic computes exactly
    (it wraps), times 2 pi / 2^32. float32 angles position * theta_i would be off by about
    0.06 radians at a million characters.
    """
    theta = 10000.0 ** (-np.arange(0, key_size, 2) / key_size)             # [K/2]
    steps = np.round(theta / (2 * np.pi) * 2.0**32).astype(np.uint32)       # phase per position
    phase = positions.astype(jnp.uint32)[:, None] * steps[None, :]          # [T, K/2], mod 2^32
    angle = jax.lax.bitcast_convert_type(phase, jnp.int32).astype(jnp.float32) * (
        2 * np.pi / 2.0**32)                                                 # in [-pi, pi)
    return jnp.cos(angle), jnp.sin(angle)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, K] with feature pairs (i, i + K/2) rotated by the angles of cos, sin."""
    x1, x2 = jnp.split(x, 2, axis=-1)                                       # [B, T, H, K/2]
    cos, sin = cos[:, None].astype(x.dtype), sin[:, None].astype(x.dtype)  # [T, 1, K/2]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Attention(hk.Module):
    """Multi-head attention of queries from `x` over keys and values from `memory`.

    Causal by position: the query at p sees keys at positions <= p (and > p - W with an
    attention window W); rotary positions rotate queries and keys first. Self-attention
    (memory=None) projects x to queries, keys and values in one matmul; cross-attention
    projects the encoder output (at the same positions) to keys and values in one.
    """

    def __init__(self, hp: HParams, name: str, dtype=jnp.float32):
        super().__init__(name=name)
        self.num_heads, self.key_size = hp.h, hp.d_model // hp.h
        self.dropout, self.window, self.rotary = hp.dropout, hp.attention_window, (
            hp.positions == "rotary")
        self.dtype = dtype  # of the attention matmuls' operands (see build)

    @hk.experimental.name_like("__call__")  # its Linears keep their names (no "~project")
    def project(self, x, positions, memory=None):
        """The queries of x [B, T, D] and the keys and values of x (or of memory [B, S, D]),
        rotary positions applied: (q [B, T, H, K], the queries' positions [T], KeysValues at
        `positions`). Its own method, so that Haiku's hk.intercept_methods can read what
        each attention block scores (visualize.py) without a second copy of the model."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.key_size
        # Fused projections: one wide matmul runs faster than three narrow ones.
        if memory is None:
            qkv = Linear(3 * H * K, name="query_key_value")(x)          # [B, T, 3HK]
            q, k, v = jnp.split(qkv.reshape(B, T, 3 * H, K), 3, axis=2)    # [B, T, H, K]
        else:  # memory [B, S, D] at `positions`: x may be only its last T (last_query)
            q = Linear(H * K, name="query")(x).reshape(B, T, H, K)      # [B, T, H, K]
            kv = Linear(2 * H * K, name="key_value")(memory)             # [B, S, 2HK]
            k, v = jnp.split(kv.reshape(B, -1, 2 * H, K), 2, axis=2)       # [B, S, H, K]
        key_positions, positions = positions, positions[positions.shape[0] - T:]
        if self.rotary:  # keys are cached rotated
            q = rotate(q, *rotary_angles(positions, K))
            k = rotate(k, *rotary_angles(key_positions, K))
        return q, positions, KeysValues.of(k, v, key_positions)  # [B, H, K, S], [B, H, S, K]

    def __call__(self, x, positions, is_training, cache=None, memory=None, last_query=False):
        """x [B, T, D] at `positions` [T] attends over itself, or over memory (the encoder's
        output [B, S, D] at `positions` [S], of which x is at the last T), and over what the
        cache holds; the cache (kv_cache.py) is returned updated. With last_query (no cache)
        only the last position queries: the output is [B, 1, D]. -> (out [B, T, D], cache)"""
        B, _, D = x.shape
        q, positions, new = self.project(x, positions, memory)
        if cache is None:
            blocks = (new,)
        else:  # the cache keeps the new keys and values and says what to attend over
            cache, blocks = cache.update(new)
        if last_query:  # keys and values need every position, the query only the last
            q, positions = q[:, -1:], positions[-1:]                     # [B, 1, H, K]
        out = attend(q, positions, blocks, self.window, self.dropout, is_training,
                     self.dtype)                                         # [B, T, H, K]
        out = Linear(D, name="out")(out.reshape(B, q.shape[1], D))      # [B, T, D]
        return kernels.dropout(out, self.dropout, is_training), cache


def _layer_norm(name: str) -> hk.LayerNorm:
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)


def _feed_forward(x: jax.Array, hp: HParams, is_training: bool, read_w_t: bool) -> jax.Array:
    h = ACTIVATIONS[hp.activation](Linear(hp.d_ff, name="ff_in")(x))     # [B, T, F]
    out = Linear(hp.d_model, name="ff_out", read_w_t=read_w_t)(h)        # [B, T, D]
    return kernels.dropout(out, hp.dropout, is_training)


class Layer(hk.Module):
    """Pre-norm layer: x + SelfAttention(LN(x)) [+ CrossAttention(LN(x), memory)] + FF(LN(x))."""

    def __init__(self, hp: HParams, name: str, dtype=jnp.float32, read_w_t: bool = False,
                 drop_rate: float = 0.0):
        super().__init__(name=name)
        self.hp, self.dtype = hp, dtype  # dtype: attention's matmuls' (see build)
        self.read_w_t = read_w_t          # single rows read transposed weights (kernels.Linear)
        self.drop_rate = drop_rate        # stochastic depth: of each branch, per sequence

    def __call__(self, x, positions, is_training, memory=None, cache=None, last_query=False):
        """x [B, T, D] -> ([B, T, D], or [B, 1, D]: the last position only, with last_query,
        what the last layer of a forward pass needs for the next character's logits; and
        the cache). cache: {"self": ..., "cross": ...}, one per attention block, or None."""
        cache = cache or {}
        new_cache = {}
        branch = lambda out: drop_branch(out, self.drop_rate, is_training)
        out, new_cache["self"] = Attention(self.hp, "self_attention", self.dtype)(
            _layer_norm("ln_self")(x), positions, is_training, cache.get("self"),
            last_query=last_query)
        x = (x[:, -1:] if last_query else x) + branch(out)
        if memory is not None:
            out, new_cache["cross"] = Attention(self.hp, "cross_attention", self.dtype)(
                _layer_norm("ln_cross")(x), positions, is_training, cache.get("cross"), memory,
                last_query=last_query)
            x = x + branch(out)
        ff = _feed_forward(_layer_norm("ln_ff")(x), self.hp, is_training, self.read_w_t)
        return x + branch(ff), new_cache


def drop_branch(out: jax.Array, rate: float, is_training: bool) -> jax.Array:
    """Stochastic depth (Huang et al. 2016): while training, a residual branch's output
    [B, T, D] is dropped for a whole sequence with probability `rate`, the kept ones scaled by
    1 / (1 - rate): that sequence's residual stream skips the branch."""
    if not is_training or rate == 0:
        return out
    return hk.dropout(hk.next_rng_key(), rate, out, broadcast_dims=(1, 2))


def sinusoidal_encodings(max_seq_len: int, d_model: int) -> np.ndarray:
    """The fixed encodings of "Attention is all you need": sin on even, cos on odd features."""
    positions = np.arange(max_seq_len)[:, None]                    # [S, 1]
    rates = 1.0 / 10000 ** (np.arange(0, d_model, 2) / d_model)  # [D/2]
    table = np.zeros((max_seq_len, d_model), np.float32)
    table[:, 0::2] = np.sin(positions * rates)
    table[:, 1::2] = np.cos(positions * rates[: d_model // 2])
    return table                                                   # [S, D]


class Unembed(Linear):
    """The Linear that makes logits: under build's policy its output stays float32, where
    the other Linears' outputs are bfloat16 (a bfloat16 logit near 8 is off by up to 1/32)."""


class Transformer(hk.Module):
    """Character Transformer: embeddings, [encoder,] decoder layers, final LN, logits."""

    def __init__(self, hp: HParams, vocab_size: int, compute_dtype: str = "float32",
                 read_w_t: bool = False, name: str = "transformer"):
        super().__init__(name=name)
        self.hp, self.vocab_size = validate(hp), vocab_size
        self.dtype = jnp.dtype(compute_dtype)  # attention's matmuls' operands (see build)
        self.read_w_t = read_w_t  # single rows read transposed weights: see kernels.Linear

    def __call__(self, tokens, is_training, cache=None, start=0, last_only=False,
                 ahead=False):
        """logits [B, T, V] of tokens [B, T] at positions start..start+T-1 (with a cache: and
        the cache); last_only: the logits of the last position alone, [B, 1, V], computed
        without the rest of the last layer's outputs (no cache); ahead (with
        HParams.ahead_loss): (logits, logits [B, T, V] of the character after next)."""
        hp = self.hp
        B, T = tokens.shape
        if not streams(hp) and (T > hp.max_seq_len or (isinstance(start, int)
                                                       and start + T > hp.max_seq_len)):
            raise ValueError(f"positions {start}..{start + T - 1} exceed HParams.max_seq_len="
                             f"{hp.max_seq_len} (sequence length T={T}).")
        if last_only and cache is not None:
            raise ValueError("last_only computes no keys or values for a cache.")
        positions = start + jnp.arange(T)                                   # [T]
        embed_init = hk.initializers.TruncatedNormal(0.02)
        x = hk.Embed(self.vocab_size, hp.d_model, w_init=embed_init,
                     name="token_embed")(tokens)                            # [B, T, D]
        if hp.positions == "learned":
            x += hk.get_parameter("position_embed", [hp.max_seq_len, hp.d_model],
                                  init=embed_init)[positions]
        elif hp.positions == "sinusoidal":
            x += jnp.asarray(sinusoidal_encodings(hp.max_seq_len, hp.d_model))[positions]
        x = kernels.dropout(x, hp.dropout, is_training)                     # [B, T, D]

        layer_cache = lambda name: None if cache is None else cache[name]
        new_cache = {}
        memories = []  # encoder layer i's output feeds decoder layer i's cross-attention
        if hp.use_encoder:
            h = x
            for i in range(hp.encoder_N):
                name = f"encoder_{i}"
                h, new_cache[name] = Layer(hp, name, self.dtype, self.read_w_t,
                                           hp.stochastic_depth * (i + 1) / hp.encoder_N)(
                    h, positions, is_training, cache=layer_cache(name))
                memories.append(h)
        for i in range(hp.decoder_N):
            name = f"decoder_{i}"
            x, new_cache[name] = Layer(hp, name, self.dtype, self.read_w_t,
                                       hp.stochastic_depth * (i + 1) / hp.decoder_N)(
                x, positions, is_training, memories[i] if i < len(memories) else None,
                layer_cache(name), last_query=last_only and i == hp.decoder_N - 1)
        x = _layer_norm("ln_final")(x)
        logits = Unembed(self.vocab_size, name="unembed",
                         read_w_t=self.read_w_t)(x)                         # [B, T|1, V]
        if hp.ahead_loss and (ahead or hk.running_init()):  # its params exist from init on
            after_next = Unembed(self.vocab_size, name="unembed_ahead")(x)  # [B, T, V]
            if ahead:
                return logits, after_next
        return logits if cache is None else (logits, new_cache)


def build(hp: HParams, vocab_size: int, compute_dtype: str = "float32") -> hk.Transformed:
    """apply(params, rng, tokens [B, T] int32, is_training) -> logits [B, T, V] float32;
    apply(..., last_only=True) -> the last position's logits [B, 1, V], for sampling;
    apply(..., ahead=True), with HParams.ahead_loss -> (logits, the character after next's).

    compute_dtype "bfloat16" puts Linear under a jmp policy (float32 parameters, bfloat16
    compute and output, as PyTorch's autocast: the next matmul takes them as they are), and
    the Transformer gives it to attention's explicit path (training with dropout): those
    matmuls take bfloat16 operands and accumulate in float32. The logits (Unembed),
    LayerNorm, softmax, the residual stream and the loss stay float32.
    """
    validate(hp)
    policy = jmp.get_policy(f"params=float32,compute={compute_dtype},output={compute_dtype}")
    logits_policy = policy.with_output_dtype(jnp.float32)

    def forward(tokens, is_training, last_only=False, ahead=False):
        with (hk.mixed_precision.push_policy(Linear, policy),
              hk.mixed_precision.push_policy(Unembed, logits_policy)):
            return Transformer(hp, vocab_size, compute_dtype)(tokens, is_training,
                                                              last_only=last_only, ahead=ahead)

    return hk.transform(forward)


def build_cached(hp: HParams, vocab_size: int) -> hk.Transformed:
    """apply(params, None, tokens [B, T], cache, start) -> (logits [B, T, V], cache).

    Inference only (no dropout). `start` is the position of tokens[:, 0]; the cache ({layer:
    {block: cache}} as attention_blocks names them, from kv_cache.init_cache) holds
    positions < start from earlier calls. A traced `start` cannot be checked: the caller keeps
    start + T <= max_seq_len (past it, the cache write clamps). params: with
    kernels.add_transposed_weights, whose copies a single row (B = T = 1) reads.
    """
    validate(hp)

    def forward(tokens, cache, start):
        return Transformer(hp, vocab_size, read_w_t=True)(tokens, False, cache, start)

    return hk.transform(forward)
