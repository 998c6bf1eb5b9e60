"""Where the fused loss may read a device value on the host.

A host sync (`.item()`, `nonzero`, boolean-mask indexing, `bool(tensor)`) stalls a GPU stream,
breaks CUDA-graph capture and ends the overlap of host and device. On the CPU there is no
device to wait for, so the CPU path spends "syncs" where they save work (compacting away
ignored rows and rows of weight 0, skipping a pass when every weight is 1, checking labels
up front). Everywhere else the op takes the sync-free path: every row goes through the
chunk loop (ignored rows weigh 0), counts stay tensors, and a bad label makes the loss NaN on
the device instead of raising (call `check_label_range` once beforehand to get the error).

The sync budget per call on the sync-free path, counted by tests/ops/test_cross_entropy_syncs.py
with a dispatch mode over `_local_scalar_dense`, `nonzero`, `masked_select`, boolean-mask
`index` and `is_nonzero`: 0 for every objective and backend.
"""

from __future__ import annotations

import torch

# Device types whose tensors live in host memory: reading them costs no stream stall.
SYNC_FREE_DEVICES = ("cpu",)


def host_sync_is_free(device: torch.device) -> bool:
    """True where reading a tensor value on the host costs no device stall (the CPU)."""
    return device.type in SYNC_FREE_DEVICES
