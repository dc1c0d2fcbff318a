"""visualize.py: its per-character losses are eval.py's, its attention maps are softmax rows
within the window, and its page shows the text and the hovered character's successors in a
real browser (headless Chromium, as tests/test_aim_ui.py)."""

import json
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint
import data
import eval as evaluation
import transformer
import visualize
import metrics
import reader
from conftest import CORPUS, ROOT, TINY, run_command, run_script, tiny_config
from test_aim_ui import BROWSER_DIR, missing_tools

STREAMING = TINY._replace(positions="rotary", attention_window=6)
SCREENSHOT_COPY = os.path.join(ROOT, ".pytest_cache", "visualize.png")


@pytest.fixture(scope="module")
def streaming_run(tmp_path_factory):
    """A brief run of a streaming tiny model (rotary, window 6): its best params file."""
    import train

    tmp_dir = tmp_path_factory.mktemp("streaming_run")
    meta = train.train(tiny_config(tmp_dir, max_iters=40, eval_interval=40), STREAMING)
    return train.params_paths(str(tmp_dir / "params"), meta["run_hash"])[1]


def one_pass_loss(model, params, ids) -> float:
    """Mean nats of ids[1:], each predicted in one forward pass over all of ids."""
    logits = model.apply(params, None, jnp.asarray(ids)[None, :-1], False)[0]
    return float(-jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(ids) - 1), ids[1:]]))


def corpus_ids(ckpt, start=5000, num_chars=300):
    text = data.read_text(CORPUS)[start:start + num_chars]
    return text, data.encode(text, ckpt.vocab)


def test_streaming_losses_are_eval_stream_loss_and_window_losses_eval_val_loss(streaming_run):
    ckpt = checkpoint.load(streaming_run)
    _, ids = corpus_ids(ckpt)
    pred = visualize.predictions(ckpt, ids)
    assert np.isnan(pred.loss[0]) and not np.isnan(pred.loss[1:]).any()
    model = transformer.build(ckpt.hparams, len(ckpt.vocab))
    stream = one_pass_loss(model, ckpt.params, ids)
    np.testing.assert_allclose(pred.loss[1:].mean(), stream, rtol=1e-5)

    nll, weights = visualize.window_losses(ckpt, ids)
    windows = data.eval_windows(ids, min(metrics.EVAL_SEQ_LEN, ckpt.hparams.max_seq_len))
    val_loss = metrics.mean_loss(metrics.make_window_loss(model), ckpt.params,
                                    data.batch_windows(windows, 32))
    np.testing.assert_allclose(nll.sum() / weights.sum(), val_loss, rtol=1e-5)
    # Each window's first position is predicted from one character: as the model alone says.
    first = np.asarray(model.apply(ckpt.params, None, windows.inputs[:, :1], False))[:, 0]
    first = -jax.nn.log_softmax(first)[np.arange(len(first)), windows.targets[:, 0]]
    np.testing.assert_allclose(nll[:, 0], first, rtol=1e-5)


def test_windowed_model_losses_are_eval_losses_of_the_sampler_window(tiny_run):
    """A model with learned positions reads the last max_seq_len characters: character i's
    loss is eval.py's loss on the window that ends just before it, that position alone."""
    ckpt = checkpoint.load(tiny_run["best"])
    S = ckpt.hparams.max_seq_len
    _, ids = corpus_ids(ckpt, num_chars=3 * S + 5)
    pred = visualize.predictions(ckpt, ids)
    window_loss = metrics.make_window_loss(transformer.build(ckpt.hparams, len(ckpt.vocab)))
    for i in (1, S - 1, S, S + 1, 2 * S + 7, len(ids) - 1):
        begin = max(0, i - S)
        inputs, targets = ids[begin:i], ids[begin + 1:i + 1]
        weights = np.zeros(len(inputs), np.float32)
        weights[-1] = 1.0  # only character i counts
        one = data.batch_windows(data.Windows(inputs[None], targets[None], weights[None]), 1)
        np.testing.assert_allclose(pred.loss[i], metrics.mean_loss(
            window_loss, ckpt.params, one), rtol=1e-5, err_msg=f"character {i}")
    logits = reader.next_logits(ckpt.hparams, len(ckpt.vocab), ckpt.params, ids)
    probs = np.asarray(jax.nn.softmax(logits))
    np.testing.assert_allclose(pred.top_probs, -np.sort(-probs)[:, :visualize.TOP], rtol=1e-5)


@pytest.mark.parametrize("span", [(0, 5), (3, 20), (25, 40)])
def test_attention_rows_sum_to_one_and_are_zero_outside_the_window(streaming_run, span):
    ckpt = checkpoint.load(streaming_run)
    _, ids = corpus_ids(ckpt, num_chars=60)
    maps = visualize.attention_maps(ckpt, ids, span)
    hp = ckpt.hparams
    assert sorted(maps) == [f"decoder_{i}/self_attention" for i in range(hp.decoder_N)]
    queries = np.arange(*span)[:, None]                       # [L, 1] absolute positions
    keys = np.arange(span[1])[None, :]                        # [1, S]
    seen = (keys <= queries) & (keys > queries - hp.attention_window)
    for name, weights in maps.items():
        assert weights.shape == (hp.h, span[1] - span[0], span[1]), name
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5, err_msg=name)
        assert np.all(weights[:, ~seen] == 0), name
        assert np.all(weights[:, seen] > 0), name


def test_attention_maps_are_the_weights_the_model_attends_with(streaming_run):
    """Weighing the intercepted values by the maps gives the attention output the model
    computes: the maps are the model's own weights, not a copy's."""
    import haiku as hk

    ckpt = checkpoint.load(streaming_run)
    _, ids = corpus_ids(ckpt, num_chars=20)
    maps = visualize.attention_maps(ckpt, ids, (0, len(ids)))
    hp = ckpt.hparams

    def forward(tokens):
        seen = {}

        def record(next_method, args, kwargs, context):
            out = next_method(*args, **kwargs)
            if context.method_name in ("project", "__call__") and isinstance(
                    context.module, transformer.Attention):
                seen.setdefault(context.module.module_name, {})[context.method_name] = out
            return out

        with hk.intercept_methods(record):
            transformer.forward_fn(hp, len(ckpt.vocab))(tokens, False)
        return seen

    seen = hk.transform(forward).apply(ckpt.params, None, jnp.asarray(ids)[None])
    for name, calls in seen.items():
        values = calls["project"][2]                                      # [1, S, H, K]
        attended = np.einsum("hts,shk->thk", maps[name.removeprefix("transformer/")],
                             np.asarray(values[0]))                      # [T, H, K]
        w = ckpt.params[f"{name}/out"]
        projected = attended.reshape(len(ids), -1) @ w["w"] + w["b"]
        np.testing.assert_allclose(projected, np.asarray(calls["__call__"][0][0]), atol=2e-5,
                                   err_msg=name)


def test_script_writes_page_png_and_json_and_the_browser_shows_them(streaming_run, tmp_path):
    out, png, js = (str(tmp_path / n) for n in ("page.html", "attention.png", "chars.json"))
    text = data.read_text(CORPUS)[20000:20400]
    text_file = tmp_path / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    result = run_script("visualize.py", f"--params={streaming_run}", f"--text_file={text_file}",
                        f"--out={out}", f"--attention_png={png}", f"--json={js}",
                        "--attention_chars=30")
    assert result.returncode == 0, result.stderr
    records = json.load(open(js, encoding="utf-8"))
    assert "".join(r["char"] for r in records["chars"]) == text
    assert records["chars"][0]["loss"] is None
    assert all(len(r["next"]) == visualize.TOP for r in records["chars"])
    ckpt = checkpoint.load(streaming_run)
    model = transformer.build(ckpt.hparams, len(ckpt.vocab))
    stream = one_pass_loss(model, ckpt.params, data.encode(text, ckpt.vocab))
    assert float(result.stdout.split("mean_loss: ")[1].split()[0]) == pytest.approx(stream,
                                                                                   abs=1e-4)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    page = open(out, encoding="utf-8").read()
    assert "http://" not in page and "https://" not in page  # self-contained

    reason = missing_tools()
    if reason and os.environ.get("CI") == "true":  # .ci/run installs both: a skip hides a bug
        pytest.fail(f"CI=true, but the browser test cannot run: {reason}")
    if reason:
        pytest.skip(f"browser check needs chromium and playwright-core: {reason}")
    screenshot = str(tmp_path / "visualize.png")
    browser = subprocess.run(
        ["node", os.path.join(BROWSER_DIR, "visualize.js"), out, str(text_file), "57",
         screenshot], cwd=BROWSER_DIR, capture_output=True, text=True, timeout=150)
    if os.path.exists(screenshot):
        os.makedirs(os.path.dirname(SCREENSHOT_COPY), exist_ok=True)
        shutil.copyfile(screenshot, SCREENSHOT_COPY)
    assert browser.returncode == 0, browser.stdout + browser.stderr
    # The five it lists are the JSON's successors of the hovered character, in order.
    shown = json.loads(browser.stdout.split("hover lists ")[1].split("; ")[0])
    assert [s.split(" ")[0] for s in shown] == [
        {" ": "\u2423", "\n": "\u21b5"}.get(c, c) for c, _ in records["chars"][57]["next"]]


@pytest.mark.parametrize("args, message", [
    (["--num_chars=1"], "--num_chars=1"),
    (["--context=ab", "--text_file=eval_context.txt"], "not both"),
    (["--context=\u4e2d\u6587"], "the text to show"),
    (["--attention_chars=0"], "--attention_chars=0"),
    (["--params=nowhere.pkl"], "nowhere.pkl"),
    (["--text_file=nowhere.txt"], "nowhere.txt"),
])
def test_bad_input_exits_2_and_writes_nothing(streaming_run, tmp_path, args, message,
                                              capsys):
    """In this process (conftest.run_command); visualize.py as a command: the page test."""
    out, png = str(tmp_path / "page.html"), str(tmp_path / "attention.png")
    params = [] if any(a.startswith("--params") for a in args) else [f"--params={streaming_run}"]
    status, _, err = run_command(capsys, "visualize.py", *params, *args, f"--out={out}",
                                 f"--attention_png={png}")
    assert status == 2 and message in err, err
    assert os.listdir(tmp_path) == []


def test_default_text_is_the_validation_split_else_the_sample_context(streaming_run, capsys):
    """By default the page shows the validation split of the text the model was trained on,
    from its first whole line; where that file is missing (a fresh clone before `make
    data`), eval_context.txt, saying so."""
    ckpt = checkpoint.load(streaming_run)
    config = visualize.Config(params=streaming_run, num_chars=200)
    text = data.read_text(CORPUS)
    val = text[len(data.split(np.arange(len(text)))[0]):]
    shown = visualize.read_shown_text(ckpt, config)
    assert shown == val[val.index("\n") + 1:][:200]
    moved = ckpt._replace(meta={**ckpt.meta, "config": {"source_file": "/nowhere/text.txt"}})
    assert visualize.read_shown_text(moved, config) == data.read_text(
        os.path.join(ROOT, "eval_context.txt"))
    assert "/nowhere/text.txt is missing" in capsys.readouterr().err


KIND_OF = {"\n": "newline", " ": "space",
           **{c: "lower-case letters" for c in "abcdefghijlmnopqrstuvxyz"},
           **{c: "capitals" for c in "ABCDEFGHIJLMNOPQRSTUVXYZ"},
           **{c: "accented letters" for c in "ñÁóéÑáíú"},
           **{c: "digits" for c in "0123456789"},
           **{c: "punctuation" for c in ":;,.!¡?¿()-"}}


def test_every_figure_on_the_page_and_in_the_json_equals_a_computation_from_the_logits(
        tiny_run, tmp_path):
    """On a text of every kind of character, several 16-character windows long, each figure
    visualize.py writes is recomputed here from the model's own forward pass: each
    character's loss (nats) and probability, its five likeliest successors, each table row's
    count and mean, and the headline means in nats and bits."""
    text = "Dijo el 3 de mayo: ¡Señor Ánsar, ven!\nY ella, ñoña, rió 4 veces; é.\nFin 12."
    ckpt = checkpoint.load(tiny_run["best"])
    ids, S = data.encode(text, ckpt.vocab), ckpt.hparams.max_seq_len
    assert len(text) > 4 * S
    apply = jax.jit(transformer.build(ckpt.hparams, len(ckpt.vocab)).apply, static_argnums=3)
    # What the sampler shows the model before character i + 1: the last S characters.
    log_probs = np.stack([np.asarray(jax.nn.log_softmax(apply(
        ckpt.params, None, jnp.asarray(ids[max(0, i + 1 - S): i + 1])[None], False)[0, -1]))
        for i in range(len(ids))])                                            # [N, V]
    loss = np.array([-log_probs[i - 1, ids[i]] for i in range(1, len(ids))])  # of char i
    out, js = str(tmp_path / "page.html"), str(tmp_path / "chars.json")
    stats = visualize.visualize(visualize.CONFIG._replace(
        params=tiny_run["best"], context=text, out=out, json=js,
        attention_png=str(tmp_path / "a.png")))
    page = json.load(open(js, encoding="utf-8"))
    records = page["chars"]
    assert records[0]["loss"] is None
    np.testing.assert_allclose([r["loss"] for r in records[1:]], loss, atol=1e-4)
    for i, r in enumerate(records):
        order = np.argsort(-log_probs[i], kind="stable")[:visualize.TOP]
        assert [c for c, _ in r["next"]] == [ckpt.vocab[j] for j in order], i
        np.testing.assert_allclose([p for _, p in r["next"]], np.exp(log_probs[i][order]),
                                   atol=1e-4)
    assert stats["mean_loss"] == pytest.approx(loss.mean(), rel=1e-5)
    assert stats["bits_per_char"] == pytest.approx(loss.mean() / np.log(2), rel=1e-5)
    html = open(out, encoding="utf-8").read()
    assert (f"Mean loss {loss.mean():.4f} nats per character "
            f"({loss.mean() / np.log(2):.3f} bits)") in html
    # Loss by kind of character, each row from the characters of that kind.
    kinds = [KIND_OF[c] for c in text[1:]]
    assert len(stats["by_kind"]) == len(set(kinds)) == 7
    for name, row in stats["by_kind"].items():
        picked = loss[[k == name for k in kinds]]
        assert row["chars"] == len(picked)
        assert row["loss"] == pytest.approx(picked.mean(), rel=1e-5)
        assert f"<td>{name}</td><td>{len(picked)}</td><td>{picked.mean():.3f}</td>" in html
    # Loss by position in eval.py's non-overlapping windows (here the model's 16).
    T = min(metrics.EVAL_SEQ_LEN, S)
    position_nll = [[] for _ in range(T)]
    for begin in range(0, len(ids) - 1, T):
        inputs, targets = ids[begin: begin + T], ids[begin + 1: begin + T + 1]
        window = np.asarray(jax.nn.log_softmax(apply(ckpt.params, None,
                                                     jnp.asarray(inputs)[None], False)[0]))
        for p, target in enumerate(targets):
            position_nll[p].append(-window[p, target])
    rows = {tuple(row["positions"]): row for row in stats["by_position"]}
    for lo, hi in [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16)]:
        values = sum(position_nll[lo:hi], [])
        row = rows[(lo, hi - 1)]
        assert row["chars"] == len(values)
        assert row["loss"] == pytest.approx(np.mean(values), rel=1e-5)
        label = f"{lo}" if lo == hi - 1 else f"{lo}-{hi - 1}"
        assert f"<td>{label}</td><td>{len(values)}</td><td>{np.mean(values):.3f}</td>" in html
    assert stats["window_loss"] == pytest.approx(np.mean(sum(position_nll, [])), rel=1e-5)
