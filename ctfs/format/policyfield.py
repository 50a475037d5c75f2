"""The ``__policy__`` metadata field of a CryptoTensors file, and the gate that has it
evaluated before a reader unwraps any data key.

The field is part of the format: ``{"local": <Rego>, "remote": <Rego>}``, written and parsed
here. Evaluating Rego is not (:mod:`ctfs.auth.policy` runs the engine). A reader asks
:func:`authorize`, which calls the evaluator the package root installs
(``ctfs/__init__.py`` → :func:`set_evaluator`); with none installed every policy is denied,
so a reader can never skip the check by accident (fail closed).
"""
from __future__ import annotations

import json
from typing import Any, Callable

from ..errors import PolicyError

DEFAULT_POLICY_SOURCE = "package model\nallow = true"

#: evaluator(local_source, input_doc) -> object with ``allowed`` and ``reason``
_evaluator: Callable[[str, dict | None], Any] | None = None


def set_evaluator(fn: Callable[[str, dict | None], Any] | None) -> None:
    """Install the policy evaluator (the package root does, with ctfs.auth.policy's)."""
    global _evaluator
    _evaluator = fn


def authorize(field_value: str, input_doc: dict | None, where: str) -> None:
    """Evaluate the ``local`` policy of FIELD_VALUE; PolicyError naming WHERE unless it allows."""
    local = parse_policy_field(field_value)["local"]
    if _evaluator is None:
        raise PolicyError(f"{where}: no policy engine is installed, so the embedded policy cannot "
                          f"be evaluated (import ctfs, which installs ctfs.auth.policy)")
    decision = _evaluator(local, input_doc)
    if not decision.allowed:
        raise PolicyError(f"{where}: access denied by the embedded policy: {decision.reason}")


class _DuplicateField(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateField(key)
        out[key] = value
    return out


def _json_type_phrase(value: Any) -> str:
    # serde's "invalid type: <unexpected>" wording
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if isinstance(value, list):
        return "sequence"
    return "map"


def parse_policy_field(value: str) -> dict:
    """Parse the ``__policy__`` metadata value into ``{"local": str, "remote": str}``.

    Raises :class:`ctfs.errors.PolicyError` with a reference-like message
    (``"Failed to parse policy: missing field `remote`"``).  Unknown extra fields are
    ignored, as serde does; a duplicated field is an error, as in serde.
    """
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(f"Failed to parse policy: invalid UTF-8: {exc}") from None
    if not isinstance(value, str):
        raise PolicyError(
            f"Failed to parse policy: expected a JSON string, got {type(value).__name__}"
        )
    try:
        obj = json.loads(value, object_pairs_hook=_no_duplicates)
    except _DuplicateField as exc:
        raise PolicyError(f"Failed to parse policy: duplicate field `{exc}`") from None
    except (ValueError, RecursionError) as exc:
        msg = getattr(exc, "msg", None) or str(exc)
        raise PolicyError(f"Failed to parse policy: {msg}") from None
    if not isinstance(obj, dict):
        raise PolicyError(
            f"Failed to parse policy: invalid type: {_json_type_phrase(obj)}, "
            "expected struct Policy"
        )
    out: dict[str, str] = {}
    for name in ("local", "remote"):
        if name not in obj:
            raise PolicyError(f"Failed to parse policy: missing field `{name}`")
        field = obj[name]
        if not isinstance(field, str):
            raise PolicyError(
                f"Failed to parse policy: invalid type: {_json_type_phrase(field)}, "
                "expected a string"
            )
        out[name] = field
    return out


def make_policy_field(local: str, remote: str | None = None) -> str:
    """The ``__policy__`` value as the reference writes it.

    Compact JSON, ``local`` then ``remote``, non-ASCII kept as UTF-8 (serde_json style).
    ``remote`` defaults to :data:`DEFAULT_POLICY_SOURCE`.
    """
    if not isinstance(local, str):
        raise TypeError("local policy must be a str")
    if remote is None:
        remote = DEFAULT_POLICY_SOURCE
    if not isinstance(remote, str):
        raise TypeError("remote policy must be a str")
    return json.dumps({"local": local, "remote": remote}, separators=(",", ":"),
                      ensure_ascii=False)
