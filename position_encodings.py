"""How positions enter the model (transformer.py): learned embeddings or the fixed sinusoidal
table added to the token embeddings (add), or rotary angles (exact at any position) that turn
queries and keys; with a window, rotary positions make a streaming model (is_streaming)."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np


EMBED_INIT = hk.initializers.TruncatedNormal(0.02)  # token and learned position embeddings


def is_streaming(hp) -> bool:
    """Rotary positions and a window (transformer.HParams): each layer sees the last W
    positions, relatively, so the model reads any length, one cached step a character
    (reader.py)."""
    return hp.positions == "rotary" and hp.attention_window is not None


def add(x: jax.Array, positions: jax.Array, kind: str, max_seq_len: int) -> jax.Array:
    """x [B, T, D] plus the encodings of `positions` [T]: "learned" (a parameter of the
    calling module, "position_embed" [max_seq_len, D]) or "sinusoidal"; "rotary": x itself."""
    D = x.shape[-1]
    if kind == "learned":
        return x + hk.get_parameter("position_embed", [max_seq_len, D],
                                    init=EMBED_INIT)[positions]
    if kind == "sinusoidal":
        return x + jnp.asarray(sinusoidal(max_seq_len, D))[positions]
    return x


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


def sinusoidal(max_seq_len: int, d_model: int) -> np.ndarray:
    """The fixed encodings of "Attention is all you need": sin on even, cos on odd features."""
    positions = np.arange(max_seq_len)[:, None]                    # [S, 1]
    rates = 1.0 / 10000 ** (np.arange(0, d_model, 2) / d_model)  # [D/2]
    table = np.zeros((max_seq_len, d_model), np.float32)
    table[:, 0::2] = np.sin(positions * rates)
    table[:, 1::2] = np.cos(positions * rates[: d_model // 2])
    return table                                                   # [S, D]
