"""The torchjd aggregator bases, with the Gramian and the combination computed by the Gram core."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

from torch import Tensor
from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator, Weighting
from torchjd.linalg import Matrix, PSDMatrix

from ._gramian import combine_rows, compute_gramian
from ._migrations import CheckpointMigrations
from ._parameters import HyperParameters
from ._torchjd_compat import weighting_of_matrix
from ._validation import check_input

A = TypeVar("A", bound=type[Aggregator])
G = TypeVar("G")  # what a forwarded property returns
S = TypeVar("S")  # what it can be set to


def _without_the_second_copy(state_dict: dict[str, Any], prefix: str) -> None:
    """
    Checkpoints written before 0.2 list the weighting's state twice, the second time under the
    composition's prefix (``weighting.weighting.``): the copy under ``gramian_weighting`` is the
    one loaded.
    """

    for key in [k for k in state_dict if k.startswith(prefix + "weighting.weighting.")]:
        del state_dict[key]


class GramianAggregator(CheckpointMigrations, GramianWeightedAggregator):
    """
    :class:`~torchjd.aggregation.GramianWeightedAggregator` whose Gramian is accumulated in at
    least float32 and whose output has the dtype of the Jacobian, even for half-precision input.
    """

    _state_migrations = (_without_the_second_copy,)

    def __init__(self, gramian_weighting: Weighting[PSDMatrix]) -> None:
        super().__init__(gramian_weighting)
        gramian_of = cast(Callable[[Matrix], PSDMatrix], compute_gramian)
        self.weighting = weighting_of_matrix(gramian_weighting, gramian_of)

    def __call__(self, matrix: Tensor, /) -> Tensor:
        return checked_call(self, matrix)

    @staticmethod
    def _combine(matrix: Matrix, weights: Tensor) -> Tensor:
        return combine_rows(weights, matrix)

    def __str__(self) -> str:
        return self.__class__.__name__


class MatrixAggregator(WeightedAggregator):
    """:class:`~torchjd.aggregation.WeightedAggregator` giving an output in the Jacobian's dtype."""

    def __call__(self, matrix: Tensor, /) -> Tensor:
        return checked_call(self, matrix)

    @staticmethod
    def _combine(matrix: Matrix, weights: Tensor) -> Tensor:
        return combine_rows(weights, matrix)


def checked_call(aggregator: Aggregator, matrix: Tensor) -> Tensor:
    """``aggregator(matrix)``, after the input checks of this package's aggregators."""

    # Before torchjd's own check, which assumes a tensor; the Gramian would hide an empty Jacobian.
    check_input(matrix, aggregator, gramian=False)
    return Aggregator.__call__(aggregator, matrix)


class Forwarded(property, Generic[G]):
    """
    A property of an aggregator that reads (and, where the weighting's can be set, writes) the
    same property of its weighting, with that property's type and docstring:
    ``lam = Forwarded(GoldenPendulumWeighting.lam)``. A plain attribute of the weighting is
    forwarded by name, with its type and a docstring: ``Forwarded[Tensor | None]("alpha", "...")``.
    """

    def __init__(self, source: Callable[[Any], G] | str, doc: str | None = None) -> None:
        if isinstance(source, str):
            name, settable, returns = source, True, None
        else:
            weighting_property = cast(property, source)
            assert weighting_property.fget is not None
            name, settable = weighting_property.fget.__name__, weighting_property.fset is not None
            returns = weighting_property.fget.__annotations__.get("return")
            doc = doc or weighting_property.__doc__

        def getter(aggregator: WeightedAggregator) -> Any:
            return getattr(_inner_weighting(aggregator), name)

        def setter(aggregator: WeightedAggregator, value: Any) -> None:
            setattr(_inner_weighting(aggregator), name, value)

        getter.__name__ = name
        if returns is not None:  # the documentation shows the weighting's type
            getter.__annotations__["return"] = returns
        super().__init__(getter, setter if settable else None, None, doc)
        self.__doc__ = doc  # a subclass of property would show its own class docstring

    if TYPE_CHECKING:

        @overload
        def __get__(self, instance: None, owner: type | None = None) -> Forwarded[G]: ...

        @overload
        def __get__(self, instance: object, owner: type | None = None) -> G: ...

        def __get__(self, instance: object, owner: type | None = None) -> Any: ...

        def __set__(self, instance: object, value: G) -> None: ...


class ForwardedConverting(Forwarded[G], Generic[G, S]):
    """
    A :class:`Forwarded` property whose weighting's setter takes more than its getter returns (a
    list for a tuple, any sequence of names): ``ForwardedConverting[tuple[float, float],
    Sequence[float]](GCondWeighting.tie_breaking_weights)``.
    """

    if TYPE_CHECKING:

        def __set__(self, instance: object, value: S) -> None: ...  # type: ignore[override]


def _inner_weighting(aggregator: WeightedAggregator) -> Any:
    if isinstance(aggregator, GramianWeightedAggregator):
        return aggregator.gramian_weighting
    return aggregator.weighting


def forwards_hyperparameters(aggregator_class: A) -> A:
    """
    Class decorator of an aggregator that inherits the mixin of its weighting's hyper-parameters
    (so that the type checker and the documentation see them on the aggregator): each property
    of the mixin that the class does not define itself becomes a :class:`Forwarded` one, which
    reads and writes the weighting's, where the value lives, and ``repr`` shows the weighting's
    values (the aggregator's own parameters, such as GCond's momentum, are its own).
    """

    own = vars(aggregator_class)
    for base in aggregator_class.__mro__[1:]:
        if not issubclass(base, HyperParameters):
            continue
        for name, value in vars(base).items():
            if isinstance(value, property) and name not in own:
                setattr(aggregator_class, name, Forwarded(cast(Any, value)))

    def shown_value(aggregator: Any, name: str) -> object:
        weighting = _inner_weighting(aggregator)
        if name in type(weighting).hyperparameter_names():
            return weighting._shown_value(name)
        return getattr(aggregator, name)

    setattr(aggregator_class, "_shown_value", shown_value)  # noqa: B010 (mypy: a method)
    return aggregator_class
