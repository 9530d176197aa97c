"""The ways into a spec: `load_spec` (a YAML file), `spec_from_dict` (YAML-shaped data) and
`load_trial_config` (a standalone trial configuration, what final training takes).

Each applies the `--set` overrides, validates the schema and every cross-field rule, and raises one
`SpecError` that lists *all* problems, one line each, as `<yaml.key.path>: <what was expected>, got <what
was found>`.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Hashable, Sequence
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from sbn_study.spec.config import TrialConfig, flatten, multi_domain_refusal
from sbn_study.spec.distributions import Distribution
from sbn_study.spec.messages import SpecError, error_lines, show
from sbn_study.spec.rules import as_stored, cross_field_errors
from sbn_study.spec.schema import (
    PLACEMENT,
    TRIAL_DEFAULTS,
    TRIAL_SECTIONS,
    SearchConfig,
    StudySpec,
    coerce,
)

# A spec is a few kilobytes, nests 6 deep (search.space.KEY.when.KEY.[values]) and holds a few hundred
# values. The limits refuse what no spec needs before it costs anything: YAML aliases can make a 500-byte
# document expand to billions of values (every later step walks them all), and deep nesting would exhaust
# PyYAML's recursion.
MAX_SPEC_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_VALUES = 10_000


class _SpecLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` (no Python tags) that also rejects duplicate keys, which PyYAML otherwise drops
    silently (a second `space:` block would replace the first), reads `1e-6` as a float like YAML 1.2
    (YAML 1.1 wants `1.0e-6`), refuses documents beyond the limits above, and reports a value it cannot
    construct (`2001-13-45`, an int of 5,000 digits) as a YAML error rather than a crash.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # PyYAML composes recursively: the depth is checked before the recursion could run out.
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _limit_error(_TOO_DEEP, self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _measure(node, 1, {}, set())
        return self.construct_document(node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            problem = str(exc).split(":")[0] or type(exc).__name__
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this {node.tag.rsplit(':', 1)[-1]} ({problem})", node.start_mark
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


_TOO_DEEP = f"nests more than {MAX_DEPTH} levels deep; no spec needs that"


def _limit_error(problem: str, mark: yaml.Mark) -> yaml.YAMLError:
    return yaml.composer.ComposerError(None, None, f"the document {problem}", mark)


def _measure(
    node: yaml.Node, depth: int, measured: dict[int, tuple[int, int]], open_ids: set[int]
) -> tuple[int, int]:
    """The values `node` holds and the levels it nests with every alias written out, `node` being at `depth`;
    a YAML error beyond the limits. `measured` keeps what each shared (aliased) node holds, so each is walked
    once however often it is referred to.
    """
    if depth > MAX_DEPTH:
        raise _limit_error(_TOO_DEEP, node.start_mark)
    known = measured.get(id(node))
    if known is None:
        if id(node) in open_ids:
            raise _limit_error("has an alias inside its own anchor, which expands forever", node.start_mark)
        open_ids.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        values, levels = 1, 0
        for child in children:
            child_values, child_levels = _measure(child, depth + 1, measured, open_ids)
            values, levels = values + child_values, max(levels, child_levels + 1)
            if values > MAX_VALUES:
                raise _limit_error(
                    f"holds more than {MAX_VALUES} values once its aliases are expanded; no spec needs that",
                    node.start_mark,
                )
        open_ids.discard(id(node))
        known = measured[id(node)] = (values, levels)
    if depth + known[1] > MAX_DEPTH:
        raise _limit_error(_TOO_DEEP, node.start_mark)
    return known


_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


class _SpecDumper(yaml.SafeDumper):
    """Quotes every string the spec loader would read as something else: a Tune trial id such as `1e999999`
    is a float (inf) to the loader's YAML 1.2 rule, which plain `safe_dump` leaves unquoted."""


_SpecDumper.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def dump_yaml(document: Any) -> str:
    """YAML that `load_spec`/`load_trial_config` read back as the same values."""
    return yaml.dump(document, Dumper=_SpecDumper, sort_keys=False)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return f"line {exc.problem_mark.line + 1}: {exc.problem}"
    return str(exc)


def _apply_override(data: dict[str, Any], override: str) -> str | None:
    """Applies one `--set key=value` to the raw spec; returns an error line instead when it cannot."""
    key, equals, raw = override.partition("=")
    parts = key.strip().split(".")
    if not equals or not all(parts):
        return f"--set {override}: expected key=value"
    try:
        value = yaml.load(raw, Loader=_SpecLoader)
    except yaml.YAMLError as exc:
        return f"--set {override}: value is not valid YAML: {_yaml_problem(exc)}"
    searched = parts[:2] == ["search", "space"] and len(parts) > 2
    if searched:
        # A searched key is itself dotted: search.space.norm.eps is space["norm.eps"].
        parts = [*parts[:2], ".".join(parts[2:])]
    node = data
    for depth, part in enumerate(parts[:-1], start=1):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            return f"--set {override}: {'.'.join(parts[:depth])} is not a mapping, got {show(node[part])}"
        node = node[part]
    if searched and value is None:
        # `--set search.space.KEY=null` stops searching KEY.
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
    return None


def _valid_parts(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Distribution], SearchConfig | None]:
    """What of a spec that failed validation is still valid: the base settings (dotted key → value, the
    default where none is given), the distributions, and the search section with those distributions, so
    that the cross-field rules still run and report what they find.
    """
    given = flatten({name: data[name] for name in TRIAL_SECTIONS if isinstance(data.get(name), dict)})
    base: dict[str, Any] = {}
    for key, default in TRIAL_DEFAULTS.items():
        if not isinstance(data.get(key.split(".")[0], {}), dict):
            continue  # a broken section: its defaults would only add false cross-field errors
        try:
            base[key] = as_stored(key, given.get(key, default))
        except ValidationError:
            continue
    raw = data.get("search")
    if not isinstance(raw, dict):
        return base, {}, None
    space: dict[str, Distribution] = {}
    for key, value in raw["space"].items() if isinstance(raw.get("space"), dict) else ():
        try:
            space[str(key)] = Distribution.model_validate(value)
        except ValidationError:
            continue
    try:
        return base, space, SearchConfig.model_validate({**raw, "space": space})
    except ValidationError:
        return base, space, None


def _prepared(data: Any, overrides: Sequence[str], source: str) -> tuple[dict[str, Any], list[str]]:
    """A copy of the document with the overrides applied and the placement coerced, and the override errors."""
    if not isinstance(data, dict):
        got = "an empty document" if data is None else type(data).__name__
        raise SpecError([f"{source}: expected a mapping at the top level, got {got}"])
    data = copy.deepcopy(data)
    errors = [error for override in overrides if (error := _apply_override(data, override))]
    if isinstance(data.get("norm"), dict) and "placement" in data["norm"]:
        data["norm"]["placement"] = coerce(PLACEMENT, data["norm"]["placement"])
    return data, errors


def _build(data: Any, overrides: Sequence[str], source: str) -> StudySpec:
    data, errors = _prepared(data, overrides, source)
    spec: StudySpec | None = None
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        errors += error_lines(exc, StudySpec)
        base, space, search = _valid_parts(data)
    else:
        base, space, search = flatten(spec.base_config().model_dump()), spec.search.space, spec.search
    rule_errors, resolved = cross_field_errors(base, space, search)
    errors += rule_errors
    if errors or spec is None:
        raise SpecError(list(dict.fromkeys(errors)))
    # Trials then sample the values the trial config stores ("34", not 34), and MLflow logs those.
    spec.search.space.update(resolved)
    return spec


def spec_from_dict(data: Any, overrides: Sequence[str] = ()) -> StudySpec:
    """Validates a spec given as (YAML-shaped) data; `overrides` are `key=value` strings as for --set."""
    return _build(data, overrides, "spec")


def read_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """The document in the file at `path` (`what` it is, for errors) as the spec loader reads it: safe, no
    duplicate keys, within the limits above. Raises SpecError with one line saying what is wrong."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_SPEC_BYTES + 1)  # never more: the path may be a device or a pipe
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError(
                [f"{path}: cannot read {what}: larger than {MAX_SPEC_BYTES:,} bytes; no spec needs that"]
            )
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError([f"{path}: cannot read {what}: {reason}"]) from None
    try:
        return yaml.load(text, Loader=_SpecLoader)
    except yaml.YAMLError as exc:
        raise SpecError([f"{path}: not valid YAML: {_yaml_problem(exc)}"]) from None


def load_spec(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> StudySpec:
    """Reads, overrides (`key=value` strings, values in YAML) and validates a spec file; relative paths in
    it resolve against the current directory. Raises SpecError listing every problem."""
    return _build(read_yaml(path, "spec"), overrides, str(path))


TrialModel = TypeVar("TrialModel", bound=TrialConfig)


def load_trial_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), model: type[TrialModel] = TrialConfig
) -> TrialModel:
    """Reads a standalone trial configuration (no `name`, `search`, ...: what final training takes) and
    checks it like a spec's base configuration (schema, architecture, norm kind, placement), with `--set`
    overrides and the same error lines. `model` may extend TrialConfig with more sections.
    """
    data, errors = _prepared(read_yaml(path, "config"), overrides, str(path))
    if "search" in data:
        raise SpecError(
            [
                f"{path}: a study spec (it has search:), not one trial's configuration: export the configs of "
                "a study's best trials with `sbn-study export STUDY` and train those"
            ]
        )
    config: TrialModel | None = None
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        errors += error_lines(exc, model)
        base = _valid_parts(data)[0]
    else:
        base = flatten(config.model_dump(include=set(TRIAL_SECTIONS)))
    errors += cross_field_errors(base, {}, None)[0]
    if config is not None and (refusal := multi_domain_refusal(config.data, "final training")):
        errors.append(refusal)
    if errors or config is None:
        raise SpecError(list(dict.fromkeys(errors)))
    return config
