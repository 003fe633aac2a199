"""
Building aggregators and weightings by name, from a dict, a YAML or JSON file, or an OmegaConf
node, so that a config file picks the method: this package's, torchjd's, and those other packages
register under the entry-point group ``torchjd_golden``.

It stands on :mod:`torchjd_golden.aggregation` and on the presets of
:mod:`torchjd_golden.schedule`.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

import torch
import torchjd.aggregation as torchjd_aggregation
from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator, Weighting

from . import aggregation
from .schedule._presets import expand_preset

__all__ = [
    "ENTRY_POINT_GROUP",
    "aggregator_from_config",
    "available_names",
    "weighting_from_config",
]

ENTRY_POINT_GROUP = "torchjd_golden"
"""The entry-point group under which aggregators and weightings are registered (ours included)."""

Kind = Literal["aggregator", "weighting"]
_BASES: dict[Kind, type] = {"aggregator": Aggregator, "weighting": Weighting}
_ABSTRACT = {Aggregator, WeightedAggregator, GramianWeightedAggregator, Weighting}
_FILE_SUFFIXES = {".yaml", ".yml", ".json"}


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., Any]


def aggregator_from_config(spec: object) -> Aggregator:
    """
    Builds an aggregator from ``spec``: a name, or a mapping with ``name`` (or Hydra's
    ``_target_``) and keyword arguments; given directly, as an OmegaConf node, or as the path of a
    YAML or JSON file holding either.

    Names cover this package's aggregators and every aggregator torchjd exports (``UPGrad``,
    ``MGDA``, ``Mean``, ``PCGrad``, ...), case-insensitively, with snake_case or kebab-case
    aliases (``golden_pendulum``, ``excess-mtl``), plus those other packages register under the
    ``torchjd_golden`` entry-point group. Where both packages define a name (``ExcessMTL``), this
    package's class is used; ``torchjd.ExcessMTL`` names torchjd's. Lists become tensors for
    tensor parameters (``pref_vector``), and mappings become weightings for weighting parameters.

    >>> aggregator_from_config({"name": "golden_pendulum", "lam": 0.3})
    GoldenPendulum(lam=0.3, n_iter=25, min_weight_fraction=0.02, pcgrad=True)

    :raises ValueError: For an unknown name or keyword (the message lists the valid ones), or a
        spec of the wrong form.
    """

    aggregator: Aggregator = _build("aggregator", spec)
    return aggregator


def weighting_from_config(spec: object) -> Weighting[Any]:
    """
    Builds a weighting from ``spec``, as :func:`aggregator_from_config` builds an aggregator:
    ``"golden_pendulum"`` and ``"GoldenPendulumWeighting"`` both name
    :class:`~torchjd_golden.GoldenPendulumWeighting`, e.g. to use with the autogram ``Engine``.
    """

    weighting: Weighting[Any] = _build("weighting", spec)
    return weighting


def available_names(kind: Kind = "aggregator") -> list[str]:
    """
    The names :func:`aggregator_from_config` (or :func:`weighting_from_config`) knows, each class
    once, plus the qualified names of the classes another one shadows (``torchjd.ExcessMTL``).
    """

    if kind not in _BASES:
        raise ValueError(f'Unknown kind {kind!r}: "aggregator" or "weighting".')
    registry = _registry(kind)
    names = set()
    for entry in registry.values():
        short = entry.name.rpartition(".")[2]
        if "." not in entry.name or registry[_normalize(kind, short)].factory is not entry.factory:
            names.add(entry.name)
    return sorted(names, key=str.lower)


def _build(kind: Kind, spec: object) -> Any:
    name, keywords = _parse(kind, expand_preset(_read(spec)))
    entry = _lookup(kind, name)
    return entry.factory(**_prepare_keywords(entry, keywords))


def _read(spec: object) -> object:
    if isinstance(spec, os.PathLike) or (
        isinstance(spec, str) and Path(spec).suffix.lower() in _FILE_SUFFIXES
    ):
        return _read_file(Path(spec))
    if type(spec).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf  # noqa: PLC0415 - only needed for OmegaConf input

        return OmegaConf.to_container(spec, resolve=True)
    return spec


def _read_file(path: Path) -> object:
    if not path.is_file():
        raise ValueError(f"The config file {str(path)!r} does not exist.")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        return json.loads(text)
    try:
        import yaml  # noqa: PLC0415 - an optional dependency
    except ImportError as error:
        raise ImportError(
            "Reading a YAML config needs PyYAML: pip install 'torchjd-golden[config]'."
        ) from error
    return yaml.load(text, Loader=_yaml_loader(yaml))


# PyYAML follows YAML 1.1, where a float needs a decimal point: ``1e-8`` (GCond's own default
# ``eps``) would be the string "1e-8". YAML 1.2 reads it as a number, and so do we.
_YAML_12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


@cache
def _yaml_loader(yaml: Any) -> type:
    class Loader(yaml.SafeLoader):
        """PyYAML's safe loader, reading exponent floats without a decimal point as floats."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_12_FLOAT, list("-+0123456789"))
    return Loader


def _parse(kind: Kind, spec: object) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        keywords = dict(spec)
        names = [keywords.pop(key) for key in ("name", "_target_") if key in keywords]
        if len(names) == 1 and isinstance(names[0], str):
            return names[0], keywords
    raise ValueError(
        f"{_article(kind).capitalize()} {kind} config must be a name, or a mapping with a `name` "
        f"(or `_target_`) string and keyword arguments. Found {spec!r}."
    )


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _lookup(kind: Kind, name: str) -> _Entry:
    registry = _registry(kind)
    entry = registry.get(_normalize(kind, name))
    if entry is None:
        closest = difflib.get_close_matches(_normalize(kind, name), list(registry), n=1)
        hint = (
            f" Did you mean {_spelled_like(name, registry[closest[0]].name)!r}?" if closest else ""
        )
        raise ValueError(
            f"Unknown {kind} {name!r}.{hint} Valid names (case-insensitive, snake_case "
            f"accepted): {', '.join(available_names(kind))}."
        )
    return entry


def _spelled_like(typed: str, name: str) -> str:
    """``name`` (a class name) in the style of what the user ``typed``: snake_case or as is."""

    if typed != typed.lower():
        return name
    package, _, short = name.rpartition(".")
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", short).lower()
    return f"{package.lower()}.{snake}" if package else snake


def _prepare_keywords(entry: _Entry, keywords: dict[str, Any]) -> dict[str, Any]:
    parameters = inspect.signature(entry.factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    valid = [n for n, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(keywords) - set(valid))
    if unknown and not takes_any:
        raise ValueError(
            f"Unknown keyword(s) {', '.join(map(repr, unknown))} for {entry.name}. "
            f"Valid keywords: {', '.join(valid) or '(none)'}."
        )
    return {key: _convert(parameters.get(key), value) for key, value in keywords.items()}


def _convert(parameter: inspect.Parameter | None, value: Any) -> Any:
    """A list for a tensor parameter becomes a tensor; a spec for a weighting, a weighting."""

    annotation = "" if parameter is None else str(parameter.annotation)
    if "Weighting" in annotation and isinstance(value, str | Mapping):
        return weighting_from_config(value)
    if "Tensor" in annotation and isinstance(value, list | tuple):
        return torch.tensor(value)
    return value


def _normalize(kind: Kind, name: str) -> str:
    key = name.strip().lower().replace("_", "").replace("-", "")
    key = key.replace("torchjd.aggregation.", "torchjd.")
    if kind == "weighting" and key.endswith("weighting"):
        key = key.removesuffix("weighting")
    return key


@cache
def _registry(kind: Kind) -> dict[str, _Entry]:
    """Normalised name -> entry: this package first, then torchjd, then entry-point plugins."""

    registry: dict[str, _Entry] = {}
    sources = [
        ("torchjd_golden", {n: getattr(aggregation, n) for n in aggregation.__all__}),
        ("torchjd", {n: getattr(torchjd_aggregation, n) for n in torchjd_aggregation.__all__}),
    ]
    for package, objects in sources:
        for name, obj in objects.items():
            if _is_buildable(kind, obj):
                _register(kind, registry, package, name, obj)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if _normalize(kind, point.name) not in registry:
            loaded = point.load()
            if _is_buildable(kind, loaded):
                _register(kind, registry, point.value.partition(":")[0], point.name, loaded)
    return registry


def _is_buildable(kind: Kind, obj: object) -> bool:
    return (
        isinstance(obj, type)
        and issubclass(obj, _BASES[kind])
        and obj not in _ABSTRACT
        and not inspect.isabstract(obj)
    )


def _register(kind: Kind, registry: dict[str, _Entry], package: str, name: str, obj: type) -> None:
    qualified = f"{package}.{name}"
    registry.setdefault(_normalize(kind, name), _Entry(name, obj))
    registry.setdefault(_normalize(kind, qualified), _Entry(qualified, obj))
