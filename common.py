"""What the scripts share: user errors, `--name=value` overrides and `--help`, atomic file
writes, Ctrl-C."""

import contextlib
import inspect
import os
import secrets
import signal
import sys
import types
import typing
from typing import Any, Callable, NamedTuple, Sequence


class UserError(Exception):
    """Bad input from the user (config, files, text): scripts print it and exit 2."""


def run_main(main: Callable[[Sequence[str]], Any], doc: str = "",
             configs: Sequence[NamedTuple] = (), presets: dict | None = None) -> None:
    """Runs `main(argv)`; a UserError becomes a one-paragraph message and exit status 2.
    `--help` or `-h` prints help_text(doc, configs, presets) and exits 0."""
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(help_text(doc, configs, presets))
        sys.exit(0)
    try:
        status = main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)


def _parse_value(name: str, text: str, hint: Any) -> Any:
    """Converts `text` to the type `hint` of field `name` (bool, int, float, str, or X | None)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if text.lower() in ("none", ""):
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if hint is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"--{name}={text}: expected a bool (True or False).")
    try:
        return hint(text)
    except ValueError:
        raise UserError(f"--{name}={text}: expected {hint.__name__}.") from None


def parse_overrides(argv: Sequence[str], *defaults: NamedTuple) -> tuple[NamedTuple, ...]:
    """Applies `--name=value` arguments to the NamedTuples `defaults`; returns the new tuples.

    Each value is converted to its field's annotated type; an unknown name, a missing `=`,
    or a value of the wrong type raises UserError listing what is valid.
    """
    fields = {name: d for d in defaults for name in d._fields}
    changes: dict[int, dict[str, Any]] = {id(d): {} for d in defaults}
    for arg in argv:
        name, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise UserError(f"bad argument {arg!r}: expected --name=value.")
        if name not in fields:
            raise UserError(
                f"unknown option --{name}. Valid names: {', '.join(sorted(fields))}.")
        owner = fields[name]
        hint = typing.get_type_hints(type(owner))[name]
        changes[id(owner)][name] = _parse_value(name, text, hint)
    return tuple(d._replace(**changes[id(d)]) for d in defaults)


def field_comments(cls: type) -> dict[str, str]:
    """{field: the comment beside it in the class's source, continuation lines joined}."""
    comments, field = {}, None
    for line in inspect.getsource(cls).splitlines():
        code, _, comment = line.partition("#")
        name = code.strip().split(":")[0] if ":" in code else ""
        if name.isidentifier() and name in cls._fields:
            field = name
            comments[field] = comment.strip()
        elif field and not code.strip() and comment:
            comments[field] += " " + comment.strip()
        elif code.strip():
            field = None
    return comments


def help_text(doc: str, configs: Sequence[NamedTuple], presets: dict | None = None) -> str:
    """What `--help` prints: the script's docstring, then every --name=value it takes with
    its type, default and the comment beside the field, then the named presets: {name:
    (config, hparams)}."""
    lines = [inspect.cleandoc(doc)] + (["", "Options (--name=value):"] if configs else [])
    for config in configs:
        comments = field_comments(type(config))
        hints = typing.get_type_hints(type(config))
        for name, default in config._asdict().items():
            hint = getattr(hints[name], "__name__", None) or str(hints[name])
            lines.append(f"  --{name}={default!r}  ({hint})  {comments.get(name, '')}".rstrip())
    if presets:
        lines += ["", "Presets (--preset=NAME):"]
        lines += [f"  {name}: {describe(*recipe)}" for name, recipe in presets.items()]
    return "\n".join(lines)


def describe(config: NamedTuple, hparams: NamedTuple) -> str:
    """A preset in a line: its model's shape, steps and optimizer."""
    return (f"{hparams.decoder_N} x {hparams.d_model} model, {hparams.positions} positions, "
            f"{config.max_iters} steps of {config.batch_size} x {hparams.max_seq_len} "
            f"characters, {config.optimizer}, on {config.source_file}")


def format_config(config: NamedTuple) -> str:
    return "\n".join(f"  {k} = {v!r}" for k, v in config._asdict().items())


def atomic_write(path: str, data: bytes) -> None:
    """Writes `data` to `path` so that readers see the old file or the new one, never a part."""
    with atomic_file(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_file(path: str):
    """A binary file to write that appears at `path` whole when the block ends, or not at all.

    Temporary file in the same folder, flush, fsync, then os.replace (atomic on POSIX). The
    temporary file is created with mode 0o666 so that the umask applies, as for a plain
    `open(path, "wb")` (tempfile.mkstemp would make it owner-only).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag that a loop checks between its steps
    (training steps, sampled chunks), so that it stops at a clean point rather than wherever
    KeyboardInterrupt lands in JAX's internals; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
