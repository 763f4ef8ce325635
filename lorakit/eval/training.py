"""`--eval_every_n_epochs` / `--eval_every_n_steps`: `lorakit eval` during training, on the LoRA files it saves.

`attach(loop, ckpt)` is called once when the loop starts; with the options off it does nothing at all. With them on,
the Checkpointer calls `on_saved(path, step, epoch)` after each LoRA file it writes, and every file on the schedule
(epoch or step a multiple of N, and the final LoRA) is scored: the training network is switched off (the base model),
the file is merged into the base weights, sampled, and taken out again, so the score is that of the file as saved
(EMA weights, save precision). The base model's samples are drawn at the first evaluation. The results go next to
the LoRAs as `lorakit eval` writes them (`<output_name>_eval.json`, table, chart, sheet), rewritten after each one.

Sampling uses the run's sample settings: --sample_sampler, and steps, CFG scale and negative prompt of the first
--sample_prompts line when there is one (else sd-scripts' 30 steps, CFG 7.5); the training resolution; --clip_skip.
A schedule without saves at those points saves the LoRA there too (a recommendation must name a file).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path
from typing import Optional

import torch

from lorakit.errors import UserError


def _options(record: dict):
    from lorakit import options as O

    values = O.defaults()
    values.update(record)
    return O.normalize(argparse.Namespace(**values))


def check_inputs(eval_tagger: str | None) -> None:
    """The trainer's preflight, before the model loads, when --eval_every_n_epochs/_steps is on: the tagger."""
    from lorakit.eval.taggers import check_tagger_dir

    if not eval_tagger:
        raise UserError("--eval_every_n_epochs/--eval_every_n_steps read every sample with a tagger: pass "
                        "--eval_tagger FOLDER (a WD14 tagger: model.onnx + selected_tags.csv), or --eval_tagger "
                        "toy for the toy world's classifier.")
    if eval_tagger != "toy":
        check_tagger_dir(eval_tagger, "--eval_tagger")


def attach(loop, ckpt) -> Optional["TrainingEval"]:
    """Hook the evaluation into the Checkpointer's saves when --eval_every_n_epochs/_steps asks for it."""
    record = getattr(ckpt, "options_record", None) or {}
    if not (record.get("eval_every_n_epochs") or record.get("eval_every_n_steps")) or not ckpt.run.is_main:
        return None
    o = _options(record)
    ev = TrainingEval(o, loop.bundle, loop.network, ckpt.run, ckpt.emit)
    ev.check_now()
    # a score needs a file: save at the eval points when the save options would not
    if o.eval_every_n_epochs and not ckpt.every_n_epochs:
        ckpt.every_n_epochs = o.eval_every_n_epochs
    if o.eval_every_n_steps and not o.eval_every_n_epochs and not ckpt.o.save_every_n_steps:
        ckpt.o = dataclasses.replace(ckpt.o, save_every_n_steps=o.eval_every_n_steps)
    ckpt.on_saved = ev.on_saved
    return ev


class TrainingEval:
    def __init__(self, o, bundle, network, run, emit):
        self.o, self.bundle, self.network, self.run, self.emit = o, bundle, network, run, emit
        self.evaluation = None
        self.images: list = []

    # ---- set-up --------------------------------------------------------------------------------------------------
    def check_now(self) -> None:
        """What can be checked before the first step: the tagger, the training data, the concept read from them."""
        from lorakit.eval.concept import find_concept, split_list, training_images
        from lorakit.eval.taggers import load_tagger

        check_inputs(self.o.eval_tagger)
        kind = "toy" if self.o.eval_tagger == "toy" else "wd14"
        self.tagger = load_tagger(kind, None if kind == "toy" else self.o.eval_tagger, flag="--eval_tagger")
        images = training_images(self.o.train_data_dir, self.o.dataset_config, self.o.caption_extension)
        # the trigger comes from the data alone here (no flag of `lorakit train` names it)
        flags = {"core_tags": "--eval_core_tags", "trigger": "Start every caption with the trigger, or name the "
                 "image folders `N_trigger class` (or set class_tokens in --dataset_config)."}
        self.concept = find_concept(images, self.tagger, core_tags=split_list(self.o.eval_core_tags) or None,
                                    flags=flags)
        c = self.concept
        self.run.log(f"eval: trigger {c.trigger!r}, class prompt {c.class_prompt!r}, core tags "
                     f"{', '.join(c.core_tags)}; scene tags {', '.join(c.scene_tags) or '-'} ({c.scene_reason})")

    def _settings(self):
        from lorakit import options as O
        from lorakit.eval.runner import EvalSettings
        from lorakit.eval.sampling import SampleSettings
        from lorakit.generate.sample_prompts import SD_SCRIPTS_DEFAULTS, load_sample_prompts

        o = self.o
        first = load_sample_prompts(o.sample_prompts)[0] if o.sample_prompts else None
        res = O.parse_resolution(o.resolution) if o.resolution else None
        width, height = res if res else (self.bundle.family.resolution, self.bundle.family.resolution)
        steps = (first.steps if first and first.steps else SD_SCRIPTS_DEFAULTS["steps"])
        cfg = (first.scale if first and first.scale else SD_SCRIPTS_DEFAULTS["scale"])
        neg = (first.negative_prompt or "") if first else ""
        on_gpu = next(self.bundle.unet.parameters()).device.type != "cpu"
        return EvalSettings(seeds=o.eval_seeds, sample=SampleSettings(
            steps=steps, sampler=o.sample_sampler, cfg_scale=cfg, width=width, height=height, negative_prompt=neg,
            clip_skip=o.clip_skip, batch_size=16 if on_gpu else 64))

    def _start(self):
        from lorakit.eval.runner import Evaluation

        self.evaluation = Evaluation(self.bundle, self.concept, self.tagger, self._settings(),
                                     log=lambda line: self.run.log(f"eval: {line}"))

    # ---- the hook ------------------------------------------------------------------------------------------------
    def wants(self, path: Path, step: int, epoch: int) -> bool:
        from lorakit.train.checkpointer import lora_name

        stem, name = Path(path).stem, self.run.name
        if stem == name:
            return True  # the final LoRA
        if self.o.eval_every_n_epochs:
            return stem == lora_name(name, epoch=epoch) and epoch % self.o.eval_every_n_epochs == 0
        return (bool(self.o.eval_every_n_steps) and stem == lora_name(name, step=step)
                and step % self.o.eval_every_n_steps == 0)

    def on_saved(self, path: Path, step: int, epoch: int) -> None:
        if not self.wants(path, step, epoch):
            return
        from lorakit.eval.runner import Checkpoint

        t0 = time.time()
        self.run.log(f"eval: scoring {Path(path).name} ...")
        self.emit("evaluating", path=str(path), step=step)
        try:
            with _base_model(self.network), torch.no_grad(), torch.random.fork_rng(devices=[]):
                py_state = random.getstate()
                try:
                    if self.evaluation is None:
                        self._start()
                        self.evaluation.add_base()
                    self.evaluation.add_file(Checkpoint(Path(path), Path(path).stem, step, epoch))
                finally:
                    random.setstate(py_state)
            files = self._write()
        except Exception as exc:  # noqa: BLE001 - a score must never end a run (set-up errors came at the start)
            self.run.log(f"warning: eval of {Path(path).name} failed ({type(exc).__name__}: {exc}); training "
                         "continues; score the files later with `lorakit eval`.")
            return
        self.run.log(f"eval: {files['json']} ({time.time() - t0:.1f} s)")
        self.emit("eval", path=str(files["json"]), step=step, recommended=self.result.get("recommended"))

    def _write(self):
        from lorakit.eval.report import write_outputs

        self.result = self.evaluation.result()
        return write_outputs(self.result, self.evaluation.sheet_images, self.run.out_dir, self.run.name)


class _base_model:
    """The training network switched off (the base model's weights compute alone), and switched back on."""

    def __init__(self, network):
        self.network = network

    def __enter__(self):
        self.was = [(a, a.enabled) for a in self.network.adapters]
        self.network.set_enabled(False)

    def __exit__(self, *exc):
        for a, on in self.was:
            a.enabled = on
