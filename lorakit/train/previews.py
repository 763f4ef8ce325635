"""Preview images during training, rendered by the generation layer with the conditioning training uses."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lorakit.errors import UserError


def load_prompts(path):
    """sd-scripts' prompt file (.txt with --n --w --h --d --l --s --ss, or .toml/.json), read by the generation layer."""
    from lorakit.generate.sample_prompts import load_sample_prompts

    return load_sample_prompts(path)


def render_samples(bundle, prompts, out_dir: Path, name: str, *, clip_skip: Optional[int], sampler: str, epoch=None,
                   step=0, device="cpu") -> list[Path]:
    """Preview images through the generation layer (A1111-style prompts, <lora:...>, infotext). `clip_skip` is
    sd-scripts' number; the previews read the layer training reads."""
    from lorakit.generate.pipeline import generate_samples

    suffix = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    return generate_samples(bundle, prompts, out_dir, prefix=f"{name}_{suffix}_", sampler=sampler,
                            clip_skip=bundle.family.train_clip_layer(clip_skip), device=device)


@dataclass(frozen=True)
class PreviewOptions:
    sample_prompts: Optional[str]
    sample_every_n_steps: Optional[int]
    sample_every_n_epochs: Optional[int]
    sample_at_first: bool
    sample_sampler: str
    clip_skip: Optional[int]


class Previews:
    """When and how previews are rendered: --sample_every_n_epochs wins over --sample_every_n_steps. Previews never
    shift the training random streams, and a failing preview is a warning, not the end of the run."""

    def __init__(self, o: PreviewOptions, run, bundle, network, optimizer, emit):
        self.o, self.run, self.bundle, self.network, self.optimizer = o, run, bundle, network, optimizer
        self.emit = emit
        self.prompts = load_prompts(o.sample_prompts) if o.sample_prompts else None
        self.samples: list[Path] = []

    def at_start(self, step: int) -> None:
        if self.o.sample_at_first and step == 0:
            self._render(None, step)

    def after_step(self, step: int) -> None:
        o = self.o
        if not o.sample_every_n_epochs and o.sample_every_n_steps and step % o.sample_every_n_steps == 0:
            self._render(None, step)

    def after_epoch(self, step: int, epoch: int) -> None:
        if self.o.sample_every_n_epochs and epoch % self.o.sample_every_n_epochs == 0:
            self._render(epoch, step)

    def _render(self, epoch: Optional[int], step: int) -> None:
        from lorakit.train.optimizers import set_train_mode

        if not self.prompts or not self.run.is_main:
            return
        import time

        # drawing previews can take minutes: say so, or the bar looks frozen
        when = f"epoch {epoch} (step {step})" if epoch is not None else f"step {step}"
        self.run.log(f"sampling {len(self.prompts)} preview prompt{'s' if len(self.prompts) != 1 else ''} for "
                     f"{when} ...")
        self.emit("sampling", step=step, prompts=len(self.prompts))
        t0 = time.time()
        set_train_mode(self.optimizer, False)
        self.network.eval()
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):  # previews never shift the training RNG streams
                new = render_samples(self.bundle, self.prompts, self.run.out_dir / "sample", self.run.name,
                                     clip_skip=self.o.clip_skip, sampler=self.o.sample_sampler, epoch=epoch, step=step,
                                     device=self.run.device)
            self.samples += new
            self.run.log(f"samples: {len(new)} image{'s' if len(new) != 1 else ''} in {self.run.out_dir / 'sample'} "
                         f"({time.time() - t0:.1f} s)")
            self.emit("sample", paths=[str(x) for x in new], step=step)
        except UserError:
            raise
        except Exception as exc:  # a preview must never end a run
            self.run.log(f"warning: sample images failed ({type(exc).__name__}: {exc}); training continues.")
        finally:
            random.setstate(py_state)
        self.network.train()
        set_train_mode(self.optimizer, True)
