"""The run's configuration: one section per feature, each declared beside the feature's
code (its options and its rules); here they are only gathered, read from TOML, and
checked whole.

`validate()` runs before any process group exists and returns every problem at once,
each naming the valid choices; `ConfigError` carries that list to the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from meshpar.checkpoint.options import CheckpointOptions
from meshpar.hf import hf_plan
from meshpar.hf.directory import DirectoryError, HFDirectory, names_a_directory
from meshpar.init import InitRule
from meshpar.mesh import MeshOptions
from meshpar.model.config import PRESETS, ModelConfig, model_config
from meshpar.options import Option, options_of
from meshpar.parallel.compile import CompileOptions
from meshpar.parallel.context import ContextOptions
from meshpar.parallel.grad_reduce import ReduceOptions
from meshpar.parallel.llama_plan import llama_plan
from meshpar.parallel.plan import Plan
from meshpar.parallel.precision import PrecisionOptions
from meshpar.parallel.recompute import RecomputeOptions
from meshpar.parallel.tensor import TensorOptions
from meshpar.parallel.zero import ZeroOptions
from meshpar.pipeline.options import PipelineOptions
from meshpar.data.options import DataOptions
from meshpar.train.launch import RunOptions
from meshpar.train.metrics import ObserveOptions
from meshpar.train.optim import LrScheduleOptions, OptimizerOptions


class ConfigError(ValueError):
    """One or more problems with a user's configuration."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class ModelSection:
    """The model a run trains: meshpar's own, a preset with any ModelConfig field changed,
    or a transformers model directory (`name` a path: its config.json says the family and
    shapes; meshpar/hf/) - or the config.json a checkpoint kept of one (`saved_config`:
    the directory need not exist any more)."""

    name: str = "tiny"
    overrides: dict = field(default_factory=dict)  # e.g. {"num_layers": 4}
    saved_config: dict | None = None

    @property
    def _directory(self) -> HFDirectory | DirectoryError | None:
        if self.saved_config is not None:
            return HFDirectory(Path(self.name), self.saved_config)
        return _read_directory(self.name) if names_a_directory(self.name) else None

    def directory(self) -> HFDirectory | None:
        """The transformers directory named (None: a preset, or a directory with problems)."""
        return self._directory if isinstance(self._directory, HFDirectory) else None

    def resolve(self) -> ModelConfig:
        if self._directory is not None:
            return self.directory().shape()
        return model_config(self.name, **self.overrides)

    def problems(self) -> list[str]:
        if self._directory is not None:
            if isinstance(self._directory, DirectoryError):
                return [str(self._directory)]
            if self.overrides:
                return [f"--model {self.name}: its config.json gives the shapes; the model fields "
                        f"{', '.join(sorted(self.overrides))} cannot change them"]
            return self._directory.problems() or self.resolve().problems()
        if self.name not in PRESETS:
            return [f"unknown model {self.name!r}; choose one of {', '.join(PRESETS)}, or give a transformers "
                    f"model directory"]
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.overrides) - fields)
        if unknown:
            return [f"unknown model field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}"]
        return self.resolve().problems()

    def build(self, seed: int) -> nn.Module:
        """The model on the meta device (shapes only)."""
        if self.directory() is not None:
            return self.directory().build()
        from meshpar.model import build_model

        return build_model(self.resolve(), seed, "meta")

    def plan(self, model: nn.Module) -> Plan:
        """How `build`'s model splits."""
        if self.directory() is not None:
            return hf_plan(model)
        return llama_plan(self.resolve())

    def init_rule(self) -> Callable[[str], InitRule]:
        """How each parameter starts (by its name) when no checkpoint is loaded."""
        if self.directory() is not None:
            return self.directory().init_rule
        from meshpar.model.llama import init_rule

        return functools.partial(init_rule, self.resolve())


def saved_model(meta: dict) -> ModelSection:
    """The model a checkpoint's header records: a transformers model (the config.json its
    run kept), or meshpar's, its preset (`tiny` for a shape of no preset) with the saved
    shape."""
    if "transformers" in meta:
        return ModelSection(meta["name"], saved_config=meta["transformers"])
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelSection(meta["name"] if meta.get("name") in PRESETS else "tiny",
                        {k: v for k, v in meta.items() if k in fields})


def _read_directory(name: str) -> HFDirectory | DirectoryError:
    try:
        return HFDirectory.read(name)
    except DirectoryError as err:
        return err


# Each section's attribute of Config and TOML table, in the order `meshpar train --help` shows them.
SECTIONS = {"mesh": MeshOptions, "data": DataOptions, "run": RunOptions, "optimizer": OptimizerOptions,
            "lr_schedule": LrScheduleOptions, "precision": PrecisionOptions, "tensor": TensorOptions,
            "context": ContextOptions, "pipeline": PipelineOptions, "recompute": RecomputeOptions,
            "compile": CompileOptions, "zero": ZeroOptions, "reduce": ReduceOptions,
            "checkpoint": CheckpointOptions, "observe": ObserveOptions}


@dataclass
class Config:
    model: ModelSection | None = field(default_factory=ModelSection)  # None: a user's model (the API)
    mesh: MeshOptions = field(default_factory=MeshOptions)
    data: DataOptions = field(default_factory=DataOptions)
    run: RunOptions = field(default_factory=RunOptions)
    optimizer: OptimizerOptions = field(default_factory=OptimizerOptions)
    lr_schedule: LrScheduleOptions = field(default_factory=LrScheduleOptions)
    precision: PrecisionOptions = field(default_factory=PrecisionOptions)
    tensor: TensorOptions = field(default_factory=TensorOptions)
    context: ContextOptions = field(default_factory=ContextOptions)
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    recompute: RecomputeOptions = field(default_factory=RecomputeOptions)
    compile: CompileOptions = field(default_factory=CompileOptions)
    zero: ZeroOptions = field(default_factory=ZeroOptions)
    reduce: ReduceOptions = field(default_factory=ReduceOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    observe: ObserveOptions = field(default_factory=ObserveOptions)
    env: dict[str, str] | None = field(default=None, repr=False)  # the launch's environment; None: os.environ

    def environ(self):
        return os.environ if self.env is None else self.env

    def model_config(self) -> ModelConfig | None:
        """meshpar's model as configured; None for a user's model or one with problems."""
        if self.model is None or self.model.problems():
            return None
        return self.model.resolve()

    def microbatches(self) -> int | None:
        """Micro-batches per step on each dp rank; None when the batch does not split."""
        return self.data.microbatches(self.mesh.dp)

    @property
    def asynchronous(self) -> bool:
        return self.pipeline.asynchronous(self)

    def update(self, **keywords) -> Config:
        """Set options by their keywords (the flags' names without dashes: `zero=1`,
        `seq_len=64`); TypeError names the valid ones. Returns self."""
        known = options_by_keyword()
        for keyword, value in keywords.items():
            if keyword not in known:
                raise TypeError(f"no option {keyword!r}; the options: {', '.join(known)}")
            opt = known[keyword]
            setattr(getattr(self, opt.section), opt.name, list(value) if isinstance(value, tuple) else value)
        return self


def all_options() -> list[Option]:
    """Every option of every section, in order."""
    return [o for name, cls in SECTIONS.items() for o in options_of(name, cls)]


@functools.cache
def options_by_keyword(sections: tuple[str, ...] = tuple(SECTIONS)) -> dict[str, Option]:
    """The options of `sections` (default all) by their keywords (read, never changed)."""
    return {o.keyword: o for name in sections for o in options_of(name, SECTIONS[name])}


# The sections whose options `meshpar.parallelize` takes: what it builds. The rest of a
# run's configuration (the mesh, the data, the learning rate's schedule, checkpoints) is
# the Python caller's.
API_SECTIONS = ("tensor", "context", "pipeline", "recompute", "compile", "zero", "reduce", "precision", "optimizer")


def api_config(mesh, sections: tuple, keywords: dict, microbatches: int, steps: int | None, seed: int,
               device_type: str) -> Config:
    """The configuration `parallelize` was given - option `sections` and option
    `keywords` over a ParallelMesh `mesh` - checked by the rules `meshpar train`'s is
    checked by; ValueError, before anything changes, with every problem."""
    by_keyword = options_by_keyword(API_SECTIONS)
    cfg = Config(model=None, mesh=MeshOptions(dp=mesh.size("dp"), tp=mesh.size("tp"), pp=mesh.size("pp"),
                                              cp=mesh.size("cp"), ep=mesh.size("ep"),
                                              ranks_per_node=mesh.ranks_per_node or None),
                 # the micro-batch count, as one row per micro-batch of each dp rank's rows
                 data=DataOptions(global_batch_size=microbatches * mesh.size("dp"), micro_batch_size=1),
                 run=RunOptions(steps=steps or 1, seed=seed, device=device_type), env={})
    for section in sections:
        name = next((n for n in API_SECTIONS if isinstance(section, SECTIONS[n])), None)
        if name is None:
            raise TypeError(f"parallelize() takes option sections of "
                            f"{', '.join(SECTIONS[n].__name__ for n in API_SECTIONS)}; got {type(section).__name__}")
        setattr(cfg, name, dataclasses.replace(section))
    unknown = [k for k in keywords if k not in by_keyword]
    if unknown:
        raise TypeError(f"parallelize() has no option {', '.join(map(repr, unknown))}; its options: "
                        f"{', '.join(by_keyword)}")
    cfg.update(**keywords)
    problems = validate(cfg, sections=API_SECTIONS)
    if microbatches < 1:
        problems.append(f"microbatches={microbatches} must be at least 1")
    if cfg.asynchronous and (steps is None or steps < 1):
        problems.append("schedule='async' is one stream over the whole run: give its length, steps=N")
    if problems:
        raise ValueError("; ".join(problems))
    return cfg


def load_toml(path: str | os.PathLike) -> Config:
    """A Config from a TOML file: a [model] table (`name` plus any ModelConfig field as an
    override) and a table per section, its keys the section's fields."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"config file {path} is not valid TOML: {err}"]) from None
    cfg, problems = Config(), []
    model_raw = dict(raw.pop("model", {}))
    cfg.model = ModelSection(name=model_raw.pop("name", "tiny"), overrides=model_raw)
    by_keyword = options_by_keyword() | {o.name: o for o in all_options()}
    for table, values in raw.items():
        if table not in SECTIONS:
            moved = [f"{key} is now [{by_keyword[key].section}] {by_keyword[key].name}"
                     for key in values if key in by_keyword] if isinstance(values, dict) else []
            problems.append(f"unknown table [{table}] in {path}; valid tables: model, {', '.join(SECTIONS)}"
                            + (f" ({'; '.join(moved)})" if moved else ""))
            continue
        section = getattr(cfg, table)
        known = [o.name for o in options_of(table, SECTIONS[table])]
        for key, value in values.items():
            if key in known:
                setattr(section, key, value)
            else:
                problems.append(f"unknown key {key!r} in [{table}]; valid keys: {', '.join(known)}")
    if problems:
        raise ConfigError(problems)
    return cfg


def validate(cfg: Config, env: dict[str, str] | None = None, sections=None) -> list[str]:
    """Every problem with `cfg`, as messages naming the valid choices; [] if none.
    `env`: the launch's environment (default os.environ); `sections`: the names of the
    sections to check (default all, and the model)."""
    if env is not None:
        cfg = dataclasses.replace(cfg, env=dict(env))
    names = list(SECTIONS) if sections is None else list(sections)
    options = [o for name in names for o in options_of(name, SECTIONS[name])]
    problems = [p for o in options for p in o.type_problem(getattr(getattr(cfg, o.section), o.name))]
    if problems:
        return problems
    problems = [p for o in options for p in o.value_problems(getattr(getattr(cfg, o.section), o.name))]
    if cfg.model is not None:
        problems += cfg.model.problems()
    for name in names:
        problems += getattr(cfg, name).problems(cfg)
    if not problems and "checkpoint" in names and cfg.model is not None:
        problems += cfg.checkpoint.source_problems(cfg)
    return problems


def check(cfg: Config, env: dict[str, str] | None = None) -> Config:
    """Raise ConfigError with every problem in `cfg`; return it if none (its model read
    from --init-from when none is given, its vocabulary from prepared data when unset)."""
    cfg.checkpoint.adopt_model(cfg)
    cfg.data.adopt_vocabulary(cfg)
    problems = validate(cfg, env)
    if problems:
        raise ConfigError(problems)
    return cfg
