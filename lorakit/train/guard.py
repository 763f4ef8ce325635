"""The NaN/inf guard of the trainable weights: checked after every optimizer step, with a copy of the last finite ones.

A finite loss does not prove a finite update (an fp16 overflow in the optimizer, a too-high learning rate on a huge
gradient): only the weights themselves tell. The check is one fused pass over the flat weights (a concatenation and
an isfinite-all, one device sync), and the copy of the last good weights costs one copy of the adapter (LoRA weights
are small). Names are looked up (lorakit.utils.finite.nonfinite_names) only once something is wrong.
"""

from __future__ import annotations

from typing import Optional

import torch


class WeightGuard:
    """After each optimizer step `check()` returns True when every trainable weight is finite (and remembers them),
    or restores the last finite weights and returns False (`bad_names` then names the first non-finite ones)."""

    def __init__(self, params, named=None):
        self.params = [p for p in params]
        self.named = named  # callable returning (name, tensor) pairs, for the message only
        self.good = [p.detach().clone() for p in self.params]  # the weights before the first step are finite
        self.bad_names: Optional[list[str]] = None

    @torch.no_grad()
    def all_finite(self) -> bool:
        if not self.params:
            return True
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        return bool(torch.isfinite(flat).all())

    @torch.no_grad()
    def check(self) -> bool:
        if self.all_finite():
            current = [p.detach() for p in self.params]
            if hasattr(torch, "_foreach_copy_"):  # one fused copy instead of one call per tensor
                torch._foreach_copy_(self.good, current)
            else:  # pragma: no cover - older torch
                for g, c in zip(self.good, current):
                    g.copy_(c)
            return True
        from lorakit.utils.finite import nonfinite_names

        named = list(self.named()) if self.named is not None else [(str(i), p) for i, p in enumerate(self.params)]
        self.bad_names = nonfinite_names(named) or ["?"]
        self.restore()
        return False

    @torch.no_grad()
    def restore(self) -> None:
        """Put the last finite weights back (in place: the optimizer and the saved network see the same tensors)."""
        for p, g in zip(self.params, self.good):
            p.copy_(g)


__all__ = ["WeightGuard"]
