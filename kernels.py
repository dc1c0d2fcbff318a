"""How the model's arithmetic runs fast on XLA (mostly XLA:CPU): none of it changes the math.

transformer.py calls these in place of the plain JAX operations; each piece says why it is
here, with the measurement behind it (docs/benchmarks.md for the whole-model figures).

  precision         Haiku's mixed-precision policies that transformer.forward_fn sets: the
                    compute dtype of every Linear (Logits: float32 outputs).
  matmul, einsum    bfloat16 operands with float32 accumulation, and gradient rules that
                    keep the backward matmuls in bfloat16 (JAX's own rules ran them at
                    float32 speed).
  Linear, Logits    hk.Linear by `matmul`; a single row (sampling one stream) reads the
                    transposed copy "w_t" where the params have one (add_transposed_weights),
                    which XLA:CPU streams faster.
  in_bands          windowed attention over a long sequence in W-blocks, each over its
                    own keys and the previous block's: T * 2W scores instead of T^2 (eval's
                    pass over the 103,097 validation characters: 0.1 GB a head, not 42).
  dropout           8 random bits per element instead of hk.dropout's 32; drop_branch,
                    stochastic depth's: a residual branch dropped for a whole sequence.

and which precision to train in: choose_compute_dtype.
"""

import contextlib
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np

from kv_cache import NO_POSITION


@contextlib.contextmanager
def precision(compute_dtype: str):
    """Within it, Haiku's mixed precision casts each Linear's input and params to
    compute_dtype (as PyTorch's autocast) and keeps its output in it for the next matmul;
    Logits' outputs are float32 (a bfloat16 logit near 8 is off by up to 1/32)."""
    policy = jmp.get_policy(f"params=float32,compute={compute_dtype},output={compute_dtype}")
    with (hk.mixed_precision.push_policy(Linear, policy),
          hk.mixed_precision.push_policy(Logits, policy.with_output_dtype(jnp.float32))):
        yield

# ---------------------------------------------------------------------------------------------
# The training precision

NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of x86 CPUs


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (Linux); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_compute_dtype(requested: str, platform: str | None = None,
                         flags: set[str] | None = None) -> tuple[str, str]:
    """(dtype, why) for train.Config.compute_dtype: "bfloat16" and "float32" as asked; "auto"
    bfloat16 on GPUs and TPUs and on CPUs with native bfloat16 matmuls (AVX-512 BF16, AMX),
    float32 on other CPUs, where XLA emulates bfloat16 and it runs slower (README,
    "Precision"). platform and flags default to this machine's."""
    if requested != "auto":
        return requested, "--compute_dtype"
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return "bfloat16", f"auto: {platform} runs bfloat16 matmuls natively"
    native = sorted(set(NATIVE_BFLOAT16_FLAGS) & (cpu_flags() if flags is None else flags))
    if native:
        return "bfloat16", f"auto: this CPU has native bfloat16 matmuls ({', '.join(native)})"
    return "float32", (f"auto: this CPU has no native bfloat16 matmuls (no "
                       f"{' or '.join(NATIVE_BFLOAT16_FLAGS)} flag), where they run slower")


# ---------------------------------------------------------------------------------------------
# Low-precision matmuls


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
    # x^T g contracts both operands' first dimension, a form XLA:CPU runs by converting
    # them to float32 (no bfloat16 kernel takes it); on x transposed in memory it is the
    # plain product its bfloat16 kernels run (18 -> 13 ms at M 4096, I 1024, O 256, the
    # transpose included). The barrier keeps XLA from folding the transpose back in.
    x_t = jax.lax.optimization_barrier(x.T)                     # [I, M]
    grad_w = _dot(x_t, g, (1, 0))                               # [I, M] . [M, O] -> [I, O]
    return grad_x.astype(x.dtype), grad_w.astype(w.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


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
    """Low-precision einsum accumulated in float32, in the form XLA:CPU has bfloat16 kernels
    for: each operand's batch indices first, in the output's order, and the operands ordered
    as the output's free indices are (the first one's first). Other forms of some of these
    contractions fail at run time (UNIMPLEMENTED: "Unsupported element type for DotThunk")."""
    inputs, out = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    batch = [c for c in out if c in spec_a and c in spec_b]

    def batch_first(x, indices):
        order = batch + [c for c in indices if c not in batch]
        return x.transpose([indices.index(c) for c in order]), "".join(order)

    (a, spec_a), (b, spec_b) = batch_first(a, spec_a), batch_first(b, spec_b)
    free = [c for c in out if (c in spec_a) != (c in spec_b)]
    if free and free[0] in spec_b:
        spec_a, spec_b, a, b = spec_b, spec_a, b, a
    return jnp.einsum(f"{spec_a},{spec_b}->{out}", a, b, preferred_element_type=jnp.float32)


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


# ---------------------------------------------------------------------------------------------
# Linear, and transposed weights for single rows

class Linear(hk.Linear):
    """hk.Linear (same parameters and initializers, always a bias) computed by `matmul`.

    Under `precision`'s policy Haiku casts the input and parameters to the compute dtype
    before this call and the output to the policy's output dtype after it.

    Where the params have a transposed copy "w_t" [O, I] of the weight (the sampler's, by
    add_transposed_weights), a single row x [1, I] is multiplied by it. XLA:CPU computes
    x @ w by streaming w's rows, and long rows stream faster: ff_out's w_t has 1536-float
    rows where w has 384-float ones (22-28 against 15-16 GB/s; one-stream sampling took
    11-13% less time per character). With more rows it is a matrix product, which ran slower
    on w_t (8 streams: 73 against 128 steps/s), so those read w.
    """

    def __init__(self, output_size: int, name: str):
        super().__init__(output_size, name=name)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        *batch, self.input_size = inputs.shape
        x = inputs.reshape(-1, self.input_size)                          # [M, I]
        if x.shape[0] == 1 and "w_t" in hk.get_params().get(self.module_name, {}):
            w_t = hk.get_parameter("w_t", [self.output_size, self.input_size], inputs.dtype)
            out = _dot(x, w_t, (1, 1))                                   # x @ w_t.T
        else:
            w = hk.get_parameter("w", [self.input_size, self.output_size], inputs.dtype,
                                 init=self.w_init or hk.initializers.TruncatedNormal(
                                     1.0 / np.sqrt(self.input_size)))
            out = matmul(x, w)
        b = hk.get_parameter("b", [self.output_size], inputs.dtype,
                             init=self.b_init or jnp.zeros)
        return (out + b).reshape(*batch, self.output_size)


class Logits(Linear):
    """The Linear that makes logits: under `precision`'s policy its output is float32."""


def _has_w_t(input_size: int, output_size: int) -> bool:
    """Whether add_transposed_weights gives a Linear of these sizes a transposed copy: the
    transpose has the longer rows."""
    return input_size > output_size


def add_transposed_weights(params: hk.Params) -> hk.Params:
    """params plus, for each Linear weight w [I, O] with I > O, its transpose "w_t" [O, I]:
    what a single row of a Linear reads (the sampler's one stream); more rows read w."""
    return {name: {**p, "w_t": jnp.transpose(p["w"])}
            if "w" in p and _has_w_t(*p["w"].shape) else p
            for name, p in params.items()}


# ---------------------------------------------------------------------------------------------
# Attention and dropout


def in_bands(attend, q, k, v, positions, window: int, split_rng: bool) -> jax.Array:
    """Windowed self-attention over a sequence many windows long, in pieces: attend(q, k, v,
    query_positions, key_positions) for the queries of each W-block over the keys of their
    own block and the one before (all they can see), so that the cost grows as T * 2W
    instead of T^2. q, k, v [B, T, H, K] at positions [T] -> [B, T, H, K]. Padded keys are at
    NO_POSITION, which no query sees; split_rng: each block draws its own dropout."""
    B, T, H, K = q.shape
    n = -(-T // window)                                                     # W-blocks

    def blocks(x, value=0):  # [B, T, ...] -> [B, n, W, ...]; positions [T] -> [n, W]
        axis = 1 if x.ndim > 1 else 0
        x = jnp.pad(x, [(0, n * window - T) if a == axis else (0, 0) for a in range(x.ndim)],
                    constant_values=value)
        return x.reshape(*x.shape[:axis], n, window, *x.shape[axis + 1:])

    def after_previous(x, value=0):  # each block's keys after its previous block's
        axis = 1 if x.ndim > 2 else 0
        first = jnp.full_like(jax.lax.index_in_dim(x, 0, axis), value)
        previous = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)],
                                   axis=axis)
        return jnp.concatenate([previous, x], axis=axis + 1)                # 2W keys

    out = hk.vmap(attend, in_axes=(1, 1, 1, 0, 0), out_axes=1, split_rng=split_rng)(
        blocks(q), after_previous(blocks(k)), after_previous(blocks(v)), blocks(positions),
        after_previous(blocks(positions, NO_POSITION), NO_POSITION))       # [B, n, W, H, K]
    return out.reshape(B, n * window, H, K)[:, :T]


def dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
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


def drop_branch(out: jax.Array, rate: float, is_training: bool) -> jax.Array:
    """Stochastic depth (Huang et al. 2016): while training, a residual branch's output
    [B, T, D] is dropped for a whole sequence at `rate`, the kept ones scaled by 1/(1-rate)
    (B draws: hk.dropout's own)."""
    if not is_training or rate == 0:
        return out
    return hk.dropout(hk.next_rng_key(), rate, out, broadcast_dims=(1, 2))
