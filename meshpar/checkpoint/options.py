"""The options of saving, stopping and resuming, and their checks against the files named."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from meshpar.options import Section, option

if TYPE_CHECKING:
    from meshpar.config import Config


@dataclass
class CheckpointOptions(Section):
    """Sharded checkpoints: where and how often, how many to keep, where to start from."""

    save_dir: str | None = option(None, "write sharded checkpoints here (DIR/step-N, atomic); one is always "
                                        "written at the end and when stopping early")
    save_every: int = option(0, "steps between checkpoints (0: only at the end)", at_least=0)
    keep_checkpoints: int = option(3, "keep the newest K complete checkpoints", at_least=1)
    resume: bool = option(False, "continue from the newest complete checkpoint in --save-dir, in any layout "
                                 "(from scratch when there is none, as on a job's first start)")
    init_from: str | None = option(None, "start from the parameters of a checkpoint or a Hugging Face "
                                         "directory (its model when --model is not given; a --model directory "
                                         "with weights starts from them without it)")
    stop_after_step: int | None = option(None, "save and exit cleanly after step N (continue later with --resume)",
                                         at_least=1)
    stop_after_minutes: float | None = option(None, "save and exit cleanly after the first step that ends past "
                                                    "M minutes", positive=True)

    def problems(self, cfg: Config) -> list[str]:
        return [f"--{name.replace('_', '-')} needs --save-dir (where the checkpoint goes)"
                for name in ("save_every", "stop_after_step", "stop_after_minutes", "resume")
                if getattr(self, name) and not self.save_dir]

    def source_problems(self, cfg: Config) -> list[str]:
        """The checkpoints named must exist, be complete and hold this run's model (their
        headers are read, nothing else). Checked once every other option is right."""
        from meshpar.checkpoint import CheckpointError, latest_checkpoint, open_checkpoint

        sources = []
        if self.resume and latest_checkpoint(self.save_dir) is not None:
            sources.append(("--resume", self.save_dir))
        if self.init_from:
            if not Path(self.init_from).exists():
                return [f"--init-from {self.init_from}: no such file or directory"]
            sources.append(("--init-from", self.init_from))
        problems = []
        for flag, path in sources:
            try:
                reader = open_checkpoint(path, native=cfg.model.directory() is not None)
            except CheckpointError as err:
                problems.append(f"{flag}: {err}")
                continue
            saved, ours = reader.meta["model"], dataclasses.asdict(cfg.model_config())
            differ = [f"{k} {ours[k]} (checkpoint {saved[k]})" for k in ours if k in saved and saved[k] != ours[k]]
            if differ:
                problems.append(f"{flag} {path} holds another model: this run's {cfg.model.name} differs in "
                                f"{', '.join(differ)}")
            else:
                problems += [f"{flag} {path}: {p}" for p in tensor_mismatch(reader, cfg.model.build(cfg.run.seed))]
        return problems

    def adopt_model(self, cfg: Config) -> None:
        """A transformers directory with weights (--model DIR) starts from them unless
        --init-from names another source. With --init-from and the default model, the
        model is the checkpoint's: its preset and shape, or the transformers directory
        its run trained."""
        directory = cfg.model.directory()
        if directory is not None and not self.init_from and directory.has_weights():
            self.init_from = str(directory.path)
            return
        if not self.init_from or cfg.model.name != "tiny" or cfg.model.overrides or not Path(self.init_from).exists():
            return
        from meshpar.checkpoint import CheckpointError, open_checkpoint

        try:
            saved = open_checkpoint(self.init_from).meta["model"]
        except CheckpointError:
            return  # source_problems() reports it
        from meshpar.config import saved_model

        cfg.model = saved_model(saved)


def tensor_mismatch(reader, model: nn.Module) -> list[str]:
    """The first parameter of `model` (built on the meta device) that `reader` lacks or
    holds at another shape (read from the files' headers: no tensor is loaded), as a
    one-item list; empty when every parameter is there at its shape."""
    for name, param in model.named_parameters():
        if not reader.has(name, "param"):
            return [f"holds no tensor {name} (the model's first parameter it lacks)"]
        if tuple(reader.full_shape(name)) != tuple(param.shape):
            return [f"{name} has shape {tuple(reader.full_shape(name))} there, {tuple(param.shape)} in the model"]
    return []
