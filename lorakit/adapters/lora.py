"""LoRA / LoCon (sd-scripts networks.lora, LyCORIS "lora"/"locon"), with optional Tucker `lora_mid` and DoRA.

delta W = (alpha / rank) * up @ down. Linear: down (r, in), up (out, r). Conv: down has the base kernel, stride and
padding (r, in, kh, kw); up is 1x1 (out, r, 1, 1). Tucker (LyCORIS use_tucker, 3x3 only): down 1x1, mid (r, r, kh, kw)
with the base stride/padding, up 1x1; delta = einsum(mid, up, down).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import AdapterModule, alpha_or_rank, kaiming_, layer_kind


class LoRAModule(AdapterModule):
    algo = "lora"

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, use_tucker: bool = False, weight_decompose: bool = False,
                 wd_on_out: bool = False, **_ignored):
        super().__init__(lora_name, org_module, multiplier)
        kind = layer_kind(org_module)
        self.lora_dim = int(lora_dim)
        r = self.lora_dim
        self.tucker = False
        if kind == "linear":
            self.lora_down = nn.Linear(org_module.in_features, r, bias=False)
            self.lora_up = nn.Linear(r, org_module.out_features, bias=False)
        else:
            cin, cout, k = org_module.in_channels, org_module.out_channels, org_module.kernel_size
            kw = dict(stride=org_module.stride, padding=org_module.padding, dilation=org_module.dilation)
            if org_module.groups != 1:
                raise TypeError(f"{lora_name}: grouped convolutions are not supported")
            if use_tucker and kind == "conv":
                self.tucker = True
                self.lora_down = nn.Conv2d(cin, r, 1, bias=False)
                self.lora_mid = nn.Conv2d(r, r, k, bias=False, **kw)
            else:
                self.lora_down = nn.Conv2d(cin, r, k, bias=False, **kw)
            self.lora_up = nn.Conv2d(r, cout, 1, bias=False)
        alpha = alpha_or_rank(alpha, r)
        self.scale = alpha / r
        self.register_buffer("alpha", torch.tensor(alpha))
        self._alpha_f = alpha
        kaiming_(self.lora_down.weight)
        if self.tucker:
            kaiming_(self.lora_mid.weight)
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = dropout or None
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None
        if weight_decompose:
            self._init_dora(wd_on_out)

    @property
    def rank(self) -> int:
        return self.lora_dim

    @classmethod
    def from_weights(cls, lora_name: str, org_module: nn.Module, w: dict[str, torch.Tensor]) -> "LoRAModule":
        down, up = w["lora_down.weight"], w["lora_up.weight"]
        mod = cls(lora_name, org_module, lora_dim=down.shape[0], alpha=w.get("alpha"), use_tucker="lora_mid.weight" in w)
        mod._check("lora_down.weight", down, mod.lora_down.weight)
        mod._check("lora_up.weight", up, mod.lora_up.weight)
        with torch.no_grad():
            mod.lora_down.weight.copy_(down.reshape(mod.lora_down.weight.shape))
            mod.lora_up.weight.copy_(up.reshape(mod.lora_up.weight.shape))
            if mod.tucker:
                mod.lora_mid.weight.copy_(w["lora_mid.weight"])
        if "alpha" not in w:
            mod.alpha.fill_(float(down.shape[0]))  # old files without alpha: sd-scripts uses alpha = rank
        if "dora_scale" in w:
            mod._init_dora(False, w["dora_scale"])
        return mod

    def _check(self, key: str, got: torch.Tensor, want: torch.Tensor) -> None:
        if got.numel() != want.numel():
            raise ValueError(f"{self.lora_name}.{key}: shape {tuple(got.shape)} does not fit the model layer "
                             f"{tuple(self.shape)} (expected {tuple(want.shape)})")

    def delta_weight(self) -> torch.Tensor:
        up = self.lora_up.weight.float().flatten(1)
        if self.tucker:
            down = self.lora_down.weight.float().flatten(1)
            d = torch.einsum("ijkl,oi,jn->onkl", self.lora_mid.weight.float(), up, down)
        else:
            d = up @ self.lora_down.weight.float().flatten(1)
        return d.reshape(self.shape) * self.scale

    def plus_parameters(self):
        return [self.lora_up.weight]

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.wd:
            return super().forward_delta(x)
        training = self.training
        if training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        dtype = self.lora_down.weight.dtype
        lx = self.lora_down(x if x.dtype == dtype else x.to(dtype))
        if self.tucker:
            lx = self.lora_mid(lx)
        scale = self.scale
        if training:
            if self.dropout:
                lx = F.dropout(lx, p=self.dropout)
            if self.rank_dropout:
                mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
                mask = mask.view(lx.size(0), self.lora_dim, 1, 1) if self.is_conv \
                    else mask.view(lx.size(0), *([1] * (lx.dim() - 2)), self.lora_dim)
                lx = lx * mask.to(lx.dtype)
                scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller
        return self.lora_up(lx) * (scale * self.multiplier * self.module_weight)


class DyLoRAModule(LoRAModule):
    """DyLoRA (sd-scripts networks.dylora): each training step picks a rank b (a multiple of `unit`); the forward
    uses ranks [0, b + unit), only the newest `unit` ranks get gradients, and the output is scaled by
    sqrt(dim / (b + unit)) as sd-scripts does. Outside training it is a plain LoRA of the full rank, and the file
    holds plain lora_down/lora_up/alpha (any lower rank is a prefix: `lora resize` can cut it)."""

    algo = "dylora"

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1.0, unit: int = 1, **kw):
        kw.pop("use_tucker", None)
        kw.pop("weight_decompose", None)
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, **kw)
        self.unit = int(unit)
        if self.lora_dim % self.unit:
            raise ValueError(f"DyLoRA: network_dim {self.lora_dim} must be a multiple of unit {self.unit}")

    def forward_delta(self, x):
        if not self.training:
            return super().forward_delta(x)
        if self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        b = int(torch.randint(0, self.lora_dim // self.unit, ())) * self.unit
        r = b + self.unit
        down, up = self.lora_down.weight, self.lora_up.weight
        down = torch.cat([down[:b].detach(), down[b:r]], 0)
        up = torch.cat([up[:, :b].detach(), up[:, b:r]], 1)
        dtype = down.dtype
        x = x if x.dtype == dtype else x.to(dtype)
        if self.is_conv:
            lx = F.conv2d(x, down, None, **self._conv_kw)
            lx = F.dropout(lx, p=self.dropout) if self.dropout else lx
            out = F.conv2d(lx, up)
        else:
            lx = F.linear(x, down)
            lx = F.dropout(lx, p=self.dropout) if self.dropout else lx
            out = F.linear(lx, up)
        return out * (self.scale * (self.lora_dim / r) ** 0.5 * self.multiplier * self.module_weight)
