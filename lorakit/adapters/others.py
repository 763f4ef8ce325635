"""Full (`diff`, LyCORIS "full"), norm-layer diffs (`w_norm`/`b_norm`, load only), IA3 and OFT (load only).

- full: delta W = diff, delta b = diff_b (no alpha, scale 1).
- IA3: W' = W * (1 + m * w), w scaling output rows, or input columns when `on_input` is true (A1111 network_ia3).
- OFT: `oft_blocks` (n, s, s) with `alpha` as constraint: Q = B - B^T, rescaled to norm <= alpha * out_dim when alpha > 0,
  R = (I + Q)(I - Q)^-1 per block; W' = R^T W per block of s output rows (`rescale` multiplies rows after).
  `oft_diag` (old LyCORIS) holds R itself. Generation uses W + m * (W' - W).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.adapters.base import AdapterModule


class FullModule(AdapterModule):
    algo = "full"

    def __init__(self, lora_name, org_module, multiplier=1.0, module_dropout=None, with_bias: bool | None = None,
                 **_ignored):
        super().__init__(lora_name, org_module, multiplier)
        self.diff = nn.Parameter(torch.zeros(self.shape))
        bias = getattr(org_module, "bias", None)
        if with_bias is None:
            with_bias = bias is not None
        self.diff_b = nn.Parameter(torch.zeros(bias.shape if bias is not None else self.shape[0])) if with_bias else None
        self.module_dropout = module_dropout or None

    @classmethod
    def from_weights(cls, lora_name, org_module, w):
        diff = w.get("diff", w.get("w_norm"))
        db = w.get("diff_b", w.get("b_norm"))
        mod = cls(lora_name, org_module, with_bias=db is not None)
        if diff.numel() != mod.diff.numel():
            raise ValueError(f"{lora_name}.diff: shape {tuple(diff.shape)} does not fit the model layer {mod.shape}")
        with torch.no_grad():
            mod.diff.copy_(diff.reshape(mod.shape))
            if db is not None:
                mod.diff_b.copy_(db.reshape(mod.diff_b.shape))
        return mod

    def delta_weight(self):
        return self.diff.float()

    def delta_bias(self):
        return None if self.diff_b is None else self.diff_b.float()

    def delta_backward(self, g):
        return [(self.diff, g)]


class NormModule(FullModule):
    """LyCORIS train_norm: w_norm/b_norm on GroupNorm/LayerNorm, applied as weight/bias differences."""

    algo = "norm"
    full_size_change = False

    def __init__(self, lora_name, org_module, multiplier=1.0, **kw):
        AdapterModule.__init__(self, lora_name, org_module, multiplier)
        self.diff = nn.Parameter(torch.zeros(self.shape))
        self.diff_b = nn.Parameter(torch.zeros(self.shape)) if getattr(org_module, "bias", None) is not None else None
        self.module_dropout = None

    def forward_delta(self, x):
        # a norm layer is affine in its weight and bias, so the output change is the norm with (dw, db)
        m = self.effective_multiplier
        org = self.org_module
        dw = (self.diff * m).to(x.dtype)
        db = None if self.diff_b is None else (self.diff_b * m).to(x.dtype)
        if isinstance(org, nn.GroupNorm):
            return nn.functional.group_norm(x, org.num_groups, dw, db, org.eps)
        return nn.functional.layer_norm(x, org.normalized_shape, dw, db, org.eps)


class IA3Module(AdapterModule):
    algo = "ia3"
    additive = False

    def __init__(self, lora_name, org_module, weight: torch.Tensor, on_input: bool):
        super().__init__(lora_name, org_module)
        self.weight = nn.Parameter(weight.detach().float().clone().flatten())
        self.register_buffer("on_input", torch.tensor(bool(on_input)))
        n = self.shape[1] if on_input else self.shape[0]
        if self.weight.numel() != n:
            raise ValueError(f"{lora_name}.weight: {self.weight.numel()} values, the model layer {self.shape} needs {n}")

    @classmethod
    def from_weights(cls, lora_name, org_module, w):
        return cls(lora_name, org_module, w["weight"], bool(w["on_input"].item()) if "on_input" in w else False)

    def new_weight(self, weight, multiplier, keep=None):
        w = weight.float()
        v = self.weight.float().to(w.device)
        shape = [1] * w.dim()
        if bool(self.on_input):
            shape[1] = -1
        else:
            shape[0] = -1
        return w + multiplier * (w * v.view(shape))


class OFTModule(AdapterModule):
    algo = "oft"
    additive = False

    def __init__(self, lora_name, org_module, blocks: torch.Tensor, alpha: float | None, is_rotation: bool,
                 rescale: torch.Tensor | None = None):
        super().__init__(lora_name, org_module)
        n, s, s2 = blocks.shape
        if s != s2 or n * s != self.shape[0]:
            raise ValueError(f"{lora_name}: OFT blocks {tuple(blocks.shape)} do not split the {self.shape[0]} output "
                             f"channels of the model layer")
        self.oft_blocks = nn.Parameter(blocks.detach().float().clone())
        self.is_rotation = is_rotation  # oft_diag: the blocks are R already
        self.register_buffer("alpha", torch.tensor(float(alpha or 0.0)))
        self.rescale = nn.Parameter(rescale.detach().float().clone()) if rescale is not None else None

    @classmethod
    def from_weights(cls, lora_name, org_module, w):
        if "oft_diag" in w:
            return cls(lora_name, org_module, w["oft_diag"], None, True)
        alpha = float(w["alpha"]) if "alpha" in w else 0.0
        return cls(lora_name, org_module, w["oft_blocks"], alpha, False, w.get("rescale"))

    def rotation(self) -> torch.Tensor:
        b = self.oft_blocks.float()
        if self.is_rotation:
            return b
        q = b - b.transpose(1, 2)
        limit = float(self.alpha) * self.shape[0]
        if limit > 0:
            norm = q.norm() + 1e-8
            if norm > limit:
                q = q * (limit / norm)
        eye = torch.eye(b.shape[1], device=b.device)
        return (eye + q) @ torch.linalg.inv(eye - q)

    def new_weight(self, weight, multiplier, keep=None):
        w = weight.float()
        r = self.rotation().to(w.device)
        n, s, _ = r.shape
        blocks = w.reshape(n, s, *w.shape[1:])
        rotated = torch.einsum("knm,kn...->km...", r, blocks).reshape(w.shape)
        if self.rescale is not None:
            rotated = rotated * self.rescale.float().to(w.device).reshape(-1, *([1] * (w.dim() - 1)))
        return w + multiplier * (rotated - w)
