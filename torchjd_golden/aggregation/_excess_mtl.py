r"""
ExcessMTL: exponentiated task weights driven by excess-risk estimates.

Reference: He et al., `Robust Multi-Task Learning with Excess Risks
<https://proceedings.mlr.press/v235/he24n.html>`_ (ICML 2024), as implemented by
``torchjd.aggregation.ExcessMTL`` 0.18.0, whose outputs this module reproduces.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torchjd import Stateful
from torchjd.linalg import Matrix

from ._aggregator_bases import (
    Forwarded,
    ForwardedConverting,
    MatrixAggregator,
    forwards_hyperparameters,
)
from ._gramian import accumulation_dtype, in_column_blocks, nan_unless, over_all_columns
from ._kernels._paths import chosen_path
from ._parameters import HyperParameters
from ._state import LazyState
from ._tasks import NamedTasks, TaskNames
from ._torchjd_compat import MatrixWeightingBase, NonDifferentiable
from ._validation import check_input, check_int, check_real

# Added under the square root of the accumulated squares and to the baseline, as the reference.
_EPS = 1e-7

# Rows whose norm is below this need no scaling of their squares in any dtype S is kept in.
_UNSCALED_BELOW = 2.0**43

# The float64 encoding: 52 mantissa bits, then 11 exponent bits biased by 1023 (all ones: inf, NaN).
_MANTISSA_BITS, _EXPONENT_MASK, _EXPONENT_BIAS = 52, 0x7FF, 1023

# Elements of the Jacobian processed at once: each of the two temporaries of a chunk holds this
# many values (1 MiB in float32, so a chunk stays in cache), whatever the size of the Jacobian.
_CHUNK_ELEMENTS = 1 << 18


def accumulate_excess_risks(
    matrix: Tensor,
    squared_sum: Tensor,
    finite: Tensor | Literal[True],
    scales: Tensor | None = None,
    rescales: Tensor | None = None,
    rows: Tensor | None = None,
) -> Tensor:
    r"""
    Adds :math:`J \odot J` to the rows ``rows`` (all when ``None``) of ``squared_sum`` :math:`S`
    in place and returns the excess-risk estimates :math:`\hat E_k = \sum_j J_{kj}^2 /
    \sqrt{S_{kj} + 10^{-7}}` (with the updated :math:`S`), the diagonal-AdaGrad proxy of
    :math:`g_k^\top H_k^{-1} g_k`.

    Row :math:`k` of ``squared_sum`` holds :math:`S_k / \sigma_k^2`, with :math:`\sigma_k` (a
    power of two, ``scales``, one per row of ``matrix``) large enough that the squares of
    :math:`J_k / \sigma_k` cannot overflow the state's dtype; the stored row is first multiplied
    by ``rescales`` :math:`(\sigma^{old}_k / \sigma_k)^2` where :math:`\sigma_k` grew. Without
    ``scales`` (all ones), the arithmetic is that of :math:`S` itself, two operations per chunk
    shorter.

    The columns are processed in chunks, so the only temporaries are two chunk-sized blocks (and,
    for a subset of rows, the chunk of those rows). When ``finite`` (a 0-dim boolean tensor) is
    false, :math:`S` is left bit-for-bit unchanged. ``finite=True`` (a Python bool: the caller
    has read it) skips the chunk's masked copy.
    """

    m, n = matrix.shape
    risks = squared_sum.new_zeros(m)
    zero = squared_sum.new_zeros(())
    eps: float | Tensor = _EPS
    if scales is not None:
        inverse_scales = (1.0 / scales).unsqueeze(1)
        eps = (_EPS / scales**2).unsqueeze(1)  # 1e-7 added to S, in the units of S / sigma^2
    width = max(1, _CHUNK_ELEMENTS // max(m, 1))
    for start in range(0, n, width):
        # In the state's dtype; zero on a non-finite step, so that S stays unchanged. Nothing
        # below writes into it: it may be a view of the caller's J.
        gradients = matrix[:, start : start + width].to(squared_sum.dtype)
        if finite is not True:
            gradients = torch.where(finite, gradients, zero)
        if scales is not None:
            gradients = gradients * inverse_scales
        columns = squared_sum[:, start : start + width]
        accumulated = columns if rows is None else columns.index_select(0, rows)
        if rescales is not None:
            accumulated.mul_(rescales.unsqueeze(1))
        accumulated.addcmul_(gradients, gradients)
        if rows is not None:
            columns.index_copy_(0, rows, accumulated)
        inverse_roots = accumulated.add(eps).rsqrt_()
        risks += torch.linalg.vecdot(inverse_roots.mul_(gradients), gradients, dim=1)
    return risks if scales is None else risks * scales


def overflow_free_scales(largest: Tensor, previous: Tensor, dtype: torch.dtype) -> Tensor:
    r"""
    The scales :math:`\sigma_k` (powers of two, at least ``previous``) for rows whose largest
    entries are ``largest``: :math:`|J_k / \sigma_k| < 2^{43}` in float32 (so that a million
    steps' squares add up below its largest value), i.e. 1 for any gradient below :math:`8.8
    \cdot 10^{12}`.
    """

    # 43 in float32 (largest value 2^128): squares below 2^86, a million steps' sum below 2^106.
    headroom = (math.floor(math.log2(torch.finfo(dtype).max)) - 40) // 2
    exponents = binary_exponents(largest.to(torch.float64)).to(torch.float64)
    needed = torch.exp2((exponents - headroom).clamp(min=0.0)).to(previous.dtype)
    return torch.maximum(previous, needed)


def binary_exponents(values: Tensor) -> Tensor:
    r"""
    ``torch.frexp(values).exponent`` of float64 ``values``, as int64: the :math:`e` with
    :math:`|x| = f \cdot 2^e`, :math:`f \in [\frac12, 1)`, and 0 for 0, inf and NaN.

    Read from the bits of the IEEE 754 encoding, because inductor cannot compile ``frexp``
    (its C++ kernel does not build). A subnormal, whose exponent field is 0, is first multiplied
    by :math:`2^{64}`, which is exact and makes it normal.
    """

    def exponent_field(x: Tensor) -> Tensor:
        return (x.view(torch.int64) >> _MANTISSA_BITS) & _EXPONENT_MASK

    field = exponent_field(values)
    normal = field - (_EXPONENT_BIAS - 1)
    subnormal = exponent_field(values * 2.0**64) - (_EXPONENT_BIAS - 1 + 64)
    exponents = torch.where(field == 0, subnormal, normal)
    return torch.where((values == 0.0) | (field == _EXPONENT_MASK), 0, exponents)


def _row_norms(matrix: Tensor) -> Tensor:
    """The norms of the whole rows of ``matrix`` (one block of columns of them, in a step split
    over the ranks: their squares are summed over the blocks)."""

    norms: Tensor = torch.linalg.vector_norm(matrix, dim=1)
    return norms if not in_column_blocks() else over_all_columns(norms.square()).sqrt()


def per_task_steps(state_dict: dict[str, Any], prefix: str) -> None:
    """
    Checkpoints written before 0.2 count one step for all tasks and hold the squares unscaled:
    each task gets the count, and a scale of one.
    """

    step_count, task_steps = state_dict.get(prefix + "step_count"), prefix + "task_steps"
    weights = state_dict.get(prefix + "task_weights")
    if task_steps in state_dict or not isinstance(step_count, Tensor):
        return
    if isinstance(weights, Tensor) and step_count.numel() == 1:
        filled, ones = step_count.expand(weights.shape[0]).clone(), torch.ones_like(weights)
    else:
        filled, ones = step_count.new_empty(0), torch.empty(0)
    state_dict[task_steps], state_dict[prefix + "sq_grad_scale"] = filled, ones


class ExcessMTLParameters(HyperParameters):
    """The hyper-parameters of :class:`ExcessMTLWeighting` and :class:`ExcessMTL`."""

    @property
    def robust_step_size(self) -> float:
        """Step size of the exponentiated weight update."""
        return self._robust_step_size

    @robust_step_size.setter
    def robust_step_size(self, value: float) -> None:
        self._robust_step_size = check_real("robust_step_size", value, low=0.0, low_open=True)

    @property
    def n_warmup_steps(self) -> int:
        """Number of first calls with uniform weights, collecting the baseline."""
        return self._n_warmup_steps

    @n_warmup_steps.setter
    def n_warmup_steps(self, value: int) -> None:
        self._n_warmup_steps = check_int("n_warmup_steps", value, low=0)


class ExcessMTLWeighting(
    ExcessMTLParameters, MatrixWeightingBase, NamedTasks, LazyState, NonDifferentiable
):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.Weighting`
    [:class:`~torchjd.linalg.Matrix`] from `Robust Multi-Task Learning with Excess Risks
    <https://proceedings.mlr.press/v235/he24n.html>`_ (ICML 2024), with the maths, names and
    defaults of ``torchjd.aggregation.ExcessMTLWeighting`` 0.18.0.

    It needs per-coordinate squared gradients, so it is a weighting of the Jacobian
    :math:`J`, not of its Gramian: a ``GramianWeightedAggregator`` of it raises a ``TypeError``
    (a square input, which a Gramian would be, is taken as a Jacobian). At each call :math:`t`:

    .. math::

        S \leftarrow S + J \odot J, \qquad
        \hat E_k = \sum_j \frac{J_{kj}^2}{\sqrt{S_{kj} + 10^{-7}}}
        \quad \text{(equations 6 and 7)}

    During the first ``n_warmup_steps`` calls the weights stay uniform and :math:`\hat E` is
    summed. The first call after the warm-up sets the baseline :math:`b`: the average of those
    sums, or, without warm-up, that call's own :math:`\hat E` (which is then used unscaled, as
    the official implementation does). Every later call scales :math:`\hat E_k` by
    :math:`1 / (b_k + 10^{-7})` and updates the weights on the simplex by an exponentiated
    gradient step (equation 9), in log space:

    .. math::

        \alpha \leftarrow \mathrm{softmax}\big(\log \alpha + \eta_\alpha \hat E\big),
        \qquad \alpha_0 = (1/m, \dots, 1/m)

    **State and memory.** The state is the :math:`m \times n` matrix :math:`S` (the size of the
    Jacobian, in float32 for a half-precision Jacobian), the weights, the warm-up sum, the
    baseline and the step count, all in buffers (``state_dict`` carries them; a checkpoint loads
    into a fresh instance). A call works on chunks of columns in place: besides :math:`S` it
    allocates two blocks of about 1 MiB, not copies of the Jacobian. Call :meth:`reset` between
    experiments to free :math:`S`. A change in the number of tasks or of parameters resets the
    state with a warning.

    **Tasks by name.** With :attr:`tasks` set, a change of tasks resets nothing: the rows of
    :math:`S`, the weights, the warm-up sums, the baselines and the warm-up progress are kept per
    task name (only the step count is shared). A task absent from a call keeps all of them; a new
    task starts with its own warm-up (a row of zeros in :math:`S`, weight :math:`1/m`) while the
    others go on with theirs; the weights of the call's tasks are renormalised to sum to one over
    them before the update, which is a softmax over them. A change of parameters still resets.

    **Non-finite input.** A Jacobian with inf or NaN leaves every part of the state untouched and
    gives NaN weights, so a ``GradScaler`` skips the step and the next step proceeds as if it
    never happened. (torchjd's class accumulates the inf into :math:`S` and returns NaN from then
    on.)

    :param robust_step_size: Step size :math:`\eta_\alpha > 0` of the exponentiated update.
    :param n_warmup_steps: Number of first calls with uniform weights that collect the baseline.
        The paper (Appendix C.1) recommends three epochs: ``3 * len(dataloader)``.
    """

    # Its row statistics are sums and maxima over the columns, reduced by over_all_columns: in a
    # multi-process step it runs on each rank's block of columns (see the step engine).
    splits_over_columns: ClassVar[bool] = True
    _state_migrations = (per_task_steps,)
    _state_names = (
        "sq_grad_sum",
        "task_weights",
        "warmup_excess_sum",
        "baseline",
        "step_count",
        "task_steps",
        "sq_grad_scale",
    )
    _per_task_names = (
        "sq_grad_sum",
        "task_weights",
        "warmup_excess_sum",
        "baseline",
        "task_steps",
        "sq_grad_scale",
    )
    sq_grad_sum: Tensor
    task_weights: Tensor
    warmup_excess_sum: Tensor
    baseline: Tensor
    step_count: Tensor
    task_steps: Tensor
    sq_grad_scale: Tensor

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__()
        self._set_hyperparameters(locals())
        self._register_state()

    def _initial_state(self, sizes: tuple[int, ...], like: Tensor) -> dict[str, Tensor]:
        step_count = torch.zeros((), dtype=torch.int64, device=like.device)
        return {**self._initial_task_rows(sizes[0], sizes, like), "step_count": step_count}

    def _initial_task_rows(
        self, count: int, sizes: tuple[int, ...], like: Tensor
    ) -> dict[str, Tensor]:
        m, n = sizes
        dtype, device = accumulation_dtype(like.dtype), like.device
        zeros = torch.zeros(count, dtype=dtype, device=device)
        return {
            "sq_grad_sum": torch.zeros(count, n, dtype=dtype, device=device),
            "task_weights": torch.full((count,), 1.0 / m, dtype=dtype, device=device),
            "warmup_excess_sum": zeros,
            "baseline": zeros.clone(),
            "task_steps": torch.zeros(count, dtype=torch.int64, device=device),
            "sq_grad_scale": torch.ones(count, dtype=dtype, device=device),
        }

    def forward(self, matrix: Matrix, /) -> Tensor:
        check_input(matrix, self, gramian=False)
        rows = self._ensure_state((matrix.shape[0], matrix.shape[1]), matrix)
        finite, scales, rescales = self._scales(matrix.detach(), rows)
        # On the host path the flag is read (a CPU tensor: no sync), sparing a masked copy of J.
        read: Tensor | Literal[True] = (
            True if chosen_path(matrix) == "host" and bool(finite) else finite
        )
        risks = over_all_columns(
            accumulate_excess_risks(matrix.detach(), self.sq_grad_sum, read, scales, rescales, rows)
        )
        if scales is None:  # all ones, unchanged
            scales = self._task_rows("sq_grad_scale", rows)

        task_weights = self._task_rows("task_weights", rows)
        warmup_excess_sum = self._task_rows("warmup_excess_sum", rows)
        steps = self._task_rows("task_steps", rows)
        in_warmup = steps < self.n_warmup_steps
        sets_baseline = steps == self.n_warmup_steps
        if self.n_warmup_steps > 0:
            first_baseline = warmup_excess_sum / self.n_warmup_steps
            scaled_first = risks / (first_baseline + _EPS)
        else:
            first_baseline = risks
            scaled_first = risks
        baseline = torch.where(sets_baseline, first_baseline, self._task_rows("baseline", rows))
        scaled = torch.where(sets_baseline, scaled_first, risks / (baseline + _EPS))
        task_weights = self._over_call_tasks(task_weights)
        # A task in its warm-up keeps its weight (no step), the others take the exponentiated one.
        increments = torch.where(in_warmup, 0.0, scaled * self.robust_step_size)
        updated = torch.softmax(torch.log(task_weights) + increments, dim=0)
        weights = torch.where(in_warmup.all(), task_weights, updated)

        self._commit(
            finite,
            rows,
            task_weights=weights,
            warmup_excess_sum=torch.where(in_warmup, warmup_excess_sum + risks, warmup_excess_sum),
            baseline=baseline,
            task_steps=steps + 1,
            sq_grad_scale=scales,
            step_count=self.step_count + 1,
        )
        return nan_unless(finite, weights).to(matrix.dtype)

    def _scales(
        self, matrix: Tensor, rows: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """
        Whether ``matrix`` is finite, and the scales of the rows of S (``None``: all one, with no
        rescaling, the common case, known on the host path without a read of J's largest entries).
        """

        previous = self._task_rows("sq_grad_scale", rows)
        if chosen_path(matrix) == "host":
            # One fast reduction over J decides, before S is touched, whether this step may change
            # state; only rows too long for float32 squares take the slower largest-entry pass.
            norms = _row_norms(matrix)
            if bool(torch.isfinite(norms).all()) and bool((norms < _UNSCALED_BELOW).all()):
                if bool((previous == 1.0).all()):
                    return torch.ones((), dtype=torch.bool, device=matrix.device), None, None
                largest = norms
            else:
                largest = torch.maximum(matrix.amax(dim=1), -matrix.amin(dim=1))
        else:
            largest = torch.maximum(matrix.amax(dim=1), -matrix.amin(dim=1))
        # The largest entries of the whole rows (a NaN counts as inf: every block sees it).
        largest = over_all_columns(torch.where(largest.isnan(), torch.inf, largest), "max")
        finite = torch.isfinite(largest).all()
        scales = overflow_free_scales(largest, previous, self.sq_grad_sum.dtype)
        scales = torch.where(finite, scales, previous)
        return finite, scales, (previous / scales) ** 2


@forwards_hyperparameters
class ExcessMTL(ExcessMTLParameters, MatrixAggregator, Stateful, NonDifferentiable):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.WeightedAggregator` from `Robust
    Multi-Task Learning with Excess Risks <https://proceedings.mlr.press/v235/he24n.html>`_
    (ICML 2024): a drop-in replacement for ``torchjd.aggregation.ExcessMTL`` with the same
    outputs, whose state survives ``state_dict`` round trips and overflow steps, and whose calls
    add no Jacobian-sized temporaries. See :class:`ExcessMTLWeighting` for the maths and the
    memory cost.

    :param robust_step_size: Step size :math:`\eta_\alpha > 0` of the exponentiated update.
    :param n_warmup_steps: Number of first calls with uniform weights that collect the baseline.
    """

    weighting: ExcessMTLWeighting

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__(ExcessMTLWeighting.from_arguments(locals()))

    tasks = ForwardedConverting[TaskNames | None, Sequence[Hashable] | None](
        ExcessMTLWeighting.tasks
    )
    known_tasks = Forwarded(ExcessMTLWeighting.known_tasks)

    def reset(self) -> None:
        """Frees the accumulated squares; the next call starts from uniform weights and warm-up."""
        self.weighting.reset()
