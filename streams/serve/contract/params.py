"""Path and query parameters: each reads (and refuses with a 400) what a request sends, and
describes itself as an OpenAPI parameter with the same limits."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streams.serve.errors import invalid

_INTEGER = re.compile(r"-?[0-9]+")
#: Digits beyond these are out of every range (and ``int`` refuses over 4300 of them).
_MOST_DIGITS = 20


def anchored(shape: re.Pattern[str]) -> str:
    """``shape`` as a JSON Schema pattern (those match anywhere; the views match whole values)."""
    return f"^(?:{shape.pattern})$"


@dataclass(frozen=True)
class IntegerQuery:
    name: str
    default: int
    minimum: int
    maximum: int
    description: str
    where = "query"

    def read(self, query: Mapping[str, str]) -> int:
        raw = query.get(self.name)
        if raw is None:
            return self.default
        if not _INTEGER.fullmatch(raw):
            raise invalid(self.name, f"{self.name} must be an integer")
        value = int(raw) if len(raw) <= _MOST_DIGITS else self.maximum + 1
        if not self.minimum <= value <= self.maximum:
            raise invalid(self.name, f"{self.name} must be between {self.minimum} and {self.maximum}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": self.minimum, "maximum": self.maximum, "default": self.default}


@dataclass(frozen=True)
class ChoiceQuery:
    """One of ``choices``, or a variant of one (``variants`` maps it to its canonical choice).

    Sent empty (``?status=``), it is as if not sent.
    """

    name: str
    choices: tuple[str, ...]
    description: str
    variants: Mapping[str, str] = field(default_factory=dict)
    default: str | None = None
    where = "query"

    def read(self, query: Mapping[str, str]) -> str | None:
        """The canonical choice asked for, else the default."""
        raw = query.get(self.name)
        if not raw:
            return self.default
        if raw in self.choices:
            return raw
        canonical = self.variants.get(raw)
        if canonical is None:
            raise invalid(self.name, f"unknown {self.name}; expected one of {list(self.choices)}")
        return canonical

    def chosen(self, query: Mapping[str, str]) -> str:
        """:meth:`read`, for a parameter with a default."""
        value = self.read(query)
        assert value is not None, f"{self.name} has no default"
        return value

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string", "enum": [*self.choices, *self.variants, ""]}
        if self.default is not None:
            schema["default"] = self.default
        return schema


@dataclass(frozen=True)
class PatternQuery:
    """A string of a given shape (a page cursor); None when not sent, or sent empty."""

    name: str
    shape: re.Pattern[str]
    description: str
    where = "query"

    def read(self, query: Mapping[str, str]) -> str | None:
        raw = query.get(self.name) or None
        if raw is not None and not self.shape.fullmatch(raw):
            raise invalid(self.name, f"{self.name} is not of the documented shape {self.shape.pattern}")
        return raw

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": f"^(?:{self.shape.pattern})?$"}


@dataclass(frozen=True)
class PathId:
    """An id in the path: a value no row could have (too long, not of its shape) is refused."""

    name: str
    shape: re.Pattern[str]
    max_length: int
    description: str
    where = "path"

    def check(self, value: str) -> str:
        if len(value) > self.max_length or not self.shape.fullmatch(value):
            raise invalid(
                self.name,
                f"{self.name} is not a valid id (at most {self.max_length} characters of the documented shape)",
            )
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "maxLength": self.max_length, "pattern": anchored(self.shape)}


Parameter = IntegerQuery | ChoiceQuery | PatternQuery | PathId


def openapi_parameter(parameter: Parameter) -> dict[str, Any]:
    return {
        "name": parameter.name,
        "in": parameter.where,
        "required": parameter.where == "path",
        "description": parameter.description,
        "schema": parameter.schema(),
    }
