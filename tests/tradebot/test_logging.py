"""tradebot.logging.redact: secrets are read from the environment as it is at each call."""
from __future__ import annotations

import pytest

from tradebot.logging import REDACTED, redact


def test_redact_follows_a_secret_set_changed_and_removed_after_earlier_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OKX_API_SECRET", raising=False)
    assert redact("okx secret abcdef123456") == "okx secret abcdef123456"  # nothing set yet (remembered)
    monkeypatch.setenv("OKX_API_SECRET", "abcdef123456")
    assert redact("okx secret abcdef123456") == f"okx secret {REDACTED}"
    monkeypatch.setenv("OKX_API_SECRET", "zyxwvu987654")
    assert redact("old abcdef123456 new zyxwvu987654") == f"old abcdef123456 new {REDACTED}"
    monkeypatch.delenv("OKX_API_SECRET")
    assert redact("new zyxwvu987654") == "new zyxwvu987654"
    monkeypatch.setenv("OKX_API_SECRET", "abcdef123456")  # a value seen before: remembered, still right
    assert redact("okx secret abcdef123456") == f"okx secret {REDACTED}"


def test_redact_ignores_short_values_and_surrounding_blanks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OKX_PASSPHRASE", "abc")  # too short: would redact ordinary words
    monkeypatch.setenv("ANTHROPIC_API_KEY", "  sk-ant-xyz-000111  ")
    assert redact("abc and sk-ant-xyz-000111") == f"abc and {REDACTED}"
