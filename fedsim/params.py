"""One vector is the model.

`FlatModel` re-points every parameter of a module to a view into a single flat float32
tensor, and every gradient to a view into a single flat gradient tensor. Loading a model is then
one ``copy_`` and reading it is one ``clone``; no per-round ``cat``/``split``.

Models must hold no buffers (use GroupNorm, not BatchNorm): the vector is the whole state.
"""

from __future__ import annotations

import torch
from torch import nn


def check_no_buffers(module: nn.Module) -> None:
    buffers = [name for name, _ in module.named_buffers()]
    if buffers:
        raise ValueError(
            f"model has buffers {buffers[:3]}; fedsim models keep all state in parameters "
            "(use GroupNorm instead of BatchNorm)"
        )


class FlatModel:
    """A module whose parameters and gradients are views into two flat tensors."""

    def __init__(self, module: nn.Module) -> None:
        check_no_buffers(module)
        params = [p for p in module.parameters()]
        self.dim = sum(p.numel() for p in params)
        self.module = module
        self.flat = torch.zeros(self.dim, dtype=torch.float32)
        self.flat_grad = torch.zeros(self.dim, dtype=torch.float32)
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                self.flat[offset : offset + n].copy_(p.detach().reshape(-1))
                p.data = self.flat[offset : offset + n].view_as(p)
                p.grad = self.flat_grad[offset : offset + n].view_as(p)
                offset += n

    def load(self, vector: torch.Tensor) -> None:
        """Set the model's parameters to ``vector`` (copied, never aliased)."""
        if vector.shape != (self.dim,):
            raise ValueError(f"parameter vector has shape {tuple(vector.shape)}, model needs ({self.dim},)")
        self.flat.copy_(vector)

    def vector(self) -> torch.Tensor:
        """A copy of the current parameters."""
        return self.flat.clone()

    def zero_grad(self) -> None:
        self.flat_grad.zero_()


class FunctionalModel:
    """A `FlatModel`'s module as a function of its flat parameter vector, for `torch.func`:
    ``logits(p, x)`` runs the module with the parameters viewed out of ``p`` (d,), so that
    ``vmap`` over a (K, d) matrix of parameter vectors runs K models at once."""

    def __init__(self, model: FlatModel) -> None:
        self.module = model.module
        self.layout: list[tuple[str, int, int, torch.Size]] = []
        offset = 0
        for name, p in model.module.named_parameters():
            self.layout.append((name, offset, p.numel(), p.shape))
            offset += p.numel()

    def logits(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        params = {name: p[o : o + n].view(shape) for name, o, n, shape in self.layout}
        return functional_call(self.module, params, (x,))
