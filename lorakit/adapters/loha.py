"""LoHa (LyCORIS "loha"): delta W = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b)  (Hadamard product).

Plain: hada_w1_a (out, r), hada_w1_b (r, in*kh*kw), same for w2. Tucker (3x3 conv): hada_t1 (r, r, kh, kw),
hada_w1_a (r, out), hada_w1_b (r, in); W1[p, q] = sum_ij t1[i, j] * w1_a[i, p] * w1_b[j, q]. rank = hada_w1_b.shape[0],
as A1111 and ComfyUI compute it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.adapters.base import AdapterModule, alpha_or_rank, layer_kind


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ijkl,ip,jq->pqkl", t, wa, wb)


class LoHaModule(AdapterModule):
    algo = "loha"
    rank_dropout_on_weight = True

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1.0, dropout=None,
                 rank_dropout=None, module_dropout=None, use_tucker=False, weight_decompose=False, wd_on_out=False,
                 **_ignored):
        super().__init__(lora_name, org_module, multiplier)
        kind = layer_kind(org_module)
        r = self.lora_dim = int(lora_dim)
        out_dim, in_dim = self.shape[0], self.shape[1]
        k = self.shape[2:]
        self.tucker = bool(use_tucker and kind == "conv")
        if self.tucker:
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *k))
            self.hada_w1_a = nn.Parameter(torch.empty(r, out_dim))
            self.hada_w1_b = nn.Parameter(torch.empty(r, in_dim))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *k))
            self.hada_w2_a = nn.Parameter(torch.empty(r, out_dim))
            self.hada_w2_b = nn.Parameter(torch.empty(r, in_dim))
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        else:
            flat_in = in_dim * math.prod(k)
            self.hada_w1_a = nn.Parameter(torch.empty(out_dim, r))
            self.hada_w1_b = nn.Parameter(torch.empty(r, flat_in))
            self.hada_w2_a = nn.Parameter(torch.empty(out_dim, r))
            self.hada_w2_b = nn.Parameter(torch.empty(r, flat_in))
        # LyCORIS' init: one factor of the second product is zero, so the delta starts at zero
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        alpha = alpha_or_rank(alpha, r)
        self.scale = alpha / r
        self.register_buffer("alpha", torch.tensor(alpha))
        self._alpha_f = alpha
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None
        if weight_decompose:
            self._init_dora(wd_on_out)

    @property
    def rank(self):
        return self.lora_dim

    @classmethod
    def from_weights(cls, lora_name, org_module, w):
        r = w["hada_w1_b"].shape[0]
        mod = cls(lora_name, org_module, lora_dim=r, alpha=w.get("alpha"), use_tucker="hada_t1" in w)
        with torch.no_grad():
            for key in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"):
                if key in w:
                    p = getattr(mod, key)
                    if p.shape != w[key].shape:
                        raise ValueError(f"{lora_name}.{key}: shape {tuple(w[key].shape)} does not fit the model layer "
                                         f"{tuple(mod.shape)} (expected {tuple(p.shape)})")
                    p.copy_(w[key])
        if "alpha" not in w:
            mod.alpha.fill_(float(r))
            mod.scale = 1.0
        if "dora_scale" in w:
            mod._init_dora(False, w["dora_scale"])
        return mod

    def delta_weight(self):
        if not torch.is_grad_enabled() and not self.tucker:
            # building for a forward only: in place, two full-size tensors at most, the scale on a small factor
            # (a full-size pass fewer: these layers' steps are bound by passes over full-size weights)
            w1 = torch.mm(self.hada_w1_a.float() * self.scale, self.hada_w1_b.float())
            return w1.mul_(torch.mm(self.hada_w2_a.float(), self.hada_w2_b.float())).reshape(self.shape)
        if self.tucker:
            w1 = _tucker(self.hada_t1.float(), self.hada_w1_a.float(), self.hada_w1_b.float())
            w2 = _tucker(self.hada_t2.float(), self.hada_w2_a.float(), self.hada_w2_b.float())
        else:
            w1 = self.hada_w1_a.float() @ self.hada_w1_b.float()
            w2 = self.hada_w2_a.float() @ self.hada_w2_b.float()
        if not torch.is_grad_enabled():
            return w1.mul_(w2).mul_(self.scale).reshape(self.shape)
        return (w1 * w2).reshape(self.shape) * self.scale

    def delta_backward(self, g):
        """d(W1 * W2) = dW1 * W2 + W1 * dW2 with W = A @ B: one full-size product alive besides g."""
        if self.tucker:
            return super().delta_backward(g)
        a1, b1, a2, b2 = (p.float() for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b))
        g = g.reshape(a1.shape[0], -1)
        s = self.scale  # on the small factors: a full-size pass fewer each
        t = torch.mm(a2 * s, b2).mul_(g)  # dLoss/dW1
        out = [(self.hada_w1_a, t @ b1.t()), (self.hada_w1_b, a1.t() @ t)]
        torch.mm(a1 * s, b1, out=t).mul_(g)  # dLoss/dW2, in the same buffer
        return out + [(self.hada_w2_a, t @ b2.t()), (self.hada_w2_b, a2.t() @ t)]

    def plus_parameters(self):
        return [self.hada_w1_a, self.hada_w2_a]
