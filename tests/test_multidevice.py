"""Data parallelism: 4 (forced CPU) devices train exactly like 1, with the batch split."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_script

SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path[:0] = [".", "tests"]
from conftest import TINY, tiny_config
import checkpoint, data, generate, train, transformer
from jax.sharding import NamedSharding, PartitionSpec as P

out_dir = sys.argv[1]
config = tiny_config(out_dir, max_iters=20, eval_interval=10, batch_size=8, log_interval=1)
text = data.load_corpus(config.source_file)
vocab = data.build_vocab(text)
model = transformer.build(TINY, len(vocab))
optimizer = train.make_optimizer(config)
mesh = train.make_mesh()
split = NamedSharding(mesh, P("data"))
inputs, _ = jax.jit(lambda k, ids: jax.lax.with_sharding_constraint(
    data.sample_batch(k, ids, 8, TINY.max_seq_len), split))(
    jax.random.PRNGKey(0), np.arange(1000, dtype=np.int32))
meta = train.train(config, TINY)
params = checkpoint.load(train.params_paths(config.params_dir, meta["run_hash"])[0])
text = generate.Sampler(params.hparams, len(params.vocab)).sample(
    params.params, data.encode("\n", params.vocab), jax.random.PRNGKey(0), 20)
print(json.dumps({
    "devices": jax.device_count(),
    "shard_shapes": [list(s.data.shape) for s in inputs.addressable_shards],
    "val_loss": meta["history"]["val_loss"], "train_loss": meta["history"]["train_loss"],
    "leaves": [float(np.abs(x).sum()) for x in jax.tree.leaves(params.params)],
    "sample_len": int(text.shape[1])}))
"""


def run_on(devices: int, tmp_path) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out_dir = tmp_path / f"devices{devices}"
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(out_dir)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_four_devices_train_like_one(tmp_path):
    one, four = run_on(1, tmp_path), run_on(4, tmp_path)
    assert (one["devices"], four["devices"]) == (1, 4)
    assert four["shard_shapes"] == [[2, 16]] * 4  # batch 8 split 4 ways
    assert one["shard_shapes"] == [[8, 16]]
    np.testing.assert_allclose(four["val_loss"], one["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(four["train_loss"], one["train_loss"], rtol=1e-5)
    # Key biases get a gradient of pure rounding noise (softmax ignores a constant shift of
    # the scores), which Adam scales up to full steps: compare them absolutely.
    np.testing.assert_allclose(four["leaves"], one["leaves"], rtol=1e-5, atol=2e-3)
    assert four["sample_len"] == 20


def test_batch_not_divisible_by_devices_is_a_clear_error():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = run_script("train.py", "--batch_size=6", "--aim=False", env=env)
    assert result.returncode == 2
    assert "--batch_size=6 is not divisible by the 4 devices" in result.stderr
    assert "Traceback" not in result.stderr
