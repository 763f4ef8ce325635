"""The `--network_args` schema: every key `parse_network_args` accepts, with an example and what it does.

One list serves the parser (an unknown key is refused), `lorakit train --help`, docs/training-options.md and the test
that parses every example, so a key cannot be accepted without being documented or documented without being parsed.
"""

from __future__ import annotations

from dataclasses import dataclass

SD1_BLOCKS_25 = "2,2,2,2,2,2,2,2,2,2,2,2,4,8,8,8,8,8,8,8,8,8,8,8,8"
SD1_ALPHAS_25 = "1,1,1,1,1,1,1,1,1,1,1,1,2,4,4,4,4,4,4,4,4,4,4,4,4"


@dataclass(frozen=True)
class NetworkArg:
    key: str
    example: str  # one --network_args item
    module: str = "networks.lora"  # the --network_module it goes with
    needs: tuple[str, ...] = ()  # other items the example needs
    note: str = ""
    family: str = "sd1"  # a model family the example applies to (FLUX-only keys: flux-dev)


NETWORK_ARGS: list[NetworkArg] = [
    NetworkArg("conv_dim", "conv_dim=8", note="also train 3x3 convs (LoCon) with this rank"),
    NetworkArg("conv_alpha", "conv_alpha=4", needs=("conv_dim=8",), note="alpha of the 3x3 convs (default 1)"),
    NetworkArg("dropout", "dropout=0.1", note="neuron dropout on the rank activations (= --network_dropout)"),
    NetworkArg("rank_dropout", "rank_dropout=0.1", note="drop whole rank channels per step"),
    NetworkArg("module_dropout", "module_dropout=0.1", note="skip whole modules per step"),
    NetworkArg("dora_wd", "dora_wd=True", note="DoRA: weight-decomposed LoRA (also with LoHa/LoKr)"),
    NetworkArg("dora_detach_norm", "dora_detach_norm=True", needs=("dora_wd=True",),
               note="DoRA: the weight norm is a constant in backward (the DoRA paper's section 4.3; less memory)"),
    NetworkArg("wd_on_output", "wd_on_output=True", needs=("dora_wd=True",),
               note="DoRA: normalise per output row instead of per input column"),
    NetworkArg("blocks", "blocks=IN04-IN07,OUT03-OUT06",
               note="train only these UNet blocks (IN00-IN11, MID, OUT00-OUT11 on SD1/2; IN00-IN08, MID, "
                    "OUT00-OUT08 on SDXL); add TE to keep the text encoder"),
    NetworkArg("block_dims", f"block_dims={SD1_BLOCKS_25}",
               note="one rank per block: 25 values on SD1/SD2 (IN00-IN11, MID, OUT00-OUT11), 23 on SDXL; 0 leaves "
                    "a block out"),
    NetworkArg("block_alphas", f"block_alphas={SD1_ALPHAS_25}", needs=(f"block_dims={SD1_BLOCKS_25}",),
               note="one alpha per block (with block_dims)"),
    NetworkArg("conv_block_dims", f"conv_block_dims={SD1_BLOCKS_25}", needs=(f"block_dims={SD1_BLOCKS_25}",),
               note="one 3x3-conv rank per block (with block_dims)"),
    NetworkArg("conv_block_alphas", f"conv_block_alphas={SD1_ALPHAS_25}",
               needs=(f"block_dims={SD1_BLOCKS_25}", f"conv_block_dims={SD1_BLOCKS_25}"),
               note="one 3x3-conv alpha per block (with conv_block_dims)"),
    NetworkArg("down_lr_weight", "down_lr_weight=sine",
               note="learning-rate factor per down block: 12 numbers (9 on SDXL) or cosine, sine, linear, "
                    "reverse_linear, zeros (+base, e.g. cosine+0.1)"),
    NetworkArg("mid_lr_weight", "mid_lr_weight=0.5", note="learning-rate factor of the middle block"),
    NetworkArg("up_lr_weight", "up_lr_weight=cosine", note="learning-rate factor per up block (like down_lr_weight)"),
    NetworkArg("block_lr_weight", "block_lr_weight=IN00-IN03:0.5;OUT08-OUT11:2",
               note="one learning-rate factor per block on every family (FLUX.1: D00-D18, S00-S37): the model's "
                    "block count of numbers, or SELECTOR:factor groups separated by ';' (others keep 1; 0 = no "
                    "LoRA there)"),
    NetworkArg("block_lr_zero_threshold", "block_lr_zero_threshold=0.1", needs=("down_lr_weight=sine",),
               note="blocks whose factor is at or below this get no LoRA at all"),
    NetworkArg("loraplus_lr_ratio", "loraplus_lr_ratio=16",
               note="LoRA+: lora_up learns this many times faster (= --loraplus_lr_ratio)"),
    NetworkArg("loraplus_unet_lr_ratio", "loraplus_unet_lr_ratio=16", note="LoRA+ ratio of the UNet only"),
    NetworkArg("loraplus_text_encoder_lr_ratio", "loraplus_text_encoder_lr_ratio=4",
               note="LoRA+ ratio of the text encoders only"),
    NetworkArg("algo", "algo=lokr", module="lycoris.kohya",
               note="LyCORIS algorithm: lora, locon, loha, lokr, dylora, full"),
    NetworkArg("preset", "preset=attn-mlp", module="lycoris.kohya",
               note="LyCORIS target preset: full, full-lin, attn-mlp, attn-only, unet-only, unet-transformer-only, "
                    "unet-convblock-only, kohya"),
    NetworkArg("factor", "factor=8", module="lycoris.kohya", needs=("algo=lokr",), note="LoKr: Kronecker factor"),
    NetworkArg("decompose_both", "decompose_both=True", module="lycoris.kohya", needs=("algo=lokr",),
               note="LoKr: make the small factor low-rank too"),
    NetworkArg("full_matrix", "full_matrix=True", module="lycoris.kohya", needs=("algo=lokr",),
               note="LoKr: keep the large factor a full matrix"),
    NetworkArg("use_tucker", "use_tucker=True", module="lycoris.kohya", needs=("algo=locon",),
               note="Tucker decomposition of 3x3 convs"),
    NetworkArg("use_cp", "use_cp=True", module="lycoris.kohya", needs=("algo=locon",), note="same as use_tucker"),
    NetworkArg("use_conv_cp", "use_conv_cp=True", module="lycoris.kohya", needs=("algo=locon",),
               note="same as use_tucker"),
    NetworkArg("disable_conv_cp", "disable_conv_cp=False", module="lycoris.kohya", needs=("algo=locon",),
               note="old LyCORIS spelling: False = use_tucker"),
    NetworkArg("unit", "unit=4", module="networks.dylora", note="DyLoRA: rank step (network_dim a multiple of it)"),
    NetworkArg("train_t5xxl", "train_t5xxl=True", family="flux-dev",
               note="FLUX.1: LoRA on T5-XXL too (lora_te3_; CLIP-L's lora_te1_ modules train by default)"),
    NetworkArg("train_blocks", "train_blocks=single", family="flux-dev",
               note="FLUX.1: all (default), double or single: which transformer blocks get LoRA"),
    NetworkArg("train_double_block_indices", "train_double_block_indices=0-9", family="flux-dev",
               note="FLUX.1: the double blocks that get LoRA (all, none, or indices and ranges: 0,2-5)"),
    NetworkArg("train_single_block_indices", "train_single_block_indices=10-37", family="flux-dev",
               note="FLUX.1: the single blocks that get LoRA (all, none, or indices and ranges)"),
    NetworkArg("split_qkv", "split_qkv=True", family="flux-dev",
               note="FLUX.1: one LoRA per q/k/v part of the fused qkv (and linear1: q/k/v/MLP); saved fused as "
                    "sd-scripts saves it, with the alpha that makes it act as trained"),
    NetworkArg("img_attn_dim", "img_attn_dim=8", family="flux-dev",
               note="FLUX.1: rank of the double blocks' image attention (qkv, proj); 0 = no LoRA there"),
    NetworkArg("txt_attn_dim", "txt_attn_dim=8", family="flux-dev", note="FLUX.1: rank of the text attention"),
    NetworkArg("img_mlp_dim", "img_mlp_dim=8", family="flux-dev", note="FLUX.1: rank of the image MLP"),
    NetworkArg("txt_mlp_dim", "txt_mlp_dim=0", family="flux-dev", note="FLUX.1: rank of the text MLP"),
    NetworkArg("img_mod_dim", "img_mod_dim=4", family="flux-dev", note="FLUX.1: rank of the image modulation"),
    NetworkArg("txt_mod_dim", "txt_mod_dim=4", family="flux-dev", note="FLUX.1: rank of the text modulation"),
    NetworkArg("single_dim", "single_dim=16", family="flux-dev",
               note="FLUX.1: rank of the single blocks' linear1 and linear2"),
    NetworkArg("single_mod_dim", "single_mod_dim=4", family="flux-dev",
               note="FLUX.1: rank of the single blocks' modulation"),
    NetworkArg("in_dims", "in_dims=[4,0,0,0,4]", family="flux-dev",
               note="FLUX.1: LoRA ranks on the embedders img_in, time_in, vector_in, guidance_in, txt_in (0: none)"),
    NetworkArg("train_norm", "train_norm=False", module="lycoris.kohya", note="accepted only as False (not supported)"),
    NetworkArg("rs_lora", "rs_lora=False", module="lycoris.kohya", note="accepted only as False (not supported)"),
    NetworkArg("use_scalar", "use_scalar=False", module="lycoris.kohya", note="accepted only as False (not supported)"),
    NetworkArg("bypass_mode", "bypass_mode=False", module="lycoris.kohya",
               note="accepted: training always runs the unmerged (bypass) form; the results are the same"),
    NetworkArg("rank_dropout_scale", "rank_dropout_scale=True", module="lycoris.kohya", needs=("rank_dropout=0.1",),
               note="divide what rank dropout keeps by the share kept in each draw (LyCORIS; without it LyCORIS "
                    "does not rescale, networks.lora always scales by 1/(1 - rank_dropout))"),
]
NETWORK_ARGS_BY_KEY = {a.key: a for a in NETWORK_ARGS}
