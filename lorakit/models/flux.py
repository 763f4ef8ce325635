"""The FLUX.1 transformer (dev and schnell), in Black Forest Labs' module layout, plus the latent packing and the
position ids it reads.

Why our own module and not diffusers' FluxTransformer2DModel: LoRA files for FLUX (sd-scripts, ComfyUI, Forge) are
named after BFL's module paths (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`),
and those layers are fused: `img_attn.qkv` is one Linear of width 3*hidden and a single block's `linear1` holds q, k,
v and the MLP input at once. diffusers splits them (to_q/to_k/to_v, proj_mlp), so a kohya LoRA on a fused layer has no
one module to sit on there. With BFL's layout the module path *is* the kohya name, BFL/ComfyUI single files load with
no key map (only diffusers folders need one, `diffusers_key_to_bfl`), and the maths is the same as BFL's reference
(parameter counts match diffusers': 11,901,408,320 for dev, 11,891,178,560 for schnell).

Shapes: img [B, L_img, 64] (packed 2x2 patches of 16-channel latents), txt [B, L_txt, 4096] (T5), y [B, 768] (CLIP-L
pooled), timesteps and guidance [B] in [0, 1] (multiplied by 1000 inside, like BFL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True

    @classmethod
    def from_config(cls, config: dict) -> "FluxParams":
        fields = {k: v for k, v in config.items() if k in cls.__dataclass_fields__}
        if "axes_dim" in fields:
            fields["axes_dim"] = tuple(fields["axes_dim"])
        return cls(**fields)


# ---- position encoding --------------------------------------------------------------------------------------------
def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """Rotation matrices [B, L, dim/2, 2, 2] for positions pos [B, L] (angles pos * theta^(-2i/dim))."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    angles = pos.double()[..., None] * (1.0 / theta**scale)
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*angles.shape, 2, 2).float()


def position_encoding(ids: torch.Tensor, axes_dim, theta: int) -> torch.Tensor:
    """[B, 1, L, head_dim/2, 2, 2] from ids [B, L, n_axes]: each axis rotates its own slice of a head's channels."""
    return torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3).unsqueeze(1)


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x [B, H, L, D] by pe (computed in float32, returned in x's dtype)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(*x.shape).type_as(x)


def attention(q, k, v, pe, mask=None) -> torch.Tensor:
    """[B, H, L, D] q/k/v -> [B, L, H*D], RoPE on q and k; mask [B, 1, 1, L] (True = attend) or None."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] (cos half first) of t in [0, 1], scaled to BFL's 0..1000 range."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---- layers -------------------------------------------------------------------------------------------------------
class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        rrms = torch.rsqrt(torch.mean(x.float() ** 2, dim=-1, keepdim=True) + 1e-6)
        return (x.float() * rrms).to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SelfAttention(nn.Module):
    """Only the parameters: the double block runs the attention of both streams together."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)  # fused q, k, v: one kohya LoRA module
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        """x [B, L, dim] -> normed q, k and v [B, H, L, D]."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """shift, scale, gate (twice for a double block) from the conditioning vector."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _modulate(x, shift, scale):
    return (1 + scale) * x + shift


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, mlp_hidden, bias=True), nn.GELU(approximate="tanh"),
                         nn.Linear(mlp_hidden, hidden, bias=True))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly (text tokens first)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        for side in ("img", "txt"):
            self.add_module(f"{side}_mod", Modulation(hidden, double=True))
            self.add_module(f"{side}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            self.add_module(f"{side}_attn", SelfAttention(hidden, num_heads, qkv_bias))
            self.add_module(f"{side}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            self.add_module(f"{side}_mlp", _mlp(hidden, mlp_hidden))

    def forward(self, img, txt, vec, pe, mask=None):
        img_m = self.img_mod(vec)
        txt_m = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(_modulate(self.img_norm1(img), img_m[0], img_m[1]))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(_modulate(self.txt_norm1(txt), txt_m[0], txt_m[1]))
        attn = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2),
                         pe, mask)
        txt_a, img_a = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + img_m[2] * self.img_attn.proj(img_a)
        img = img + img_m[5] * self.img_mlp(_modulate(self.img_norm2(img), img_m[3], img_m[4]))
        txt = txt + txt_m[2] * self.txt_attn.proj(txt_a)
        txt = txt + txt_m[5] * self.txt_mlp(_modulate(self.txt_norm2(txt), txt_m[3], txt_m[4]))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over text + image tokens: linear1 gives q, k, v and the MLP input in one matmul (fused, one kohya
    LoRA module); linear2 maps attention output and MLP activation back together."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden, self.num_heads = hidden, num_heads
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, hidden * 3 + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // num_heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x, vec, pe, mask=None):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(_modulate(self.pre_norm(x), shift, scale)),
                               [3 * self.hidden, self.mlp_hidden], dim=-1)
        b, n, _ = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe, mask), self.mlp_act(mlp)), 2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift[:, None], scale[:, None]))


# ---- the model ----------------------------------------------------------------------------------------------------
class FluxTransformer(nn.Module):
    """FLUX.1's denoiser. Module paths are BFL's (= kohya LoRA names and single-file keys)."""

    def __init__(self, params: FluxParams):
        super().__init__()
        p = params
        if p.hidden_size % p.num_heads or sum(p.axes_dim) != p.hidden_size // p.num_heads:
            raise ValueError(f"FLUX config: axes_dim {p.axes_dim} must add up to hidden_size/num_heads")
        self.params = p
        self.config = {"_class_name": "FluxTransformer", **{k: getattr(p, k) for k in p.__dataclass_fields__}}
        self.img_in = nn.Linear(p.in_channels, p.hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks))
        self.final_layer = LastLayer(p.hidden_size, p.out_channels)
        self.gradient_checkpointing = False
        self.block_swaps: tuple = ()  # BlockSwap of double_blocks and single_blocks (--blocks_to_swap)

    @classmethod
    def from_config(cls, config: dict) -> "FluxTransformer":
        return cls(FluxParams.from_config(config))

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    @property
    def block_depths(self) -> tuple[int, int]:
        return self.params.depth, self.params.depth_single_blocks

    def enable_block_swap(self, blocks_to_swap: int, device, observer=None) -> tuple[int, int]:
        """sd-scripts' --blocks_to_swap: everything but the swapped blocks moves to `device`; the swapped blocks'
        weights stay in CPU memory and visit the device in turn (models.block_swap). Returns (double, single)
        blocks swapped. Call after the weights have their training dtype (fp8 included)."""
        from lorakit.models.block_swap import BlockSwap, swap_counts

        counts = swap_counts(blocks_to_swap, self.block_depths)
        for name, child in self.named_children():
            if name not in ("double_blocks", "single_blocks"):
                child.to(device)
        lists = (("double", self.double_blocks, counts[0]), ("single", self.single_blocks, counts[1]))
        self.block_swaps = tuple(
            BlockSwap(blocks, c, device, observer=(lambda kind, i, n=name: observer(n, kind, i)) if observer else None)
            for name, blocks, c in lists)
        return counts

    def _run(self, block, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _run_blocks(self, blocks, swap, stream: tuple, vec, pe, mask) -> tuple:
        """Each block over the stream (img, txt) or (x,), with block swap's moves around it when enabled."""
        if swap is not None:
            swap.begin()
        for i, block in enumerate(blocks):
            vec_i = vec
            if swap is not None:
                swap.before_forward(i)
                *stream, vec_i = swap.mark(i, *stream, vec)
            out = self._run(block, *stream, vec_i, pe, mask)
            stream = out if isinstance(out, tuple) else (out,)
            if swap is not None:
                swap.after_forward(i)
        return stream

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_mask=None):
        """Velocity [B, L_img, out_channels]. txt_mask [B, L_txt] (True = a real token) hides T5 padding from every
        attention (--apply_t5_attn_mask); guidance [B] is required by dev (its distilled guidance embedding)."""
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("FLUX.1-dev needs a guidance value (its distilled guidance embedding)")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y.to(img.dtype))
        img, txt = self.img_in(img), self.txt_in(txt.to(img.dtype))
        pe = position_encoding(torch.cat((txt_ids, img_ids), dim=1), self.params.axes_dim, self.params.theta)
        mask = None
        if txt_mask is not None:
            keep_img = torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)
            mask = torch.cat((txt_mask.to(img.device, torch.bool), keep_img), dim=1)[:, None, None, :]
        swaps = self.block_swaps or (None, None)
        img, txt = self._run_blocks(self.double_blocks, swaps[0], (img, txt), vec, pe, mask)
        (x,) = self._run_blocks(self.single_blocks, swaps[1], (torch.cat((txt, img), 1),), vec, pe, mask)
        return self.final_layer(x[:, txt.shape[1]:], vec)


# ---- latents <-> tokens -------------------------------------------------------------------------------------------
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4]: each 2x2 patch becomes one token (channel-major, then row, column)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of pack_latents for a latent of height x width."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(batch: int, height: int, width: int, device=None) -> torch.Tensor:
    """[B, (H/2)(W/2), 3] position ids of packed latent tokens: (0, row, column), as BFL's sampling code builds."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(1, -1, 3).expand(batch, -1, -1)


def text_ids(batch: int, length: int, device=None) -> torch.Tensor:
    """Text tokens all sit at position (0, 0, 0): RoPE leaves them unrotated."""
    return torch.zeros(batch, length, 3, device=device)
