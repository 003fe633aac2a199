r"""
The two sources of the comparison's weights side by side: each method that weights the Gramian
trained with its weights from the Jacobian of the trunk's parameters (``"parameters"``, the exact
method) and from the Gramian of the tasks' gradients with respect to the trunk's output
(``"features"``, one backward pass), with what the fast step costs in :math:`\Delta_m\%` and
saves in time per step.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._summary import Summary


def has_features_rows(summaries: Sequence[Summary]) -> bool:
    return any(s.method is not None and s.method.gramian_from == "features" for s in summaries)


def sources_note(summaries: Sequence[Summary]) -> str | None:
    """What the rows marked (features) are and what their columns mean, where there are some."""

    if not has_features_rows(summaries):
        return None
    with_features = {
        s.method.name
        for s in summaries
        if s.method is not None and s.method.gramian_from == "features"
    }
    without = dict.fromkeys(
        s.label for s in summaries if s.method is not None and s.method.name not in with_features
    )
    lines = [
        "- Rows marked (features): the same method, trained by "
        '`JacobianDescent(network, aggregator, shared=network.trunk, gramian_from="features")`: '
        "its weights come from the Gramian of the tasks' gradients with respect to the trunk's "
        "output (the batch's 64 features per sample), then one ordinary backward pass of "
        "sum_k w_k L_k gives the trunk w^T J. In these rows g_k, in the shares s_k and their "
        "balance, is task k's gradient with respect to the trunk's output (the square root of "
        "the feature Gramian's diagonal), not with respect to its parameters; the weights are "
        "those the step returned. The mean rank ranks them among all the rows."
    ]
    if without:
        lines.append(
            "- Without a (features) row, as they weight the Jacobian itself and not its Gramian: "
            f"{', '.join(without)}."
        )
    return "\n".join(lines)


def sources_table(summaries: Sequence[Summary]) -> str | None:
    """
    Per workload and method with both rows: Δm% and ms / step with the weights from the
    parameters and from the features, the difference of the Δm% and the ratio of the times.
    """

    if not has_features_rows(summaries):
        return None
    exact = {
        (s.workload.name, s.method.name): s
        for s in summaries
        if s.method is not None and s.method.gramian_from == "parameters"
    }
    header = [
        "workload",
        "method",
        "Δm% parameters",
        "Δm% features",
        "features - parameters",
        "ms / step parameters",
        "ms / step features",
        "speed-up",
    ]
    lines = [
        "The feature Gramian against the exact step (Δm% mean ± std over seeds):",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---" + "|---:" * (len(header) - 2) + "|",
    ]
    for fast in summaries:
        if fast.method is None or fast.method.gramian_from != "features":
            continue
        slow = exact.get((fast.workload.name, fast.method.name))
        if slow is None or slow.delta_m is None or fast.delta_m is None:
            continue
        difference = fast.delta_m.mean - slow.delta_m.mean
        cells = [
            fast.workload.name,
            slow.label,
            slow.delta_m.format(2, signed=True),
            fast.delta_m.format(2, signed=True),
            f"{difference:+.2f}",
            f"{slow.ms_per_step.mean:.1f}",
            f"{fast.ms_per_step.mean:.1f}",
            f"{slow.ms_per_step.mean / fast.ms_per_step.mean:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
