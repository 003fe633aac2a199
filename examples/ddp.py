"""
Jacobian descent under DistributedDataParallel: ``--processes`` gloo processes on CPU train one
model with :class:`~torchjd_golden.JacobianDescent`, each on its share of every batch, then one
process trains on the whole batches; the two must agree (see docs/guides/training_at_scale.rst).
The network, its batches and the run are in ``_data_parallel.py``, shared with ``fsdp2.py``.

Run: ``python examples/ddp.py [--processes N] [--gramian-from {parameters,features}]``
"""

from __future__ import annotations

from _data_parallel import Network, run
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchjd_golden import GABA, JacobianDescent


def make_step(network: Network, rank: int | None, source: str) -> tuple[nn.Module, JacobianDescent]:
    """Wraps the network in DDP (on several processes), then makes the step for the wrapped one."""

    model = network if rank is None else DistributedDataParallel(network)
    engine = JacobianDescent(model, GABA(warmup_steps=2), shared=network.trunk, gramian_from=source)
    return model, engine


if __name__ == "__main__":
    run(__doc__.split("\n\n")[0], "DDP", make_step)
