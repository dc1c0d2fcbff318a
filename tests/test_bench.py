"""bench.py end to end on a tiny model: every figure of its table is in its JSON, the
derived ones (tokens per step, FLOPs per token, MFU) equal hand counts, and bad options exit
2. (The timings themselves are measurements, not checked here: see docs/benchmarks.md.)"""

import json
import os
import sys

import pytest

import bench
import recipes
import train
import transformer
from conftest import TINY, environment, run_command, run_script

TINY_ARGS = [f"--{name}={value}" for name, value in TINY._asdict().items()]


FAKE_YARDSTICK = """import json, sys
with open(sys.argv[0] + ".calls", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
print("params: 1")
print("train_tok_s:", 100.0 if sys.argv[8] == "bf16" else 400.0)
"""


def test_bench_of_a_streaming_params_file_reports_every_figure(tmp_path, capsys):
    """One whole bench run (each section, as `python bench.py` runs them): every figure of
    its table in its JSON; the derived ones (tokens per step, FLOPs per token, MFU, the
    ratios to the yardstick) equal hand counts. --params takes the model's HPARAMS from the
    file; for a streaming model the bench times past-the-window sampling as cached steps,
    the prefill of contexts of each length, and generate.py end to end. --torch_python: the
    yardstick (here a stand-in that records its arguments) trains the bench's shape, batch
    and dropout in bf16 and f32; train_vs_torch = tokens/s over its bf16 tokens/s,
    train_vs_torch_f32 over its f32 ones."""
    import train
    from conftest import tiny_config

    hp = TINY._replace(positions="rotary", attention_window=8)
    meta = train.train(tiny_config(tmp_path, max_iters=5, eval_interval=5), hp)
    params = train.params_paths(str(tmp_path / "params"), meta["run_hash"])[1]
    script = tmp_path / "yardstick.py"
    script.write_text(FAKE_YARDSTICK)
    path = tmp_path / "bench.json"
    result = run_script("bench.py", f"--params={params}", "--batch_size=2", "--train_steps=1",
                        "--num_samples=2", "--compute_dtypes=float32", "--generate_chars=500",
                        "--prefill_lengths=300,100", "--prefill_chunk=64", f"--json={path}",
                        f"--torch_python={sys.executable}", f"--torch_script={script}",
                        "--torch_seconds=3")
    assert result.returncode == 0, result.stderr
    r = json.loads(path.read_text())
    for key in ("peak_f32_gflops", "peak_bf16_gflops", "copy_gb_per_s", "read_gb_per_s",
                "train_tokens_per_s", "train_mfu", "train_eval_s", "sample_cached_chars_per_s",
                "sample_batch_cached_chars_per_s", "sample_full_window_chars_per_s",
                "sample_full_forward_chars_per_s", "sample_fraction_of_bound",
                "ceilings_peak_rss_mb", "train_peak_rss_mb", "sample_peak_rss_mb",
                "generate_chars_per_s", "generate_short_peak_rss_mb",
                "generate_long_peak_rss_mb", "prefill_100_chars_per_s",
                "prefill_300_chars_per_s", "prefill_300_peak_rss_mb"):
        assert r[key] > 0, key
    assert r["train_compute_dtype"] == "float32"
    assert r["train_tokens_per_s"] == r["train_float32_tokens_per_s"]
    # The derived figures, by hand: 2 x 16 tokens a step; FLOPs of the corpus's 88 characters.
    assert r["train_tokens_per_s"] == pytest.approx(2 * hp.max_seq_len / r["train_step_s"])
    ahead = 6 * (hp.d_model * 88 + 88) if train.CONFIG.ahead_loss else 0  # second head
    assert r["flops_per_token"] == hand_flops_per_token(hp, 88) + ahead
    assert r["train_gflops"] == pytest.approx(r["train_tokens_per_s"] * r["flops_per_token"]
                                              / 1e9)
    assert r["train_mfu"] == pytest.approx(r["train_gflops"] / r["peak_f32_gflops"])
    assert r["sample_bandwidth_bound_chars_per_s"] == (
        r["copy_gb_per_s"] * 1e9 / r["weight_bytes"])
    assert r["prefill_chunk"] == 64
    assert (r["torch_bf16_tokens_per_s"], r["torch_f32_tokens_per_s"]) == (100.0, 400.0)
    assert r["train_vs_torch"] == r["train_tokens_per_s"] / 100.0
    assert r["train_vs_torch_f32"] == r["train_tokens_per_s"] / 400.0
    calls = [json.loads(line)
             for line in (tmp_path / "yardstick.py.calls").read_text().splitlines()]
    shape = ["2", "16", "2", "32", "4", "64", "3.0"]  # B T layers d_model heads d_ff seconds
    assert calls == [shape + ["bf16", "0.1"], shape + ["f32", "0.1"]]
    for line in ("sample, cached, 1 stream", "one evaluation (train.py's)",
                 "prefill, a context of 300 chars", "sample, past the window (cached)",
                 "d_model 32, 2 layers",  # the file's model, not the defaults
                 "generate.py, 500 chars", "train vs PyTorch bf16 / f32"):
        assert line in result.stdout, line


def test_bench_bad_options_exit_2(capsys):
    """Each in this process (conftest.run_command), the first as a command too."""
    bad = ((["--compute_dtypes=float16"], "--compute_dtypes"),
           (["--max_seq_len=1"], "--max_seq_len >= 2"),
           (["--d_model=30", "--h=4"], "divisible"),
           (["--preset=tpu"], "--preset=tpu: unknown preset"),
           (["--preset=cpu", "--minutes=2"], "--preset and --minutes both name a recipe"),
           (["--minutes=-1"], "--minutes=-1"),
           (["--minutes=inf"], "--minutes=inf: must be a positive number"),
           (["--optimizer=sgd"], "--optimizer='sgd'"),
           (["--prefill_lengths=10,0"], "--prefill_lengths"),
           (["--prefill_lengths=ten"], "--prefill_lengths"),
           (["--torch_python=/nonexistent/python"], "not an executable file"))
    for args, message in bad:
        status, _, err = run_command(capsys, "bench.py", *args)
        assert status == 2 and message in err, (args, err)
    result = run_script("bench.py", *bad[0][0])
    assert result.returncode == 2, result.stderr
    assert bad[0][1] in result.stderr and "Traceback" not in result.stderr


def test_bench_preset_takes_the_presets_model_and_batch(tmp_path):
    import train

    script = tmp_path / "yardstick.py"
    script.write_text(FAKE_YARDSTICK)
    result = run_script("bench.py", "--preset=cpu", "--section=torch",
                        f"--torch_python={sys.executable}", f"--torch_script={script}")
    assert result.returncode == 0, result.stderr
    recipe = recipes.PRESETS["cpu"]
    config, hp = train.CONFIG._replace(**recipe.config), transformer.HParams(**recipe.hparams)
    (call, _) = [json.loads(line)
                 for line in (tmp_path / "yardstick.py.calls").read_text().splitlines()]
    assert call[:6] == [str(x) for x in (config.batch_size, hp.max_seq_len, hp.decoder_N,
                                         hp.d_model, hp.h, hp.d_ff)]
    assert call[8] == str(hp.dropout)


@pytest.mark.parametrize("minutes", [2, 10, 90])
def test_bench_minutes_times_what_train_minutes_trains(minutes):
    """`--minutes=N` times the step of `train.py --minutes=N`: its budget's HPARAMS, batch
    size and optimizer settings, as recipes.resolve gives them, options still winning."""
    for argv in ([f"--minutes={minutes}"], [f"--minutes={minutes}", "--d_model=64"]):
        config, hp = bench.resolve(argv)
        trains, trains_hp, _ = recipes.resolve(argv, train.CONFIG, transformer.HPARAMS)
        assert hp == trains_hp
        timed = bench.train_config_of(config)
        assert timed._replace(minutes=minutes, preset=trains.preset) == trains


def test_bench_times_the_presets_optimizer_unless_told_another():
    """`--preset=original` times the training step that `train.py --preset=original` runs
    (AdamW) on train.py's devices (its batch split over a device per core), and without a
    preset train.py's CONFIG (Muon); --optimizer chooses."""
    import train

    env = environment()

    def timed(*args):
        result = run_script("bench.py", *args, *TINY_ARGS, "--batch_size=2", "--train_steps=1",
                            "--compute_dtypes=float32", "--section=train", env=env)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout.strip().splitlines()[-1])
        return out["train_optimizer"], out["train_devices"]

    per_core = min(len(os.sched_getaffinity(0)), 2)  # as many as divide the batch of 2
    assert recipes.PRESETS["original"].config["optimizer"] == "adamw" != train.CONFIG.optimizer
    assert timed("--preset=original") == ("adamw", per_core)
    # The others' optimizer, resolved as the section resolves it (Muon's single device:
    # test_multidevice.py).
    optimizer = lambda *args: bench.train_config_of(bench.resolve(args)[0]).optimizer
    assert optimizer() == train.CONFIG.optimizer
    assert optimizer("--preset=original", "--optimizer=muon") == "muon"


def hand_flops_per_token(hp: transformer.HParams, V: int) -> int:
    """6 x the parameters that matmuls use per token (not the embedding tables, which are
    gathered) + 12 x attention blocks x T x D (the scores and the weighted sum), counted from
    the layers one by one."""
    D, F, T = hp.d_model, hp.d_ff, hp.max_seq_len
    encoders = hp.encoder_N if hp.use_encoder else 0
    attention = 4 * (D * D + D)                      # q, k, v, out: weights and biases
    layer = attention + D * F + F + F * D + D + 4 * D  # + feed-forward + two LayerNorms
    cross = attention + 2 * D                        # decoder layers fed by the encoder
    matmul_params = (hp.decoder_N + encoders) * layer + encoders * cross + 2 * D + D * V + V
    return 6 * matmul_params + 12 * (hp.decoder_N + 2 * encoders) * T * D


@pytest.mark.parametrize("changes", [
    {}, {"positions": "sinusoidal"}, {"positions": "rotary", "attention_window": 8},
    {"use_encoder": True, "positions": "rotary"}], ids=["learned", "sinusoidal", "rotary",
                                                        "encoder"])
def test_flops_per_token_is_the_hand_count_for_each_kind_of_positions(changes):
    """No kind of positions adds matmul FLOPs: a learned table is gathered, not multiplied."""
    hp = TINY._replace(**changes)
    assert bench.flops_per_token(hp, 88) == hand_flops_per_token(hp, 88)
