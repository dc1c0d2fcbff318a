"""generate.py: the KV-cache sampler equals a plain windowed sampler; seeds; bad input."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint
import generate
import model_checks
import position_encodings
import transformer
import reader
import sampling
from conftest import TINY, run_command, run_script, within

VOCAB_SIZE = 12


def last_logits(apply, params, windows: np.ndarray, S: int) -> jax.Array:
    """apply's logits [B, V] at the last position of windows [B, <= S], each padded after its
    end to S, which a causal model's last position does not see: one compiled shape."""
    padded = np.pad(windows, ((0, 0), (0, S - windows.shape[1])))                # [B, S]
    return apply(params, None, jnp.asarray(padded), False)[:, windows.shape[1] - 1]


def reference_sample(params, hp, context_ids, key, num_chars, temperature=1.0, top_k=None,
                     num_samples=1, top_p=None, min_p=None):
    """The plain sampler: a full forward pass over the last max_seq_len ids per character, for
    num_samples streams side by side (character i of every stream drawn with fold_in(key, i)).
    -> [num_samples, num_chars] ids."""
    apply = jax.jit(transformer.build(hp, VOCAB_SIZE).apply, static_argnums=3)
    ids = np.tile(np.asarray(context_ids, np.int32), (num_samples, 1))       # [B, T]
    for i in range(num_chars):
        logits = last_logits(apply, params, ids[:, -hp.max_seq_len:], hp.max_seq_len)  # [B, V]
        token = sampling.sample_logits(jax.random.fold_in(key, i), logits, temperature, top_k,
                                       top_p, min_p)
        ids = np.concatenate([ids, np.asarray(token)[:, None]], axis=1)
    return ids[:, len(context_ids):]


def init_params(hp, seed=0):
    tokens = jnp.zeros((1, hp.max_seq_len), jnp.int32)
    return jax.jit(transformer.build(hp, VOCAB_SIZE).init, static_argnums=2)(
        jax.random.PRNGKey(seed), tokens, False)


@pytest.mark.parametrize("use_encoder", [False, True])
def test_cached_sampler_equals_windowed_reference_past_the_window(use_encoder):
    hp = TINY._replace(use_encoder=use_encoder)
    params = init_params(hp)
    context = np.array([3, 1, 4, 1, 5], np.int32)
    num_chars = 2 * hp.max_seq_len + 5  # fills the window, then slides over it twice
    key = jax.random.PRNGKey(7)
    cached = sampling.Sampler(hp, VOCAB_SIZE).sample(params, context, key, num_chars)
    assert cached.shape == (1, num_chars)
    np.testing.assert_array_equal(cached, reference_sample(params, hp, context, key,
                                                           num_chars))


def test_long_context_keeps_its_last_max_seq_len_characters():
    params = init_params(TINY)
    sampler = sampling.Sampler(TINY, VOCAB_SIZE)
    long_context = np.arange(3 * TINY.max_seq_len, dtype=np.int32) % VOCAB_SIZE
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(
        sampler.sample(params, long_context, key, 20),
        sampler.sample(params, long_context[-TINY.max_seq_len:], key, 20))
    np.testing.assert_array_equal(sampler.sample(params, long_context, key, 20),
                                  reference_sample(params, TINY, long_context, key, 20))


def test_same_seed_same_text_other_seed_other_text():
    params = init_params(TINY)
    sampler = sampling.Sampler(TINY, VOCAB_SIZE)
    context = np.array([1, 2], np.int32)
    a = sampler.sample(params, context, jax.random.PRNGKey(1), 60)
    b = sampler.sample(params, context, jax.random.PRNGKey(1), 60)
    c = sampler.sample(params, context, jax.random.PRNGKey(2), 60)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_top_k_1_is_greedy_and_top_k_restricts_choices():
    params = init_params(TINY)
    context = np.array([1, 2, 3], np.int32)
    greedy = sampling.Sampler(TINY, VOCAB_SIZE, top_k=1).sample(
        params, context, jax.random.PRNGKey(3), 30)
    apply = jax.jit(transformer.build(TINY, VOCAB_SIZE).apply, static_argnums=3)
    ids = list(context)
    for _ in range(30):
        logits = last_logits(apply, params, np.asarray([ids[-TINY.max_seq_len:]]),
                             TINY.max_seq_len)
        ids.append(int(jnp.argmax(logits[0])))
    assert greedy[0].tolist() == ids[len(context):]

    logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
    draws = jax.vmap(lambda k: sampling.sample_logits(k, logits, 1.0, 2))(
        jax.random.split(jax.random.PRNGKey(0), 400))
    assert set(np.asarray(draws).ravel().tolist()) == {2, 3}


def test_temperature_sharpens_and_flattens():
    logits = jnp.log(jnp.array([[0.2, 0.8]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    share = lambda t: float(jnp.mean(jax.vmap(
        lambda k: sampling.sample_logits(k, logits, t, None))(keys)))
    assert share(0.05) > 0.99            # nearly greedy
    assert 0.75 < share(1.0) < 0.85      # the model's own 0.8
    assert 0.46 < share(100.0) < 0.56    # nearly uniform (p = 0.503)


@pytest.mark.parametrize("use_encoder, num_samples", [(False, 1), (True, 3)])
def test_chunked_sampling_equals_reference_through_chunks_steps_and_a_full_window(
        use_encoder, num_samples):
    """A short context in a window of several chunks: multi-character cached chunks, single
    steps where fewer than a chunk's positions are free, then past the full window; each
    stream equals the plain sampler's, and the streams differ."""
    hp = TINY._replace(use_encoder=use_encoder)
    params = init_params(hp)
    context = np.array([4, 2, 7], np.int32)   # chunks of 4 over positions 3..14, one step
    key = jax.random.PRNGKey(11)              # to 16, then the window slides
    num_chars = 2 * hp.max_seq_len + 5
    sampler = sampling.Sampler(hp, VOCAB_SIZE, chunk=4)
    sizes = [chunk.shape[1] for chunk, _ in zip(
        sampler.stream(params, context, key, num_samples), range(7))]
    assert sizes == [4, 4, 4, 1, 4, 4, 4]
    batch = sampler.sample(params, context, key, num_chars, num_samples=num_samples)
    assert batch.shape == (num_samples, num_chars)
    np.testing.assert_array_equal(
        batch, reference_sample(params, hp, context, key, num_chars, num_samples=num_samples))
    assert len({tuple(row) for row in batch.tolist()}) == num_samples


# End to end through the script, with a tiny trained params file.

def test_generate_prints_context_then_seeded_sample(tiny_run, tmp_path, capsys):
    context = tmp_path / "context.txt"
    context.write_text("En un lugar", encoding="utf-8")
    run = lambda *args: run_command(capsys, "generate.py", f"--params={tiny_run['best']}", *args)
    args = [f"--context_file={context}", "--num_chars=50", "--prng_seed=5"]
    (status, first, err), (_, second, _) = run(*args), run(*args)
    assert status == 0, err
    assert first == second
    assert first.startswith("En un lugar") and len(first) == 11 + 50 + 1
    assert "seed 5" in err and "params" in err
    assert run(*args[:-1], "--prng_seed=6")[1] != first
    assert run("--context=En un lugar", "--num_chars=50", "--prng_seed=5") == (0, first, err)

    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    status, out, _ = run(f"--context_file={empty}", "--num_chars=5", "--prng_seed=1")
    assert status == 0 and out.startswith("\n")

    status, out, _ = run(*args, "--num_samples=3")
    assert status == 0 and out.count("--- sample") == 3


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.target}",))


def _bad_inputs(tiny_run, tmp_path):
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("hola ç☃", encoding="utf-8")
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(open(tiny_run["best"], "rb").read()[:1000])
    unsafe = tmp_path / "unsafe.pkl"
    unsafe.write_bytes(pickle.dumps({"format": checkpoint.FORMAT,
                                     "params": _Evil(tmp_path / "pwned")}))
    params = f"--params={tiny_run['best']}"
    return [
        ([params, f"--context_file={unknown}"], "'ç' (U+00E7), '☃' (U+2603)"),
        ([params, "--context_file=/nonexistent.txt"], "cannot read context file"),
        ([params, "--context=hola ☃"], "--context: 1 character(s) not in the model's vocabulary"),
        (["--params=/nonexistent.pkl"], "cannot read params file '/nonexistent.pkl'"),
        ([f"--params={corrupt}"], "is truncated or corrupt"),
        ([f"--params={unsafe}"], "unsafe pickle global posix.system"),
        ([params, "--temperature=0"], "--temperature=0.0: must be > 0"),
        ([params, "--top_k=0"], "--top_k=0: must be >= 1"),
        ([params, "--top_p=0"], "--top_p=0.0: must be in (0, 1]"),
        ([params, "--top_p=1.5"], "--top_p=1.5: must be in (0, 1]"),
        ([params, "--min_p=-0.1"], "--min_p=-0.1: must be in [0, 1]"),
        ([params, "--min_p=2"], "--min_p=2.0: must be in [0, 1]"),
        ([params, "--num_chars=-1"], "--num_chars=-1: must be >= 0"),
        ([params, "--num_samples=2", "--num_chars=None"], "needs --num_chars"),
        ([params, "--temperature=hot"], "expected float"),
        ([params, "--bogus=1"], "unknown option --bogus"),
    ]


def test_bad_input_exits_2_with_a_clear_message(tiny_run, tmp_path, capsys):
    """Each in this process (run_command: an exception other than the UserError that exits
    2 fails the test, as a traceback would), the first as a command too."""
    inputs = _bad_inputs(tiny_run, tmp_path)
    for args, message in inputs:
        status, _, err = run_command(capsys, "generate.py", "--num_chars=5", *args)
        assert status == 2 and message in err, (args, err)
    assert not (tmp_path / "pwned").exists()
    args, message = inputs[0]
    result = run_script("generate.py", "--num_chars=5", *args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_ends_an_endless_stream_cleanly(tiny_run):
    """num_chars=None streams until Ctrl-C, which ends it with exit 0 and no traceback."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    process = subprocess.Popen(
        [sys.executable, "generate.py", f"--params={tiny_run['best']}", "--prng_seed=3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        streamed = within(120, process.stdout.read, 300)  # the context, then samples
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert len(streamed) == 300
    assert process.returncode == 0, err.decode()
    assert b"Traceback" not in err


# Streaming models: rotary positions and an attention window.

STREAMING = TINY._replace(positions="rotary", attention_window=6)


def full_forward_sample(params, hp, context_ids, key, sampled, temperature=1.0, top_k=None,
                        top_p=None, min_p=None):
    """What one full forward pass over the whole text (context and sampled ids [B, N]) says
    each sampled id must be: the draw of character i from the logits at its position."""
    text = np.concatenate([np.tile(context_ids, (len(sampled), 1)), sampled], axis=1)
    logits = jax.jit(transformer.build(hp, VOCAB_SIZE).apply, static_argnums=3)(
        params, None, jnp.asarray(text[:, :-1]), False)                      # [B, T - 1, V]
    start = len(context_ids) - 1
    return np.stack([sampling.sample_logits(jax.random.fold_in(key, i), logits[:, start + i],
                                            temperature, top_k, top_p, min_p)
                     for i in range(sampled.shape[1])], axis=1)


@pytest.mark.parametrize("use_encoder, num_samples, top_k", [
    (False, 1, None),  # seeded, one stream
    (False, 3, 1),     # greedy, several streams
    (True, 2, None),   # the encoder and cross-attention
])
def test_streaming_sampler_equals_one_full_forward_pass_many_windows_on(
        use_encoder, num_samples, top_k):
    """Every character of a streaming model is a cached step through ring caches, for
    windows past the first and past max_seq_len, and the text is what one full forward pass
    over all of it gives."""
    hp = STREAMING._replace(use_encoder=use_encoder)
    params = init_params(hp)
    context = np.array([3, 1, 4, 1, 5], np.int32)
    key = jax.random.PRNGKey(7)
    num_chars = 4 * hp.max_seq_len + 3  # 11 windows of 6, 4 training lengths
    sampler = sampling.Sampler(hp, VOCAB_SIZE, top_k=top_k, chunk=4)
    assert [c.shape[1] for c, _ in zip(sampler.stream(params, context, key), range(6))] == [4] * 6
    sampled = sampler.sample(params, context, key, num_chars, num_samples)
    np.testing.assert_array_equal(
        sampled, full_forward_sample(params, hp, context, key, sampled, top_k=top_k))
    # Seeded streams differ; greedy ones are the same text.
    assert len({tuple(row) for row in sampled.tolist()}) == (1 if top_k == 1 else num_samples)


@pytest.mark.parametrize("context_length, prefill_chunk", [
    (5, 4), (13, 4), (20, 4), (5, 16), (13, 16), (20, 16), (24, 4)])
def test_streaming_prefill_in_chunks_equals_one_full_forward_pass(context_length,
                                                                  prefill_chunk):
    """The context read prefill_chunk characters at a time through the rings (W = 6):
    lengths under, over and at multiples of the window and of the chunk, chunks shorter and
    longer than the window; several streams."""
    params = init_params(STREAMING)
    context = (np.arange(context_length, dtype=np.int32) * 7 + 3) % VOCAB_SIZE
    key = jax.random.PRNGKey(context_length)
    sampler = sampling.Sampler(STREAMING, VOCAB_SIZE, prefill_chunk=prefill_chunk)
    sampled = sampler.sample(params, context, key, 12, num_samples=2)
    np.testing.assert_array_equal(sampled,
                                  full_forward_sample(params, STREAMING, context, key, sampled))


@pytest.mark.parametrize("hp", [STREAMING, STREAMING._replace(use_encoder=True, encoder_N=2)])
def test_streaming_prefill_reads_the_reach_of_a_context_exactly(hp):
    """After a context of any length the logits are the full forward pass's at its last
    position, though only the last transformer.reach characters are read: the first of
    them still changes the next character's logits, and anything before it cannot."""
    params = init_params(hp)
    full = jax.jit(transformer.build(hp, VOCAB_SIZE).apply, static_argnums=3)
    sampler = sampling.Sampler(hp, VOCAB_SIZE, prefill_chunk=4)
    reach = reader.receptive_field(hp)
    rng = np.random.default_rng(0)
    for n in (reach - 1, reach, reach + 1, 3 * reach + 2):
        context = rng.integers(0, VOCAB_SIZE, n).astype(np.int32)
        logits = sampler.reader.start(params, context, 1).logits[0]
        expected = full(params, None, jnp.asarray(context)[None], False)[0, -1]
        np.testing.assert_allclose(logits, expected, atol=1e-6, err_msg=f"length {n}")
        if n > reach:  # the first character read matters to the full pass: it is read
            changed = context.copy()
            changed[n - reach] = (changed[n - reach] + 1) % VOCAB_SIZE
            moved = full(params, None, jnp.asarray(changed)[None], False)[0, -1]
            assert np.abs(moved - expected).max() > 1e-4
            np.testing.assert_allclose(sampler.reader.start(params, changed, 1).logits[0], moved,
                                       atol=1e-6)
            changed[: n - reach] = (changed[: n - reach] + 3) % VOCAB_SIZE  # beyond reach
            np.testing.assert_allclose(
                full(params, None, jnp.asarray(changed)[None], False)[0, -1], moved,
                atol=1e-6)


def test_streaming_sampler_reads_a_context_longer_than_the_window_whole():
    """The prefill reads the whole context (what the full forward pass sees), not its last
    max_seq_len characters."""
    params = init_params(STREAMING)
    context = np.arange(3 * STREAMING.max_seq_len, dtype=np.int32) % VOCAB_SIZE
    key = jax.random.PRNGKey(2)
    sampled = sampling.Sampler(STREAMING, VOCAB_SIZE).sample(params, context, key, 20)
    np.testing.assert_array_equal(sampled,
                                  full_forward_sample(params, STREAMING, context, key, sampled))


@pytest.mark.parametrize("hp", [
    TINY._replace(use_encoder=True, encoder_N=2),                  # encoder_N == decoder_N
    TINY._replace(use_encoder=True, encoder_N=1, decoder_N=1),     # one layer, cross-attends
    STREAMING._replace(use_encoder=True, encoder_N=2),             # the same, streaming
    TINY._replace(decoder_N=1),                                    # one layer
    TINY._replace(h=1),                                            # one head
    TINY._replace(attention_window=1),                             # a window of 1
    STREAMING._replace(attention_window=1),                        # streaming, a window of 1
    TINY._replace(max_seq_len=1),                                  # one position
    STREAMING._replace(use_encoder=True, attention_gate=True),     # gated heads, streaming
    STREAMING._replace(value_embeddings=True),                     # value embeddings
    STREAMING._replace(decoder_N=3, unet=True, activation="swiglu"),  # U-Net, SwiGLU
], ids=["encoder_N=decoder_N", "one_layer_encoder", "streaming_encoder_N=decoder_N",
        "one_layer", "one_head", "window_1", "streaming_window_1", "max_seq_len_1",
        "gated", "value_embeddings", "unet_swiglu"])
def test_every_valid_model_samples_as_the_plain_reference(hp):
    """Past the window, so that every path runs: cached steps, slides, the last layer's
    last-position pass (which cross-attends when encoder_N == decoder_N)."""
    model_checks.validate(hp)
    params = init_params(hp)
    context = np.array([3, 1, 4], np.int32)
    key = jax.random.PRNGKey(11)
    num_chars = 2 * hp.max_seq_len + 5
    sampled = sampling.Sampler(hp, VOCAB_SIZE).sample(params, context, key, num_chars)
    expected = (full_forward_sample(params, hp, context, key, sampled)
                if position_encodings.is_streaming(hp) else
                reference_sample(params, hp, context, key, num_chars))
    np.testing.assert_array_equal(sampled, expected)


def test_temperature_and_top_k_on_the_command_line_change_the_text(tiny_run, capsys):
    """--top_k=1, and a temperature near 0, sample the greedy continuation (computed here
    with full forward passes); the default rule, with the same seed, another text."""
    ckpt = checkpoint.load(tiny_run["best"])
    apply = jax.jit(transformer.build(ckpt.hparams, len(ckpt.vocab)).apply, static_argnums=3)
    context = "En un lugar"
    ids = list(np.asarray(__import__("data").encode(context, ckpt.vocab)))
    S = ckpt.hparams.max_seq_len
    for _ in range(30):
        ids.append(int(np.argmax(last_logits(apply, ckpt.params, np.asarray([ids[-S:]]), S)[0])))
    greedy = context + "".join(ckpt.vocab[i] for i in ids[len(context):]) + "\n"

    def sample(*args):
        status, out, err = run_command(capsys, "generate.py", f"--params={tiny_run['best']}",
                                       f"--context={context}", "--num_chars=30",
                                       "--prng_seed=4", *args)
        assert status == 0, err
        return out

    assert sample("--top_k=1") == greedy
    assert sample("--temperature=0.001") == greedy
    default = sample()
    assert default != greedy
    assert sample("--top_k=2") not in (greedy, default)


def test_top_p_keeps_the_fewest_likeliest_reaching_p_and_min_p_a_share_of_the_likeliest():
    logits = jnp.log(jnp.array([[0.05, 0.3, 0.5, 0.15]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)

    def draws(**rule):
        ids = jax.vmap(lambda k: sampling.sample_logits(k, logits, 1.0, None, **rule))(keys)
        return np.bincount(np.asarray(ids).ravel(), minlength=4) / len(keys)

    share = draws(top_p=0.7)        # 0.5 alone is short of 0.7: 0.5 and 0.3
    assert share[0] == share[3] == 0 and abs(share[2] - 0.5 / 0.8) < 0.03
    assert set(np.flatnonzero(draws(top_p=0.81))) == {1, 2, 3}  # 0.8 is short of 0.81
    assert set(np.flatnonzero(draws(top_p=0.4))) == {2}         # the likeliest alone
    assert set(np.flatnonzero(draws(top_p=1.0))) == {0, 1, 2, 3}
    assert set(np.flatnonzero(draws(min_p=0.5))) == {1, 2}      # p >= 0.25
    assert set(np.flatnonzero(draws(min_p=0.2))) == {1, 2, 3}   # p >= 0.1
    assert abs(draws(min_p=0.2)[3] - 0.15 / 0.95) < 0.03
    # In order: temperature 100 flattens the four to about 0.25 each, top-k 3 keeps the three
    # likeliest (about 1/3 each), and top-p 0.6 of those the two likeliest.
    hot = jax.vmap(lambda k: sampling.sample_logits(k, logits, 100.0, 3, 0.6, None))(keys)
    assert set(np.asarray(hot).ravel().tolist()) == {1, 2}


@pytest.mark.parametrize("streaming, num_samples, rule", [
    (False, 1, dict(top_p=0.9)),
    (False, 3, dict(min_p=0.2, temperature=1.5)),
    (True, 1, dict(top_p=0.8, min_p=0.1)),
    (True, 2, dict(top_k=5, top_p=0.9, min_p=0.05, temperature=0.8)),
])
def test_cached_sampler_with_top_p_and_min_p_equals_the_plain_reference(streaming, num_samples,
                                                                        rule):
    hp = STREAMING if streaming else TINY
    params = init_params(hp, seed=3)
    context = np.array([2, 7, 1, 8], np.int32)
    key = jax.random.PRNGKey(9)
    num_chars = 2 * hp.max_seq_len + 3
    sampled = sampling.Sampler(hp, VOCAB_SIZE, chunk=4, **rule).sample(
        params, context, key, num_chars, num_samples)
    expected = (full_forward_sample(params, hp, context, key, sampled, **rule) if streaming
                else reference_sample(params, hp, context, key, num_chars,
                                      num_samples=num_samples, **rule))
    np.testing.assert_array_equal(sampled, expected)
