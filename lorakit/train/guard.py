"""The NaN/inf guard of the trainable weights: checked after every optimizer step, with a copy of the last finite ones.

A finite loss does not prove a finite update (an fp16 overflow in the optimizer, a too-high learning rate on a huge
gradient): only the weights themselves tell. The check reads each weight's norm (NaN and inf survive it; one device
sync), and the copy of the last good weights costs one copy of the adapter (LoRA weights are small). Names are looked
up (lorakit.utils.finite.nonfinite_names) only once something is wrong.
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
        ps = [p.detach() for p in self.params if p.numel()]
        if hasattr(torch, "_foreach_norm"):
            # one fused read of the weights: NaN and inf propagate through each norm (1444 tensors of SDXL's LoRA
            # shapes, 28M parameters, on a CPU: 5.7 ms; a max and a per-tensor min: 12.4 ms). A norm also overflows
            # for finite values beyond ~1e19, so only a non-finite norm has the weights themselves inspected
            if bool(torch.isfinite(torch.stack(torch._foreach_norm(ps))).all()):
                return True
        return all(bool(torch.isfinite(p).all()) for p in ps)

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
