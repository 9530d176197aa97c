"""Spec problems as the user reads them: one `<yaml.key.path>: <what was expected>, got <what was found>`
line each, from pydantic's errors and from the spec's own checks.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Sequence
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from sbn_study.errors import UserError


class SpecError(UserError):
    """Every problem found in a spec, one `<yaml.key.path>: <expected>, got <found>` line each."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def spec_error(message: str) -> PydanticCustomError:
    """A validator's error whose line reads `<yaml.key.path>: <message>`."""
    # The message goes in through the context because spec messages contain `{...}`, which pydantic would
    # otherwise read as template fields.
    return PydanticCustomError("spec", "{message}", {"message": message})


# repr() of a value walks all of it, and a spec's values can be huge (a long string, a YAML alias that
# expands a list many times over): reprlib looks at a bounded part only.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 3, 80, 80
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = _SHOWN.maxfrozenset = 8


def show(value: Any) -> str:
    """A value as an error line quotes it, cut to 80 characters."""
    text = _SHOWN.repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


_EXPECTED_TYPES: dict[str, str] = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
_BOUNDS: dict[str, str] = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def model_at(root: type[BaseModel], path: Sequence[Any]) -> type[BaseModel] | None:
    """The model class found by following `path` (field names) from `root`, or None off the models."""
    cls = root
    for part in path:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        cls = annotation
    return cls


def _field_at(root: type[BaseModel], loc: Sequence[Any]) -> FieldInfo | None:
    parent = model_at(root, loc[:-1])
    return parent.model_fields.get(loc[-1]) if parent and loc and isinstance(loc[-1], str) else None


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _constraints(field: FieldInfo) -> list[Any]:
    """A field's constraints, with those an optional field keeps inside its union (`Seed | None`)."""
    found = list(field.metadata)
    for member in get_args(field.annotation):
        for item in getattr(member, "__metadata__", ()):
            found += item.metadata if isinstance(item, FieldInfo) else [item]
    return found


def _bounds(field: FieldInfo | None, err: ErrorDetails) -> str:
    sources = _constraints(field) if field else [err.get("ctx", {})]
    parts = []
    for source in sources:
        for name, symbol in _BOUNDS.items():
            bound = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
            if bound is not None:
                parts.append(f"{symbol} {_number(bound)}")
    return " and ".join(parts)


def _loc_text(loc: Sequence[Any]) -> str:
    text = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for an error in a dict key rather than its value
            continue
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def describe(err: ErrorDetails, root: type[BaseModel]) -> str:
    """The part of an error line after `<yaml.key.path>: `; `root` is the model the error's path starts at."""
    kind, loc = err["type"], err["loc"]
    got = f", got {show(err['input'])}"
    if kind == "spec":
        return err["msg"]
    if kind == "missing":
        return "missing required key"
    if kind == "extra_forbidden":
        parent = model_at(root, loc[:-1])
        match = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1) if parent else []
        return f"unknown key (did you mean {_loc_text((*loc[:-1], match[0]))}?)" if match else "unknown key"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
        return f"expected one of {', '.join(allowed)}{got}"
    bounds = _bounds(_field_at(root, loc), err)
    if kind in _BOUND_ERRORS:
        return f"must be {bounds}{got}"
    if kind in _EXPECTED_TYPES:
        return f"expected {_EXPECTED_TYPES[kind]}{' ' + bounds if bounds else ''}{got}"
    message = err["msg"]
    return f"{message[:1].lower()}{message[1:]}{got}"


def error_lines(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """One `<yaml.key.path>: <problem>` line per error of validating `root`."""
    return [f"{_loc_text(err['loc'])}: {describe(err, root)}" for err in exc.errors()]
