"""LoRA files, state folders and their pruning during a run. Every call names the step and epoch it saves at."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


def lora_name(base: str, epoch: Optional[int] = None, step: Optional[int] = None) -> str:
    if epoch is not None:
        return f"{base}-{epoch:06d}"
    if step is not None:
        return f"{base}-step{step:08d}"
    return base


@dataclass(frozen=True)
class SaveOptions:
    save_every_n_steps: Optional[int]
    save_last_n_epochs: Optional[int]
    save_last_n_epochs_state: Optional[int]
    save_last_n_steps: Optional[int]
    save_last_n_steps_state: Optional[int]
    save_state: bool
    save_state_on_train_end: bool
    save_precision: Optional[str]
    no_metadata: bool
    metadata_license: Optional[str]
    metadata_tags: Optional[str]
    metadata_usage_hint: Optional[str]
    metadata_thumbnail: Optional[str]
    metadata_merged_from: Optional[str]
    metadata_preprocessor: Optional[str]
    metadata_is_negative_embedding: Optional[str]


def thumbnail_data_url(value: str) -> str:
    """--metadata_thumbnail: a data URL as given, or an image file turned into one (as sd-scripts does)."""
    import base64
    import mimetypes
    import os

    from lorakit.errors import UserError

    if value.startswith("data:"):
        return value
    if not os.path.isfile(value):
        raise UserError(f"--metadata_thumbnail {value!r} is neither a data: URL nor an image file; give the path of "
                        "a small PNG/JPEG/WebP preview (it is stored in the LoRA as a data URL).")
    mime = mimetypes.guess_type(value)[0] or "image/png"
    with open(value, "rb") as fh:
        return f"data:{mime};base64,{base64.b64encode(fh.read()).decode('ascii')}"


class Checkpointer:
    """Saves the LoRA (with metadata) and the training state; keeps only the last N periodic saves. Only the main
    process writes; every process joins a state save (each keeps its own random streams)."""

    def __init__(self, run, network, optim, o: SaveOptions, *, every_n_epochs: Optional[int], num_epochs: int,
                 max_steps: int, metadata, options_record: dict, emit: Callable[..., None], ema=None,
                 ema_save_as: str = "beside"):
        self.run, self.network, self.optim, self.o = run, network, optim, o
        self.every_n_epochs, self.num_epochs, self.max_steps = every_n_epochs, num_epochs, max_steps
        self.metadata, self.options_record, self.emit = metadata, options_record, emit
        self.ema, self.ema_save_as = ema, ema_save_as  # ema.Ema or None; "beside" or "lora"
        self.saved: list[Path] = []  # LoRA files written
        self.saved_ema: list[Path] = []  # {stem}-ema files written beside them (--ema_save_as beside)
        self.states: list[Path] = []  # state folders written
        self.modelspec = self._modelspec_extras()

    # ---- what the loop calls -------------------------------------------------------------------------------------
    def after_step(self, step: int, epoch: int, resume_at: tuple[int, int]) -> None:
        """--save_every_n_steps (not at the last step: the final save covers it)."""
        every = self.o.save_every_n_steps
        if not every or step % every or step >= self.max_steps:
            return
        stem = lora_name(self.run.name, step=step)
        self.save_lora(stem, step=step, epoch=epoch)
        if self.o.save_state:
            self.save_state(self.run.out_dir / f"{stem}-state", step=step, resume_at=resume_at)
        self._prune_steps(step)

    def after_epoch(self, step: int, epoch: int) -> None:
        """--save_every_n_epochs (not after the last epoch: the final save covers it)."""
        every = self.every_n_epochs
        if not every or epoch % every or epoch >= self.num_epochs:
            return
        stem = lora_name(self.run.name, epoch=epoch)
        self.save_lora(stem, step=step, epoch=epoch)
        if self.o.save_state:
            self.save_state(self.run.out_dir / f"{stem}-state", step=step, resume_at=(epoch + 1, 0))
        self._prune_epochs(epoch)

    def save_stop(self, step: int, epoch: int, resume_at: tuple[int, int]) -> None:
        """Ctrl-C or stop_after_step: a LoRA and a state to --resume from."""
        stem = lora_name(self.run.name, step=step)
        self.save_lora(stem, step=step, epoch=epoch)
        self.save_state(self.run.out_dir / f"{stem}-state", step=step, resume_at=resume_at)

    def save_final(self, step: int, epoch: int, next_epoch: int) -> Path:
        path = self.save_lora(self.run.name, step=step, epoch=epoch)
        if self.o.save_state or self.o.save_state_on_train_end:
            self.save_state(self.run.out_dir / f"{self.run.name}-state", step=step, resume_at=(next_epoch, 0))
        return path

    # ---- writers -------------------------------------------------------------------------------------------------
    def save_lora(self, stem: str, *, step: int, epoch: int) -> Path:
        from lorakit.train.optimizers import set_train_mode

        path = self.run.out_dir / f"{stem}.safetensors"
        if not self.run.is_main:
            return path
        self.emit("saving", path=str(path))  # the progress bar says what it waits for
        set_train_mode(self.optim.optimizer, False)  # schedule-free: save the averaged weights
        try:
            if self.ema is not None and self.ema_save_as == "lora":
                with self.ema.swapped():
                    self._write(path, step, epoch, ema=True)
            else:
                self._write(path, step, epoch)
        finally:
            set_train_mode(self.optim.optimizer, True)
        self.saved.append(path)
        self.run.log(f"saved {path}")
        self.emit("saved", path=str(path))
        if self.ema is not None and self.ema_save_as == "beside":
            ema_path = self.ema_file(stem)
            with self.ema.swapped():
                self._write(ema_path, step, epoch, ema=True)
            self.saved_ema.append(ema_path)
            self.run.log(f"saved {ema_path} (EMA weights)")
            self.emit("saved", path=str(ema_path))
        if getattr(self, "on_saved", None) is not None:  # --eval_every_n_*: lorakit.eval.training scores the file
            self.on_saved(path, step=step, epoch=epoch)
        return path

    def ema_file(self, stem: str) -> Path:
        return self.run.out_dir / f"{stem}-ema.safetensors"

    def _write(self, path: Path, step: int, epoch: int, ema: bool = False) -> None:
        """The network's current weights as a kohya LoRA with the run's metadata (Network.save_weights' keys, but
        ss_network_args only when --network_args were given, as sd-scripts writes it)."""
        from lorakit.adapters.file import build_metadata, save_lora

        if self.o.no_metadata:
            save_lora(path, self.network.state_dict(), {}, self._precision)
            return
        md = build_metadata(self.network.family, output_name=path.stem, **self.metadata.save_kwargs)
        md.update(self.network.training_metadata())
        if "ss_network_args" not in self.metadata.base:
            md.pop("ss_network_args", None)
        md.update(self.metadata.base)
        md.update(ss_steps=str(step), ss_epoch=str(epoch), ss_training_finished_at=str(time.time()))
        md.update(self.modelspec)
        if ema:
            md["lorakit.ema"] = self.ema.describe()
        save_lora(path, self.network.state_dict(), md, self._precision)

    def _modelspec_extras(self) -> dict[str, str]:
        """The --metadata_* options that ModelSpec keys hold as given (the thumbnail as a data URL)."""
        o = self.o
        md = {f"modelspec.{key}": value for key, value in (
            ("license", o.metadata_license), ("tags", o.metadata_tags), ("usage_hint", o.metadata_usage_hint),
            ("merged_from", o.metadata_merged_from), ("preprocessor", o.metadata_preprocessor),
            ("is_negative_embedding", o.metadata_is_negative_embedding)) if value}
        if o.metadata_thumbnail:
            md["modelspec.thumbnail"] = thumbnail_data_url(o.metadata_thumbnail)
        return md

    def save_state(self, folder: Path, *, step: int, resume_at: tuple[int, int]) -> Path:
        import torch

        from lorakit.train.state import TrainState, capture_rng, save_state

        gens = {"noise": self.run.streams.noise.get_state(), "latent": self.run.streams.latent.get_state()}
        rng = capture_rng()
        if self.run.world > 1:  # every process draws its own noise: keep all their RNG states for an exact resume
            import torch.distributed as dist

            everyone = [None] * self.run.world
            dist.all_gather_object(everyone, (gens, rng))
            gens = dict(gens, per_rank=[g for g, _ in everyone])
            rng = dict(rng, per_rank=[r for _, r in everyone])
        if not self.run.is_main:
            return folder
        self.emit("saving", path=str(folder))
        o = self.optim
        st = TrainState(network={k: v.detach().float().cpu() for k, v in self.network.state_dict().items()},
                        optimizer=o.optimizer.state_dict(), scheduler=o.scheduler.state_dict(),
                        scaler=o.scaler.state_dict() if o.scaler is not None else None, rng=rng, generators=gens,
                        counters={"epoch": resume_at[0], "batch": resume_at[1], "global_step": step,
                                  "seed": self.run.seed, "max_train_steps": self.max_steps,
                                  "num_threads": torch.get_num_threads()},  # float sums depend on it: see trainer
                        options=dict(self.options_record),
                        extra={"ema": self.ema.state_dict()} if self.ema is not None else {})
        save_state(folder, st)
        self.states.append(folder)
        self.run.log(f"saved state {folder}")
        return folder

    # ---- pruning (--save_last_n_epochs/_steps and their _state variants) -------------------------------------------
    def _prune_epochs(self, epoch: int) -> None:
        for n, is_state in ((self.o.save_last_n_epochs, False),
                            (self.o.save_last_n_epochs_state or self.o.save_last_n_epochs, True)):
            old = epoch - self.every_n_epochs * n if n else 0
            if old >= 1:
                self._remove(lora_name(self.run.name, epoch=old), is_state)

    def _prune_steps(self, step: int) -> None:
        every = self.o.save_every_n_steps
        for n, is_state in ((self.o.save_last_n_steps, False),
                            (self.o.save_last_n_steps_state or self.o.save_last_n_steps, True)):
            for s in range(every, step - n, every) if n else ():
                self._remove(lora_name(self.run.name, step=s), is_state)

    def _remove(self, stem: str, is_state: bool) -> None:
        from lorakit.train.state import remove_state

        if not self.run.is_main:
            return
        if is_state:
            remove_state(self.run.out_dir / f"{stem}-state")
        else:
            (self.run.out_dir / f"{stem}.safetensors").unlink(missing_ok=True)
            self.ema_file(stem).unlink(missing_ok=True)

    @property
    def _precision(self) -> str:
        return {"float": "fp32", None: "fp32"}.get(self.o.save_precision, self.o.save_precision)
