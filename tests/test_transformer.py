"""Tests of transformer.py: shapes, parameter count, causality, positions, dropout, the pre-norm
structure, bfloat16 compute, the last-position pass, overfitting one string, and HParams
validation. Its caches are tested in test_kv_cache.py, its fast forms in test_kernels.py.

Every model is tiny (conftest.TINY or a variant) and every repeated apply is jitted: compiling
dominates on a CPU, and the persistent cache set up in conftest makes reruns fast.
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY

import bench
import kernels
import transformer
import position_encodings
import reader

VOCAB = 10
BATCH_SIZE = 2
LN_EPS = 1e-5  # hk.LayerNorm's default


def tiny(use_encoder: bool = False, **changes) -> transformer.HParams:
    """TINY, with one encoder layer when use_encoder, and any other field changed."""
    return TINY._replace(**{"use_encoder": use_encoder, "encoder_N": 1, **changes})


def random_tokens(seed: int, seq_len: int = TINY.max_seq_len, batch_size: int = BATCH_SIZE,
                  vocab_size: int = VOCAB) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), (batch_size, seq_len), 0, vocab_size)


def param_shapes(hp: transformer.HParams, vocab_size: int = VOCAB):
    """The initialized model's parameter tree, as shapes: init traced, never run."""
    model = transformer.build(hp, vocab_size)
    return jax.eval_shape(functools.partial(model.init, is_training=False),
                          jax.random.PRNGKey(0), jnp.zeros((1, hp.max_seq_len), jnp.int32))


def random_params(hp: transformer.HParams, vocab_size: int = VOCAB, seed: int = 0):
    """Parameters of the model's shapes, drawn with numpy.

    These tests check structure (causality, caching, dropout), not the initializers, and
    compiling the random initializers costs several seconds per model on a CPU. Biases and
    LayerNorm offsets are nonzero so that no term can hide behind a zero.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['w']"):                               # [fan_in, fan_out]
            value = rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[0])
        elif name.endswith("['scale']"):
            value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        elif name.endswith(("['embeddings']", "['position_embed']")):
            value = rng.normal(size=leaf.shape)
        else:                                                    # biases, LayerNorm offsets
            value = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(hp, vocab_size))


@functools.lru_cache(maxsize=None)
def jitted_apply(hp: transformer.HParams, is_training: bool, vocab_size: int = VOCAB):
    """apply(params, rng, tokens) -> logits, jitted with is_training fixed; one per model,
    shared by the tests, so each model and token shape compiles once per session."""
    model = transformer.build(hp, vocab_size)
    return jax.jit(functools.partial(model.apply, is_training=is_training))


def count(params) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def module_name(name: str) -> str:
    """Haiku module names without the '/~/' separators some Haiku versions put in them."""
    return name.replace("/~", "")


# ---------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("use_encoder", [False, True])
@pytest.mark.parametrize("seq_len", [5, TINY.max_seq_len])
def test_logits_shape_dtype_finite(use_encoder, seq_len):
    """Logits are [B, T, V] float32 and finite, for T below and at max_seq_len."""
    hp = tiny(use_encoder)
    params = random_params(hp)
    tokens = random_tokens(1, seq_len)
    modes = [(False, None)]
    if seq_len == hp.max_seq_len:  # the shape the other tests compile training mode for
        modes.append((True, jax.random.PRNGKey(2)))
    for is_training, rng in modes:
        logits = jitted_apply(hp, is_training)(params, rng, tokens)
        assert logits.shape == (BATCH_SIZE, seq_len, VOCAB)
        assert logits.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("use_encoder", [False, True])
def test_sequence_longer_than_max_seq_len_raises(use_encoder):
    """T > max_seq_len raises ValueError naming max_seq_len."""
    hp = tiny(use_encoder)
    params = random_params(hp)
    tokens = random_tokens(1, hp.max_seq_len + 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        transformer.build(hp, VOCAB).apply(params, None, tokens, False)


# ---------------------------------------------------------------------------------------------
# Parameter count


def expected_param_count(hp: transformer.HParams, vocab_size: int) -> int:
    """Written independently of bench.param_count, module by module."""
    D, F, V, S = hp.d_model, hp.d_ff, vocab_size, hp.max_seq_len
    layer_norm = 2 * D                          # scale and offset
    attention = 4 * (D * D + D)                 # query, key, value, out: weights and biases
    attention += hp.attention_gate * (D * hp.h + hp.h)  # the gate: a weight and bias a head
    feed_forward = D * F + F + F * D + D        # ff_in, ff_out
    feed_forward += (hp.activation == "swiglu") * (D * F + F)  # ff_in's gate half
    layer = 2 * layer_norm + attention + feed_forward
    embeddings = V * D + (S * D if hp.positions == "learned" else 0)
    embeddings += hp.value_embeddings * hp.decoder_N * V * D  # a table per decoder layer
    skips = hp.unet * (hp.decoder_N // 2)       # a scalar per U-Net skip
    encoder_N = hp.encoder_N if hp.use_encoder else 0
    cross = encoder_N * (layer_norm + attention)
    return (embeddings + (hp.decoder_N + encoder_N) * layer + cross + skips
            + layer_norm + D * V + V)           # final LN, unembedding


def test_param_count_of_default_hparams():
    """The default model (vocab 88) has param_count(HPARAMS, 88) == the formula's parameters."""
    hp, vocab_size = transformer.HPARAMS, 88
    model = transformer.build(hp, vocab_size)
    shapes = jax.eval_shape(functools.partial(model.init, is_training=False),
                            jax.random.PRNGKey(0), jnp.zeros((1, hp.max_seq_len), jnp.int32))
    D, F, V, S = hp.d_model, hp.d_ff, vocab_size, hp.max_seq_len
    formula = (V * D + (S * D if hp.positions == "learned" else 0)
               + hp.decoder_N * (2 * 2 * D + 4 * (D * D + D) + D * F + F + F * D + D)
               + 2 * D + D * V + V)
    assert count(shapes) == formula
    assert bench.param_count(hp, vocab_size) == formula


@pytest.mark.parametrize("hp", [
    tiny(False),
    tiny(True),
    tiny(True, encoder_N=2),
    tiny(False, positions="sinusoidal"),
    tiny(True, positions="sinusoidal"),
    tiny(True, positions="rotary", attention_window=4),
    tiny(True, attention_gate=True),
    tiny(True, value_embeddings=True),
    tiny(False, activation="swiglu"),
    tiny(True, unet=True, decoder_N=5),
], ids=["decoder", "encoder1", "encoder2", "sinusoidal", "encoder_sinusoidal", "rotary",
        "gated", "value_embeddings", "swiglu", "unet"])
def test_param_count_matches_initialized_model(hp):
    """param_count and the independent formula both equal the initialized model's count."""
    actual = count(param_shapes(hp))
    assert bench.param_count(hp, VOCAB) == actual
    assert expected_param_count(hp, VOCAB) == actual


def test_sinusoidal_positions_have_no_parameters():
    """Sinusoidal encodings add no position_embed parameter; learned ones add [S, D]."""
    learned = param_shapes(tiny(False))
    sinusoidal = param_shapes(tiny(False, positions="sinusoidal"))
    assert learned["transformer"]["position_embed"].shape == (TINY.max_seq_len, TINY.d_model)
    assert "position_embed" not in sinusoidal.get("transformer", {})


def test_sinusoidal_encodings_formula():
    """sin(p / 10000^(2i/D)) on feature 2i and cos of the same angle on feature 2i+1."""
    max_seq_len, d_model = 12, 8
    table = position_encodings.sinusoidal(max_seq_len, d_model)
    assert table.shape == (max_seq_len, d_model)
    for p in range(max_seq_len):
        for i in range(d_model // 2):
            angle = p / 10000 ** (2 * i / d_model)
            np.testing.assert_allclose(table[p, 2 * i], np.sin(angle), atol=1e-6)
            np.testing.assert_allclose(table[p, 2 * i + 1], np.cos(angle), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Causality


@pytest.mark.parametrize("is_training", [False, True])
@pytest.mark.parametrize("use_encoder, streaming", [(False, False), (True, False), (True, True)])
def test_future_tokens_do_not_change_past_logits(use_encoder, streaming, is_training):
    """Changing tokens after t leaves logits at <= t unchanged and changes later ones.

    In training mode (same rng, so the same dropout masks) the explicit-softmax attention path
    runs instead of the fused one; both must be causal. A streaming model runs 40 positions,
    the banded pass over W-blocks.
    """
    hp = tiny(use_encoder, **(dict(positions="rotary", attention_window=6) if streaming
                              else {}))
    params = random_params(hp)
    apply = jitted_apply(hp, is_training)
    rng = jax.random.PRNGKey(3) if is_training else None
    tokens = random_tokens(4, seq_len=40 if streaming else hp.max_seq_len)
    logits = apply(params, rng, tokens)
    for t in (0, 6, tokens.shape[1] - 2):
        changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 1) % VOCAB)
        changed_logits = apply(params, rng, changed)
        np.testing.assert_allclose(changed_logits[:, :t + 1], logits[:, :t + 1], atol=1e-6)
        assert not np.allclose(changed_logits[:, t + 1:], logits[:, t + 1:], atol=1e-4)


@pytest.mark.parametrize("use_encoder", [False, True])
def test_loss_at_t_has_no_gradient_from_later_positions(use_encoder):
    """d loss_t / d position_embed[s] is zero for s > t and nonzero for s <= t."""
    hp = tiny(use_encoder)
    params = random_params(hp)
    model = transformer.build(hp, VOCAB)
    tokens, targets = random_tokens(5), random_tokens(6)

    @jax.jit
    def position_grads(params, t):
        def loss_at_t(params):
            logits = model.apply(params, None, tokens, False)                 # [B, T, V]
            log_probs = jax.nn.log_softmax(logits[:, t])                      # [B, V]
            return -jnp.take_along_axis(log_probs, targets[:, t, None], axis=-1).mean()
        return jax.grad(loss_at_t)(params)["transformer"]["position_embed"]  # [S, D]

    for t in (0, 5, hp.max_seq_len - 1):
        row_norms = np.abs(np.asarray(position_grads(params, t))).sum(axis=-1)  # [S]
        assert np.all(row_norms[t + 1:] == 0.0), row_norms
        assert np.all(row_norms[:t + 1] > 0.0), row_norms


# ---------------------------------------------------------------------------------------------
# Positions


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rotary"])
def test_order_of_characters_matters(positions):
    """Permuting the first characters (last one fixed) changes the last position's logits.

    One layer, so that the control holds: without positions its last query sees a set.
    """
    hp = tiny(False, positions=positions, decoder_N=1)
    params = random_params(hp)
    apply = jitted_apply(hp, False)
    tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    permuted = jnp.array([[7, 6, 5, 4, 3, 2, 1, 8]])  # the first seven reversed, last kept
    last = apply(params, None, tokens)[0, -1]
    permuted_last = apply(params, None, permuted)[0, -1]
    assert not np.allclose(last, permuted_last, atol=1e-5)
    if positions == "learned":
        # Control: without position information the last query sees a set, not a sequence.
        table = params["transformer"]["position_embed"]
        blind = {**params, "transformer": {**params["transformer"],
                                           "position_embed": jnp.zeros_like(table)}}
        np.testing.assert_allclose(apply(blind, None, tokens)[0, -1],
                                   apply(blind, None, permuted)[0, -1], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("use_encoder", [False, True])
def test_dropout_follows_rng_and_is_training(use_encoder):
    """Training differs across rngs and repeats with one rng; evaluation needs no rng."""
    hp = tiny(use_encoder, dropout=0.1)
    params = random_params(hp)
    train, evaluate = jitted_apply(hp, True), jitted_apply(hp, False)
    tokens = random_tokens(7)
    rng_a, rng_b = jax.random.PRNGKey(10), jax.random.PRNGKey(11)
    train_a = train(params, rng_a, tokens)
    assert not np.allclose(train_a, train(params, rng_b, tokens), atol=1e-4)
    np.testing.assert_array_equal(train_a, train(params, rng_a, tokens))
    eval_logits = evaluate(params, None, tokens)
    np.testing.assert_array_equal(eval_logits, evaluate(params, None, tokens))
    np.testing.assert_array_equal(eval_logits, evaluate(params, rng_a, tokens))
    assert not np.allclose(train_a, eval_logits, atol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 1e-7])
@pytest.mark.parametrize("use_encoder", [False, True])
def test_zero_dropout_training_equals_evaluation(use_encoder, dropout):
    """With dropout 0, training mode gives the evaluation logits; with a vanishing rate too,
    which checks that the explicit-softmax attention (dropout > 0) matches the fused one."""
    hp = tiny(use_encoder, dropout=dropout)
    params = random_params(hp)
    tokens = random_tokens(8)
    train_logits = jitted_apply(hp, True)(params, jax.random.PRNGKey(12), tokens)
    eval_logits = jitted_apply(hp, False)(params, None, tokens)
    np.testing.assert_allclose(train_logits, eval_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("changes, batch_size", [
    ({}, BATCH_SIZE),
    # Key size above the context, 3 sequences of 2 heads: shapes where XLA:CPU once chose a
    # layout it has no bfloat16 kernel for (UNIMPLEMENTED at run time).
    ({"max_seq_len": 4, "d_model": 64, "h": 2}, 3),
])
def test_bfloat16_compute_keeps_float32_params_and_matches_float32_loss(changes, batch_size):
    """build(compute_dtype="bfloat16"): same parameters (float32), float32 logits of float32
    precision, and the loss and its gradient close to float32's (bfloat16 rounding),
    dropout on."""
    hp = tiny(False, **changes)
    params = random_params(hp)
    tokens = random_tokens(20, hp.max_seq_len, batch_size)
    targets = random_tokens(21, hp.max_seq_len, batch_size)

    def loss_and_grads(compute_dtype):
        model = transformer.build(hp, VOCAB, compute_dtype)
        assert jax.tree.map(jnp.shape, param_shapes(hp)) == jax.tree.map(
            jnp.shape, jax.eval_shape(functools.partial(model.init, is_training=False),
                                      jax.random.PRNGKey(0), tokens))

        def loss(params):
            logits = model.apply(params, jax.random.PRNGKey(3), tokens, True)
            assert logits.dtype == jnp.float32
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return jax.jit(jax.value_and_grad(loss))(params)

    (loss32, grads32), (loss16, grads16) = loss_and_grads("float32"), loss_and_grads("bfloat16")
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
    assert loss16 != loss32 and abs(loss16 - loss32) < 0.02 * loss32
    flat32, flat16 = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)])
                      for t in (grads32, grads16))
    cosine = flat32 @ flat16 / jnp.linalg.norm(flat32) / jnp.linalg.norm(flat16)
    assert cosine > 0.99, cosine
    # The other Linears return bfloat16; the logits keep float32's precision: few of them
    # are bfloat16 numbers.
    model = transformer.build(hp, VOCAB, "bfloat16")
    logits = jax.jit(model.apply, static_argnums=3)(
        params, None, tokens, False)
    assert np.mean(np.asarray(logits == logits.astype(jnp.bfloat16).astype(jnp.float32))) < 0.5


# ---------------------------------------------------------------------------------------------
# Pre-norm structure


def layer_norm(x, scale, offset):
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + LN_EPS) * scale + offset


def by_hand(params, tokens, residual=lambda p, x: x):
    """A learned-position model's logits computed in numpy from its params: the embeddings,
    `residual(p, x)` for what the layers add (p: the params by module name), the final
    LayerNorm and the unembedding."""
    p = {module_name(name): jax.tree_util.tree_map(np.asarray, module)
         for name, module in params.items()}
    x = (p["transformer/token_embed"]["embeddings"][np.asarray(tokens)]
         + p["transformer"]["position_embed"][:tokens.shape[1]])             # [B, T, D]
    x = residual(p, x)
    final, unembed = p["transformer/ln_final"], p["transformer/unembed"]
    return layer_norm(x, final["scale"], final["offset"]) @ unembed["w"] + unembed["b"]


BRANCH_OUTPUTS = ("self_attention/out", "cross_attention/out", "ff_out")


def zeroed(params, modules=BRANCH_OUTPUTS):
    """The params with the modules whose names end in `modules` zeroed: by default every
    residual branch's output projection."""
    return {name: jax.tree_util.tree_map(jnp.zeros_like, module)
            if module_name(name).endswith(modules) else module
            for name, module in params.items()}


@pytest.mark.parametrize("use_encoder", [False, True])
def test_zeroed_branches_make_every_layer_the_identity(use_encoder):
    """With every branch's output projection zeroed, logits = unembed(LN_final(embeddings))."""
    hp = tiny(use_encoder)
    params = zeroed(random_params(hp))
    zeroed_names = [name for name in params if module_name(name).endswith(BRANCH_OUTPUTS)]
    encoder_N = hp.encoder_N if use_encoder else 0
    assert len(zeroed_names) == 2 * hp.decoder_N + 2 * encoder_N + encoder_N  # self, ff; cross
    tokens = random_tokens(9)
    logits = jitted_apply(hp, False)(params, None, tokens)                  # [B, T, V]

    # By hand (random_params gives the final LayerNorm scale != 1, offset != 0).
    expected = by_hand(params, tokens)                                      # [B, T, V]
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def silu_gated(h):
    gate, h = np.split(h, 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * h


@pytest.mark.parametrize("activation, activate", [
    ("relu", lambda h: np.maximum(h, 0)), ("relu2", lambda h: np.maximum(h, 0) ** 2),
    ("swiglu", silu_gated)])
def test_feed_forward_applies_its_activation(activation, activate):
    """With attention's output projection zeroed, a one-layer model computes
    unembed(LN_final(x + W2 act(LN_ff(x) W1 + b1) + b2)), x the embeddings, act the
    HParams.activation: max(h, 0), its square for relu2, and for swiglu silu(a) * b of the
    halves a, b of LN_ff(x) W1 + b1 (2F wide)."""
    hp = TINY._replace(decoder_N=1, activation=activation)
    params = zeroed(random_params(hp), "self_attention/out")
    tokens = random_tokens(4)
    logits = jitted_apply(hp, False)(params, None, tokens)                  # [B, T, V]

    def feed_forward(p, x):
        ln, ff_in, ff_out = (p[f"transformer/decoder_0/{name}"]
                             for name in ("ln_ff", "ff_in", "ff_out"))
        h = activate(layer_norm(x, ln["scale"], ln["offset"]) @ ff_in["w"] + ff_in["b"])
        return x + h @ ff_out["w"] + ff_out["b"]

    expected = by_hand(params, tokens, feed_forward)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decoder_N, pairs", [(3, {2: 0}), (4, {2: 1, 3: 0})])
def test_unet_adds_the_first_halfs_outputs_to_the_second_halfs_inputs(decoder_N, pairs):
    """With unet and attention's output projections zeroed, layer i computes x + FF_i(x) on
    its input x, which for each layer i of the second half is the layer before's output plus
    skip_i times the output of layer j = pairs[i], mirrored (3 layers: layer 2 gets layer
    0's; 4 layers: layer 2 gets layer 1's, layer 3 layer 0's)."""
    hp = TINY._replace(decoder_N=decoder_N, unet=True)
    params = zeroed(random_params(hp), "self_attention/out")
    tokens = random_tokens(5)
    logits = jitted_apply(hp, False)(params, None, tokens)                  # [B, T, V]

    def layers(p, x):
        outputs = []
        for i in range(decoder_N):
            if i in pairs:
                x = x + p["transformer"][f"skip_{i}"] * outputs[pairs[i]]
            ln, ff_in, ff_out = (p[f"transformer/decoder_{i}/{name}"]
                                 for name in ("ln_ff", "ff_in", "ff_out"))
            h = np.maximum(layer_norm(x, ln["scale"], ln["offset"]) @ ff_in["w"] + ff_in["b"], 0)
            x = x + h @ ff_out["w"] + ff_out["b"]
            outputs.append(x)
        return x

    expected = by_hand(params, tokens, layers)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention_gate, value_embeddings",
                         [(False, False), (True, False), (False, True)],
                         ids=["plain", "gated", "value_embeddings"])
def test_self_attention_computes_causal_softmax_attention_and_its_gate(attention_gate,
                                                                       value_embeddings):
    """With the feed-forward branch zeroed, a one-layer model adds to x (the embeddings) the
    attention of LN_self(x): per head softmax(q k / sqrt(K)) v over the positions up to each
    query's (with value_embeddings, v plus the layer's table's row of each key's token),
    then with attention_gate each head's output times sigmoid(LN_self(x) Wg + bg), then the
    out projection."""
    hp = TINY._replace(decoder_N=1, attention_gate=attention_gate,
                       value_embeddings=value_embeddings)
    params = zeroed(random_params(hp), "ff_out")
    tokens = random_tokens(6)
    logits = jitted_apply(hp, False)(params, None, tokens)                  # [B, T, V]
    H, K = hp.h, hp.d_model // hp.h

    def attention(p, x):
        block = lambda name: p[f"transformer/decoder_0/self_attention/{name}"]
        ln = p["transformer/decoder_0/ln_self"]
        h = layer_norm(x, ln["scale"], ln["offset"])                        # [B, T, D]
        qkv = h @ block("query_key_value")["w"] + block("query_key_value")["b"]
        B, T, _ = x.shape
        q, k, v = np.split(qkv.reshape(B, T, 3 * H, K), 3, axis=2)          # [B, T, H, K]
        if value_embeddings:
            table = p["transformer/value_embed_0"]["embeddings"]             # [V, D]
            v = v + table[tokens].reshape(B, T, H, K)
        scores = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(K)
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("bhts,bshk->bthk", weights, v)                      # [B, T, H, K]
        if attention_gate:
            gate = h @ block("gate")["w"] + block("gate")["b"]              # [B, T, H]
            out = out / (1 + np.exp(-gate))[..., None]
        return x + out.reshape(B, T, H * K) @ block("out")["w"] + block("out")["b"]

    expected = by_hand(params, tokens, attention)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_encoder", [False, True])
def test_stochastic_depth_drops_whole_sequences_branches_in_training_only(use_encoder):
    """Stochastic depth drops a layer's branches for whole sequences: at a rate near 1 each
    sequence's logits are those of the model with every branch zeroed; evaluation never
    drops; and at rate r the last layer's branches stay in about 1 - r of the sequences,
    scaled by 1 / (1 - r)."""
    hp = tiny(use_encoder, dropout=0.0, decoder_N=1, stochastic_depth=0.999)
    params = random_params(hp)
    tokens = random_tokens(21)
    dropped = jitted_apply(hp, True)(params, jax.random.PRNGKey(3), tokens)
    no_branches = jitted_apply(hp, False)(zeroed(params), None, tokens)
    np.testing.assert_allclose(dropped, no_branches, atol=1e-5, rtol=1e-5)
    plain = jitted_apply(hp._replace(stochastic_depth=0.0), False)(params, None, tokens)
    np.testing.assert_array_equal(jitted_apply(hp, False)(params, None, tokens), plain)

    # Rate 0.5 at the last layer: each sequence keeps its feed-forward branch (x2) or not.
    hp = tiny(False, dropout=0.0, decoder_N=1, stochastic_depth=0.5)
    params = random_params(hp)

    def stream(params, rng, tokens):  # the residual stream after the layer
        return hk.transform(lambda t: transformer.Layer(hp, "decoder_0", drop_rate=0.5)(
            t, jnp.arange(t.shape[1]), True)[0]).apply(params, rng, tokens)

    x = jax.random.normal(jax.random.PRNGKey(5), (400, 3, hp.d_model))
    layer_params = {k.removeprefix("transformer/"): v for k, v in params.items()
                    if k.startswith("transformer/decoder_0")}
    out = jax.jit(stream)(layer_params, jax.random.PRNGKey(6), x)
    keep_none = jax.jit(stream)(zeroed(layer_params), jax.random.PRNGKey(6), x)
    np.testing.assert_allclose(keep_none, x, atol=1e-6)  # zeroed branches: the stream alone
    unchanged = np.all(np.isclose(out, x, atol=1e-6), axis=(1, 2))  # both branches dropped
    assert 0.15 < unchanged.mean() < 0.35, unchanged.mean()  # 0.5 * 0.5 of the sequences


# ---------------------------------------------------------------------------------------------
# Encoder wiring


def test_decoder_layer_i_cross_attends_to_encoder_layer_i():
    """With decoder_1's cross-attention output zeroed, encoder_1 no longer affects the logits
    (it feeds decoder_1 only) while encoder_0 still does (it feeds decoder_0)."""
    hp = tiny(True, encoder_N=2)
    params = dict(random_params(hp))
    cross_1 = next(name for name in params
                   if module_name(name) == "transformer/decoder_1/cross_attention/out")
    params[cross_1] = jax.tree_util.tree_map(jnp.zeros_like, params[cross_1])
    apply = jitted_apply(hp, False)
    tokens = random_tokens(15)
    logits = apply(params, None, tokens)

    def with_encoder_ff_changed(layer: int):
        name = next(name for name in params
                    if module_name(name) == f"transformer/encoder_{layer}/ff_out")
        return {**params, name: jax.tree_util.tree_map(lambda w: w + 0.5, params[name])}

    np.testing.assert_allclose(apply(with_encoder_ff_changed(1), None, tokens), logits,
                               atol=1e-6)
    assert not np.allclose(apply(with_encoder_ff_changed(0), None, tokens), logits, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Sampling's forward pass over a full window


@pytest.mark.parametrize("use_encoder", [False, True])
def test_last_logits_are_the_full_forwards_last_position(use_encoder):
    """reader.build_last_logits, the sampler's pass over a full window (the head reads the
    last position only), equals the full forward's last position; shorter sequences too."""
    hp = tiny(use_encoder, encoder_N=2 if use_encoder else 1, decoder_N=3)
    params = random_params(hp)
    apply = jax.jit(transformer.build(hp, VOCAB).apply, static_argnums=3)
    last_logits = jax.jit(reader.build_last_logits(hp, VOCAB).apply)
    for seq_len in (hp.max_seq_len, 7):
        tokens = random_tokens(16, seq_len)
        full = apply(params, None, tokens, False)                            # [B, T, V]
        last = last_logits(params, None, tokens)                             # [B, V]
        assert last.shape == (BATCH_SIZE, VOCAB)
        np.testing.assert_allclose(last, full[:, -1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Overfitting


TEXT = "En un lugar de la Mancha, de cuyo nombre no quiero acordarme, no"


@pytest.mark.parametrize("use_encoder", [False, True])
def test_tiny_model_overfits_one_string(use_encoder):
    """A tiny model memorizes a 64-character string: loss < 0.05 within 400 Adam steps."""
    assert len(TEXT) == 64
    vocab = sorted(set(TEXT))
    ids = jnp.array([[vocab.index(c) for c in TEXT]])                 # [1, 64]
    inputs, targets = ids[:, :-1], ids[:, 1:]                         # [1, 63]
    hp = tiny(use_encoder, max_seq_len=64, dropout=0.0)
    model = transformer.build(hp, len(vocab))
    params = jax.jit(functools.partial(model.init, is_training=False))(
        jax.random.PRNGKey(0), inputs)
    optimizer = optax.adam(3e-3)

    def loss_fn(params, rng):
        logits = model.apply(params, rng, inputs, True)               # [1, 63, V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def train_steps(params, opt_state, rng):
        def step(carry, rng):  # 50 updates per call: few host round trips
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, rng)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss
        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), jax.random.split(rng, 50))
        return params, opt_state, losses                          # losses: [50]

    opt_state = optimizer.init(params)
    rng = jax.random.PRNGKey(1)
    losses = []
    for _ in range(8):  # at most 400 steps
        rng, steps_rng = jax.random.split(rng)
        params, opt_state, step_losses = train_steps(params, opt_state, steps_rng)
        losses += [float(step_losses[0]), float(step_losses[-1])]
        if losses[-1] < 0.05:
            break
    assert losses[0] > 1.0, losses
    assert losses[-1] < 0.05, losses


# ---------------------------------------------------------------------------------------------
# HParams validation


INVALID = [
    ("d_model", TINY._replace(d_model=30, h=4)),
    ("max_seq_len", TINY._replace(max_seq_len=0)),
    ("d_model", TINY._replace(d_model=0)),
    ("h", TINY._replace(h=0)),
    ("d_ff", TINY._replace(d_ff=0)),
    ("decoder_N", TINY._replace(decoder_N=0)),
    ("encoder_N", TINY._replace(encoder_N=0)),
    ("max_seq_len", TINY._replace(max_seq_len=-1)),
    ("dropout", TINY._replace(dropout=-0.1)),
    ("dropout", TINY._replace(dropout=1.0)),
    ("dropout", TINY._replace(dropout=1.5)),
    ("stochastic_depth", TINY._replace(stochastic_depth=1.0)),
    ("stochastic_depth", TINY._replace(stochastic_depth=-0.5)),
    ("activation", TINY._replace(activation="gelu")),
    ("encoder_N", TINY._replace(use_encoder=True, encoder_N=3, decoder_N=2)),
    ("positions", TINY._replace(positions="relative")),
    ("positions", TINY._replace(positions="rotary", d_model=36, h=4)),  # odd key size 9
    ("attention_window", TINY._replace(attention_window=0)),
    ("attention_window", TINY._replace(attention_window=2.5)),
]


@pytest.mark.parametrize("field, hp", INVALID,
                         ids=[f"{field}-{i}" for i, (field, _) in enumerate(INVALID)])
def test_invalid_hparams_raise_value_error_naming_the_field(field, hp):
    """build() rejects each invalid value with a ValueError whose message names the field."""
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        transformer.build(hp, 10)


def test_valid_edge_hparams_build():
    """The edges of the valid ranges are accepted: dropout 0, encoder_N == decoder_N, h == D."""
    for hp in (TINY._replace(dropout=0.0), TINY._replace(use_encoder=True, encoder_N=2),
               TINY._replace(h=TINY.d_model), TINY._replace(positions="sinusoidal"),
               TINY._replace(positions="rotary", attention_window=1)):
        assert isinstance(transformer.build(hp, 10), hk.Transformed)


# ---------------------------------------------------------------------------------------------
# Streaming models: rotary positions, attention window


def test_a_window_of_w_shows_each_query_itself_and_the_w_minus_1_before():
    """One layer, window 4: the logits at position 10 change with the token at 7 (three
    before) and not with the token at 6 (four before)."""
    hp = tiny(positions="rotary", attention_window=4, decoder_N=1, max_seq_len=16)
    params = random_params(hp)
    apply = jitted_apply(hp, False)
    tokens = random_tokens(30)
    logits = apply(params, None, tokens)[:, 10]
    changed = lambda t: apply(params, None, tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB))
    np.testing.assert_array_equal(changed(6)[:, 10], logits)
    assert not np.allclose(changed(7)[:, 10], logits, atol=1e-4)


def test_streaming_model_takes_any_length_and_its_banded_pass_equals_the_plain_one():
    """A streaming model applies to sequences several max_seq_len long (the banded pass over
    W-blocks beyond 2W positions): each prefix's logits are those of the longer sequence,
    and the logits of a repeated text only depend on the last W characters per layer, not
    on where the text is (rotary positions are relative)."""
    hp = tiny(positions="rotary", attention_window=6)
    params = random_params(hp)
    apply = jitted_apply(hp, False)
    tokens = random_tokens(31, seq_len=5 * hp.max_seq_len)                 # [B, 80]
    logits = apply(params, None, tokens)
    assert logits.shape == (BATCH_SIZE, 80, VOCAB)
    for length in (12, 13, 45):  # the plain masked pass, then banded ones
        np.testing.assert_allclose(apply(params, None, tokens[:, :length]),
                                   logits[:, :length], atol=1e-5, rtol=1e-5)
    reach = hp.decoder_N * (hp.attention_window - 1)  # what position 79 can depend on
    np.testing.assert_allclose(apply(params, None, tokens[:, 79 - reach:])[:, -1],
                               logits[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len"):
        jitted_apply(tiny(positions="rotary"), False)(random_params(tiny(positions="rotary")),
                                                      None, tokens)


def test_attention_dropout_acts_in_every_band_of_the_banded_pass():
    """Sequences longer than two windows attend in W-bands: while training, dropout on the
    attention weights changes the output of queries in every band (not only the plain
    pass's), and no query sees past its window either way."""
    W, T, H, K = 4, 20, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (1, T, H, K))
    k = jax.random.normal(keys[1], (1, T, H, K))
    v = jax.random.normal(keys[2], (1, T, H, K))
    positions = jnp.arange(T)

    def core(is_training):
        def attend(q, k, v, query_positions, key_positions):
            mask = transformer.visible(query_positions, key_positions, W)
            return transformer.attention(q, k, v, mask, 0.5 if is_training else 0.0)
        return kernels.in_bands(attend, q, k, v, positions, W, split_rng=is_training)

    apply = hk.transform(core).apply
    plain = apply({}, None, False)
    dropped = apply({}, jax.random.PRNGKey(1), True)
    for band in range(T // W):
        rows = slice(band * W, (band + 1) * W)
        assert not np.allclose(dropped[:, rows], plain[:, rows]), band
    # The plain rows are the windowed softmax attention, computed here directly.
    scores = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(K)
    offset = positions[:, None] - positions[None, :]
    weights = jax.nn.softmax(jnp.where((offset >= 0) & (offset < W), scores, -jnp.inf))
    np.testing.assert_allclose(plain, jnp.einsum("bhts,bshk->bthk", weights, v), atol=1e-5)
