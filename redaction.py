"""Secret redaction, a leaf module: the project's apps and its logging both use it; it imports nothing of theirs.

`redact(text)` returns `text` with the values of our secret environment variables replaced by `[REDACTED]`.
Log lines are redacted by the processor `tradebot.logging.configure_logging` installs once (settings); the apps
call `redact` themselves only for text they store (the journal, error messages).
"""
from __future__ import annotations

import os
from typing import Any

SECRET_VARIABLES = (
    "OKX_API_KEY",
    "OKX_API_SECRET",
    "OKX_PASSPHRASE",
    "ANTHROPIC_API_KEY",
    "PERPLEXITY_API_KEY",
    "DJANGO_SECRET_KEY",
    "FLOWER_BASIC_AUTH",
    "TELEGRAM_BOT_TOKEN",
)
REDACTED = "[REDACTED]"


def _secret_values() -> tuple[str, ...]:
    """The secret values now set, longest first.

    Read at call time: tests and `manage.py` may set variables after import. Reading
    seven variables through `os.environ` (which encodes each name and decodes each
    value) cost ~7 us, and every journaled text pays it (a replay: every cycle). The
    environment's own mapping, asked with its own key encoding, says in well under a
    microsecond whether the raw values are those of the last call.
    """
    global _SECRETS_LAST
    raw_data = getattr(os.environ, "_data", None)
    if raw_data is None or not _ENV_KEYS:  # not CPython's os.environ: read it the plain way every time
        return _secret_values_read()
    raw = tuple(raw_data.get(key) for key in _ENV_KEYS)
    if _SECRETS_LAST is None or _SECRETS_LAST[0] != raw:
        _SECRETS_LAST = (raw, _secret_values_read())
    return _SECRETS_LAST[1]


def _secret_values_read() -> tuple[str, ...]:
    values = (os.environ.get(name, "").strip() for name in SECRET_VARIABLES)
    # Very short values would redact ordinary words; real keys are long. The lower-case form too: a vendor
    # may lower-case an error text that quotes a key (python-telegram-bot does with the Bot API URL's token).
    found = {v for v in values if len(v) >= 6}
    return tuple(sorted(found | {v.lower() for v in found}, key=len, reverse=True))


# The variables' names as os.environ keys them internally (bytes on POSIX, upper-case text on Windows).
_ENV_KEYS = tuple(os.environ.encodekey(name) for name in SECRET_VARIABLES) if hasattr(os.environ, "encodekey") else ()
_SECRETS_LAST: tuple[tuple[Any, ...], tuple[str, ...]] | None = None  # (raw values, the secrets they give)


def redact(text: str) -> str:
    """Return `text` with every secret value replaced by [REDACTED]."""
    if not text:
        return text  # most cycles end with no error text: no environment to read
    for secret in _secret_values():
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
