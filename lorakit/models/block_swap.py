"""Block swap (sd-scripts' `--blocks_to_swap N`): a transformer's blocks take turns on the compute device.

A list of n blocks keeps `keep = n - s` of them on the device; the other s wait in CPU memory. The forward pass runs
the blocks in order: when block i (i < s) is done it leaves the device and block i + keep comes in, so the device
ends the forward pass holding blocks s..n-1, the ones backward needs first. Backward runs the blocks in reverse:
when block j (j >= keep) is done it leaves and block j - keep comes in, which leaves blocks 0..keep-1 on the device
for the next step. Blocks s..keep-1 (when s < keep) never move. A block leaves before the next one comes in, so the
device never holds more than `keep` blocks of the list.

The base weights are frozen, so a block's weights never need copying back: each swapped block keeps its weights in
CPU memory (its "home" copy, made once) and a block on the device holds a copy of them; leaving just drops the copy.
A forward pass without backward (previews, validation, generation) ends with blocks s..n-1 on the device; `begin`
puts blocks 0..keep-1 back before the next pass. Moves are synchronous on the current stream (no overlap with
compute yet: correct, and slower than sd-scripts' threaded swap).

sd-scripts' FLUX rule for N (library/flux_models.py, enable_block_swap): N // 2 double blocks and 2 (N - N // 2)
single blocks (a double block weighs about two single ones), at most depth - 2 of each list: N <= 35 for FLUX.1.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from lorakit.errors import UserError

Observer = Callable[[str, int], None]  # ("in" | "out", block index): tests record the moves


def swap_counts(n: int, depths: Sequence[int], flag: str = "--blocks_to_swap") -> tuple[int, ...]:
    """Blocks of each list that --blocks_to_swap n swaps (sd-scripts' split; two lists: n // 2 and 2 (n - n // 2)),
    each list keeping at least two blocks on the device."""
    if n < 0:
        raise UserError(f"{flag} {n}: give a number of blocks >= 0 (0: no swapping).")
    counts = (n,) if len(depths) == 1 else (n // 2, 2 * (n - n // 2))
    limit = max_blocks_to_swap(depths)
    if any(c > d - 2 for c, d in zip(counts, depths)):
        raise UserError(f"{flag} {n}: at most {limit} for this model ({' + '.join(map(str, depths))} blocks; "
                        f"sd-scripts swaps n // 2 double and 2 (n - n // 2) single blocks and keeps two of each on "
                        f"the device). Use {limit} or fewer; 18 is sd-scripts' usual value for 12 GB.")
    return counts


def max_blocks_to_swap(depths: Sequence[int]) -> int:
    if len(depths) == 1:
        return max(0, depths[0] - 2)
    return max(n for n in range(0, 2 * sum(depths)) if n // 2 <= depths[0] - 2 and n - n // 2 <= (depths[1] - 2) // 2)


class BlockSwap:
    """Moves the frozen weights of `blocks` between CPU memory and `device` so that at most len(blocks) - swapped
    blocks are on the device at once (see the module docstring). The owner calls `begin()` before a forward pass,
    `before_forward(i)` / `after_forward(i)` around block i, and `mark(i, *inputs)` on every tensor input of block i
    that may carry a gradient (the stream and the conditioning vector) so that backward reports when block i is
    done."""

    def __init__(self, blocks: nn.ModuleList, swapped: int, device, observer: Optional[Observer] = None):
        self.blocks, self.n, self.swapped = blocks, len(blocks), int(swapped)
        self.keep = self.n - self.swapped
        self.device = torch.device(device)
        self.observer = observer
        moving = set(range(self.swapped)) | set(range(self.keep, self.n))
        self.home: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}
        for i, block in enumerate(blocks):
            if i in moving:  # weights stay in CPU memory; a copy visits the device
                self.home[i] = [(p, p.data.to("cpu")) for p in block.parameters() if not p.requires_grad]
                for p, home in self.home[i]:
                    p.data = home
            else:
                block.to(self.device)
        self.resident: set[int] = set(range(self.n)) - set(self.home)
        self.backward_pass = False
        self.begin()

    # ---- moves --------------------------------------------------------------------------------------------------
    def _out(self, i: int) -> None:
        if i in self.home and i in self.resident:
            for p, home in self.home[i]:
                p.data = home
            self.resident.discard(i)
            if self.observer:
                self.observer("out", i)

    def _in(self, i: int) -> None:
        if i in self.home and i not in self.resident:
            for p, home in self.home[i]:
                p.data = home.to(self.device, copy=True)
            self.resident.add(i)
            if self.observer:
                self.observer("in", i)

    # ---- the owner's calls --------------------------------------------------------------------------------------
    def begin(self) -> None:
        """Blocks 0..keep-1 on the device (where a step that ran backward left them)."""
        want = set(range(self.keep))
        for i in sorted(self.resident - want):
            self._out(i)
        for i in sorted(want - self.resident):
            self._in(i)
        self.backward_pass = False

    def before_forward(self, i: int) -> None:
        if i not in self.resident:  # a block that is not there when it runs would compute on the CPU copy
            raise RuntimeError(f"block swap: block {i} is not on {self.device} when it runs "
                               f"(on the device: {sorted(self.resident)})")

    def after_forward(self, i: int) -> None:
        if not self.backward_pass and i < self.swapped:
            self._out(i)
            self._in(i + self.keep)
        if i == self.n - 1:
            self.backward_pass = True  # recomputation under gradient checkpointing must not move blocks

    def after_backward(self, i: int) -> None:
        if i >= self.keep:
            self._out(i)
            self._in(i - self.keep)

    def mark(self, i: int, *tensors: torch.Tensor):
        """`tensors` unchanged; backward calls after_backward(i) once their gradients are complete, i.e. when block
        i's backward is done: every op of the block that uses its weights lies on the way to one of its inputs (no call
        when none of them needs a gradient: then no block before i has one either)."""
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
            return tensors
        return _BackwardDone.apply(self, i, *tensors)


class _BackwardDone(torch.autograd.Function):
    @staticmethod
    def forward(ctx, swap: BlockSwap, i: int, *tensors):
        ctx.swap, ctx.i = swap, i
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.swap.after_backward(ctx.i)
        return (None, None, *grads)


def device_bytes_change(blocks_lists: Sequence[nn.ModuleList], counts: Sequence[int], device_type: str) -> int:
    """How block swap changes the bytes of frozen weights on the compute device (every block of a list is the same
    size): on a GPU the swapped blocks' weights leave it (negative); on the CPU, where their home copies already are,
    the copies of the swapped blocks the device holds at once are added (min(keep, swapped) per list)."""
    total = 0
    for blocks, c in zip(blocks_lists, counts):
        if c and len(blocks):
            per = sum(p.numel() * p.element_size() for p in blocks[0].parameters() if not p.requires_grad)
            total += (min(len(blocks) - c, c) if device_type == "cpu" else -c) * per
    return total
