"""Shared test setup: the project root on sys.path, a persistent XLA compilation cache, and
XLA's CPU code generated without LLVM's optimizations.

Compiling dominates these tests on a CPU (seconds per jitted function), and many tests build
the same tiny model: the on-disk cache lets a shape compile once per machine, subprocesses
included (they inherit the environment variables set here). What is left compiles faster
unoptimized (a tiny Muon train step: 3.1 s against 6.2 s) and runs slower (the shipped Tiny
Shakespeare model's whole validation split: about a fifth), which the suite gains on
(docs/testing.md). The computed values are the same to float32 rounding; scripts run outside
the tests keep XLA's defaults.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
UNOPTIMIZED = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if UNOPTIMIZED not in os.environ.get("XLA_FLAGS", ""):  # a child importing conftest has it
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {UNOPTIMIZED}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

import transformer  # noqa: E402

# JAX's backends start here, with the devices XLA_FLAGS gives (one CPU device unless a test
# sets a count), so that train.main's split of a CPU into a device per core
# (train_step.split_cpu_cores) leaves in-process runs on them, whichever test runs first;
# tests that split run train.py in a fresh process (test_multidevice.py).
jax.devices()

CORPUS = os.path.join(ROOT, "novelas_ejemplares.txt")
# Tiny Shakespeare: $TINYSHAKESPEARE (as .ci/run sets it), else the copy beside the checkout;
# tests never download it.
SHAKESPEARE = os.environ.get("TINYSHAKESPEARE") or os.path.join(
    os.path.dirname(ROOT), "shared", "tinyshakespeare.txt")

# A model small enough that each test runs in seconds on a CPU: the original project's kind
# (learned positions, no window), as the tests' own fields below.
TINY = transformer.HParams(max_seq_len=16, d_model=32, h=4, d_ff=64, decoder_N=2,
                           encoder_N=1, use_encoder=False, dropout=0.1, positions="learned",
                           attention_window=None)


def original_config():
    """train.CONFIG under the original project's recipe (AdamW, cosine decay, random
    windows, no second head, no averaging): the plain training the tests change a field of."""
    import recipes
    import train

    return train.CONFIG._replace(**recipes.ORIGINAL.config)


def tiny_config(tmp_dir, **changes):
    """original_config() for a run of seconds: tiny batches, frequent evaluation of a sample
    (8,192 characters of each split), no Aim."""
    return original_config()._replace(
        batch_size=8, max_iters=40, learning_rate=3e-3, warmup_iters=5, eval_interval=20,
        eval_batch_size=512, eval_chars=8192, log_interval=5, source_file=CORPUS, aim=False,
        aim_repo=str(tmp_dir), params_dir=os.path.join(str(tmp_dir), "params"),
        sample_chars=0)._replace(**changes)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny training run shared by the tests that need a params file: its final meta.
    It evaluates the whole validation split, as eval.py does."""
    import train

    tmp_dir = tmp_path_factory.mktemp("tiny_run")
    meta = train.train(tiny_config(tmp_dir, max_iters=100, eval_interval=50,
                                   eval_chars=train.CONFIG.eval_chars), TINY)
    latest, best = train.params_paths(str(tmp_dir / "params"), meta["run_hash"])
    return {"meta": meta, "latest": latest, "best": best, "dir": tmp_dir}


def environment(devices: int | None = None) -> dict:
    """The tests' environment for a child process on `devices` CPU devices (XLA_FLAGS' own
    count), or on the devices train.py picks (None: without a count, a device per core)."""
    count = f"--xla_force_host_platform_device_count={devices} " if devices else ""
    return dict(os.environ, XLA_FLAGS=count + UNOPTIMIZED)


def run_script(*args, timeout=300, **kwargs):
    """Runs `python <script> args...` in the project root; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def run_command(capsys, script: str, *args: str) -> tuple[int, str, str]:
    """`python <script> args...` in this process, as its `__main__` block runs it (the
    module's main under common.run_main): (exit status, stdout, stderr). What needs a fresh
    process (a signal, a device split, start-up itself) runs through run_script, as does
    each script at least once."""
    import importlib

    import common

    module = importlib.import_module(script.removesuffix(".py"))
    capsys.readouterr()
    argv, sys.argv = sys.argv, [script, *args]
    try:
        common.run_main(module.main)
        status = 0
    except SystemExit as e:
        status = e.code
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return status, out, err


def within(timeout: float, read, *args):
    """read(*args) (a blocking read of a child's pipe), failing the test after `timeout`
    seconds instead of hanging it; the caller kills the child."""
    import threading

    result = []
    reader = threading.Thread(target=lambda: result.append(read(*args)), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        pytest.fail(f"{getattr(read, '__qualname__', read)} read nothing within {timeout} s")
    return result[0]


def tiny_loss(hp=TINY, vocab_size: int = 88, ahead_loss: float = 0.0,
              compute_dtype: str = "float32"):
    """objectives.loss_fn of a tiny model: the function train.py transforms and steps."""
    import objectives

    return objectives.loss_fn(hp, vocab_size, objectives.Weights(ahead_loss), compute_dtype)


def make_optimizer(config, loss=None, hidden=None):
    """optimizer.make_optimizer for `loss`'s params (tiny_loss() by default), or for the
    given {module: {name: is a hidden matrix}}."""
    import jax.numpy as jnp

    import optimizer

    if hidden is None:
        dummy = jnp.zeros((1, 4), jnp.int32)
        hidden = optimizer.hidden_matrices(loss or tiny_loss(), dummy, dummy)
    return optimizer.make_optimizer(config, hidden)
