"""Reading settings from the environment: one variable per dataclass field, parsed by its type.

``RLHF_DEMO_<FIELD>`` (upper case), nested dataclasses as ``<FIELD>__<SUBFIELD>``; a value
that does not parse is a :class:`SettingError` that names the variable.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

__all__ = ["SettingError", "coerce", "from_env"]


class SettingError(ValueError):
    """A setting from the environment or the command line that cannot be used; names it."""


def coerce(value: str, annotation: str, name: str) -> Any:
    """Parse an environment string as the field's annotated type (``int``, ``float | None``,
    ``bool``, ``Path``, ``tuple[str, ...]``, ``str``); a bad value names the variable."""
    kinds = {part.strip() for part in annotation.split("|")}
    if "None" in kinds and value.strip().lower() in ("", "none", "null"):
        return None
    try:
        if "bool" in kinds:
            lowered = value.strip().lower()
            if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError("expected true/false")
            return lowered in ("1", "true", "yes", "on")
        if "int" in kinds:
            return int(value)
        if "float" in kinds:
            number = float(value)
            if number != number:
                raise ValueError("NaN")
            return number
        if "Path" in kinds:
            return Path(value)
        if any(k.startswith("tuple") for k in kinds):
            return tuple(v.strip() for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise SettingError(f"{name}={value!r}: expected {annotation} ({exc})") from None
    return value


def from_env(obj: Any, prefix: str, env: dict[str, str]) -> dict[str, Any]:
    """The fields of dataclass ``obj`` that ``env`` sets, as ``PREFIX<FIELD>`` (nested
    dataclasses as ``PREFIX<FIELD>__<SUBFIELD>``)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        current, key = getattr(obj, f.name), f"{prefix}{f.name.upper()}"
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            nested = from_env(current, f"{key}__", env)
            if nested:
                try:
                    values[f.name] = dataclasses.replace(current, **nested)
                except (TypeError, ValueError) as exc:
                    raise SettingError(f"{key}__*: {exc}") from None
        elif key in env:
            values[f.name] = coerce(env[key], str(f.type), key)
    return values
