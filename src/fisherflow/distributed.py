"""Fisher information over ``torch.distributed``: the names users reach for.

A thin alias of :mod:`fisherflow.flow.distributed` (aggregation of information and
fusion of per-rank estimates) so that ``fisherflow.distributed`` works as documented.
"""

from fisherflow.flow.distributed import all_reduce_information, fuse_across_ranks, is_distributed

__all__ = ["all_reduce_information", "fuse_across_ranks", "is_distributed"]
