"""LoKr (LyCORIS "lokr"): delta W = scale * kron(W1, W2).

out = a*b and in = c*d are split by `factorization` (LyCORIS' rule). W1 (a, c) is `lokr_w1` or `lokr_w1_a @ lokr_w1_b`;
W2 (b, d[, kh, kw]) is `lokr_w2`, or `lokr_w2_a @ lokr_w2_b` (conv: reshaped from (b, d*kh*kw)), or Tucker with
`lokr_t2`. scale = alpha / rank when a low-rank factor exists (rank = w1_b or w2_b rows), else 1 (A1111/ComfyUI rule).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.adapters.base import AdapterModule, alpha_or_rank, kaiming_, layer_kind


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension, m <= n, m as close to `factor` (or to sqrt) as the divisors allow."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrModule(AdapterModule):
    algo = "lokr"
    rank_dropout_on_weight = True

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1.0, dropout=None,
                 rank_dropout=None, module_dropout=None, use_tucker=False, weight_decompose=False, wd_on_out=False,
                 factor: int = -1, decompose_both: bool = False, full_matrix: bool = False, _shapes=None, **_ignored):
        super().__init__(lora_name, org_module, multiplier)
        kind = layer_kind(org_module)
        r = self.lora_dim = int(lora_dim)
        out_dim, in_dim, k = self.shape[0], self.shape[1], tuple(self.shape[2:])
        self.tucker = False
        if _shapes is not None:  # building from a file: the tensors decide
            self._build_from_shapes(_shapes)
        else:
            factor = int(factor)
            a, b = factorization(out_dim, factor)
            c, d = factorization(in_dim, factor)
            if decompose_both and r < max(a, c) / 2 and not full_matrix:
                self.lokr_w1_a = nn.Parameter(torch.empty(a, r))
                self.lokr_w1_b = nn.Parameter(torch.empty(r, c))
            else:
                self.lokr_w1 = nn.Parameter(torch.empty(a, c))
            if full_matrix or r >= max(b, d) / 2:
                self.lokr_w2 = nn.Parameter(torch.empty(b, d, *k))
            elif use_tucker and kind == "conv":
                self.tucker = True
                self.lokr_t2 = nn.Parameter(torch.empty(r, r, *k))
                self.lokr_w2_a = nn.Parameter(torch.empty(r, b))
                self.lokr_w2_b = nn.Parameter(torch.empty(r, d))
            else:
                self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
                self.lokr_w2_b = nn.Parameter(torch.empty(r, d * math.prod(k)))
            # LyCORIS' init: the W2 side starts at zero
            if hasattr(self, "lokr_w2"):
                nn.init.zeros_(self.lokr_w2)
            else:
                if self.tucker:
                    kaiming_(self.lokr_t2)
                kaiming_(self.lokr_w2_a)
                nn.init.zeros_(self.lokr_w2_b)
            for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b"):
                if hasattr(self, name):
                    kaiming_(getattr(self, name))
        low_rank = [getattr(self, n) for n in ("lokr_w1_b", "lokr_w2_b") if hasattr(self, n)]
        if low_rank:
            self.lora_dim = low_rank[0].shape[0]
            alpha = alpha_or_rank(alpha, self.lora_dim)
            self.scale = alpha / self.lora_dim
        else:
            alpha = float(self.lora_dim)  # both factors full: scale 1, LyCORIS stores alpha = dim
            self.scale = 1.0
        self.register_buffer("alpha", torch.tensor(alpha))
        self._alpha_f = alpha
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None
        if weight_decompose:
            self._init_dora(wd_on_out)

    def _build_from_shapes(self, shapes: dict[str, torch.Size]) -> None:
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.zeros(shape)))
        self.tucker = "lokr_t2" in shapes

    @property
    def rank(self):
        return self.lora_dim if (hasattr(self, "lokr_w1_b") or hasattr(self, "lokr_w2_b")) else None

    @classmethod
    def from_weights(cls, lora_name, org_module, w):
        names = [n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2") if n in w]
        mod = cls(lora_name, org_module, lora_dim=1, alpha=w.get("alpha"), _shapes={n: w[n].shape for n in names})
        with torch.no_grad():
            for n in names:
                getattr(mod, n).copy_(w[n])
        if "alpha" not in w and mod.rank is not None:
            mod.alpha.fill_(float(mod.rank))
            mod.scale = 1.0
        elif "alpha" in w and mod.rank is None:
            mod.alpha.fill_(float(w["alpha"].float()))  # kept for re-saving; full factors use scale 1
        if mod.delta_weight().numel() != math.prod(mod.shape):
            raise ValueError(f"{lora_name}: LoKr factors give {mod.delta_weight().numel()} values, the model layer "
                             f"{tuple(mod.shape)} has {math.prod(mod.shape)}")
        if "dora_scale" in w:
            mod._init_dora(False, w["dora_scale"])
        return mod

    def _w1(self) -> torch.Tensor:
        return self.lokr_w1.float() if hasattr(self, "lokr_w1") else self.lokr_w1_a.float() @ self.lokr_w1_b.float()

    def _w2(self) -> torch.Tensor:
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2.float()
        elif self.tucker:
            w2 = torch.einsum("ijkl,ip,jq->pqkl", self.lokr_t2.float(), self.lokr_w2_a.float(), self.lokr_w2_b.float())
        else:
            w2 = self.lokr_w2_a.float() @ self.lokr_w2_b.float()
        if len(self.shape) == 4 and w2.dim() == 2:
            w2 = w2.reshape(w2.shape[0], -1, *self.shape[2:])
        return w2

    def delta_weight(self):
        w1, w2 = self._w1(), self._w2()
        if len(self.shape) == 4:
            w1 = w1.reshape(*w1.shape, 1, 1)
        d = torch.kron(w1, w2)
        if d.numel() == math.prod(self.shape):
            d = d.reshape(self.shape)
        return d.mul_(self.scale) if not torch.is_grad_enabled() else d * self.scale

    def delta_backward(self, g):
        """kron(W1, W2)[i*b + k, j*d + l, ...] = W1[i, j] W2[k, l, ...]: both gradients are contractions of g."""
        if self.tucker:
            return super().delta_backward(g)
        w1, w2 = self._w1(), self._w2()
        (a, c), (b, d) = w1.shape, w2.shape[:2]
        g = g.reshape(a, b, c, d, -1)
        w2f = w2.reshape(b, d, -1)
        # the W1 gradient sums b*d*k values per entry: torch.sum's cascade keeps fp32 accurate to ~1e-7 where a
        # matmul's running sum drifts to ~5e-6; one row of W1 at a time keeps the product at 1/a of the weight
        g1 = torch.stack([(g[i] * w2f[:, None]).sum(dim=(0, 2, 3)) for i in range(a)]).mul_(self.scale)
        g2 = torch.einsum("ikjlp,ij->klp", g, w1).mul_(self.scale).reshape(w2.shape)
        out = []
        if hasattr(self, "lokr_w1"):
            out.append((self.lokr_w1, g1))
        else:
            out += [(self.lokr_w1_a, g1 @ self.lokr_w1_b.float().t()), (self.lokr_w1_b, self.lokr_w1_a.float().t() @ g1)]
        if hasattr(self, "lokr_w2"):
            out.append((self.lokr_w2, g2))
        else:
            g2 = g2.reshape(b, -1)
            out += [(self.lokr_w2_a, g2 @ self.lokr_w2_b.float().t()), (self.lokr_w2_b, self.lokr_w2_a.float().t() @ g2)]
        return out

    def plus_parameters(self):
        return [getattr(self, n) for n in ("lokr_w2", "lokr_w2_b") if hasattr(self, n)]
