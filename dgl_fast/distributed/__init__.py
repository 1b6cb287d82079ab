"""DGL across processes, GPUs and machines through ``torch.distributed``.

- :mod:`.runner`: :class:`DistributedDGL`, one rank's share of a grid of stage groups x replicas
  (synchronous or asynchronous DGL), with evaluation and checkpoints.
- :mod:`.protocol`: the grid layout, checked message headers, timeouts, :class:`PeerError`.
- :mod:`.agreement`: the start-up check that every rank was launched alike (:class:`ConfigMismatch`).
- :mod:`.replicas`: the device mesh; each stage and its head in DistributedDataParallel over its replicas.
- :mod:`.sharding`: each replica row's feeding rank loads only its shard (DistributedSampler, shares).
- :mod:`.files`: per-rank checkpoint files and their manifest (async mode).
- :mod:`.resharding`: sync mode's checkpoints through torch.distributed.checkpoint, loadable on any grid.
"""

from .agreement import ConfigMismatch, agree
from .protocol import Layout, PeerError
from .runner import DistributedDGL, even_placement

__all__ = ["ConfigMismatch", "DistributedDGL", "Layout", "PeerError", "agree", "even_placement"]
