"""Count the aten ops that would block the host on a CUDA device (CPU tests have no GPU to ask).

``torch.cuda.set_sync_debug_mode("warn")`` needs a GPU; on the CPU the same ops are visible to a dispatch
mode: reading a tensor's value on the host (``item``, ``bool(t)``, ``int(t)``, ``tolist``) and ops whose output
size depends on values (``nonzero``, ``unique``, boolean-mask indexing, ``bincount``, ``repeat_interleave`` with
tensor repeats and no ``output_size``), plus host-to-device copies of pageable memory (invisible on the CPU).
"""

from __future__ import annotations

import traceback
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

_SYNCING = {
    "aten::_local_scalar_dense", "aten::nonzero", "aten::_unique", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::unique_dim_consecutive", "aten::bincount", "aten::masked_select",
    "aten::is_nonzero", "aten::nonzero_numpy",
}


class SyncOps(TorchDispatchMode):
    """``with SyncOps() as s: ...`` then ``s.counts`` (op name -> calls) of the host-syncing ops run inside."""

    def __init__(self, trace: bool = False) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.trace = trace
        self.where: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _SYNCING:
            self.counts[name] += 1
        elif func._overloadname == "Tensor" and name == "aten::repeat_interleave" \
                and (kwargs or {}).get("output_size") is None:
            self.counts[name] += 1  # the repeats' sum is read on the host
        if self.trace and (name in _SYNCING or name == "aten::repeat_interleave"):
            self.where.append((name, "".join(traceback.format_stack(limit=8)[:-1])))
        return func(*args, **(kwargs or {}))
