"""The checks of a model's settings (transformer.HParams): `validate` raises ValueError
naming the first invalid field, with what it may be. The model checks its HParams when it is
built; a params file's are checked when it loads (checkpoint.py), a run's before it starts."""

ACTIVATIONS = ("relu", "relu2", "swiglu")  # the feed-forward block's (transformer.feed_forward)
POSITIONS = ("learned", "sinusoidal", "rotary")  # how positions enter (position_encodings.py)


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate(hp):
    """Raises ValueError naming the first invalid field of `hp`; returns `hp` unchanged."""
    for field in ("max_seq_len", "d_model", "h", "d_ff", "decoder_N", "encoder_N"):
        if not is_count(getattr(hp, field)):
            raise ValueError(f"HParams.{field}={getattr(hp, field)!r}: must be an integer >= 1.")
    if hp.d_model % hp.h:
        raise ValueError(f"HParams.d_model={hp.d_model} must be divisible by h={hp.h}.")
    for field in ("dropout", "stochastic_depth"):
        if not 0.0 <= getattr(hp, field) < 1.0:
            raise ValueError(f"HParams.{field}={getattr(hp, field)!r}: must be in [0, 1).")
    if hp.use_encoder and hp.encoder_N > hp.decoder_N:
        raise ValueError(
            f"HParams.encoder_N={hp.encoder_N}: each encoder layer feeds the decoder layer of "
            f"the same index, so it must be <= decoder_N={hp.decoder_N}.")
    if hp.activation not in ACTIVATIONS:
        raise ValueError(f"HParams.activation={hp.activation!r}: {', '.join(ACTIVATIONS)}.")
    if hp.positions not in POSITIONS:
        raise ValueError(f"HParams.positions={hp.positions!r}: {', '.join(POSITIONS)}.")
    if hp.positions == "rotary" and (hp.d_model // hp.h) % 2:
        raise ValueError(f"HParams.positions='rotary' rotates pairs of features: the key size "
                         f"d_model / h = {hp.d_model // hp.h} must be even.")
    if not (hp.attention_window is None or is_count(hp.attention_window)):
        raise ValueError(f"HParams.attention_window={hp.attention_window!r}: an integer >= 1, "
                         "or None.")
    return hp
