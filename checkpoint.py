"""Self-contained params files: everything needed to sample from a run or to resume it.

A file is a pickle of plain Python containers and numpy arrays only:
  {"format": FORMAT, "params": {module: {name: array}}, "hparams": {...}, "vocab": str,
   "meta": {...}, "opt_state": [array, ...] or None, "rng": array or None}
The optimizer state is stored as its flat list of leaves (optax states are custom classes);
the trainer rebuilds its structure from a fresh `optimizer.init`. Loading goes through a
restricted unpickler that admits numpy's array reconstruction and nothing else, so a file
from someone else cannot run code: pickle otherwise calls any global the file names.
"""

import io
import pickle
from typing import Any, NamedTuple

import jax
import numpy as np

import data
import model_checks
import transformer
from common import UserError, atomic_write

FORMAT = "nanogpt-haiku/1"
# The shipped params, by the preset that trained them: each run's best validation params,
# without optimizer state. Cervantes' are every script's default.
SHIPPED_PARAMS = {"cpu": "params/params.786a84eefdb443bf9e98d68b.pkl.min_val.pkl",
                  "shakespeare": "params/params.04320fa1ba314b95aeefe005.pkl.min_val.pkl"}
DEFAULT_PARAMS = SHIPPED_PARAMS["cpu"]
# Files written before the after-next head became an objective of its own (objectives.py)
# hold it in the model, as "transformer/unembed_ahead", and its weight as HParams.ahead_loss:
# load() drops the head (evaluation and sampling never read it) and moves the weight to the
# run's config. Their training state resumes at the commit before that change.
LEGACY_HEAD, LEGACY_COMMIT = "transformer/unembed_ahead", "f551d7f"
# The original project's HPARAMS. Each field added since was added switched off, at its value
# here, so a file that lacks a field was trained with this value, whatever today's default.
ORIGINAL_HPARAMS = dict(
    max_seq_len=128,
    d_model=384,
    h=6,
    d_ff=1536,
    decoder_N=6,
    encoder_N=1,
    use_encoder=False,
    dropout=0.2,
    activation="relu",
    positions="learned",
    attention_window=None,
    stochastic_depth=0.0,
    attention_gate=False,
    value_embeddings=False,
    unet=False,
)

# The only globals a params file may name: how numpy pickles arrays and dtypes
# (numpy >= 2 writes numpy._core, numpy 1.x wrote numpy.core; protocol 5 uses _frombuffer).
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    ("ml_dtypes", "bfloat16"),  # the dtype of bfloat16 optimizer moments (a type, no code)
}


class CheckpointError(UserError):
    """A params file that is missing, corrupt, unsafe or not ours."""


class Checkpoint(NamedTuple):
    params: dict                  # Haiku params: {module: {name: np.ndarray}}
    hparams: transformer.HParams
    vocab: str                    # the characters in id order
    meta: dict                    # step, val_loss, min_val_loss, min_val_step, config, ...
    opt_state: list | None        # optimizer state leaves, in jax.tree.leaves order
    rng: np.ndarray | None        # the training PRNG key's data


class _UnsafeGlobal(Exception):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise _UnsafeGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _to_numpy(tree):
    """A pytree of jax/numpy arrays as plain dicts and lists of numpy arrays."""
    if isinstance(tree, dict):
        return {str(k): _to_numpy(v) for k, v in tree.items()}
    return np.asarray(jax.device_get(tree))


def _check_plain(value: Any, where: str) -> None:
    """Meta must be plain Python (what the restricted unpickler reads back)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not (value is None or type(value) in (bool, int, float, str)):
        raise TypeError(f"{where} is a {type(value).__name__}: params file meta holds only "
                        "plain Python values (convert with float() or int()).")


def save(path: str, *, params, hparams: transformer.HParams, vocab: str, meta: dict,
         opt_state=None, rng=None) -> None:
    """Writes a params file atomically (a crash mid-save leaves the previous file intact)."""
    _check_plain(meta, "meta")
    payload = {
        "format": FORMAT,
        "params": _to_numpy(params),
        "hparams": hparams._asdict(),
        "vocab": vocab,
        "meta": meta,
        "opt_state": (None if opt_state is None
                      else [np.asarray(x) for x in jax.device_get(jax.tree.leaves(opt_state))]),
        "rng": None if rng is None else np.asarray(jax.device_get(rng)),
    }
    atomic_write(path, pickle.dumps(payload, protocol=4))


def _check_params(tree: Any, where: str, path: str) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_params(v, f"{where}/{k}", path)
    elif not (isinstance(tree, np.ndarray) and tree.dtype.kind in "fiub"):
        raise CheckpointError(f"{path!r} is not a valid params file: {where} is not a "
                              f"numeric array.")


def load(path: str) -> Checkpoint:
    """Reads a params file written by `save`, refusing any pickle that names another global;
    a missing shipped file gets a pointer to training."""
    try:
        return _load(path)
    except CheckpointError:
        if path in SHIPPED_PARAMS.values():
            raise CheckpointError(
                f"the shipped params file {path!r} is missing or unreadable (an "
                "incomplete checkout?). Restore it with `git checkout -- params`, or train a "
                "model (`python train.py --preset=cpu`) and pass its file: "
                "--params=params/params.<run hash>.pkl.min_val.pkl") from None
        raise


def _load(path: str) -> Checkpoint:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read params file {path!r}: {e.strerror}.") from None
    try:
        payload = _RestrictedUnpickler(io.BytesIO(raw)).load()
    except _UnsafeGlobal as e:
        raise CheckpointError(
            f"refusing to load {path!r}: unsafe pickle global {e}. Params files hold only "
            "numpy arrays and plain Python values; this one would run code.") from None
    except Exception as e:  # truncated or garbage bytes raise many different errors
        raise CheckpointError(f"{path!r} is truncated or corrupt and cannot be loaded "
                              f"({type(e).__name__}: {e}).") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a nanogpt-haiku params file (format "
                              f"{FORMAT!r} expected).")
    try:
        _convert_legacy(payload)
        hparams = model_checks.validate(transformer.HParams(
            **(ORIGINAL_HPARAMS | payload["hparams"])))
        params, vocab, meta = payload["params"], payload["vocab"], payload["meta"]
        opt_state, rng = payload["opt_state"], payload["rng"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path!r} is not a valid params file ({e}).") from None
    if not isinstance(vocab, str) or not vocab or not isinstance(meta, dict):
        raise CheckpointError(f"{path!r} is not a valid params file (bad vocab or meta).")
    _check_params(params, "params", path)
    return Checkpoint(params, hparams, vocab, meta, opt_state, rng)


def _convert_legacy(payload: dict) -> None:
    """A file from before commit LEGACY_COMMIT's successor, in today's form (LEGACY_HEAD)."""
    ahead_loss = payload["hparams"].pop("ahead_loss", 0.0)
    if ahead_loss and isinstance(payload["meta"], dict):
        config = payload["meta"].setdefault("config", {})
        config.setdefault("ahead_loss", ahead_loss)
    if isinstance(payload["params"], dict) and LEGACY_HEAD in payload["params"]:
        del payload["params"][LEGACY_HEAD]
        if payload["opt_state"] is not None:
            payload["meta"]["resumes_at_commit"] = LEGACY_COMMIT


def training_text(ckpt: Checkpoint) -> str:
    """The text file the params were trained on (as its run named it), else the corpus."""
    return ckpt.meta.get("config", {}).get("source_file") or data.CORPUS_FILE


def num_params(params) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(params))
