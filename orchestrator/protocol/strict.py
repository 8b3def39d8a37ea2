"""Strict readers of wire JSON for the typed records: each failure is a ValueError that
names the field (``handoff.gates[0].timedOut is missing``), so a peer sending a wrong
shape is told what to fix. Shared by every record module in ``protocol/``."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any


def mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be an object, not {type(value).__name__}")
    return value


def field(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where}.{key} is missing")
    return obj[key]


def string(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = field(obj, key, where)
    if not isinstance(value, str):
        raise ValueError(f"{where}.{key} must be a string")
    return value


def opt_string(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    value = field(obj, key, where)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}.{key} must be a string or null")
    return value


def integer(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = field(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}.{key} must be an integer")
    return value


def opt_integer(obj: Mapping[str, Any], key: str, where: str) -> int | None:
    value = field(obj, key, where)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}.{key} must be an integer or null")
    return value


def number(obj: Mapping[str, Any], key: str, where: str) -> float:
    value = field(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}.{key} must be a number")
    return value


def opt_number(obj: Mapping[str, Any], key: str, where: str) -> float | None:
    value = field(obj, key, where)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"{where}.{key} must be a number or null")
    return value


def boolean(obj: Mapping[str, Any], key: str, where: str) -> bool:
    value = field(obj, key, where)
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{key} must be true or false")
    return value


def strings(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = field(obj, key, where)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}.{key} must be a list of strings")
    return tuple(value)


def array(obj: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = field(obj, key, where)
    if not isinstance(value, list):
        raise ValueError(f"{where}.{key} must be a list")
    return value


def epoch_of(text: str, where: str) -> float:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{where} must be an RFC 3339 time, not {text!r}") from None
    if moment.tzinfo is None:
        raise ValueError(f"{where} must be an RFC 3339 time with a zone, not {text!r}")
    return moment.timestamp()


def time(obj: Mapping[str, Any], key: str, where: str) -> float:
    return epoch_of(string(obj, key, where), f"{where}.{key}")


def opt_time(obj: Mapping[str, Any], key: str, where: str) -> float | None:
    text = opt_string(obj, key, where)
    return None if text is None else epoch_of(text, f"{where}.{key}")


def mappings(obj: Mapping[str, Any], key: str, where: str) -> list[Mapping[str, Any]]:
    value = field(obj, key, where)
    if not isinstance(value, list):
        raise ValueError(f"{where}.{key} must be a list")
    return [mapping(item, f"{where}.{key}[{i}]") for i, item in enumerate(value)]
