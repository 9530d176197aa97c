"""Whether the settings a study searches can change its trials, and settings that work against each other.

The catalog says when a setting acts (`acts_only_when`, e.g. `model.width` only for the tiny model); the base
configuration and the search space say which values the deciding settings can have in the trials that sample
it. A searched setting that can act in none of them is an error: every value the sampler tries is the same
trial. One that acts in some of them only, with no `when:` keeping it to those, is a warning: the sampler
spends trials on values that change nothing, and models noise in them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sbn_study.spec.catalog import ARCHITECTURES, NORMS, SPECTRAL_EPS_KINDS, acts_only_when
from sbn_study.spec.distributions import Distribution, sampling_order

Space = Mapping[str, Distribution]
_KNOWN: dict[str, Mapping[str, Any]] = {"norm.kind": NORMS, "model.arch": ARCHITECTURES}

# Every dataset is 32×32: a site's spectral variance is at most that of a 32×32 map (stage 1, or the stem).
_LARGEST_MAP = 32 * 32
# The spectral variance of a unit-variance map (what a BN hands SBN) under each FFT norm, by Parseval.
_SPECTRAL_VARIANCE = {"backward": float(_LARGEST_MAP), "ortho": 1.0, "forward": 1.0 / _LARGEST_MAP}
# eps at 10 % of the variance moves SBN's rescale γ/√(σ² + ε) by 5 %; below that it is a safeguard, above
# it a different normalization.
_EPS_SHARE = 0.1


def _unique(values: Iterable[Any]) -> list[Any]:
    unique: list[Any] = []
    for value in values:
        if value not in unique:
            unique.append(value)
    return unique


def _listing(values: Sequence[Any]) -> str:
    return f"always {values[0]}" if len(values) == 1 else f"one of {', '.join(map(str, values))}"


def _yaml_list(values: Sequence[Any]) -> str:
    return json.dumps(list(values))  # JSON is YAML, with strings quoted: "34" stays a string


def _may_skip(dist: Distribution, base: Mapping[str, Any], space: Space) -> bool:
    """Whether some trial does not sample `dist` (and so keeps the base value): a condition can fail."""
    return any(
        any(value not in wanted for value in _values(key, base, space, {}))
        for key, wanted in dist.when.items()
    )


def _values(key: str, base: Mapping[str, Any], space: Space, given: Mapping[str, Sequence[Any]]) -> list[Any]:
    """The values `key` can have in a trial in which every key of `given` has one of its values: the
    choices, or the ends of a range, of a searched key, and the base value where it may not be sampled.
    """
    dist = space.get(key)
    values: list[Any] = []
    compatible = dist is not None and all(
        condition not in given or any(value in wanted for value in given[condition])
        for condition, wanted in dist.when.items()
    )
    if dist is not None and compatible:
        values += dist.values if dist.kind == "choice" else [dist.low, dist.high]
    if (dist is None or not compatible or _may_skip(dist, base, space)) and key in base:
        values.append(base[key])
    return _unique(v for v in values if key not in given or v in given[key])


def _searched_problems(base: Mapping[str, Any], space: Space) -> tuple[list[str], list[str]]:
    errors: list[str] = []
    warnings: list[str] = []
    for key, dist in space.items():
        where = f"search.space.{key}"
        for condition, wanted in dist.when.items():
            possible = _values(condition, base, space, {})
            if possible and not any(value in wanted for value in possible):
                errors.append(
                    f"{where}: never sampled: its when needs {condition} in {_yaml_list(wanted)}, "
                    f"which is {_listing(possible)}"
                )
        for need in acts_only_when(key):
            # Unknown architectures and kinds are errors of their own: whether a setting acts for them is moot.
            known = _KNOWN.get(need.key)
            possible = [v for v in _values(need.key, base, space, dist.when) if known is None or v in known]
            acting = [value for value in possible if need.holds(value)]
            if possible and not acting:
                errors.append(
                    f"{where}: can never act: it acts only when {need}, and {need.key} is "
                    f"{_listing(possible)} in the trials that sample it; search {need.key} too, or drop {key}"
                )
            elif len(acting) < len(possible):
                idle = [value for value in possible if not need.holds(value)]
                warnings.append(
                    f"{where}: acts only when {need}, but is also sampled when {need.key} is "
                    f"{' or '.join(map(str, idle))}; restrict it with when: {{{need.key}: {_yaml_list(acting)}}}"
                )
    return errors, warnings


def _requirement_errors(base: Mapping[str, Any], space: Space) -> list[str]:
    """Kinds whose layer cannot be built with a value of a setting that a trial of that kind can have."""
    errors = []
    kinds = _values("norm.kind", base, space, {})
    for kind in (k for k in kinds if k in NORMS):
        for setting, needed, why in NORMS[kind].requires:
            key = f"norm.{setting}"
            bad = [v for v in _values(key, base, space, {"norm.kind": [kind]}) if v != needed]
            if bad:
                where = next((f"search.space.{k}" for k in (key, "norm.kind") if k in space), key)
                errors.append(
                    f"{where}: norm.kind {kind} needs {key}: {json.dumps(needed)} ({why}), but a trial of "
                    f"kind {kind} can have {key}: {', '.join(map(json.dumps, bad))}"
                )
    return errors


def _eps_warnings(base: Mapping[str, Any], space: Space) -> list[str]:
    """An eps that, under the FFT norm it can meet, is no longer small against SBN's spectral variance."""
    kinds = [kind for kind in _values("norm.kind", base, space, {}) if kind in SPECTRAL_EPS_KINDS]
    if not kinds:
        return []
    given: dict[str, Sequence[Any]] = {"norm.kind": kinds}
    fft_norms = [f for f in _values("norm.fft_norm", base, space, given) if f in _SPECTRAL_VARIANCE]
    too_large = {}
    for fft_norm in fft_norms:
        eps = max(_values("norm.eps", base, space, {**given, "norm.fft_norm": [fft_norm]}), default=0.0)
        if eps > _EPS_SHARE * _SPECTRAL_VARIANCE[fft_norm]:
            too_large[fft_norm] = eps
    if not too_large:
        return []
    where = "search.space.norm.eps" if "norm.eps" in space else "norm.eps"
    fine = [f for f in fft_norms if f not in too_large]
    advice = f"restrict it with when: {{norm.fft_norm: {_yaml_list(fine)}}} or" if fine else "use"
    return [
        f"{where}: reaches {eps:g} where norm.fft_norm is {fft_norm}, under which SBN's spectral variance of "
        f"a unit-variance 32×32 map is about {_SPECTRAL_VARIANCE[fft_norm]:.0e}: an eps above "
        f"{_EPS_SHARE * _SPECTRAL_VARIANCE[fft_norm]:.0e} changes what SBN computes; {advice} a smaller eps"
        for fft_norm, eps in too_large.items()
    ]


def _acyclic(space: Space) -> bool:
    try:
        sampling_order(space)
    except ValueError:
        return False  # reported by the space's own check; the analysis here would not end
    return True


def effect_errors(base: Mapping[str, Any], space: Space) -> list[str]:
    """Searched settings that can never act or are never sampled, and values a norm kind cannot be built
    with; `base` maps the base configuration's dotted keys to their values, `space` holds the searched
    distributions with values as the trial configuration stores them."""
    if not _acyclic(space):
        return []
    return _searched_problems(base, space)[0] + _requirement_errors(base, space)


def effect_warnings(base: Mapping[str, Any], space: Space) -> list[str]:
    """Searched settings sampled also where they cannot act, and an eps too large for an FFT norm it meets."""
    if not _acyclic(space):
        return []
    return _searched_problems(base, space)[1] + _eps_warnings(base, space)
