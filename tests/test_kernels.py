"""Tests of kernels.py: the fast forms compute what the plain JAX operations do.

bfloat16 matmuls and einsums (and their gradient rules), the transposed weights that single
rows read, fused attention, and the 8-bit dropout.
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels


@pytest.mark.parametrize("spec, shape_a, shape_b", [
    ("mi,io->mo", (64, 48), (48, 32)),                      # Linear (kernels.matmul)
    ("bthk,bshk->bhts", (3, 4, 2, 16), (3, 4, 2, 16)),      # attention scores (einsum)
    ("bhts,bshk->bthk", (3, 2, 4, 4), (3, 4, 2, 16)),       # attention output (einsum)
])
def test_low_precision_gradients_match_float32(spec, shape_a, shape_b):
    """matmul / einsum with bfloat16 operands: a float32 result, and gradients (the custom
    rule, in bfloat16 with float32 accumulation) within bfloat16 rounding of float32's."""
    fn = kernels.matmul if spec == "mi,io->mo" else functools.partial(kernels.einsum,
                                                                          spec)
    a = jax.random.normal(jax.random.PRNGKey(0), shape_a)
    b = jax.random.normal(jax.random.PRNGKey(1), shape_b) / 7
    g = jax.random.normal(jax.random.PRNGKey(2), jax.eval_shape(fn, a, b).shape)

    def vjp(a, b):
        out, pullback = jax.vjp(fn, a, b)
        return (out, *pullback(g.astype(out.dtype)))

    exact = vjp(a, b)
    np.testing.assert_allclose(exact[0], jnp.einsum(spec, a, b), rtol=1e-5, atol=1e-5)
    low = jax.jit(vjp)(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    assert [x.dtype for x in low] == [jnp.float32, jnp.bfloat16, jnp.bfloat16]
    for x, y in zip(low, exact):
        scale = np.abs(np.asarray(y)).max()
        np.testing.assert_allclose(np.asarray(x, np.float32), y, atol=0.02 * scale)
        assert not np.array_equal(np.asarray(x, np.float32), y)  # it did run in bfloat16


def test_single_rows_read_the_transposed_copy_and_compute_the_same():
    """add_transposed_weights adds w_t = w.T to the Linears with more inputs than outputs.
    Given it, a single row reads w_t (zeroing it leaves the bias), several rows read w, and
    either way the output is x @ w + b; params without it read w."""
    def linear(x, output_size):
        return kernels.Linear(output_size, name="linear")(x)

    wide, narrow = (hk.without_apply_rng(hk.transform(functools.partial(linear,
                                                                        output_size=size)))
                    for size in (48, 16))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32))
    for model, has_w_t in ((narrow, True), (wide, False)):  # 32 -> 16 and 32 -> 48
        params = model.init(jax.random.PRNGKey(1), x)
        params["linear"]["b"] = jnp.full_like(params["linear"]["b"], 0.5)
        with_t = kernels.add_transposed_weights(params)
        assert ("w_t" in with_t["linear"]) == has_w_t
        if has_w_t:
            np.testing.assert_array_equal(with_t["linear"]["w_t"], params["linear"]["w"].T)
        w, b = params["linear"]["w"], params["linear"]["b"]
        for rows in (x[:1], x):
            np.testing.assert_allclose(model.apply(with_t, rows), rows @ w + b, rtol=1e-5,
                                       atol=1e-5)
        if has_w_t:
            zeroed = {"linear": {**with_t["linear"], "w_t": jnp.zeros_like(w.T)}}
            np.testing.assert_allclose(model.apply(zeroed, x[:1]), b[None])  # read w_t
            np.testing.assert_allclose(model.apply(zeroed, x), x @ w + b, rtol=1e-5,
                                       atol=1e-5)                          # read w
            np.testing.assert_allclose(model.apply(params, x[:1]), x[:1] @ w + b, rtol=1e-5,
                                       atol=1e-5)


def test_attention_is_masked_softmax_attention():
    """transformer.attention(q, k, v, mask) without dropout (XLA's fused kernel) is
    softmax(q k / sqrt(K), masked) v, and attention_weights its weights, computed here with
    numpy (dropout's path: tests/test_transformer.py)."""
    import transformer

    B, T, S, H, K = 2, 3, 5, 2, 4
    q, k, v = (np.asarray(jax.random.normal(jax.random.PRNGKey(i), shape))
               for i, shape in enumerate([(B, T, H, K), (B, S, H, K), (B, S, H, K)]))
    mask = np.arange(S)[None, :] <= np.array([1, 3, 4])[:, None]              # [T, S]
    logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(K)
    logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(transformer.attention_weights(q, k, mask), weights, rtol=1e-5,
                               atol=1e-6)
    expected = np.einsum("bhts,bshk->bthk", weights, v)
    np.testing.assert_allclose(transformer.attention(q, k, v, mask), expected, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_dropout_drops_its_rounded_rate_and_keeps_the_mean(rate):
    """dropout zeroes a fraction round(rate * 256) / 256 of the elements, at random places,
    and scales the rest so that the mean is unchanged; evaluation leaves x as it is."""
    x = jnp.ones((64, 1001))  # a size not divisible by 4: the last word's bytes are cut
    dropout = hk.transform(lambda x, is_training: kernels.dropout(x, rate, is_training))
    out = np.asarray(dropout.apply({}, jax.random.PRNGKey(0), x, True))
    dropped = round(rate * 256) / 256
    assert abs((out == 0).mean() - dropped) < 0.01
    np.testing.assert_allclose(out[out != 0], 1 / (1 - dropped), rtol=1e-6)
    assert abs(out.mean() - 1.0) < 0.02
    # The dropped places differ along every axis (no repeated pattern between rows).
    assert not np.array_equal(out[0] == 0, out[1] == 0)
    assert not np.array_equal(out[:, 0] == 0, out[:, 1] == 0)
    np.testing.assert_array_equal(dropout.apply({}, None, x, False), x)


def test_auto_compute_dtype_is_bfloat16_only_where_it_runs_natively():
    choose = kernels.choose_compute_dtype
    assert choose("float32", "gpu")[0] == "float32"  # asked for: as asked
    assert choose("bfloat16", "cpu", set())[0] == "bfloat16"
    assert choose("auto", "gpu")[0] == "bfloat16"
    assert choose("auto", "tpu")[0] == "bfloat16"
    zen3 = {"avx2", "fma", "avx512f"}  # what an AMD Zen 3 or older Intel CPU reports
    dtype, why = choose("auto", "cpu", zen3)
    assert dtype == "float32" and "no avx512_bf16 or amx_bf16" in why
    for native in ({"avx512_bf16"}, {"amx_bf16", "amx_tile"}):  # Zen 4; Sapphire Rapids
        dtype, why = choose("auto", "cpu", zen3 | native)
        assert dtype == "bfloat16" and sorted(native)[0] in why
    # This machine: bfloat16 exactly when its CPU says it has a native bfloat16 flag.
    native_here = bool(kernels.cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if jax.default_backend() == "cpu":
        assert choose("auto")[0] == ("bfloat16" if native_here else "float32")
