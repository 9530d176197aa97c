"""What a searched parameter may be: a `Distribution`, and the order its `when` conditions impose.

Searched keys (`search.space`) are dotted keys of the base trial configuration, the same keys `--set` and
the MLflow params use. Distributions are one-key mappings:

    {choice: [v, ...]}          categorical, non-empty, scalar values
    {uniform: [low, high]}      float, low < high
    {loguniform: [low, high]}   float on a log scale, 0 < low < high
    {int: [low, high]}          integer, bounds inclusive, low <= high (low == high pins a value)
    {logint: [low, high]}       integer on a log scale, bounds inclusive, 1 <= low < high
    {quniform: [low, high, q]}  float in steps of q, low < high, q > 0 dividing high - low

plus an optional `when: {dotted.key: value or [values], ...}`: the parameter is sampled only in the trials in
which every one of those other (searched `choice` or base) keys has one of its values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from sbn_study.spec.messages import show, spec_error

DistributionKind = Literal["choice", "uniform", "loguniform", "int", "logint", "quniform"]
DISTRIBUTION_KINDS: tuple[str, ...] = get_args(DistributionKind)

# kind → (what its list must hold, the rule between the numbers)
_RANGE_RULES: dict[str, tuple[str, str]] = {
    "uniform": ("two numbers [low, high]", "low < high"),
    "loguniform": ("two numbers [low, high]", "0 < low < high"),
    "int": ("two integers [low, high]", "low <= high"),
    "logint": ("two integers [low, high]", "1 <= low < high"),
    "quniform": ("three numbers [low, high, q]", "low < high and a step q > 0 that divides high - low"),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_integral(value: Any) -> bool:
    """A finite number with no fractional part (3 and 3.0; not True, not 3.5)."""
    return _is_number(value) and float(value).is_integer()


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _range_holds(kind: str, low: float, high: float, q: float | None) -> bool:
    if kind == "loguniform":
        return 0 < low < high
    if kind == "int":
        return low <= high
    if kind == "logint":
        return 1 <= low < high
    if kind == "quniform":
        # Optuna would lower `high` to the last whole step (to `low` for a step longer than the range),
        # computing in decimal as the spec writes the numbers: 0.1 divides 0.3 - 0.1 there.
        return low < high and q is not None and q > 0 and _divides(q, _decimal(high) - _decimal(low))
    return low < high


def _decimal(number: float) -> Decimal:
    return Decimal(str(number))


def _divides(step: float, length: Decimal) -> bool:
    try:
        return length % _decimal(step) == 0
    except InvalidOperation:  # more steps than decimal's 28 digits count, which Optuna's check refuses too
        return False


def _parse_range(kind: str, args: Any) -> dict[str, Any]:
    shape, rule = _RANGE_RULES[kind]
    size = 3 if kind == "quniform" else 2
    integers = kind in ("int", "logint")
    if (
        not isinstance(args, list)
        or len(args) != size
        or not all(is_integral(a) if integers else _is_number(a) for a in args)
    ):
        raise spec_error(f"{kind} needs {shape}, got {show(args)}")
    numbers = [int(a) for a in args] if integers else list(args)
    low, high, q = numbers[0], numbers[1], numbers[2] if size == 3 else None
    if not _range_holds(kind, low, high, q):
        raise spec_error(f"{kind} needs {rule}, got {show(args)}")
    return {"low": low, "high": high, "q": q}


def _parse_choice(args: Any) -> dict[str, Any]:
    if not isinstance(args, list) or not args:
        raise spec_error(f"choice needs a non-empty list of values, got {show(args)}")
    # Optuna's categorical distributions hold only these types.
    bad = [v for v in args if not _is_scalar(v)]
    if bad:
        raise spec_error(f"choice values must be strings, numbers, booleans or null, got {show(bad[0])}")
    return {"values": tuple(args)}


def _parse_when(raw: Any) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise spec_error(f"when needs a mapping of dotted.key: value or [values], got {show(raw)}")
    when: dict[str, list[Any]] = {}
    for key, value in raw.items():
        values = value if isinstance(value, list) else [value]
        if not isinstance(key, str) or not values or not all(_is_scalar(v) for v in values):
            raise spec_error(f"when needs a mapping of dotted.key: value or [values], got {show(raw)}")
        when[key] = list(values)
    return when


class Distribution(BaseModel):
    """One searched parameter. Built from (and dumped back to) the one-key mapping a spec writes, e.g.
    `Distribution.model_validate({"loguniform": [1e-6, 1e-2]})`; `kind` says which fields apply: `values`
    for `choice`, `low`/`high` (ints for `int`/`logint`) and `q` (for `quniform`) otherwise.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: DistributionKind
    values: tuple[Any, ...] = ()
    low: int | float | None = None
    high: int | float | None = None
    q: float | None = None
    when: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_written_form(cls, data: Any) -> Any:
        example = "a mapping such as {choice: [a, b]} or {loguniform: [low, high]}"
        if not isinstance(data, dict):
            raise spec_error(f"expected {example}, got {show(data)}")
        kinds = [key for key in data if key != "when"]
        unknown = [key for key in kinds if key not in DISTRIBUTION_KINDS]
        if unknown:
            raise spec_error(
                f"expected one of {', '.join(DISTRIBUTION_KINDS)} (and optionally when), "
                f"got {show(unknown[0])}"
            )
        if len(kinds) != 1:
            got = " and ".join(kinds) if kinds else "none"
            raise spec_error(f"expected exactly one of {', '.join(DISTRIBUTION_KINDS)}, got {got}")
        kind = kinds[0]
        fields = _parse_choice(data[kind]) if kind == "choice" else _parse_range(kind, data[kind])
        return {"kind": kind, **fields, "when": _parse_when(data.get("when"))}

    @property
    def args(self) -> list[Any]:
        """The list the spec writes after the kind: the choices, `[low, high]` or `[low, high, q]`."""
        if self.kind == "choice":
            return list(self.values)
        return [self.low, self.high, self.q] if self.kind == "quniform" else [self.low, self.high]

    def refusal(self, value: Any) -> str | None:
        """Why this distribution cannot give `value` (as the trial config stores it), or None when it can:
        what an enqueued configuration must pass for the sampler to hand its value out unchanged."""
        if self.kind == "choice":
            # `True == 1` in Python, but a sampler hands out the one it was given.
            if any(v == value and isinstance(v, bool) == isinstance(value, bool) for v in self.values):
                return None
            return f"expected one of the choices ({', '.join(map(str, self.values))}), got {show(value)}"
        if not _is_number(value):
            return f"expected a number in [{self.low}, {self.high}], got {show(value)}"
        if self.kind in ("int", "logint") and not is_integral(value):
            return f"expected an integer in [{self.low}, {self.high}], got {show(value)}"
        assert self.low is not None and self.high is not None
        if not self.low <= value <= self.high:
            return f"expected a value in [{self.low}, {self.high}] ({self.kind}), got {show(value)}"
        if (
            self.kind == "quniform"
            and self.q is not None
            and not _divides(self.q, _decimal(value) - _decimal(self.low))
        ):
            return f"expected low + a whole number of steps q = {self.q}, got {show(value)}"
        return None

    @model_serializer
    def _to_written_form(self) -> dict[str, Any]:
        written: dict[str, Any] = {self.kind: self.args}
        if self.when:
            written["when"] = self.when
        return written


def sampling_order(space: Mapping[str, Distribution]) -> list[str]:
    """The searched keys, each after the searched keys its `when` conditions name, else in spec order.

    A condition is checked against what this trial sampled, so the key it names must be sampled first,
    wherever the spec lists it. Raises ValueError naming the keys of a cycle.
    """
    order: list[str] = []
    path: list[str] = []

    def visit(key: str) -> None:
        if key in order:
            return
        if key in path:
            raise ValueError(" → ".join([*path[path.index(key) :], key]))
        path.append(key)
        for condition in space[key].when:
            if condition in space:
                visit(condition)
        path.pop()
        order.append(key)

    for key in space:
        visit(key)
    return order
