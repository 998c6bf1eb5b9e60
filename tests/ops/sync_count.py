"""Count host syncs at the dispatcher: the aten ops that make the host wait for a device value.

`_local_scalar_dense` (`.item()`, `bool(t)`, `float(t)`, `int(t)`), `nonzero`, `masked_select`,
`is_nonzero`, and `index` with a boolean mask (its output size is data-dependent). A
TorchDispatchMode sees every aten op, including the ones inside fastmem's custom ops: a
mode is popped while it handles an op, so for a `fastmem::` op it runs the op's Python
implementation with itself pushed again.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default: "_local_scalar_dense", aten.nonzero.default: "nonzero",
            aten.masked_select.default: "masked_select", aten.is_nonzero.default: "is_nonzero"}


def _custom_op_impls() -> dict:
    from fastmem.ops.cross_entropy import custom_op

    return {op._opoverload: op._init_fn for op in (custom_op._lce_op, custom_op._lce_grads_op)}


def _boolean_index(func, args) -> bool:
    if func is not aten.index.Tensor:
        return False
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])


class CountSyncs(TorchDispatchMode):
    """`with CountSyncs() as syncs: ...` then `syncs.total` and `syncs.by_op`."""

    def __init__(self):
        super().__init__()
        self.by_op: collections.Counter = collections.Counter()
        self._impls = _custom_op_impls()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.by_op[SYNC_OPS[func]] += 1
        elif _boolean_index(func, args):
            self.by_op["index[bool]"] += 1
        impl = self._impls.get(func)
        if impl is not None:
            with self:
                return impl(*args, **kwargs)
        return func(*args, **kwargs)
