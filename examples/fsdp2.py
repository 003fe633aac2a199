"""
Jacobian descent on an FSDP2 model: ``--processes`` gloo processes on CPU train one
``fully_shard``-ed model with :class:`~torchjd_golden.JacobianDescent` (each rank holds a shard of
every parameter and its share of every batch), then one process trains on the whole batches; the
two must agree (see docs/guides/training_at_scale.rst). The network, its batches and the run are
in ``_data_parallel.py``, shared with ``ddp.py``.

Run: ``python examples/fsdp2.py [--processes N] [--gramian-from {parameters,features}]``
"""

from __future__ import annotations

from _data_parallel import Network, run
from torch import nn
from torch.distributed.fsdp import fully_shard

from torchjd_golden import GABA, JacobianDescent


def make_step(network: Network, rank: int | None, source: str) -> tuple[nn.Module, JacobianDescent]:
    """Shards each layer of the trunk, each head and the root (on several processes), then makes
    the step for the sharded network."""

    if rank is not None:
        for module in (*network.trunk, *network.heads):
            if isinstance(module, nn.Linear):
                fully_shard(module)
        fully_shard(network)
    engine = JacobianDescent(
        network, GABA(warmup_steps=2), shared=network.trunk, gramian_from=source
    )
    return network, engine


if __name__ == "__main__":
    run(__doc__.split("\n\n")[0], "FSDP2", make_step)
