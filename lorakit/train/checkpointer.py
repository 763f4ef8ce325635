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


class Checkpointer:
    """Saves the LoRA (with metadata) and the training state; keeps only the last N periodic saves. Only the main
    process writes; every process joins a state save (each keeps its own random streams)."""

    def __init__(self, run, network, optim, o: SaveOptions, *, every_n_epochs: Optional[int], num_epochs: int,
                 max_steps: int, metadata, options_record: dict, emit: Callable[..., None]):
        self.run, self.network, self.optim, self.o = run, network, optim, o
        self.every_n_epochs, self.num_epochs, self.max_steps = every_n_epochs, num_epochs, max_steps
        self.metadata, self.options_record, self.emit = metadata, options_record, emit
        self.saved: list[Path] = []  # LoRA files written
        self.states: list[Path] = []  # state folders written

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
        set_train_mode(self.optim.optimizer, False)  # schedule-free: save the averaged weights
        if self.o.no_metadata:
            from lorakit.adapters.file import save_lora as raw_save

            raw_save(path, self.network.state_dict(), {}, self._precision)
        else:
            md = dict(self.metadata.base, ss_steps=str(step), ss_epoch=str(epoch),
                      ss_training_finished_at=str(time.time()))
            if self.o.metadata_license:
                md["modelspec.license"] = self.o.metadata_license
            if self.o.metadata_tags:
                md["modelspec.tags"] = self.o.metadata_tags
            self.network.save_weights(path, precision=self._precision, metadata=md, **self.metadata.save_kwargs)
        set_train_mode(self.optim.optimizer, True)
        self.saved.append(path)
        self.run.log(f"saved {path}")
        self.emit("saved", path=str(path))
        return path

    def save_state(self, folder: Path, *, step: int, resume_at: tuple[int, int]) -> Path:
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
        o = self.optim
        st = TrainState(network={k: v.detach().float().cpu() for k, v in self.network.state_dict().items()},
                        optimizer=o.optimizer.state_dict(), scheduler=o.scheduler.state_dict(),
                        scaler=o.scaler.state_dict() if o.scaler is not None else None, rng=rng, generators=gens,
                        counters={"epoch": resume_at[0], "batch": resume_at[1], "global_step": step,
                                  "seed": self.run.seed, "max_train_steps": self.max_steps},
                        options=dict(self.options_record))
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

    @property
    def _precision(self) -> str:
        return {"float": "fp32", None: "fp32"}.get(self.o.save_precision, self.o.save_precision)
