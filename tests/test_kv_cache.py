"""Tests of kv_cache.py: the cached model, fed its caches, gives the full forward's logits.

Sampling streams through sampling.Sampler, whose texts tests/test_generate.py compares with a
plain sampler; these check the caches alone, step by step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import generate
import kernels
import kv_cache
import transformer
import reader
import sampling
from test_transformer import BATCH_SIZE, VOCAB, jitted_apply, random_params, random_tokens, tiny


@pytest.mark.parametrize("use_encoder", [False, True])
@pytest.mark.parametrize("batch_size", [1, BATCH_SIZE])
def test_cached_prefill_and_steps_match_full_forward(use_encoder, batch_size):
    """Prefill of k tokens, then one-token steps, gives the logits of one full forward.

    Two encoder layers, so that the order of several encoder and cross-attention caches counts.
    With batch size 1 the steps read the transposed weights.
    """
    hp = tiny(use_encoder, encoder_N=2 if use_encoder else 1)
    params = random_params(hp)
    seq_len, prefill = hp.max_seq_len, 5
    tokens = random_tokens(14, batch_size=batch_size)
    full = jitted_apply(hp, False)(params, None, tokens)                   # [B, T, V]

    cached = jax.jit(transformer.build_cached(hp, VOCAB).apply)
    params = kernels.add_transposed_weights(params)
    cache = reader.empty_cache(hp, batch_size)
    logits, cache = cached(params, None, tokens[:, :prefill], cache, 0)
    steps = [logits]
    for t in range(prefill, seq_len):
        logits, cache = cached(params, None, tokens[:, t:t + 1], cache, jnp.int32(t))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_encoder", [False, True])
def test_chunk_cache_steps_match_full_forward(use_encoder):
    """Steps through ChunkCaches (the full cache only read, new keys in a chunk-sized cache)
    give the full forward's logits, in chunks of 4 (start_chunk, steps, end_chunk)."""
    hp = tiny(use_encoder, encoder_N=2 if use_encoder else 1)
    params = random_params(hp)
    prefill, chunk = 5, 4
    tokens = random_tokens(15)
    full = jitted_apply(hp, False)(params, None, tokens)                   # [B, T, V]

    cached = jax.jit(transformer.build_cached(hp, VOCAB).apply)
    logits, cache = cached(params, None, tokens[:, :prefill],
                           reader.empty_cache(hp, BATCH_SIZE), 0)
    steps = [logits]
    for start in range(prefill, hp.max_seq_len - chunk + 1, chunk):
        state = kv_cache.start_chunk(cache, jnp.int32(start), chunk)
        for t in range(start, start + chunk):
            logits, state = cached(params, None, tokens[:, t:t + 1], state, jnp.int32(t))
            steps.append(logits)
        cache = kv_cache.end_chunk(cache, state)
    done = prefill + len(steps) - 1
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full[:, :done],
                               atol=1e-5, rtol=1e-5)
    assert done == hp.max_seq_len - (hp.max_seq_len - prefill) % chunk


@pytest.mark.parametrize("start", [0, 1_000_003])
def test_streaming_steps_through_ring_caches_match_full_forward_at_any_position(start):
    """A streaming model's prefill and one-token steps through RingCaches of W = 6 slots,
    over 40 positions (the rings wrap six times), give the full forward pass's logits; the
    same from position 1,000,003 on, where float32 angles position * frequency would be off
    by about 0.06 radians: rotary scores depend on relative positions only, exactly."""
    hp = tiny(positions="rotary", attention_window=6)
    params = random_params(hp)
    tokens = random_tokens(4, seq_len=40)
    full = jitted_apply(hp, False)(params, None, tokens)                   # [B, 40, V]
    cached = jax.jit(transformer.build_cached(hp, VOCAB).apply)
    params = kernels.add_transposed_weights(params)
    cache = reader.empty_cache(hp, BATCH_SIZE)
    assert all(c.k.shape[-1] == 6 for layer in cache.values() for c in layer.values())
    logits, cache = cached(params, None, tokens[:, :5], cache, start)
    steps = [logits]
    for t in range(5, 40):
        logits, cache = cached(params, None, tokens[:, t:t + 1], cache, jnp.int32(start + t))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)
