"""A set of adapters over a model bundle: created for training from network_module/network_args (sd-scripts and
LyCORIS semantics) or built from a LoRA file for generation; applied unmerged (hooked forward) or merged.

    net = create_network(bundle, "networks.lora", 16, 8, {"conv_dim": "8", "conv_alpha": "4"})
    net.apply_to(bundle); groups = net.trainable_param_groups(unet_lr=1e-4, text_encoder_lr=5e-5, default_lr=1e-4)
    net.save_weights("out/name.safetensors", precision="fp16", metadata={...})

    net = load_network(bundle, "my_lora.safetensors", multiplier=0.8)       # unmerged, stackable
    net.set_block_weights({"BASE": 1, "IN04": 0, ...}); net.merge_into(); net.unmerge(); net.remove()
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from lorakit.adapters import base
from lorakit.adapters.blocks import (BlockScheme, block_lr_vector, block_lr_weights, lbw_block_of,
                                     parse_block_selector, scheme_for)
from lorakit.adapters.embeddings import BUNDLE_MODULE, TokenEmbeddings, bundle_words, split_bundle
from lorakit.adapters.dit_args import IN_LAYERS, DitArgs, parse_dit_args, split_parts
from lorakit.adapters.loha import LoHaModule
from lorakit.adapters.lokr import LoKrModule
from lorakit.adapters.lora import DyLoRAModule, LoRAModule, SplitLoRAModule
from lorakit.adapters.others import FullModule, IA3Module, NormModule, OFTModule
from lorakit.adapters.targets import (PRESETS, Target, check_preset, family_classes, module_map, te_targets,
                                      unet_targets)
from lorakit.errors import UserError
from lorakit.network_args import NETWORK_ARGS_BY_KEY

TRAINABLE_ALGOS = {"lora": LoRAModule, "locon": LoRAModule, "loha": LoHaModule, "lokr": LoKrModule,
                   "dylora": DyLoRAModule, "full": FullModule}
LOAD_ONLY_ALGOS = ("ia3", "oft", "diag-oft", "glora", "boft")

# network_module -> (fixed algo or None = from the `algo` arg, default preset)
NETWORK_MODULES = {"networks.lora": ("lora", "kohya"), "networks.dylora": ("dylora", "kohya"),
                   "networks.loha": ("loha", "kohya"), "networks.lokr": ("lokr", "kohya"),
                   "lycoris.kohya": (None, "full")}

# every key the parser accepts, with its example and help: one schema (lorakit.network_args)
KNOWN_ARGS = tuple(NETWORK_ARGS_BY_KEY)
_UNSUPPORTED = {"train_norm", "rs_lora", "use_scalar"}


def _rank_dropout_rescale(lycoris: bool, args: Mapping[str, str], rank_dropout: float | None) -> str | None:
    """sd-scripts' networks.lora scales the kept rank channels by 1/(1 - p); LyCORIS leaves them, or with
    rank_dropout_scale=True divides them by the share kept in that draw."""
    scale = arg_true(args.get("rank_dropout_scale", False))
    if scale and not rank_dropout:
        raise UserError("network_args rank_dropout_scale=True rescales rank dropout, but rank_dropout is not set; "
                        "add rank_dropout=0.1 (for example) or remove rank_dropout_scale.")
    if not lycoris:
        if scale:
            raise UserError("network_args rank_dropout_scale is a LyCORIS argument (--network_module lycoris.kohya); "
                            "networks.lora always scales rank dropout by 1/(1 - rank_dropout). Remove it.")
        return "expected"
    return "mean" if scale else None


def arg_true(v) -> bool:
    """A network_args truth value as sd-scripts and LyCORIS read them ("true", "1", "yes", "on")."""
    return str(v).strip().lower() in ("1", "true", "yes", "on")


@dataclass
class NetworkConfig:
    network_module: str = "networks.lora"
    algo: str = "lora"
    dim: int = 4
    alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    rank_dropout_rescale: str | None = "expected"  # see AdapterModule.rank_dropout_rescale
    module_dropout: float | None = None
    preset: str = "kohya"
    dora: bool = False
    wd_on_out: bool = False
    dora_detach_norm: bool = False
    use_tucker: bool = False
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    unit: int = 1
    block_dims: list[int] | None = None
    block_alphas: list[float] | None = None
    conv_block_dims: list[int] | None = None
    conv_block_alphas: list[float] | None = None
    block_lr_weight: list[float] | None = None
    selected_blocks: set[int] | None = None
    select_te: bool = True
    loraplus_unet: float | None = None
    loraplus_te: float | None = None
    train_t5xxl: bool = False  # FLUX: T5 gets LoRA modules too
    train_blocks: str = "all"  # FLUX: "all", "double" or "single" blocks
    dit: DitArgs = field(default_factory=DitArgs)  # FLUX: block indices, per-kind ranks, in_dims, split_qkv
    args: dict = field(default_factory=dict)


def parse_network_args(family, network_module: str, network_dim: int | None, network_alpha: float | None,
                       network_args: Mapping[str, str] | None, neuron_dropout: float | None = None) -> NetworkConfig:
    """Validate --network_module / --network_args (a dict of strings) the way sd-scripts and LyCORIS read them."""
    args = {str(k): v for k, v in (network_args or {}).items()}
    if network_module not in NETWORK_MODULES:
        raise UserError(f"network_module {network_module!r} is not supported; use one of {', '.join(NETWORK_MODULES)}.")
    unknown = sorted(k for k in args if k not in KNOWN_ARGS)
    if unknown:
        raise UserError(f"network_args: unknown argument(s) {', '.join(unknown)}. Valid: {', '.join(KNOWN_ARGS)}.")
    bad = sorted(k for k in args if k in _UNSUPPORTED and arg_true(args[k]))
    if bad:
        raise UserError(f"network_args: {', '.join(bad)} is not supported by lorakit; remove it.")
    fixed_algo, default_preset = NETWORK_MODULES[network_module]
    lycoris = fixed_algo is None
    scheme = scheme_for(family)

    def num(key, conv=float):
        v = args.get(key)
        if v is None or str(v).strip() in ("", "None", "none"):
            return None
        try:
            return conv(float(v)) if conv is int else conv(v)
        except ValueError:
            raise UserError(f"network_args {key}={v!r}: expected a number.") from None

    cfg = NetworkConfig(network_module=network_module, args=dict(args))
    cfg.dim = int(network_dim) if network_dim is not None else 4
    cfg.alpha = float(network_alpha) if network_alpha is not None else 1.0
    if fixed_algo and "algo" in args and str(args["algo"]).strip().lower() not in (fixed_algo, "locon"):
        raise UserError(f"network_args algo={args['algo']} does not go with network_module {network_module} "
                        f"(which always trains {fixed_algo}); use --network_module lycoris.kohya for other algorithms.")
    algo = (fixed_algo or str(args.get("algo", "lora"))).strip().lower()
    if algo == "dora":
        algo, args["dora_wd"] = "lora", "true"
    if algo in LOAD_ONLY_ALGOS:
        raise UserError(f"network_args algo={algo}: lorakit can apply {algo} files at generation time but cannot "
                        f"train them; use one of {', '.join(TRAINABLE_ALGOS)}.")
    if algo not in TRAINABLE_ALGOS:
        raise UserError(f"network_args algo={algo!r} is unknown; use one of {', '.join(TRAINABLE_ALGOS)}.")
    cfg.algo = algo
    cfg.preset = str(args.get("preset", default_preset)).strip()
    preset = check_preset(cfg.preset)
    cfg.conv_dim = num("conv_dim", int)
    cfg.conv_alpha = num("conv_alpha")
    if lycoris:
        # LyCORIS: conv rank/alpha default to the linear ones
        cfg.conv_dim = cfg.conv_dim if cfg.conv_dim is not None else cfg.dim
        cfg.conv_alpha = cfg.conv_alpha if cfg.conv_alpha is not None else cfg.alpha
        if not preset.enable_conv:
            cfg.conv_dim = None
    elif cfg.conv_dim is not None and cfg.conv_alpha is None:
        cfg.conv_alpha = 1.0  # sd-scripts default
    if cfg.conv_dim == 0:
        cfg.conv_dim = None
    cfg.dropout = num("dropout") if "dropout" in args else neuron_dropout
    cfg.rank_dropout = num("rank_dropout")
    cfg.rank_dropout_rescale = _rank_dropout_rescale(lycoris, args, cfg.rank_dropout)
    cfg.module_dropout = num("module_dropout")
    cfg.dora = arg_true(args.get("dora_wd", False))
    cfg.wd_on_out = arg_true(args.get("wd_on_output", False))
    cfg.dora_detach_norm = arg_true(args.get("dora_detach_norm", False))
    if cfg.dora_detach_norm and not cfg.dora:
        raise UserError("network_args dora_detach_norm applies to DoRA only; add dora_wd=True or remove it.")
    cfg.use_tucker = any(arg_true(args.get(k, False)) for k in ("use_tucker", "use_cp", "use_conv_cp")) or \
        ("disable_conv_cp" in args and not arg_true(args["disable_conv_cp"]))
    cfg.factor = num("factor", int) or -1
    cfg.decompose_both = arg_true(args.get("decompose_both", False))
    cfg.full_matrix = arg_true(args.get("full_matrix", False))
    cfg.unit = num("unit", int) or 1
    if cfg.dora and algo in ("dylora", "full"):
        raise UserError(f"network_args dora_wd: DoRA works with lora/locon/loha/lokr, not {algo}.")
    if algo == "dylora" and cfg.dim % cfg.unit:
        raise UserError(f"network_args unit={cfg.unit}: network_dim {cfg.dim} must be a multiple of unit.")

    # block-wise ranks / lr weights
    n = scheme.count

    def vec(key, conv):
        v = args.get(key)
        if v is None:
            return None
        try:
            vals = [conv(float(s)) if conv is int else conv(s) for s in str(v).split(",")]
        except ValueError:
            raise UserError(f"network_args {key}: {v!r} is not a comma-separated list of numbers.") from None
        if len(vals) != n:
            raise UserError(f"network_args {key}: {len(vals)} values given, {family.name} needs {n} "
                            f"(one per block: {', '.join(scheme.name_of(i) for i in range(n))}).")
        return vals

    lr_w = block_lr_weights(scheme, args.get("down_lr_weight"), args.get("mid_lr_weight"), args.get("up_lr_weight"),
                            float(args.get("block_lr_zero_threshold", 0.0) or 0.0))
    block_dims = vec("block_dims", int)
    if block_dims is not None or lr_w is not None:
        cfg.block_dims = block_dims or [cfg.dim] * n
        cfg.block_alphas = vec("block_alphas", float) or [cfg.alpha] * n
        cfg.conv_block_dims = vec("conv_block_dims", int)
        if cfg.conv_block_dims is not None:
            cfg.conv_block_alphas = vec("conv_block_alphas", float) or [cfg.conv_alpha or 1.0] * n
        elif cfg.conv_dim is not None:
            cfg.conv_block_dims = [cfg.conv_dim] * n
            cfg.conv_block_alphas = [cfg.conv_alpha] * n
        if lr_w is not None:
            for i, w in enumerate(lr_w):
                if w == 0:
                    cfg.block_dims[i] = 0
                    if cfg.conv_block_dims is not None:
                        cfg.conv_block_dims[i] = 0
    elif any(k in args for k in ("block_alphas", "conv_block_dims", "conv_block_alphas")):
        raise UserError("network_args block_alphas / conv_block_dims / conv_block_alphas need block_dims "
                        "(or a down/mid/up_lr_weight) as in sd-scripts.")
    cfg.block_lr_weight = lr_w
    if args.get("blocks"):
        cfg.selected_blocks, cfg.select_te = parse_block_selector(str(args["blocks"]), scheme)
    if args.get("block_lr_weight") is not None:
        _block_lr_weight(cfg, args, scheme)
    _dit_args(cfg, args, family)
    ratio = num("loraplus_lr_ratio")
    cfg.loraplus_unet = num("loraplus_unet_lr_ratio") or ratio
    cfg.loraplus_te = num("loraplus_text_encoder_lr_ratio") or ratio
    return cfg


def _block_lr_weight(cfg: NetworkConfig, args: dict, scheme) -> None:
    """block_lr_weight (every family, FLUX's D00-S37 included): per-block lr factors without touching the ranks, so
    it combines with per-kind ranks; a block at factor 0 leaves the selection (no LoRA there, as sd-scripts does)."""
    if cfg.block_lr_weight is not None:
        raise UserError("network_args block_lr_weight and down_lr_weight / mid_lr_weight / up_lr_weight both set "
                        "block learning rates; use one of them.")
    weights = block_lr_vector(scheme, str(args["block_lr_weight"]),
                              float(args.get("block_lr_zero_threshold", 0.0) or 0.0))
    cfg.block_lr_weight = weights
    zeros = {i for i, w in enumerate(weights) if w == 0}
    if zeros:
        # -1: layers outside every block (FLUX's img_in, SD's conv_in...) keep their LoRA unless `blocks` left them out
        selected = cfg.selected_blocks if cfg.selected_blocks is not None else {-1, *range(scheme.count)}
        cfg.selected_blocks = selected - zeros


_TRAIN_BLOCKS = {"all": ("DoubleStreamBlock", "SingleStreamBlock"), "double": ("DoubleStreamBlock",),
                 "single": ("SingleStreamBlock",)}


def _dit_args(cfg: NetworkConfig, args: dict, family) -> None:
    """sd-scripts' FLUX network args (train_t5xxl, train_blocks); refused for families without those parts."""
    flux_args = [k for k in ("train_t5xxl", "train_blocks") if k in args]
    if flux_args and family.lora_block_classes != _TRAIN_BLOCKS["all"]:
        raise UserError(f"network_args {', '.join(flux_args)}: only FLUX.1 models have T5 / double and single blocks; "
                        f"this model is {family.title}.")
    cfg.train_t5xxl = arg_true(args.get("train_t5xxl", False))
    cfg.train_blocks = str(args.get("train_blocks", "all")).strip().lower()
    if cfg.train_blocks not in _TRAIN_BLOCKS:
        raise UserError(f"network_args train_blocks={args['train_blocks']!r}: use all, double or single.")
    cfg.dit = parse_dit_args(args, family, cfg.algo)
    if cfg.dit.type_dims and cfg.block_dims is not None:
        raise UserError("network_args: per-kind ranks (img_attn_dim, single_dim...) and block_dims / *_lr_weight "
                        "both set ranks; use one of them.")


class Network(nn.Module):
    """Adapters over one bundle. Submodules are named by their kohya module names, so `state_dict()` has kohya keys."""

    def __init__(self, family, adapters: list[base.AdapterModule], config: NetworkConfig | None = None,
                 metadata: dict | None = None):
        super().__init__()
        self.family = family
        self.config = config
        self.source_metadata = metadata or {}
        self.scheme: BlockScheme = scheme_for(family)
        for a in adapters:
            if a.lora_name in self._modules:
                raise ValueError(f"duplicated LoRA module name {a.lora_name}")
            self.add_module(a.lora_name, a)
        self.multiplier = 1.0
        self._applied = False
        self._backups: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self.skipped_modules: list[str] = []

    # ---- views ---------------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[base.AdapterModule]:
        return [m for m in self._modules.values() if isinstance(m, base.AdapterModule)]

    @property
    def embeddings(self) -> TokenEmbeddings | None:
        """Trained token embeddings saved with the adapters (bundle_emb.* keys), if any."""
        return self._modules.get(BUNDLE_MODULE)

    def set_embeddings(self, embeddings: TokenEmbeddings | None) -> None:
        if embeddings is not None:
            self.add_module(BUNDLE_MODULE, embeddings)

    @property
    def unet_adapters(self):
        return [a for a in self.adapters if a.lora_name.startswith("lora_unet_")]

    @property
    def te_adapters(self):
        return [a for a in self.adapters if a.lora_name.startswith("lora_te")]

    def names(self) -> list[str]:
        return [a.lora_name for a in self.adapters]

    def block_index(self, lora_name: str) -> int:
        return self.scheme.index(lora_name)

    # ---- applying ------------------------------------------------------------------------------------------------
    def apply_to(self, bundle=None, apply_text_encoder: bool = True, apply_unet: bool = True) -> "Network":
        """Hook every adapter into its layer (unmerged). A bundle argument is accepted for symmetry: the adapters
        already know their layers. Dropping a side removes its adapters from the network (sd-scripts)."""
        if self._backups is not None:
            raise RuntimeError("this network is merged; unmerge() before applying it unmerged")
        for a in self.adapters:
            is_te = a.lora_name.startswith("lora_te")
            if (is_te and not apply_text_encoder) or (not is_te and not apply_unet):
                delattr(self, a.lora_name)
                continue
            base.attach(a)
        if self.embeddings is not None and apply_text_encoder:
            self.embeddings.attach()
        self._applied = True
        return self

    def remove(self) -> None:
        """Take the adapters out of the model (unmerging first if merged)."""
        if self._backups is not None:
            self.unmerge()
        for a in self.adapters:
            base.detach(a)
        if self.embeddings is not None:
            self.embeddings.detach()
        self._applied = False

    def set_multiplier(self, multiplier: float, te_multiplier: float | None = None) -> None:
        self.multiplier = float(multiplier)
        for a in self.adapters:
            a.multiplier = float(te_multiplier if (te_multiplier is not None and a.lora_name.startswith("lora_te"))
                                 else multiplier)

    def set_enabled(self, enabled: bool) -> None:
        for a in self.adapters:
            a.enabled = enabled

    def set_module_weights(self, weights: Mapping[str, float] | Callable[[str], float] | None) -> None:
        """Per-module factors on top of the multiplier (None resets to 1)."""
        for a in self.adapters:
            if weights is None:
                a.module_weight = 1.0
            elif callable(weights):
                a.module_weight = float(weights(a.lora_name))
            else:
                a.module_weight = float(weights.get(a.lora_name, 1.0))

    def set_block_weights(self, block_weights: Mapping[str, float], default: float = 1.0) -> None:
        """LoRA Block Weight: factors by block name (BASE, IN00..IN11, M00, OUT00..OUT11)."""
        self.set_module_weights(lambda n: 1.0 if lbw_block_of(n) == "OTHER"
                                else float(block_weights.get(lbw_block_of(n), default)))

    @torch.no_grad()
    def merge_into(self, bundle=None, multiplier: float | None = None) -> None:
        """Write the adapters into the base weights (originals kept for unmerge()); hooks are removed first."""
        if self._backups is not None:
            raise RuntimeError("already merged")
        for a in self.adapters:
            base.detach(a)
        self._applied = False
        if self.embeddings is not None:  # token vectors replace input rows: they stay hooked (nothing to merge into)
            self.embeddings.attach()
        self._backups = {}
        for a in self.adapters:
            org = a.org_module
            m = (a.multiplier if multiplier is None else float(multiplier)) * a.module_weight
            w = org.weight
            bias = getattr(org, "bias", None)
            # backups live on the CPU: exact unmerge without holding a second copy in GPU memory
            self._backups[a.lora_name] = (w.detach().to("cpu", copy=True),
                                          None if bias is None else bias.detach().to("cpu", copy=True))
            was_training = a.training
            a.train(False)  # merged weights never carry dropout
            new_w = a.new_weight(w, m)
            db = a.delta_bias()
            a.train(was_training)
            w.copy_(new_w.to(w.dtype))
            if db is not None and bias is not None:
                bias.add_((db * m).to(bias.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._backups is None:
            return
        for a in self.adapters:
            w, b = self._backups[a.lora_name]
            a.org_module.weight.copy_(w)
            if b is not None:
                a.org_module.bias.copy_(b)
        self._backups = None

    @property
    def is_merged(self) -> bool:
        return self._backups is not None

    # ---- training ------------------------------------------------------------------------------------------------
    def trainable_param_groups(self, unet_lr: float | None = None, text_encoder_lr=None,
                               default_lr: float = 1e-4, embedding_lr: float | None = None) -> list[dict]:
        """Optimizer param groups as sd-scripts builds them: text encoder(s) at text_encoder_lr (a list gives one rate
        per encoder), UNet at unet_lr scaled per block by the block lr weights, LoRA+ "up" parameters at ratio x lr.
        Trained token embeddings form their own group at embedding_lr (default: default_lr).
        Each group has `params`, `lr` and a `name`; groups with lr 0 are left out."""
        groups: list[dict] = []
        te_lrs = text_encoder_lr if isinstance(text_encoder_lr, (list, tuple)) else None

        def te_lr_for(name: str) -> float:
            if te_lrs is not None:  # one rate per encoder, in the family's order (FLUX: CLIP-L, T5)
                idx = next((i for i, p in enumerate(self.family.lora_te_prefixes) if name.startswith(p + "_")), 0)
                v = te_lrs[min(idx, len(te_lrs) - 1)]
                return default_lr if v is None else float(v)
            return default_lr if text_encoder_lr is None else float(text_encoder_lr)

        def add(name: str, adapters: list[base.AdapterModule], lr: float, ratio: float | None):
            if not adapters or lr == 0:
                return
            plus_ids = {id(p) for a in adapters for p in a.plus_parameters()} if ratio else set()
            normal = [p for a in adapters for p in a.parameters() if p.requires_grad and id(p) not in plus_ids]
            plus = [p for a in adapters for p in a.parameters() if p.requires_grad and id(p) in plus_ids]
            if normal:
                groups.append({"params": normal, "lr": lr, "name": name})
            if plus:
                groups.append({"params": plus, "lr": lr * ratio, "name": name + " plus"})

        cfg = self.config or NetworkConfig()
        by_te: dict[float, list] = {}
        for a in self.te_adapters:
            by_te.setdefault(te_lr_for(a.lora_name), []).append(a)
        for i, (lr, ads) in enumerate(by_te.items()):
            add("textencoder" if len(by_te) == 1 else f"textencoder{i + 1}", ads, lr, cfg.loraplus_te)
        u_lr = default_lr if unet_lr is None else float(unet_lr)
        if cfg.block_lr_weight is not None:
            blocks: dict[int, list] = {}
            for a in self.unet_adapters:
                blocks.setdefault(self.scheme.index(a.lora_name), []).append(a)
            for idx in sorted(blocks):
                w = cfg.block_lr_weight[idx] if 0 <= idx < len(cfg.block_lr_weight) else 1.0
                add(f"unet_block{idx}", blocks[idx], u_lr * w, cfg.loraplus_unet)
        else:
            add("unet", self.unet_adapters, u_lr, cfg.loraplus_unet)
        emb_lr = default_lr if embedding_lr is None else float(embedding_lr)
        if self.embeddings is not None and emb_lr != 0:
            groups.append({"params": list(self.embeddings.parameters()), "lr": emb_lr, "name": "embeddings"})
        return groups

    # ---- files ---------------------------------------------------------------------------------------------------
    def training_metadata(self) -> dict[str, str]:
        """The ss_network_* keys sd-scripts writes for this network."""
        cfg = self.config
        if cfg is None:
            return {}
        return {"ss_network_module": cfg.network_module, "ss_network_dim": str(cfg.dim),
                "ss_network_alpha": str(_num_str(cfg.alpha)), "ss_network_args": json.dumps(cfg.args)}

    def save_weights(self, path: str | os.PathLike, precision: str | torch.dtype | None = "fp16",
                     metadata: Mapping[str, str] | None = None, **meta_kw) -> dict[str, str]:
        """Save as a kohya .safetensors (atomic). `metadata` adds/overrides keys (the trainer's ss_* fields);
        meta_kw go to build_metadata (title, resolution, clip_skip, trigger_phrase, ...). Returns the metadata."""
        from lorakit.adapters.file import build_metadata, save_lora

        md = build_metadata(self.family, output_name=os.path.splitext(os.path.basename(os.fspath(path)))[0],
                            **meta_kw)
        md.update(self.training_metadata())
        md.update({k: str(v) for k, v in (metadata or {}).items()})
        return save_lora(path, self.state_dict(), md, precision)

    def load_weights(self, path_or_sd) -> None:
        """Load a file saved from a network of the same layout (resume / continue training)."""
        from lorakit.adapters.file import read_lora_file, to_kohya

        if isinstance(path_or_sd, Mapping):
            sd = dict(path_or_sd)
        else:
            lf = read_lora_file(path_or_sd)
            sd = to_kohya(lf.tensors, lf.metadata, self.family, source=str(path_or_sd))
        own = self.state_dict()
        words = sorted(set(bundle_words(sd)) - set(bundle_words(own)))
        if words:
            raise UserError(f"{path_or_sd}: the file bundles trained embeddings for {', '.join(words)}; add "
                            f"--train_embedding {' '.join(words)} to go on training them (or write a copy without "
                            f"them: lorakit lora filter FILE --drop_embeddings --save_to OUT).")
        unexpected = sorted({k.split(".")[0] for k in sd if k not in own})
        if unexpected:
            raise UserError(f"{path_or_sd}: {len(unexpected)} module(s) are not part of this network "
                            f"(e.g. {', '.join(unexpected[:3])}); it was trained with other targets or network_args.")
        bad = [k for k in sd if sd[k].shape != own[k].shape and sd[k].numel() != own[k].numel()]
        if bad:
            raise UserError(f"{path_or_sd}: shapes differ from this network for {len(bad)} tensors (e.g. {bad[0]}: "
                            f"{tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}); check network_dim/conv_dim.")
        sd = {k: v.reshape(own[k].shape) for k, v in sd.items()}
        self.load_state_dict(sd, strict=False)
        for a in self.adapters:  # the scale follows the loaded alpha
            if hasattr(a, "scale") and getattr(a, "alpha", None) is not None and a.rank:
                a.scale = float(a.alpha) / a.rank


def _num_str(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ---- creating for training ----------------------------------------------------------------------------------------
def create_network(bundle, network_module: str = "networks.lora", network_dim: int | None = 4,
                   network_alpha: float | None = 1.0, network_args: Mapping[str, str] | None = None,
                   train_unet: bool = True, train_text_encoder: bool = True, multiplier: float = 1.0,
                   neuron_dropout: float | None = None) -> Network:
    """Build the adapters sd-scripts (or LyCORIS) would build for this bundle. Not applied yet: call apply_to()."""
    family = bundle.family
    cfg = parse_network_args(family, network_module, network_dim, network_alpha, network_args, neuron_dropout)
    preset = PRESETS[cfg.preset]
    scheme = scheme_for(family)
    cls = TRAINABLE_ALGOS[cfg.algo]
    conv_on = preset.enable_conv and (cfg.conv_dim is not None or cfg.conv_block_dims is not None)
    classes = family_classes(family, preset.unet_classes)
    if cfg.preset == "kohya" and conv_on:
        classes = classes + ("ResnetBlock2D", "Downsample2D", "Upsample2D")
    if cfg.train_blocks != "all":
        classes = tuple(c for c in classes if c in _TRAIN_BLOCKS[cfg.train_blocks])
    adapters: list[base.AdapterModule] = []

    def make(t: Target, dim: int, alpha: float):
        dev = t.module.weight.device
        kw = dict(multiplier=multiplier, lora_dim=dim, alpha=alpha, dropout=cfg.dropout, rank_dropout=cfg.rank_dropout,
                  module_dropout=cfg.module_dropout, use_tucker=cfg.use_tucker, weight_decompose=cfg.dora,
                  wd_on_out=cfg.wd_on_out, factor=cfg.factor, decompose_both=cfg.decompose_both,
                  full_matrix=cfg.full_matrix, unit=cfg.unit)
        parts = split_parts(family, t.lora_name, t.module.weight.shape[1]) if cfg.dit.split_qkv else None
        with torch.device(dev):
            a = SplitLoRAModule(t.lora_name, t.module, parts, **kw) if parts else cls(t.lora_name, t.module, **kw)
        a.wd_detach_norm = cfg.dora_detach_norm
        a.rank_dropout_rescale = cfg.rank_dropout_rescale
        return a

    if train_text_encoder and cfg.select_te and preset.te_modules:
        for t in te_targets(bundle.text_encoders, family, preset.te_modules, optional=cfg.train_t5xxl):
            adapters.append(make(t, cfg.dim, cfg.alpha))
    if train_unet:
        for t in unet_targets(bundle.unet, family, classes, conv=conv_on, extra_names=preset.unet_names):
            idx = scheme.index(t.lora_name)
            if cfg.selected_blocks is not None and idx not in cfg.selected_blocks:
                continue
            if t.kind in ("linear", "conv1x1"):
                if cfg.block_dims is not None and idx >= 0:
                    dim, alpha = cfg.block_dims[idx], cfg.block_alphas[idx]
                else:
                    dim, alpha = cfg.dim, cfg.alpha
            elif cfg.conv_block_dims is not None and idx >= 0:
                dim, alpha = cfg.conv_block_dims[idx], cfg.conv_block_alphas[idx]
            elif cfg.conv_dim is not None:
                dim, alpha = cfg.conv_dim, cfg.conv_alpha
            else:
                continue
            dim = cfg.dit.dim(t.lora_name, dim)
            if not dim:
                continue
            adapters.append(make(t, dim, alpha))
        adapters += [make(t, d, cfg.alpha) for t, d in _in_layer_targets(bundle.unet, family, cfg.dit.in_dims)]
    if not adapters:
        raise UserError("network_args select no layer at all (every block has rank 0 or is left out); "
                        "check blocks / block_dims / *_lr_weight and train_unet / train_text_encoder.")
    net = Network(family, adapters, cfg)
    net.multiplier = multiplier
    return net


def _in_layer_targets(unet, family, in_dims) -> list[tuple[Target, int]]:
    """network_args in_dims: LoRA targets on the denoiser's input embedders, with their ranks (0: none; a layer the
    model lacks, like schnell's guidance embedder, none)."""
    from lorakit.adapters.targets import unet_lora_name

    if not in_dims:
        return []
    modules = dict(unet.named_modules())
    out = []
    for paths, dim in zip(IN_LAYERS, in_dims):
        for path in paths:
            if dim and isinstance(modules.get(path), nn.Linear):
                name = unet_lora_name(family, path)
                out.append((Target(name, modules[path], "linear", None), dim))
    return out


# ---- building from a file -----------------------------------------------------------------------------------------
def detect_algo(lora_name: str, w: Mapping[str, torch.Tensor]):
    if "lora_down.weight" in w and "lora_up.weight" in w:
        return LoRAModule
    if "hada_w1_a" in w:
        return LoHaModule
    if "lokr_w1" in w or "lokr_w1_a" in w:
        return LoKrModule
    if "diff" in w:
        return FullModule
    if "w_norm" in w:
        return NormModule
    if "oft_blocks" in w or "oft_diag" in w:
        return OFTModule
    if "weight" in w and "on_input" in w:
        return IA3Module
    if "a1.weight" in w:
        raise UserError(f"{lora_name}: GLoRA modules are not supported by lorakit.")
    raise UserError(f"{lora_name}: unknown adapter tensors {', '.join(sorted(w))}; lorakit reads LoRA/LoCon "
                    f"(lora_down/lora_up[/lora_mid]), LoHa (hada_*), LoKr (lokr_*), full (diff), IA3, OFT and DoRA.")


def group_by_module(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        name, _, param = k.partition(".")
        out.setdefault(name, {})[param] = v
    return out


def build_network_from_state_dict(bundle, sd: Mapping[str, torch.Tensor], metadata: dict | None = None,
                                  source: str = "LoRA", strict: bool = True) -> Network:
    """Adapters for every module of a kohya-keyed state dict; any module the model lacks, or whose shapes do not fit,
    is an error that names the family the file seems to be for. strict=False skips unknown module names instead
    (logged, listed in `net.skipped_modules`) as A1111 does, but still fails when nothing matches or shapes differ."""
    from lorakit.adapters.file import describe_family_mismatch

    sd, bundled = split_bundle(sd)
    embeddings = TokenEmbeddings.from_bundle(bundle, bundled, source)
    targets = module_map(bundle)
    adapters = []
    missing, misfit = [], []
    for name, w in group_by_module(sd).items():
        t = targets.get(name)
        if t is None:
            missing.append(name)
            continue
        cls = detect_algo(name, w)
        try:
            if cls is NormModule:
                if t.kind != "norm":
                    raise ValueError(f"{name}: w_norm on a {t.kind} layer")
            elif t.kind == "norm":
                raise ValueError(f"{name}: {cls.algo} tensors on a norm layer")
            with torch.device(t.module.weight.device if t.module.weight.device.type != "meta" else "cpu"):
                adapters.append(cls.from_weights(t.lora_name, t.module, w))
        except ValueError as exc:
            misfit.append(str(exc))
    skipped: list[str] = []
    if missing and not strict and adapters and not misfit:
        import logging

        logging.getLogger(__name__).warning("%s: %d module(s) not in this model were skipped: %s", source,
                                            len(missing), ", ".join(missing[:5]))
        skipped, missing = missing, []
    if missing or misfit:
        hint = describe_family_mismatch(sd, metadata or {}, bundle.family)
        parts = []
        if missing:
            parts.append(f"{len(missing)} module name(s) do not exist in this {bundle.family.title} model "
                         f"(e.g. {', '.join(missing[:3])})")
        if misfit:
            parts.append(f"{len(misfit)} module(s) have shapes that do not fit ({misfit[0]})")
        raise UserError(f"{source}: " + "; ".join(parts) + ". " + hint)
    if not adapters:
        raise UserError(f"{source}: the file holds no adapter modules.")
    net = Network(bundle.family, adapters, None, metadata).eval()
    net.set_embeddings(embeddings)
    net.skipped_modules = skipped
    return net


def load_network(bundle, source, multiplier: float = 1.0, merge: bool = False, apply: bool = True,
                 strict: bool = True) -> Network:
    """Read a LoRA file (any supported style) and apply it to `bundle`: unmerged (default; stackable, multiplier
    changeable) or merged into the weights. `source` is a path or a LoraFile."""
    from lorakit.adapters.file import LoraFile, check_family, read_lora_file, to_kohya

    lf = source if isinstance(source, LoraFile) else read_lora_file(source)
    check_family(lf, bundle.family)
    sd = to_kohya(lf.tensors, lf.metadata, bundle.family, source=str(lf.path))
    net = build_network_from_state_dict(bundle, sd, lf.metadata, source=str(lf.path), strict=strict)
    # keep the file's dtype out of the maths: adapters compute in float32 and cast to the layer's dtype
    net.set_multiplier(multiplier)
    net.eval()  # generation: no dropout, DyLoRA at full rank
    if merge:
        net.merge_into()
    elif apply:
        net.apply_to(bundle)
    return net
