"""Data parallelism: 4 (forced CPU) devices train exactly like 1, with the batch split; a CPU
host split into a device per core."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import ROOT, environment, run_command, run_script

SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path[:0] = [".", "tests"]
from conftest import TINY, tiny_config
import checkpoint, data, sampling, train, transformer
from jax.sharding import NamedSharding, PartitionSpec as P

out_dir = sys.argv[1]
# float32 matmuls: bfloat16 rounds each device's partial gradients before they are summed,
# so its result depends on the split by more than this test's tolerance.
config = tiny_config(out_dir, max_iters=20, eval_interval=10, batch_size=8, log_interval=1,
                     compute_dtype="float32", eval_chars=8192)  # a sample: one batch
text = data.read_text(config.source_file)
vocab = data.build_vocab(text)
mesh = train.make_mesh()
split = NamedSharding(mesh, P("data"))
inputs, _ = jax.jit(lambda k, ids: jax.lax.with_sharding_constraint(
    data.window_batch(ids, data.sample_starts(k, len(ids), 8, TINY.max_seq_len),
                      TINY.max_seq_len), split))(
    jax.random.PRNGKey(0), np.arange(1000, dtype=np.int32))
# The compiled step that train() runs, as text: its first call lowers it once more.
compiled = []
make_train_step = train.make_train_step
def spy(*args):
    step = make_train_step(*args)
    def first_lowered(state, *arrays):
        if not compiled:
            compiled.append(step.lower(state, *arrays).compile().as_text())
        return step(state, *arrays)
    return first_lowered
train.make_train_step = spy
meta = train.train(config, TINY)
params = checkpoint.load(train.params_paths(config.params_dir, meta["run_hash"])[0])
text = sampling.Sampler(params.hparams, len(params.vocab)).sample(
    params.params, data.encode("\n", params.vocab), jax.random.PRNGKey(0), 20)
print(json.dumps({
    "devices": jax.device_count(),
    "shard_shapes": [list(s.data.shape) for s in inputs.addressable_shards],
    "val_loss": meta["history"]["val_loss"], "train_loss": meta["history"]["train_loss"],
    "leaves": [float(np.abs(x).sum()) for x in jax.tree.leaves(params.params)],
    "sample_len": int(text.shape[1]),
    "all_reduces": compiled[0].count(" all-reduce(")}))
"""


def run_on(devices: int, tmp_path) -> dict:
    env = environment(devices)
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
    # Each device computes its share of the batch, so the gradients (and the loss) are summed
    # across devices in the step; if every device computed the whole batch, nothing would be.
    assert four["all_reduces"] >= 1 and one["all_reduces"] == 0


def test_batch_not_divisible_by_devices_is_a_clear_error():
    env = environment(4)
    result = run_script("train.py", "--batch_size=6", "--aim=False", env=env)
    assert result.returncode == 2
    assert "--batch_size=6 is not divisible by the 4 devices" in result.stderr
    assert "Traceback" not in result.stderr


def _eval_lines(stdout: str) -> list[tuple[int, float, float]]:
    """(step, train, val) of each `step N | train X | val Y | ...` line."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("step "):
            fields = line.split(" | ")
            rows.append((int(fields[0].split()[1]), float(fields[1].split()[1]),
                         float(fields[2].split()[1])))
    return rows


def test_two_processes_with_jax_distributed_train_like_one(tmp_path, capsys):
    """Two localhost processes (one CPU device each, gloo collectives) split each batch,
    and train as one process on one device (this one: conftest.run_command)."""
    import socket

    from conftest import CORPUS, TINY

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # float32, as above: in bfloat16 the split changes the rounding by more than 2e-4.
    common = ["train.py", f"--source_file={CORPUS}", "--aim=False", "--max_iters=20",
              "--eval_interval=10", "--batch_size=8", "--eval_batch_size=512",
              "--sample_chars=0", "--compute_dtype=float32", "--eval_chars=8192",
              *(f"--{k}={v}" for k, v in TINY._asdict().items())]
    status, single, err = run_command(capsys, *common, f"--params_dir={tmp_path / 'single'}")
    assert status == 0, err[-2000:]
    multi_dir = tmp_path / "multi"
    # Each child writes to files, not pipes: read one after the other, a pipe could fill up
    # and block its child in a collective that the other child waits for.
    logs = [(open(multi_dir.with_suffix(f".{i}.out"), "w+"),
             open(multi_dir.with_suffix(f".{i}.err"), "w+")) for i in range(2)]
    processes = [subprocess.Popen(
        [sys.executable, *common, f"--params_dir={multi_dir}", "--distributed=True",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={i}"], cwd=ROOT, stdout=out, stderr=err, text=True)
        for i, (out, err) in enumerate(logs)]
    try:
        for p in processes:
            p.wait(timeout=400)
    finally:
        for p in processes:
            p.kill()
    outputs = []
    for out, err in logs:
        out.seek(0), err.seek(0)
        outputs.append((out.read(), err.read()))
        out.close(), err.close()
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-2000:]
    expected = _eval_lines(single)
    assert [row[0] for row in expected] == [10, 20]
    got = _eval_lines(outputs[0][0])
    assert [row[0] for row in got] == [10, 20]
    np.testing.assert_allclose(np.array(got)[:, 1:], np.array(expected)[:, 1:], atol=2e-4)
    assert _eval_lines(outputs[1][0]) == []  # process 1 does not log
    # Only process 0 writes: one run's two params files and its plot (process 1's run hash
    # differs, so any file of its own would show up here).
    assert sorted(p.suffix for p in multi_dir.iterdir()) == [".pkl", ".pkl", ".png"]


def _devices(stderr: str) -> int:
    """How many devices train.py's `devices: [...]` line names."""
    return next(line for line in stderr.splitlines()
                if line.startswith("devices: ")).count("Device(")


PICKS = r"""
import json, sys
import train, train_step
train_step.split_cpu_cores()  # as train.py does before JAX starts
picks = [len(train_step.mesh_devices(train.CONFIG._replace(**changes)))
         for changes in json.loads(sys.argv[1])]
print(json.dumps(picks))
"""


def test_one_cpu_host_splits_an_adamw_batch_over_its_cores(tmp_path):
    """Without XLA_FLAGS train.py makes a device per core: an AdamW run splits its batch over
    as many as divide it and the evaluation's batch (an odd one: a single device), a Muon
    run keeps one, --cpu_devices picks, and too many exit 2. The picks in one process, as
    train.py makes them; a run of train.py splits its batch as picked, and so does its
    resumption."""
    from conftest import CORPUS, TINY

    cores = len(os.sched_getaffinity(0))
    env = environment()
    per_core = max(n for n in (1, 2, 4, 8) if n <= cores)  # as many as divide the batches
    cases = [({"optimizer": "adamw"}, per_core), ({"optimizer": "muon"}, 1),
             ({"optimizer": "adamw", "cpu_devices": 1}, 1),
             ({"optimizer": "adamw", "eval_batch_size": 3}, 1)]
    base = {"batch_size": 8, "eval_batch_size": 512}
    result = subprocess.run([sys.executable, "-c", PICKS,
                             json.dumps([{**base, **changes} for changes, _ in cases])],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == [expected for _, expected in cases]
    common = ["train.py", f"--source_file={CORPUS}", "--aim=False", "--max_iters=2",
              "--eval_interval=2", "--batch_size=8", "--eval_batch_size=512",
              "--eval_chars=8192", "--sample_chars=0", f"--params_dir={tmp_path}",
              *(f"--{k}={v}" for k, v in TINY._asdict().items())]
    result = run_script(*common, "--optimizer=adamw", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _devices(result.stderr) == per_core
    # Resumed, the run picks by its saved config (AdamW), not by train.py's CONFIG (Muon).
    (latest,) = [p for p in tmp_path.glob("*.pkl") if not p.name.endswith(".min_val.pkl")]
    result = run_script("train.py", f"--resume={latest}", "--aim=False", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _devices(result.stderr) == per_core
    result = run_script(*common, f"--cpu_devices={cores + 1}", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--cpu_devices={cores + 1}: must be from 0 (pick) to this host's" in result.stderr
