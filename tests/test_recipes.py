"""What a user edits is what runs: `python train.py` trains CONFIG (train.py) and HPARAMS
(transformer.py) as written; a named recipe (recipes.py: --preset, --minutes' choice)
applies only when asked, and prints each field it replaces."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

import checkpoint
import model_checks
import recipes
import train
import transformer
from conftest import CORPUS, ROOT, TINY, tiny_config

# Fields not edited in the run below, each because it changes what the command does rather
# than what it trains (tested where that is tested): a budget, a file to resume, teach or
# plot, several hosts, a recipe.
NOT_EDITED = {"minutes", "resume", "teachers", "plot_only", "distributed", "preset"}


def edits(tmp_path) -> tuple[dict, dict]:
    """A value for each field of CONFIG and HPARAMS, each different from the one written:
    a run of seconds."""
    config = dict(
        batch_size=4, max_iters=4, learning_rate=2e-3, warmup_iters=2, schedule="cosine",
        decay_fraction=0.5, min_lr_ratio=0.2, optimizer="adamw", muon_learning_rate=0.03,
        muon_ns_steps=3, weight_decay=0.05, weight_decay_final=0.02, beta2=0.95, grad_clip=0.5,
        ahead_loss=0.2, ema_decay=0.9, batches="random", distill_weight=0.25,
        compute_dtype="float32", prng_seed=7, source_file=CORPUS, min_char_count=2,
        eval_interval=2, eval_batch_size=8, eval_chars=2000, cpu_devices=1, log_interval=2,
        params_dir=str(tmp_path / "params"), aim=False, aim_repo=str(tmp_path),
        sample_chars=0, coordinator_address="localhost:1", num_processes=3, process_id=1)
    hparams = dict(
        max_seq_len=12, d_model=24, h=2, d_ff=40, decoder_N=2, encoder_N=2, use_encoder=True,
        dropout=0.05, activation="relu2", positions="sinusoidal", attention_window=8,
        stochastic_depth=0.1, attention_gate=True, value_embeddings=True,
        unet=True)
    assert set(config) == set(train.Config._fields) - NOT_EDITED
    assert set(hparams) == set(transformer.HParams._fields)
    for written, edited in ((train.CONFIG, config), (transformer.HPARAMS, hparams)):
        assert all(getattr(written, name) != value for name, value in edited.items())
    return config, hparams


def edit_source(path: str, cls: str, values: dict) -> None:
    """Rewrites the default of each field of class `cls` in the file, as a user would."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    start = source.index(f"class {cls}(NamedTuple):")
    head, body = source[:start], source[start:]
    for name, value in values.items():
        body, count = re.subn(rf"^(    {name}: [^=\n]+= )([^#\n]+?)(\s*#.*)?$",
                              lambda m: f"{m[1]}{value!r}{m[3] or ''}", body, count=1,
                              flags=re.M)
        assert count == 1, name
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + body)


def printed(stderr: str, block: str) -> dict:
    """{field: its repr} from train.py's printed `config:` or `hparams:` block."""
    fields = {}
    for line in stderr.split(f"\n{block}:\n", 1)[1].splitlines():
        if not line.startswith("  "):
            break
        name, value = line[2:].split(" = ", 1)
        fields[name] = value
    return fields


def test_python_train_py_trains_config_and_hparams_as_edited(tmp_path):
    """A copy of the scripts with every field of CONFIG and HPARAMS edited in the source;
    `python train.py` with no options prints and trains each edit, and saves it in the
    params file (as the run's config and the model's HPARAMS)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for script in glob.glob(os.path.join(ROOT, "*.py")):
        shutil.copy(script, repo)
    config, hparams = edits(tmp_path)
    edit_source(repo / "train.py", "Config", config)
    edit_source(repo / "transformer.py", "HParams", hparams)
    result = subprocess.run([sys.executable, "train.py"], cwd=repo, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "preset: none (CONFIG in train.py and HPARAMS in transformer.py as written)" in (
        result.stderr)
    shown = printed(result.stderr, "config")
    assert {name: shown[name] for name in config} == {k: repr(v) for k, v in config.items()}
    shown = printed(result.stderr, "hparams")
    assert shown == {k: repr(v) for k, v in hparams.items()}
    (best,) = glob.glob(os.path.join(config["params_dir"], "*.min_val.pkl"))
    ckpt = checkpoint.load(best)
    assert {name: ckpt.meta["config"][name] for name in config} == config
    assert ckpt.hparams == transformer.HParams(**hparams)
    assert ckpt.meta["step"] == config["max_iters"]


@pytest.mark.parametrize("argv, recipe", [
    (["--preset=original"], recipes.PRESETS["original"]),
    (["--preset=cpu", "--d_model=48"], recipes.PRESETS["cpu"]),
    (["--preset=shakespeare", "--max_iters=3"], recipes.PRESETS["shakespeare"]),
    (["--preset=gpu"], recipes.PRESETS["gpu"]),
    (["--minutes=3", "--batch_size=8"], recipes.BUDGETS[2].recipe),
    (["--minutes=60"], recipes.BUDGETS[60].recipe),
])
def test_a_recipe_prints_exactly_the_fields_it_replaces(monkeypatch, capsys, tmp_path, argv,
                                                        recipe):
    """With CONFIG and HPARAMS edited, a named recipe's first lines list each field it sets
    to another value than the edited one (`name old -> new`), and no other; options on the
    command line win over both, and the run trains the result."""
    config, hparams = edits(tmp_path)
    edited = (train.CONFIG._replace(**config), transformer.HPARAMS._replace(**hparams))
    monkeypatch.setattr(train, "CONFIG", edited[0])
    monkeypatch.setattr(transformer, "HPARAMS", edited[1])
    ran = []
    monkeypatch.setattr(train, "train", lambda config, hparams, started: ran.append(
        (config, hparams)) or {"min_val_loss": 1.0, "min_val_step": 0})
    assert train.main(argv) == 0
    stderr = capsys.readouterr().err
    given = {arg[2:].split("=")[0] for arg in argv}
    expected = {f"{name} {getattr(written, name)!r} -> {value!r}"
                for settings, written in zip(recipe, edited)
                for name, value in settings.items()
                if getattr(written, name) != value and name not in given}
    header = stderr.split("\nit replaces, of CONFIG and HPARAMS as written:\n", 1)[1]
    listed = set(header.split("\nconfig:\n")[0].strip("\n").split("\n  "))
    assert {line.strip() for line in listed} == expected
    (trained,) = ran
    options = dict(arg[2:].split("=") for arg in argv)
    want = recipes.apply(recipe, *edited)[:2]
    for settings, got in zip(want, trained):
        for name in got._fields:
            if name not in ("preset", "minutes") and name not in options:
                assert getattr(got, name) == getattr(settings, name), name
    assert trained[1].d_model == int(options.get("d_model", want[1].d_model))


def test_on_a_gpu_the_first_lines_name_the_gpu_recipe(monkeypatch):
    monkeypatch.setattr(train.jax, "default_backend", lambda: "gpu")
    hint = train.gpu_hint(train.CONFIG)
    assert hint.startswith("on gpu: --preset=gpu trains the GPU-sized recipe (6 x 384 model")
    assert train.gpu_hint(train.CONFIG._replace(preset="original")) == ""
    monkeypatch.setattr(train.jax, "default_backend", lambda: "cpu")
    assert train.gpu_hint(train.CONFIG) == ""


def test_config_and_hparams_as_written_are_the_shipped_cervantes_recipe():
    """`python train.py` reproduces the run of the shipped Cervantes params: its saved config
    and HPARAMS, apart from the preset's name, and fields added since (at values that train
    the same: every validation character, Muon's one device, no budget, optax's five
    Newton-Schulz iterations)."""
    ckpt = checkpoint.load(checkpoint.DEFAULT_PARAMS)
    config, hparams, said = recipes.resolve([], train.CONFIG, transformer.HPARAMS)
    assert said.startswith("preset: none")
    assert hparams == ckpt.hparams
    saved = {k: v for k, v in ckpt.meta["config"].items() if k != "preset"}
    assert {k: v for k, v in config._asdict().items() if k in saved} == saved
    assert set(config._fields) - set(saved) == {"preset", "minutes", "min_char_count",
                                                "eval_chars", "cpu_devices", "muon_ns_steps"}
    assert train.Config(**recipes.CPU.config) == train.CONFIG
    assert transformer.HParams(**recipes.CPU.hparams) == transformer.HPARAMS


def test_every_recipe_sets_every_field_the_original_sets():
    """A recipe sets all of a run's training fields, so that it trains the same whatever
    CONFIG and HPARAMS say; ORIGINAL names every HPARAMS field (files that lack one)."""
    assert set(recipes.ORIGINAL.hparams) == set(transformer.HParams._fields)
    assert set(recipes.ORIGINAL.config) <= set(train.Config._fields)
    for name, recipe in recipes.PRESETS.items():
        assert set(recipe.config) >= set(recipes.ORIGINAL.config), name
        assert set(recipe.hparams) == set(recipes.ORIGINAL.hparams), name
        config, hparams, _ = recipes.resolve([f"--preset={name}"], train.CONFIG,
                                             transformer.HPARAMS)
        recipes.check_config(config)
        model_checks.validate(hparams)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(recipes.UserError, match="--preset=fast: unknown preset. Valid presets: "
                                                "none, original, cpu, shakespeare, gpu."):
        recipes.resolve(["--preset=fast"], train.CONFIG, transformer.HPARAMS)


def test_a_resumed_run_lacking_a_field_reads_the_value_it_was_trained_with(tmp_path):
    """A training-state file from before a config field existed resumes with the field's
    original value (every field was added switched off), not today's CONFIG."""
    config = tiny_config(tmp_path, max_iters=1, eval_interval=1)
    meta = train.train(config, TINY)
    latest = train.params_paths(config.params_dir, meta["run_hash"])[0]
    ckpt = checkpoint.load(latest)
    old = {k: v for k, v in ckpt.meta["config"].items()
           if k not in ("optimizer", "ahead_loss", "ema_decay", "batches", "schedule")}
    checkpoint.save(latest, params=ckpt.params, hparams=ckpt.hparams, vocab=ckpt.vocab,
                    meta=ckpt.meta | {"config": old}, opt_state=ckpt.opt_state, rng=ckpt.rng)
    resumed, hparams, _ = recipes.resolve([f"--resume={latest}"], train.CONFIG,
                                          transformer.HPARAMS)
    assert train.CONFIG.optimizer == "muon" and train.CONFIG.ahead_loss > 0
    assert (resumed.optimizer, resumed.ahead_loss, resumed.ema_decay, resumed.batches,
            resumed.schedule) == ("adamw", 0.0, 0.0, "random", "cosine")
    assert hparams == TINY
