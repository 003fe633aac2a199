"""
Hyper-parameters written once. A method's hyper-parameters are the parameters of its
constructors, in their order, each a property of the same name whose setter validates the value.
The properties live in a mixin (:class:`HyperParameters`) that the weighting and the aggregator
both inherit; the aggregator's read and write its weighting's
(:func:`~._aggregator_bases.forwards_hyperparameters`), where the values live.

The constructor's signature is then the one list of them, as scikit-learn's estimators have it:
the weighting assigns them from its arguments (:meth:`HyperParameters._set_hyperparameters`),
the aggregator builds its weighting from its own (:meth:`HyperParameters.from_arguments`), and
``repr`` shows them. The signatures themselves stay written out, for the reader, the type
checker and the documentation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

H = TypeVar("H", bound="HyperParameters")

_NAMES: dict[type, tuple[str, ...]] = {}  # the hyper-parameters of each class, once read


class HyperParameters:
    """Mixin of a class whose hyper-parameters are its constructor's parameters (see above)."""

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        """The names of the constructor's parameters, in their order."""
        names = _NAMES.get(cls)
        if names is None:
            names = _NAMES[cls] = tuple(inspect.signature(cls).parameters)
        return names

    @classmethod
    def from_arguments(cls: type[H], arguments: Mapping[str, Any]) -> H:
        """
        An instance whose hyper-parameters take their values from ``arguments``: the
        ``locals()`` of a constructor with (at least) the same parameters.
        """

        constructor = cast(Callable[..., H], cls)
        return constructor(**{name: arguments[name] for name in cls.hyperparameter_names()})

    def _set_hyperparameters(self, arguments: Mapping[str, Any]) -> None:
        """
        Sets every hyper-parameter from the constructor's ``locals()``, in the constructor's order
        (a setter may check the value against an earlier one).
        """

        for name in self.hyperparameter_names():
            setattr(self, name, arguments[name])

    def _shown_value(self, name: str) -> object:
        """The value ``repr`` shows for hyper-parameter ``name``."""
        return getattr(self, name)

    def __repr__(self) -> str:
        shown = (f"{name}={self._shown_value(name)!r}" for name in self.hyperparameter_names())
        return f"{type(self).__name__}({', '.join(shown)})"
