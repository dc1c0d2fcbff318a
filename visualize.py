"""What the model predicts and where it looks: `python visualize.py [--field=value ...]`.

Writes a self-contained HTML page (inline CSS and JavaScript, no network): a text with each
character coloured by its surprisal, the model's loss on it in nats given everything before it
as its sampler would read it; hovering (or tapping) a character shows the five likeliest
characters to follow it. Above the text: the mean loss and bits per character, the loss by
kind of character, and the loss by position within eval.py's 128-character windows (why the
first characters of a window cost more, and so why val_loss is above val_loss_stream). Below
it: each attention block's weights, head by head, over a span of the text (also a PNG).
`--json=FILE` writes the per-character data for other tools.

The attention weights are read with Haiku's hk.intercept_methods from each attention block's
`project` (its queries and keys) and scored by the model's own transformer.attention_weights:
training and sampling run exactly as without this script.
"""

import base64
import html
import io
import json
import math
import os
import sys
import time
import unicodedata
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import PIL.Image

import checkpoint
import data
import encoding
import metrics
import position_encodings
import reader
import transformer
from common import UserError, atomic_write, parse_overrides, run_main

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


class Config(NamedTuple):
    params: str = checkpoint.DEFAULT_PARAMS  # params file to look into
    text_file: str | None = None      # text to show (UTF-8); None: the start of the
                                      # validation split of the text the model was trained on
    context: str | None = None        # the text inline, instead of text_file
    num_chars: int = 3000             # show the text's first num_chars characters
    attention_start: int = 0          # first character of the span the attention maps show
    attention_chars: int = 160        # characters in that span (queries and keys)
    out: str = "out/visualize.html"   # the page
    attention_png: str = "out/attention.png"  # the attention maps as one PNG grid
    json: str | None = None           # also write the per-character data here


CONFIG = Config()

TOP = 5  # likeliest successors shown per character
LINE_SLACK = 4096  # characters read past --num_chars of the split, to start at a whole line

# Kinds of character, the first that holds: loss by kind tells what the model finds hard.
KINDS = {
    "newline": lambda c: c == "\n",
    "space": lambda c: c == " ",
    "lower-case letters": lambda c: c.isascii() and c.islower(),
    "capitals": lambda c: c.isascii() and c.isupper(),
    "accented letters": lambda c: c.isalpha(),  # the non-ASCII ones: á, é, ñ, ç, ...
    "digits": lambda c: c.isdigit(),
    "punctuation": lambda c: unicodedata.category(c)[0] in "PS",
    "other": lambda c: True,
}
# Positions within a window, grouped so that each group holds enough characters to compare.
POSITION_GROUPS = [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 128)]


def kind(c: str) -> str:
    return next(name for name, holds in KINDS.items() if holds(c))


class Predictions(NamedTuple):
    loss: np.ndarray      # [N] float: nats of character i given those before it (0: nan)
    top_ids: np.ndarray   # [N, TOP] int: the likeliest characters to follow character i
    top_probs: np.ndarray  # [N, TOP] float: their probabilities


def predictions(ckpt: checkpoint.Checkpoint, ids: np.ndarray) -> Predictions:
    """Each character's loss given what its sampler would show the model (reader.py), and
    the likeliest characters to follow it."""
    logits = reader.next_logits(ckpt.hparams, len(ckpt.vocab), ckpt.params, ids)
    log_probs = jax.nn.log_softmax(jnp.asarray(logits))
    loss = -np.take_along_axis(np.asarray(log_probs[:-1]), ids[1:, None], axis=1)[:, 0]
    top_log_probs, top_ids = jax.lax.top_k(log_probs, TOP)
    return Predictions(np.concatenate([[np.nan], loss]), np.asarray(top_ids),
                       np.exp(np.asarray(top_log_probs)))


def window_losses(ckpt: checkpoint.Checkpoint, ids: np.ndarray,
                  batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(nats [NW, T], weights [NW, T]) of eval.py's non-overlapping windows over ids: each
    position's loss, the first character of each window predicted from one character."""
    seq_len = metrics.window_len(ckpt.hparams)
    windows = data.eval_windows(ids, seq_len)
    model = transformer.build(ckpt.hparams, len(ckpt.vocab))

    nll = jax.jit(lambda params, batches: jax.lax.map(          # [NB, B, T]
        lambda b: metrics.position_losses(model, params, b), batches))
    batches = data.batch_windows(windows, batch_size)
    losses = np.asarray(nll(jax.device_put(ckpt.params), batches)).reshape(-1, seq_len)
    return losses[: len(windows.inputs)], windows.weights


def attention_maps(ckpt: checkpoint.Checkpoint, ids: np.ndarray,
                   span: tuple[int, int]) -> dict[str, np.ndarray]:
    """{attention block: weights [H, L, S]} for the L queries of ids[span[0]:span[1]] over
    the S keys up to the last of them: a streaming model reads ids from the start, as its
    sampler does (S = span[1]); another model reads the span alone, as one window (S = L:
    see attention_span). Each row sums to one and is zero where the query does not see the
    key."""
    hp = ckpt.hparams
    streaming = position_encodings.is_streaming(hp)
    first = span[0] if streaming else 0
    ids = ids[: span[1]] if streaming else ids[span[0]:span[1]]

    def forward(tokens):
        scored = {}

        def read_projections(next_method, args, kwargs, context):
            out = next_method(*args, **kwargs)
            if context.method_name == "project":  # (q, k, v), at the positions args[1]
                scored[context.module.module_name] = (*out[:2], args[1])
            return out

        with hk.intercept_methods(read_projections):
            transformer.forward_fn(hp, len(ckpt.vocab))(tokens, False)
        return {name: transformer.attention_weights(q[:, first:], k, transformer.visible(
                    positions[first:], positions, hp.attention_window))[0]
                for name, (q, k, positions) in scored.items()}

    maps = jax.jit(hk.transform(forward).apply)(ckpt.params, None, jnp.asarray(ids)[None])
    return {name.removeprefix("transformer/"): np.asarray(w) for name, w in maps.items()}


def attention_span(hp: transformer.HParams, num_chars: int, config: Config) -> tuple[int, int]:
    """[start, end) of the characters whose attention the maps show: config's span, within
    the text and, for a model that is not streaming, within one max_seq_len window."""
    start = min(config.attention_start, num_chars - 1)
    length = config.attention_chars
    if not position_encodings.is_streaming(hp):
        length = min(length, hp.max_seq_len)
    return start, min(num_chars, start + length)


def plot_attention(maps: dict[str, np.ndarray], span: str, window: int | None, path: str):
    """One heatmap per attention block (rows) and head (columns): queries down, keys across
    the span; the line marks the oldest key a query sees (W - 1 characters back)."""
    names = list(maps)
    heads = maps[names[0]].shape[0]
    L = len(span)
    fig, axes = plt.subplots(len(names), heads, figsize=(3.4 * heads, 3.4 * len(names)),
                             squeeze=False, layout="constrained")  # room for the suptitle
    for row, name in enumerate(names):
        for head in range(heads):
            ax = axes[row, head]
            ax.imshow(maps[name][head][:, -L:] ** 0.5, cmap="magma", vmin=0, vmax=1,
                      interpolation="nearest")
            if window is not None and window <= L:  # the oldest key a query still sees
                ax.plot([0, L - window], [window - 1, L - 1], color="cyan", lw=0.4)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} head {head}", fontsize=8)
    fig.suptitle(f"attention weights (square root), {L} characters: queries down, keys "
                 f"across{'' if window is None else f'; window {window}'}", fontsize=10)
    drawn, buffer = io.BytesIO(), io.BytesIO()
    fig.savefig(drawn, format="png", dpi=72)
    plt.close(fig)
    # 256 colours: the same picture in 40% of the bytes (it is inlined in the page too).
    PIL.Image.open(drawn).convert("RGB").quantize(256).save(buffer, "PNG", optimize=True)
    atomic_write(path, buffer.getvalue())
    return buffer.getvalue()


def summary(text: str, pred: Predictions, window_nll: np.ndarray,
            window_weights: np.ndarray) -> dict:
    loss = pred.loss[1:]
    by_kind = {}
    for name in KINDS:
        picked = [l for c, l in zip(text[1:], loss) if kind(c) == name]
        if picked:
            by_kind[name] = {"chars": len(picked), "loss": float(np.mean(picked))}
    by_position = []
    for lo, hi in POSITION_GROUPS:
        if lo < window_nll.shape[1]:
            w = window_weights[:, lo:hi]
            if w.sum():
                by_position.append({"positions": [lo, min(hi, window_nll.shape[1]) - 1],
                                    "chars": int(w.sum()),
                                    "loss": float(window_nll[:, lo:hi].sum() / w.sum())})
    mean = float(np.mean(loss))
    return {"mean_loss": mean, "bits_per_char": mean / math.log(2),
            "window_loss": float(window_nll.sum() / window_weights.sum()),
            "window_len": window_nll.shape[1], "by_kind": by_kind, "by_position": by_position}


def char_records(text: str, pred: Predictions, vocab: str) -> list[dict]:
    return [{"char": c, "loss": None if np.isnan(l) else round(float(l), 4),
             "next": [[vocab[j], round(float(p), 4)] for j, p in zip(ids, probs)]}
            for c, l, ids, probs in zip(text, pred.loss, pred.top_ids, pred.top_probs)]


def colour(loss: float | None) -> str:
    """White at 0 nats through yellow to red at 6 and beyond."""
    if loss is None:
        return "#eee"
    t = min(loss / 6.0, 1.0)
    return f"hsl({60 * (1 - t):.0f}, 100%, {100 - 45 * t:.0f}%)"


def shown(c: str) -> str:
    return {"\n": "\u21b5\n", " ": " ", "\t": "\u2192\t"}.get(c, c)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.3em; }} h2 {{ font-size: 1.1em; margin-top: 1.5em; }}
table {{ border-collapse: collapse; margin-right: 2em; display: inline-table;
        vertical-align: top; }}
td, th {{ padding: 2px 8px; text-align: right; }} th {{ border-bottom: 1px solid #999; }}
td:first-child, th:first-child {{ text-align: left; }}
.bar {{ display: inline-block; height: 0.8em; background: #e67e22; }}
#text {{ font: 15px/1.7 ui-monospace, monospace; white-space: pre-wrap;
        border: 1px solid #ccc; padding: 0.8em; max-width: 60em; }}
#text span {{ cursor: pointer; }}
#text span:hover, #text span.on {{ outline: 1px solid #000; }}
#tip {{ position: fixed; display: none; background: #fff; border: 1px solid #333;
       padding: 6px 9px; font: 13px ui-monospace, monospace; pointer-events: none;
       box-shadow: 2px 2px 6px rgba(0,0,0,.3); }}
.legend span {{ display: inline-block; padding: 0 6px; font: 12px ui-monospace, monospace; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<p>{about}</p>
<p><b>Mean loss {mean_loss:.4f} nats per character ({bits:.3f} bits)</b> over {count} predicted
characters, each given everything before it as the sampler reads it. In eval.py's
non-overlapping {window_len}-character windows the same text costs {window_loss:.4f}: the first
characters of each window see little context.</p>
<table><tr><th>kind of character</th><th>chars</th><th>loss</th><th></th></tr>
{kind_rows}</table>
<table><tr><th>position in a {window_len}-character window</th><th>chars</th><th>loss</th>
<th></th></tr>
{position_rows}</table>
<h2>The text, coloured by surprisal</h2>
<p class="legend">{legend} &nbsp; Hover over (or tap) a character: what the model expects to
follow it. Grey: the first character, predicted from nothing.</p>
<div id="text">{spans}</div>
<div id="tip"></div>
<h2>Attention maps</h2>
<p>{attention_about}</p>
<img alt="attention maps" src="data:image/png;base64,{png}">
<script>
const chars = {records};
const tip = document.getElementById('tip');
const fmt = (c) => c === '\\n' ? '\\u21b5' : c === ' ' ? '\\u2423' : c;
function show(e) {{
  const el = e.target.closest('span[data-i]');
  if (!el) return;
  document.querySelectorAll('#text span.on').forEach((s) => s.classList.remove('on'));
  el.classList.add('on');
  const i = +el.dataset.i, r = chars[i], next = chars[i + 1];
  let h = '<b>' + fmt(r.char) + '</b> ' + (r.loss === null ? '(first)' :
    r.loss.toFixed(2) + ' nats, p = ' + Math.exp(-r.loss).toFixed(3)) +
    '<br>next (\u2190 the one that came):';
  for (const [c, p] of r.next) {{
    const actual = next && next.char === c ? ' \\u2190' : '';
    h += '<br><span class="next">' + fmt(c) + ' ' + p.toFixed(3) + actual + '</span>';
  }}
  tip.innerHTML = h;
  tip.style.display = 'block';
  const x = Math.min(e.clientX + 12, window.innerWidth - 160);
  tip.style.left = x + 'px';
  tip.style.top = (e.clientY + 16) + 'px';
}}
const text = document.getElementById('text');
text.addEventListener('mouseover', show);
text.addEventListener('click', show);
text.addEventListener('mouseleave', () => {{ tip.style.display = 'none'; }});
</script></body></html>
"""


def bar_rows(rows: list[tuple[str, int, float]], top: float) -> str:
    return "\n".join(
        f"<tr><td>{html.escape(label)}</td><td>{count}</td><td>{loss:.3f}</td><td><span "
        f'class="bar" style="width:{100 * loss / top:.0f}px"></span></td></tr>'
        for label, count, loss in rows)


def render(config: Config, title: str, text: str, records: list[dict], stats: dict,
           png: bytes, span: tuple[int, int], window: int | None) -> str:
    kinds = [(k, v["chars"], v["loss"]) for k, v in stats["by_kind"].items()]
    positions = [(f"{a}" if a == b else f"{a}-{b}", p["chars"], p["loss"])
                 for p in stats["by_position"] for a, b in [p["positions"]]]
    top = max(loss for _, _, loss in kinds + positions) or 1.0
    spans = "".join(f'<span data-i="{i}" style="background:{colour(r["loss"])}">'
                    f"{html.escape(shown(c))}</span>" for i, (c, r) in
                    enumerate(zip(text, records)))
    legend = "".join(f'<span style="background:{colour(x)}">{x} nats</span>'
                     for x in (0, 1, 2, 3, 4, 5, 6))
    a, b = span
    return PAGE.format(
        title=html.escape(title), about=html.escape(
            f"params {config.params}; text: {describe_text(config)}; "
            f"{len(text)} characters."),
        mean_loss=stats["mean_loss"], bits=stats["bits_per_char"], count=len(text) - 1,
        window_len=stats["window_len"], window_loss=stats["window_loss"],
        kind_rows=bar_rows(kinds, top), position_rows=bar_rows(positions, top),
        legend=legend, spans=spans, png=base64.b64encode(png).decode(),
        attention_about=html.escape(
            f"Characters {a} to {b - 1} ({text[a:b][:60]!r}...): each attention block's "
            "weights, one head per column; row: the query (the character reading), column: "
            "the key it weighs. " + ("" if window is None else
                                     f"The cyan line marks the window: a query sees itself and "
                                     f"the {window - 1} characters before it.")),
        records=json.dumps(records, ensure_ascii=False).replace("</", "<\\/"))


def describe_text(config: Config) -> str:
    if config.context is not None:
        return "--context"
    return config.text_file or "the start of the validation split"


def read_shown_text(ckpt: checkpoint.Checkpoint, config: Config) -> str:
    """The text to show: --context, --text_file, or the start of the validation split of
    the params file's training text (eval_context.txt where that file is missing)."""
    if config.context is not None:
        text = data.normalize(config.context)
    elif config.text_file is not None:
        text = data.read_text(config.text_file)
    else:
        path = checkpoint.training_text(ckpt)
        if not os.path.exists(path):
            print(f"# {path} is missing (`make data` fetches the corpus): showing "
                  "eval_context.txt instead", file=sys.stderr)
            text = data.read_text("eval_context.txt")
        else:  # as ids (a large text from its cache), of which a few lines are decoded
            val_ids = data.split(encoding.load(path, ckpt.vocab).ids)[1]
            text = data.decode(val_ids[: config.num_chars + LINE_SLACK], ckpt.vocab)
            text = text[text.find("\n") + 1:]  # from the first whole line
    text = text[: config.num_chars]
    if len(text) < 2:
        raise UserError(f"the text to show has {len(text)} characters: at least 2 are needed "
                        "(one predicts the next).")
    return text


def check_config(config: Config) -> None:
    if config.num_chars < 2:
        raise UserError(f"--num_chars={config.num_chars}: must be >= 2.")
    if config.attention_start < 0 or config.attention_chars < 1:
        raise UserError(f"--attention_start={config.attention_start} must be >= 0 and "
                        f"--attention_chars={config.attention_chars} >= 1.")
    if config.context is not None and config.text_file is not None:
        raise UserError("give --context or --text_file, not both.")


def visualize(config: Config) -> dict:
    """Writes the page, the PNG and (with config.json) the per-character data; returns the
    summary statistics."""
    check_config(config)
    ckpt = checkpoint.load(config.params)
    text = read_shown_text(ckpt, config)
    try:
        ids = data.encode(text, ckpt.vocab)
    except UserError as e:
        raise UserError(f"the text to show: {e}") from None
    span = attention_span(ckpt.hparams, len(text), config)
    pred = predictions(ckpt, ids)
    stats = summary(text, pred, *window_losses(ckpt, ids))
    maps = attention_maps(ckpt, ids, span)
    png = plot_attention(maps, text[span[0]:span[1]], ckpt.hparams.attention_window,
                         config.attention_png)
    records = char_records(text, pred, ckpt.vocab)
    page = render(config, "What the model predicts and where it looks", text, records, stats,
                  png, span, ckpt.hparams.attention_window)
    atomic_write(config.out, page.encode())
    if config.json:
        atomic_write(config.json, json.dumps({"params": config.params, **stats,
                                              "chars": records}, ensure_ascii=False).encode())
    return stats


def main(argv) -> int:
    (config,) = parse_overrides(argv, CONFIG)
    begin = time.time()
    stats = visualize(config)
    print(f"mean_loss: {stats['mean_loss']:.4f}")
    print(f"bits_per_char: {stats['bits_per_char']:.4f}")
    print(f"wrote {config.out}, {config.attention_png}"
          + (f", {config.json}" if config.json else "")
          + f" in {time.time() - begin:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main, __doc__, [CONFIG])
