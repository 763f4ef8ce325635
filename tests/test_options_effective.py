"""No silent options: every option the schema marks effective is read by the code that acts on it during a run,
every dataset/subset key of the schema is accepted in a dataset TOML, network args are checked before the model
loads, and `lorakit train --help` and docs/training-options.md list every --network_args key with an example.

How the first check works: training runs with recording option objects. A read counts when it comes from the code
that acts on the option: reads by code that only copies, reports or checks every option in bulk (the schema module,
dataclasses.replace, the ss_* metadata, the dataset report, the preflight's existence/range checks, the memory
estimate, the stages' `picked`) are not counted. `picked` forwards options into each stage's small options class, and
reads of those count; dataset and subset keys count when the dataset layer reads the field of its config objects.
An option that nothing reads, or that only a bulk reader touches, fails the test.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit import options as O
from lorakit.errors import UserError
from test_train_common import dataset, make_images, one_thread, options, read_lora, run, tiny  # noqa: F401

BULK_FILES = ("lorakit/options.py", "dataclasses.py", "lorakit/train/metadata.py", "lorakit/data/check.py",
              "lorakit/data/config.py", "lorakit/train/preflight.py", "lorakit/train/memory.py", __file__)
BULK_FUNCTIONS = {"picked", "_options_record"}
# read by the front end, not by train(): checked in that code
FRONT_END = {"config_file": "lorakit/options.py", "output_config": "lorakit/cli/train_cmd.py"}
# read in the memory estimate (its own options)
MEMORY = {"estimate_memory", "max_memory", "auto_fit"}
# read only in a situation these small runs do not make: the module that reads them must name them
CONDITIONAL = {"auto_fit": "lorakit/train/memory.py"}  # read when the predicted peak exceeds --max_memory
# the training eval (issue 17) reads its options from the run's options record (a dict), out of this harness' sight;
# once it takes them from the run's Options (a stage's picked options), drop them here and the runs below cover them
CONDITIONAL.update({name: "lorakit/eval/training.py" for name in (
    "eval_every_n_epochs", "eval_every_n_steps", "eval_tagger", "eval_core_tags", "eval_seeds")})
# options whose purpose is the metadata: the ss_*/ModelSpec writers are the code acting on them
METADATA_PURPOSE = {o.name for o in O.OPTIONS if o.group == O.G_META} | {"training_comment"}
METADATA_WRITERS = ("lorakit/train/metadata.py", "lorakit/train/checkpointer.py")


class Reads:
    def __init__(self):
        self.names: set[str] = set()
        self.raw: set[str] = set()  # every read, bulk ones included (the test's own sanity check)

    def caller_counts(self, opt: str = "", config_object: bool = False) -> bool:
        f = sys._getframe(2)
        for _ in range(2):  # the reader, and the function a comprehension inside it belongs to
            fn = f.f_code.co_filename.replace("\\", "/")
            if opt in METADATA_PURPOSE and (fn.endswith(METADATA_WRITERS) or f.f_code.co_name == "ss_metadata"):
                return True
            if fn.endswith(BULK_FILES) or f.f_code.co_name in BULK_FUNCTIONS:
                return False
            if not f.f_code.co_name.startswith("<"):
                break
            f = f.f_back
        return True

    def memory_read(self) -> bool:
        return sys._getframe(2).f_code.co_filename.replace("\\", "/").endswith("lorakit/train/memory.py")


def _recording(cls, reads: Reads, names_of: dict[str, str]):
    """A subclass of `cls` whose attribute reads of option fields are recorded (under the option's name)."""
    base_get = cls.__getattribute__

    def __getattribute__(self, name):
        opt = names_of.get(name)
        if opt is not None:
            reads.raw.add(opt)
            if reads.caller_counts(opt) or (opt in MEMORY and reads.memory_read()):
                reads.names.add(opt)
        return base_get(self, name)

    return type(cls.__name__, (cls,), {"__getattribute__": __getattribute__})


@pytest.fixture
def reads(monkeypatch):
    from lorakit.data import config as C
    from lorakit.train import stages as S
    from lorakit.train import trainer as T

    r = Reads()
    by_name = {o.name: o.name for o in O.OPTIONS}
    opts_cls = _recording(O.Options, r, by_name)
    made: dict[type, type] = {}

    def picked(cls, opts):
        if cls not in made:
            made[cls] = _recording(cls, r, {f.name: f.name for f in dataclasses.fields(cls) if f.name in by_name})
        return made[cls](**{f.name: picked(f.metadata["options"], opts) if "options" in f.metadata
                            else getattr(opts, f.name) for f in dataclasses.fields(cls)})

    monkeypatch.setattr(S, "picked", picked)
    monkeypatch.setattr(T, "pick", picked)
    for cfg_cls, keys in ((C.SubsetConfig, C.SUBSET_OPTIONS), (C.DatasetConfig, C.DATASET_OPTIONS)):
        names_of = {key: o.name for key, o in keys.items()}
        base_get = cfg_cls.__getattribute__

        def getter(self, name, _names=names_of, _base=base_get):
            opt = _names.get(name)
            if opt is not None:
                r.raw.add(opt)
                if r.caller_counts(opt):
                    r.names.add(opt)
            return _base(self, name)

        monkeypatch.setattr(cfg_cls, "__getattribute__", getter)
    # train-scope options the dataset layer reads from the command line's values (a dict): count those reads; a
    # config name standing for a train option (dataset_repeats -> num_repeats) counts for it
    train_scope = {o.name for o in O.OPTIONS if o.scope == "train"}
    via = {cfg: arg for arg, cfg in C.ARG_TO_CONFIG.items() if arg in train_scope}

    class ArgDict(dict):
        def _note(self, key):
            name = via.get(key, key)
            if name in train_scope:
                r.raw.add(name)
                r.names.add(name)

        def get(self, key, default=None):
            self._note(key)
            return super().get(key, default)

        def __getitem__(self, key):
            self._note(key)
            return super().__getitem__(key)

    orig_args = C._args_to_dict
    monkeypatch.setattr(C, "_args_to_dict", lambda args: ArgDict(orig_args(args)))
    r.options_class = opts_cls
    return r


def _train(reads, tmp, argv, **kw):
    ns = O.resolve(argv)
    plain = O.normalize(ns)
    opts = reads.options_class(**{f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)})
    from lorakit.train.trainer import train

    return train(opts, progress=False, log=lambda *a, **k: None, **kw)


def _model_file(tmp: Path) -> Path:
    from lorakit.models.saving import save_single_file

    path = tmp / "tiny_sd1.safetensors"
    save_single_file(tiny("sd1"), path)
    return path


def _flux_files(folder: Path) -> dict[str, Path]:
    """A tiny FLUX.1-dev the way BFL ships it: the transformer alone (bare keys), clip_l, t5xxl and ae beside it."""
    from safetensors.torch import save_file

    from lorakit.models.saving import checkpoint_metadata, ldm_state_dict

    folder.mkdir(parents=True)
    bundle = tiny("flux-dev")
    sd = ldm_state_dict(bundle)
    widths = {"lorakit.configs": checkpoint_metadata(bundle, "tiny")["lorakit.configs"]}
    parts = {"model": ("model.diffusion_model.", widths), "clip_l": ("text_encoders.clip_l.transformer.", None),
             "t5xxl": ("text_encoders.t5xxl.transformer.", None), "ae": ("vae.", None)}
    from transformers import ByT5Tokenizer

    out = {"tokenizers": folder / "tokenizers"}  # sd-scripts' --tokenizer_cache_dir layout
    ByT5Tokenizer().save_pretrained(out["tokenizers"] / "google_t5-v1_1-xxl")
    for name, (prefix, metadata) in parts.items():
        out[name] = folder / f"{name}.safetensors"
        save_file({k[len(prefix):]: v.contiguous() for k, v in sd.items() if k.startswith(prefix)}, str(out[name]),
                  metadata=metadata)
    return out


def _runs(reads, tmp: Path):
    model = _model_file(tmp)
    data = dataset(tmp / "d", n_train=4, n_reg=2, sizes=((64, 64), (128, 64)))
    (tmp / "d" / "train" / "1_zq shape" / "000.txt").unlink()  # class tokens stand in for a missing caption
    masks = tmp / "masks"
    masks.mkdir()
    for p in (tmp / "d" / "train" / "1_zq shape").glob("*.png"):
        Image.fromarray(np.full(Image.open(p).size[::-1], 255, np.uint8)).save(masks / p.name)
    prompts = tmp / "prompts.txt"
    prompts.write_text("zq shape --w 64 --h 64 --s 1\n", encoding="utf-8")
    thumb = tmp / "thumb.png"
    Image.new("RGB", (8, 8)).save(thumb)
    common = ["--pretrained_model_name_or_path", str(model), "--output_name", "eff", "--resolution", "64",
              "--network_dim", "2", "--seed", "1", "--max_data_loader_n_workers", "0"]
    # 1: command-line dataset with augmentation, masks, validation, EMA, every metadata option, previews
    _train(reads, tmp, common + [
        "--train_data_dir", data["train_data_dir"], "--reg_data_dir", data["reg_data_dir"],
        "--output_dir", str(tmp / "o1"), "--vae", str(model), "--v2", "--enable_bucket", "--min_bucket_reso", "64",
        "--max_bucket_reso", "128", "--bucket_reso_steps", "64", "--bucket_no_upscale", "--resize_interpolation",
        "area", "--train_batch_size", "2", "--caption_extension", ".txt", "--shuffle_caption", "--caption_separator",
        ",", "--keep_tokens", "1", "--keep_tokens_separator", "|||", "--secondary_separator", ";;;",
        "--enable_wildcard", "--caption_prefix", "p", "--caption_suffix", "s", "--caption_dropout_rate", "0.1",
        "--caption_dropout_every_n_epochs", "3", "--caption_tag_dropout_rate", "0.1", "--token_warmup_min", "1",
        "--token_warmup_step", "0.5", "--max_token_length", "150", "--color_aug", "--flip_aug", "--random_crop",
        "--face_crop_aug_range", "2.0,4.0", "--masked_loss", "--conditioning_data_dir", str(masks), "--alpha_mask", "--on_bad_image", "skip",
        "--validation_split", "0.3", "--validation_seed", "4", "--validate_every_n_steps", "1",
        "--validate_every_n_epochs", "1", "--max_validation_steps", "1", "--prior_loss_weight", "0.5",
        "--ema_decay", "0.9", "--ema_warmup", "--ema_update_every", "1", "--ema_save_as", "beside", "--ema_samples",
        "--network_module", "networks.lora", "--network_alpha", "2", "--network_dropout", "0.1", "--network_args",
        "conv_dim=2", "--network_train_unet_only", "--unet_lr", "1e-3", "--scale_weight_norms", "1.0",
        "--loraplus_lr_ratio", "2", "--loraplus_unet_lr_ratio", "2", "--loraplus_text_encoder_lr_ratio", "2",
        "--training_comment", "c", "--optimizer_type", "AdamW", "--learning_rate", "1e-3", "--optimizer_args",
        "weight_decay=0.01", "--max_grad_norm", "1.0", "--gradient_accumulation_steps", "1", "--lr_scheduler",
        "cosine_with_restarts", "--lr_warmup_steps", "1", "--lr_scheduler_num_cycles", "2",
        "--max_train_epochs", "1", "--loss_type", "huber", "--huber_schedule", "snr", "--huber_c", "0.1",
        "--huber_scale", "1.0", "--min_snr_gamma", "5", "--debiased_estimation_loss",
        "--scale_v_pred_loss_like_noise_pred", "--v_pred_like_loss", "0.1", "--v_parameterization",
        "--zero_terminal_snr", "--noise_offset", "0.05", "--noise_offset_random_strength", "--adaptive_noise_scale",
        "0.01", "--multires_noise_iterations", "2", "--multires_noise_discount", "0.3", "--ip_noise_gamma", "0.05",
        "--ip_noise_gamma_random_strength", "--min_timestep", "10", "--max_timestep", "990",
        "--gradient_checkpointing", "--no_half_vae", "--xformers", "--save_precision", "fp16",
        "--save_every_n_steps", "1", "--save_last_n_steps", "1", "--save_last_n_steps_state", "1", "--save_state",
        "--save_state_on_train_end", "--metadata_title", "t", "--metadata_author", "a", "--metadata_description",
        "d", "--metadata_license", "l", "--metadata_tags", "x", "--metadata_usage_hint", "u", "--metadata_thumbnail",
        str(thumb), "--metadata_merged_from", "m", "--metadata_trigger_phrase", "zq", "--metadata_preprocessor",
        "pp", "--metadata_is_negative_embedding", "False", "--logging_dir", str(tmp / "logs"), "--log_prefix", "lp",
        "--log_config", "--log_with", "tensorboard", "--console_log_file", str(tmp / "log.txt"), "--sample_prompts",
        str(prompts), "--sample_every_n_steps", "100", "--sample_every_n_epochs", "1", "--sample_at_first",
        "--sample_sampler", "euler", "--clip_skip", "2", "--ddp_timeout", "5", "--save_model_as", "safetensors",
        "--lr_decay_steps", "0", "--lr_scheduler_power", "1.0", "--lr_scheduler_min_lr_ratio", "0.1",
        "--save_n_epoch_ratio", "1"],
           predict_memory=False)
    # 2: a TOML dataset with cached latents and text-encoder outputs; epoch saves; a resumed state
    toml = tmp / "ds.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 2\n[[datasets.subsets]]\n'
                    f'image_dir = "{tmp / "d" / "train" / "1_zq shape"}"\nnum_repeats = 1\n', encoding="utf-8")
    base2 = common + ["--dataset_config", str(toml), "--output_dir", str(tmp / "o2"), "--cache_latents",
                      "--cache_latents_to_disk", "--vae_batch_size", "2", "--skip_cache_check",
                      "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk",
                      "--network_train_unet_only", "--max_train_steps", "4", "--save_every_n_epochs", "1",
                      "--save_last_n_epochs", "1", "--save_last_n_epochs_state", "1",
                      "--save_state", "--mixed_precision", "bf16", "--full_bf16", "--lr_scheduler", "polynomial",
                      "--dim_from_weights", "--no_metadata"]
    _train(reads, tmp, common + ["--dataset_config", str(toml), "--output_dir", str(tmp / "o5"), "--max_train_steps",
                                 "1", "--network_train_text_encoder_only", "--text_encoder_lr", "1e-4"],
           predict_memory=False)
    first = _train(reads, tmp, common + ["--dataset_config", str(toml), "--output_dir", str(tmp / "o0"),
                                         "--max_train_steps", "1", "--network_train_unet_only"], predict_memory=False)
    _train(reads, tmp, base2 + ["--network_weights", str(first.final_lora), "--base_weights", str(first.final_lora),
                                "--base_weights_multiplier", "0.5"], stop_after_step=1, predict_memory=False)
    states = sorted((tmp / "o2").glob("*-state"))
    _train(reads, tmp, base2 + ["--network_weights", str(first.final_lora), "--resume", str(states[-1]),
                                "--lr_scheduler_timescale", "2"], predict_memory=False)
    # 3: fine-tune metadata (--in_json), the memory prediction, refusals that are the options' effect
    meta = tmp / "meta.json"
    imgs = sorted((tmp / "d" / "train" / "1_zq shape").glob("*.png"))
    meta.write_text("{" + ", ".join(f'"{p}": {{"caption": "zq"}}' for p in imgs) + "}", encoding="utf-8")
    _train(reads, tmp, common + ["--in_json", str(meta), "--train_data_dir", str(tmp / "d" / "train" / "1_zq shape"),
                                 "--dataset_repeats", "2", "--output_dir", str(tmp / "o3"), "--max_memory", "100GB",
                                 "--max_train_steps", "1"])  # --estimate_memory is read (False) in every run
    # 4: FLUX.1 from a transformer-only file, its text encoders and AE as files of their own
    flux = _flux_files(tmp / "flux")
    _train(reads, tmp, ["--pretrained_model_name_or_path", str(flux["model"]), "--clip_l", str(flux["clip_l"]),
                        "--t5xxl", str(flux["t5xxl"]), "--ae", str(flux["ae"]), "--train_data_dir",
                        data["train_data_dir"], "--output_dir", str(tmp / "o6"), "--resolution", "64",
                        "--network_dim", "2", "--seed", "1", "--max_train_steps", "1", "--max_data_loader_n_workers",
                        "0", "--t5xxl_max_token_length", "8", "--apply_t5_attn_mask", "--timestep_sampling",
                        "shift", "--sigmoid_scale", "1.5", "--discrete_flow_shift", "3.1582",
                        "--model_prediction_type", "raw", "--guidance_scale", "1.0", "--tokenizer_cache_dir",
                        str(flux["tokenizers"]), "--blocks_to_swap", "2"], predict_memory=False)
    _train(reads, tmp, ["--pretrained_model_name_or_path", str(flux["model"]), "--clip_l", str(flux["clip_l"]),
                        "--t5xxl", str(flux["t5xxl"]), "--ae", str(flux["ae"]), "--train_data_dir",
                        data["train_data_dir"], "--output_dir", str(tmp / "o7"), "--resolution", "64",
                        "--network_dim", "2", "--seed", "1", "--max_train_steps", "1", "--max_data_loader_n_workers",
                        "0", "--t5xxl_max_token_length", "8", "--tokenizer_cache_dir", str(flux["tokenizers"]),
                        "--timestep_sampling", "sigma", "--weighting_scheme", "logit_normal", "--logit_mean", "0.1",
                        "--logit_std", "1.2"], predict_memory=False)
    for flag in ("--weighted_captions", "--full_fp16"):
        with pytest.raises(UserError):
            _train(reads, tmp, common + ["--train_data_dir", data["train_data_dir"], "--output_dir",
                                         str(tmp / "o4"), flag], predict_memory=False)


def test_every_effective_option_is_read_in_a_run(reads, tmp_path):
    _runs(reads, tmp_path)
    effective = {o.name for o in O.OPTIONS if o.effect}
    missing = sorted(effective - reads.names - set(FRONT_END) - set(CONDITIONAL))
    assert not missing, (f"effective options that no code acting on them read in these runs: {missing}. Make them "
                         "do what their help says, or mark them effect=False (accepted, no effect) in "
                         "lorakit/options.py.")
    for name, module in {**FRONT_END, **CONDITIONAL}.items():  # their code names them
        text = Path(module).read_text(encoding="utf-8")
        assert f'"{name}"' in text or f".{name}" in text, (name, module)
    # the harness itself sees bulk reads (so an option missing above was really unread where it counts)
    assert {"masked_loss", "ema_decay", "validation_split"} <= reads.raw


def test_the_check_catches_an_unread_option(reads, tmp_path, monkeypatch):
    """Design check: an option forwarded into a stage's options (and into the metadata) but then ignored by the code
    that should act on it is reported as unread."""
    from lorakit.train.checkpointer import Checkpointer

    monkeypatch.setattr(Checkpointer, "_modelspec_extras", lambda self: {})  # a "forgotten" --metadata_usage_hint
    _train(reads, tmp_path, ["--pretrained_model_name_or_path", str(_model_file(tmp_path)), "--train_data_dir",
                             dataset(tmp_path)["train_data_dir"], "--output_dir", str(tmp_path / "o"),
                             "--resolution", "64", "--max_train_steps", "1", "--metadata_usage_hint", "x"],
           predict_memory=False)
    assert "metadata_usage_hint" in reads.raw  # copied into SaveOptions by picked()...
    assert "metadata_usage_hint" not in reads.names  # ...but nothing acted on it
    assert {"zero_terminal_snr", "train_data_dir", "flip_aug", "metadata_title"} <= reads.names
