"""How tensors cross Ray: as numpy arrays.

Ray pickles a torch tensor in-band: its storage is copied into the pickle stream on one side and
out of it on the other. A numpy array goes out-of-band instead: it is written once into the
object store and read there without a copy. Returning 13 MB of block sums from an actor took
31-46 ms as tensors and 4-5 ms as one numpy array here (median of 20 calls, 2 cores).

`register` makes Ray send every contiguous CPU tensor that this process serialises as a numpy
view of it; the receiving side copies it into a contiguous tensor of its own (writable, not tied
to the object store). Values, dtype, shape and strides arrive unchanged, so results are
bit-identical. The rest go the usual way (storage and strides): tensors that are not contiguous
(transposed, sliced across rows, expanded), and those numpy cannot hold (bfloat16, GPU, sparse,
with autograd history, conjugate views)."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch

NUMPY_DTYPES = frozenset(
    {
        torch.float16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
    }
)


def to_wire(tensor: torch.Tensor) -> tuple[str, Any]:
    """What is serialised in place of ``tensor``: a numpy view of it, or its usual pickle."""
    if (
        tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and tensor.is_contiguous()
        and tensor.dtype in NUMPY_DTYPES
        and not tensor.requires_grad
        and not tensor.is_conj()
        and not tensor.is_neg()
    ):
        return "numpy", tensor.numpy()
    return "pickle", pickle.dumps(tensor, protocol=pickle.HIGHEST_PROTOCOL)


def from_wire(wire: tuple[str, Any]) -> torch.Tensor:
    """The tensor `to_wire` sent, in memory of its own."""
    kind, payload = wire
    if kind == "numpy":
        return torch.from_numpy(np.array(payload, copy=True))
    return pickle.loads(payload)


def register() -> None:
    """Send this process's tensors through Ray as numpy arrays (`to_wire`), in the Ray session it
    is connected to (the driver after ``ray.init``, or an actor)."""
    from ray.util.serialization import register_serializer

    register_serializer(torch.Tensor, serializer=to_wire, deserializer=from_wire)
