"""Typed readers for settings that come from the environment.

Every reader fails at start with a message that names the variable and the bad
value, so `DECISION_CYCLE_SECONDS=abc` stops the process before any cycle runs
instead of crashing a worker later. Secrets are read with `env_secret`, whose
error messages never repeat the value.
"""
from __future__ import annotations

import os
from decimal import Decimal, InvalidOperation


class ImproperSetting(Exception):
    """A setting in the environment has a value we cannot use."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None:
        return None
    value = value.strip()
    return value if value != "" else None


def env_str(name: str, default: str) -> str:
    value = _raw(name)
    return default if value is None else value


def env_secret(name: str) -> str:
    """A secret: empty when unset; its value never appears in an error."""
    return _raw(name) or ""


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = _raw(name)
    if value is None:
        result = default
    else:
        try:
            result = int(value)
        except ValueError:
            raise ImproperSetting(f"{name} must be a whole number, got {value!r}") from None
    _check_range(name, result, minimum, maximum)
    return result


def env_decimal(
    name: str, default: str, *, minimum: Decimal | None = None, maximum: Decimal | None = None
) -> Decimal:
    value = _raw(name)
    text = default if value is None else value
    try:
        result = Decimal(text)
    except InvalidOperation:
        raise ImproperSetting(f"{name} must be a number, got {text!r}") from None
    if not result.is_finite():
        raise ImproperSetting(f"{name} must be a finite number, got {text!r}")
    _check_range(name, result, minimum, maximum)
    return result


def env_float(name: str, default: float, *, minimum: float | None = None, maximum: float | None = None) -> float:
    value = _raw(name)
    if value is None:
        result = default
    else:
        try:
            result = float(value)
        except ValueError:
            raise ImproperSetting(f"{name} must be a number, got {value!r}") from None
        if result != result or result in (float("inf"), float("-inf")):
            raise ImproperSetting(f"{name} must be a finite number, got {value!r}")
    _check_range(name, result, minimum, maximum)
    return result


def env_bool(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperSetting(f"{name} must be true or false, got {value!r}")


def env_list(name: str, default: list[str]) -> list[str]:
    value = _raw(name)
    if value is None:
        return list(default)
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise ImproperSetting(f"{name} must be a comma-separated list, got {value!r}")
    return items


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default)
    if value not in choices:
        raise ImproperSetting(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_range(name: str, value: int | float | Decimal, minimum: object, maximum: object) -> None:
    if minimum is not None and value < minimum:  # type: ignore[operator]
        raise ImproperSetting(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:  # type: ignore[operator]
        raise ImproperSetting(f"{name} must be at most {maximum}, got {value}")
