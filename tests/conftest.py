"""Shared test setup: the project root on sys.path, a persistent XLA compilation cache.

Compiling dominates these tests on a CPU (seconds per jitted function), and many tests build
the same tiny model: the on-disk cache lets a shape compile once per machine, subprocesses
included (they inherit the environment variables set here).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

import transformer  # noqa: E402

CORPUS = os.path.join(ROOT, "novelas_ejemplares.txt")

# A model small enough that each test runs in seconds on a CPU.
TINY = transformer.HParams(max_seq_len=16, d_model=32, h=4, d_ff=64, decoder_N=2,
                           encoder_N=1, use_encoder=False, dropout=0.1)


@pytest.fixture
def tiny_hparams():
    return TINY
