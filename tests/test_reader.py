"""reader.py's promise: a text's logits are what the model's sampler would give each
character, whatever the text's length or the model's kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reader
import transformer
from conftest import TINY

V = 11


def random_model(hp: transformer.HParams):
    model = transformer.build(hp, V)
    return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), False)


STREAMING = TINY._replace(positions="rotary", attention_window=4, decoder_N=3, dropout=0.0)


@pytest.mark.parametrize("hp", [STREAMING, STREAMING._replace(use_encoder=True, encoder_N=2)],
                         ids=["decoder", "encoder"])
def test_a_streaming_models_long_text_reads_in_passes_as_one_pass(monkeypatch, hp):
    """A streaming model reads a long text in passes of STREAM_CHUNK positions (the last
    one shorter), each after the receptive field before it: with three layers that reaches
    three windows back, not one. Every row equals one forward pass over the whole text."""
    assert reader.receptive_field(STREAMING) == 3 * 3 + 1
    model, params = random_model(hp)
    ids = np.random.default_rng(0).integers(0, V, 150).astype(np.int32)
    monkeypatch.setattr(reader, "STREAM_CHUNK", 16)
    whole = model.apply(params, None, jnp.asarray(ids)[None], False)[0]     # [150, V]
    np.testing.assert_allclose(reader.next_logits(hp, V, params, ids), whole, atol=2e-5)


def test_any_other_model_reads_its_last_max_seq_len_characters():
    """A model with learned positions predicts character i + 1 from the window that ends
    at i: the first max_seq_len rows are one pass, each later one its window's last."""
    hp = TINY._replace(dropout=0.0)
    S = hp.max_seq_len
    model, params = random_model(hp)
    ids = np.random.default_rng(1).integers(0, V, 3 * S + 5).astype(np.int32)
    logits = reader.next_logits(hp, V, params, ids)
    assert logits.shape == (len(ids), V)
    apply = jax.jit(model.apply, static_argnums=3)
    np.testing.assert_allclose(logits[:S], apply(params, None, jnp.asarray(ids[:S])[None],
                                                 False)[0], atol=2e-5)
    for i in (S, S + 1, 2 * S + 3, len(ids) - 1):
        window = jnp.asarray(ids[i - S + 1: i + 1])[None]
        np.testing.assert_allclose(logits[i], apply(params, None, window, False)[0, -1],
                                   atol=2e-5, err_msg=f"character {i}")
    # Read in groups of batch_size * 16 windows, the last group partial and padded.
    ids = np.random.default_rng(2).integers(0, V, S + 150).astype(np.int32)
    grouped = np.concatenate(list(reader.iter_next_logits(hp, V, params, ids, batch_size=4)))
    windows = np.lib.stride_tricks.sliding_window_view(ids, S)                 # [151, S]
    np.testing.assert_allclose(grouped[S - 1:], apply(params, None, jnp.asarray(windows),
                                                      False)[:, -1], atol=2e-5)
