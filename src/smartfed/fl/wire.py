"""The dtype states travel in (``--wire_dtype``), both directions, for every method.

The server keeps and averages float32; what crosses the wire is cast to the
wire dtype just before a message is built and back to float32 just after one
is read, so strategies, validation and aggregation never see the wire format.
Flower's ``ArrayRecord`` goes through numpy, which has no bfloat16: a bfloat16
tensor travels as the int16 view of its bits (the same 2 bytes) and both ends
know from the run config to read it back as bfloat16.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a tensor of each wire dtype is stored as inside an ArrayRecord.
_CARRIER = {"float32": torch.float32, "bfloat16": torch.int16, "float16": torch.float16}


def encode(tensors: Mapping[str, torch.Tensor], wire_dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``wire_dtype`` (bfloat16 as its int16 bit view); others unchanged."""
    if wire_dtype == "float32":
        return dict(tensors)
    dtype = _DTYPES[wire_dtype]
    out = {}
    for key, value in tensors.items():
        if value.is_floating_point():
            value = value.detach().to(dtype)
            if dtype == torch.bfloat16:
                value = value.view(torch.int16)  # same bits, a dtype numpy can carry
        out[key] = value.contiguous()
    return out


def decode(tensors: Mapping[str, torch.Tensor], wire_dtype: str) -> dict[str, torch.Tensor]:
    """The inverse of ``encode``, as float32. A tensor not in the wire's carrier dtype is left as it came,
    so that reply validation names it (a client sending another dtype is dropped, not silently cast).
    """
    if wire_dtype == "float32":
        return dict(tensors)
    carrier = _CARRIER[wire_dtype]
    out = {}
    for key, value in tensors.items():
        if value.dtype == carrier:
            if wire_dtype == "bfloat16":
                value = value.view(torch.bfloat16)
            value = value.float()
        out[key] = value
    return out


def wire_bytes(tensors: Mapping[str, torch.Tensor], wire_dtype: str) -> int:
    """Bytes the tensor data takes on the wire (without framing), whatever dtype it is held in now."""
    size = _DTYPES[wire_dtype].itemsize
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in tensors.values())
