"""Structured logging (structlog over stdlib) with secret redaction.

Every rendered log line, and every text we store in the journal through
`redact`, has the values of our secret environment variables replaced by
`[REDACTED]`, so an exception that happens to quote a key cannot leak it.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

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


def _redact_event(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: (redact(v) if isinstance(v, str) else v) for k, v in event_dict.items()}


class _RedactingFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self._inner.format(record))


def configure_logging(*, level: str = "INFO", fmt: str = "console") -> None:
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _redact_event,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(formatter))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Quiet chatty libraries; their warnings still show.
    for name in ("httpx", "httpcore", "urllib3", "numba", "kombu", "amqp"):
        logging.getLogger(name).setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
