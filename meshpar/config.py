"""The run's configuration: dataclasses, filled from TOML and CLI flags, validated whole.

`validate()` runs before any process group exists and returns every problem at once,
each naming the valid choices; `ConfigError` carries that list to the CLI.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from meshpar.model.config import LARGE_PRESETS, PRESETS, ModelConfig, model_config
from meshpar.mesh import MeshShape
from meshpar.parallel.context import context_parallel_problems
from meshpar.parallel.grad_reduce import COMPRESSIONS
from meshpar.parallel.precision import PRECISIONS
from meshpar.parallel.recompute import POLICIES
from meshpar.parallel.llama_plan import tensor_parallel_problems
from meshpar.parallel.zero import OFFLOADS, STAGES
from meshpar.pipeline.schedules import GENERATORS, async_min_microbatches
from meshpar.pipeline.split import split_problems


class ConfigError(ValueError):
    """One or more problems with a user's configuration."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class ModelSection:
    name: str = "tiny"
    overrides: dict = field(default_factory=dict)  # e.g. {"num_layers": 4}

    def resolve(self) -> ModelConfig:
        return model_config(self.name, **self.overrides)


@dataclass
class ParallelConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False  # Megatron SP: norms and residual sharded on the sequence over tp
    cp_impl: str = "ring"  # context-parallel attention: ring or all-to-all (Ulysses)
    schedule: str = "1f1b"  # pipeline schedule (see meshpar/pipeline/schedules.py)
    virtual_stages: int = 1  # pipeline chunks per rank (interleaved-1f1b)
    pp_layers: list[int] | None = None  # layers per stage; default: balanced by cost
    recompute: str = "none"  # none, full or selective activation recomputation
    recompute_every: int = 1  # with full: recompute every N-th layer only
    bucket_mb: float = 25.0  # gradient bucket size for the dp reduction
    zero: int = 0  # ZeRO stage over dp: 0 replicated, 1 optimizer, 2 + gradients, 3 + parameters sharded
    overlap: bool = True  # launch each bucket's dp reduction from backward as soon as it is complete
    offload: list[str] = field(default_factory=list)  # "optimizer" and/or "params" (ZeRO-3) to host memory
    grad_compression: str = "none"  # dp gradients on the wire: none (fp32), bf16, fp16 or int8
    error_feedback: bool = True  # int8: carry each step's quantization error into the next
    ranks_per_node: int | None = None  # default: torchrun's LOCAL_WORLD_SIZE, else every rank on one node
    hierarchical_allreduce: bool = False  # dp all-reduce: inside nodes, then across, then inside

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp


@dataclass
class TrainConfig:
    global_batch_size: int = 32  # sequences per optimizer step, over all dp ranks
    micro_batch_size: int | None = None  # per dp rank; default: no accumulation
    seq_len: int = 128
    steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    lr_scale_from: int | None = None  # scale lr by global_batch_size / lr_scale_from
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    eval_every: int = 50  # 0: evaluate only at the end
    eval_batches: int = 4
    data: str | None = None  # None: the Python standard library's sources
    metrics_file: str | None = None
    tensorboard_dir: str | None = None  # the metrics as TensorBoard scalars too (needs the tensorboard package)
    device: str = "cpu"
    precision: str = "fp32"  # fp32, bf16 or fp16 compute; parameters, gradients and optimizer stay fp32
    compile: bool = False  # torch.compile each transformer block
    # Host memory freed in a step goes back to the system (glibc: fixed malloc thresholds,
    # train/host_memory.py): a lower peak resident set for a slower CPU step.
    return_freed_memory: bool = False
    backend: str | None = None  # collectives: nccl or gloo; default nccl with cuda, gloo on cpu
    loss_scale_initial: float = 65536.0  # fp16 dynamic loss scaling
    loss_scale_growth_interval: int = 1000
    loss_scale_backoff: float = 0.5
    loss_scale_hysteresis: int = 2
    progress: bool = True
    trace_dir: str | None = None  # write a Chrome/Perfetto trace per rank of steps 2-4 here
    comm_timeout: float = 300.0  # seconds one collective may wait before the watchdog ends the run
    check_consistency_every: int = 0  # compare replicated parameters across ranks every N steps (0: never)
    save_dir: str | None = None  # checkpoints go here, one step-N directory each (and one at the end)
    save_every: int = 0  # steps between checkpoints (0: only at the end and when stopping early)
    keep_checkpoints: int = 3  # the newest K complete checkpoints are kept
    resume: bool = False  # continue from the newest complete checkpoint in save_dir (from scratch if none)
    init_from: str | None = None  # start from these parameters: a checkpoint or a Hugging Face Llama directory
    stop_after_step: int | None = None  # save and exit cleanly after this step
    stop_after_minutes: float | None = None  # save and exit cleanly after the step that passes this wall time

    def num_microbatches(self, dp: int) -> int:
        per_rank = self.global_batch_size // dp
        return per_rank // (self.micro_batch_size or per_rank)


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {"model": ModelSection, "parallel": ParallelConfig, "train": TrainConfig}


def load_toml(path: str | os.PathLike) -> Config:
    """A Config from a TOML file with [model], [parallel] and [train] tables.
    [model] takes `name` plus any ModelConfig field as an override."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"config file {path} is not valid TOML: {err}"]) from None
    problems = [f"unknown table [{name}] in {path}; valid tables: {', '.join(SECTIONS)}"
                for name in raw if name not in SECTIONS]
    cfg = Config()
    model_raw = dict(raw.get("model", {}))
    cfg.model = ModelSection(name=model_raw.pop("name", "tiny"), overrides=model_raw)
    for name in ("parallel", "train"):
        section = getattr(cfg, name)
        known = {f.name for f in dataclasses.fields(section)}
        for key, value in raw.get(name, {}).items():
            if key in known:
                setattr(section, key, value)
            else:
                problems.append(f"unknown key {key!r} in [{name}]; valid keys: {', '.join(sorted(known))}")
    if problems:
        raise ConfigError(problems)
    return cfg


def _batch_splits(tr: TrainConfig, dp: int) -> bool:
    """Whether the global batch divides into dp ranks and micro-batches (else another
    message already says why)."""
    if dp < 1 or tr.global_batch_size < 1 or tr.global_batch_size % dp:
        return False
    per_rank = tr.global_batch_size // dp
    return tr.micro_batch_size is None or (tr.micro_batch_size >= 1 and per_rank % tr.micro_batch_size == 0)


def zero_problems(cfg: Config) -> list[str]:
    par = cfg.parallel
    problems = []
    if par.zero not in STAGES:
        problems.append(f"--zero {par.zero}: choose one of {', '.join(map(str, STAGES))}")
    unknown = [o for o in par.offload if o not in OFFLOADS]
    if unknown:
        problems.append(f"--offload {','.join(unknown)}: choose from {', '.join(OFFLOADS)}")
    if "params" in par.offload and par.zero != 3:
        problems.append("--offload params keeps parameter shards in host memory: it needs --zero 3")
    if par.zero != 0 and par.schedule == "async" and par.pp > 1:
        problems.append(f"--zero {par.zero} with --schedule async is not supported: the async schedule keeps "
                        f"whole weight snapshots per batch in flight, which sharded states would not see; "
                        f"use --zero 0 or another schedule")
    if par.offload and par.schedule == "async" and par.pp > 1:
        problems.append("--offload with --schedule async is not supported; use another schedule")
    return problems


def ranks_per_node(par: ParallelConfig, env=None) -> int:
    """The node size: as configured, else torchrun's LOCAL_WORLD_SIZE, else the world."""
    env = os.environ if env is None else env
    if par.ranks_per_node is not None:
        return par.ranks_per_node
    if "LOCAL_WORLD_SIZE" in env and "RANK" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    return par.world_size


def communication_problems(cfg: Config, env) -> list[str]:
    par = cfg.parallel
    problems = []
    if par.grad_compression not in COMPRESSIONS:
        problems.append(f"--grad-compression {par.grad_compression}: choose one of {', '.join(COMPRESSIONS)}")
    elif par.grad_compression == "int8":
        if par.zero == 3:
            problems.append("--grad-compression int8 works with --zero 0-2: its error feedback keeps a full "
                            "fp32 gradient per rank, which ZeRO-3 exists to avoid; use bf16 or fp16 with ZeRO-3")
        if cfg.train.precision == "fp16":
            problems.append("--grad-compression int8 with --precision fp16 is not supported: the error carried "
                            "between steps would be in units of a loss scale that may have changed; use bf16")
        if par.hierarchical_allreduce:
            problems.append("--hierarchical-allreduce runs in fp32 or 16 bits; use --grad-compression none, "
                            "bf16 or fp16 with it")
    if par.grad_compression != "none" and par.schedule == "async" and par.pp > 1:
        problems.append("--grad-compression with --schedule async is not supported; use another schedule")
    k = ranks_per_node(par, env)
    if k < 1 or par.world_size % k:
        problems.append(f"--ranks-per-node {k} must divide the world size {par.world_size}; "
                        f"use one of {_divisors(par.world_size)}")
        return problems
    if k % par.tp:
        problems.append(f"--tp {par.tp} does not fit in a node of {k} ranks: tensor parallelism exchanges "
                        f"activations twice per layer and stays inside a node; use a tp dividing {k}")
    if par.hierarchical_allreduce:
        if par.zero != 0:
            problems.append(f"--hierarchical-allreduce replaces ZeRO-0's all-reduce; --zero {par.zero} "
                            f"reduce-scatters gradients instead; use --zero 0")
        shape = MeshShape(pp=par.pp, dp=par.dp, cp=par.cp, tp=par.tp)
        try:
            per_node, nodes = shape.node_split("dp", k)
        except ValueError as err:
            problems.append(f"--hierarchical-allreduce needs the same number of dp ranks on each node: {err}")
        else:
            if per_node == 1 or nodes == 1:
                problems.append(f"--hierarchical-allreduce needs dp to span nodes with several ranks on each; "
                                f"here dp={par.dp} has {per_node} rank(s) on each of {nodes} node(s) "
                                f"of {k} ranks (set --ranks-per-node)")
    return problems


def _checkpoint_problems(cfg: Config) -> list[str]:
    """Flags of saving and resuming; the checkpoints named must exist, be complete and
    hold this run's model (their headers are read, nothing else)."""
    tr, par = cfg.train, cfg.parallel
    problems = []
    for name in ("save_every", "stop_after_step", "stop_after_minutes", "resume"):
        value = getattr(tr, name)
        if value and not tr.save_dir:
            problems.append(f"--{name.replace('_', '-')} needs --save-dir (where the checkpoint goes)")
    if tr.save_every < 0:
        problems.append(f"--save-every={tr.save_every} must be at least 0 (0: only at the end)")
    if tr.keep_checkpoints < 1:
        problems.append(f"--keep-checkpoints={tr.keep_checkpoints} must be at least 1")
    if tr.stop_after_step is not None and tr.stop_after_step < 1:
        problems.append(f"--stop-after-step={tr.stop_after_step} must be at least 1")
    if tr.stop_after_minutes is not None and tr.stop_after_minutes <= 0:
        problems.append(f"--stop-after-minutes={tr.stop_after_minutes} must be positive")
    if tr.save_dir and par.schedule == "async" and par.pp > 1:
        problems.append("--save-dir with --schedule async is not supported: between two steps the async "
                        "schedule holds a batch's gradient half applied; use another schedule")
    if problems:
        return problems
    from meshpar.checkpoint import CheckpointError, latest_checkpoint, open_checkpoint

    sources = []
    if tr.resume and latest_checkpoint(tr.save_dir) is not None:
        sources.append(("--resume", tr.save_dir))
    if tr.init_from:
        if not Path(tr.init_from).exists():
            return [f"--init-from {tr.init_from}: no such file or directory"]
        sources.append(("--init-from", tr.init_from))
    for flag, path in sources:
        try:
            reader = open_checkpoint(path)
        except CheckpointError as err:
            problems.append(f"{flag}: {err}")
            continue
        saved = reader.meta["model"]
        ours = dataclasses.asdict(cfg.model.resolve())
        differ = [f"{k} {ours[k]} (checkpoint {saved[k]})" for k in ours if k in saved and saved[k] != ours[k]]
        if differ:
            problems.append(f"{flag} {path} holds another model: this run's {cfg.model.name} differs in "
                            f"{', '.join(differ)}")
        else:
            problems += [f"{flag} {path}: {p}" for p in tensor_mismatch(reader, cfg.model.resolve())]
    return problems


def tensor_mismatch(reader, model_cfg: ModelConfig) -> list[str]:
    """The first parameter of the model that `reader` lacks or holds at another shape
    (read from the files' headers: no tensor is loaded), as a one-item list; empty when
    every parameter is there at its shape."""
    from meshpar.model import build_model

    for name, param in build_model(model_cfg, 0, "meta").named_parameters():
        if not reader.has(name, "param"):
            return [f"holds no tensor {name} (the model's first parameter it lacks)"]
        if tuple(reader.full_shape(name)) != tuple(param.shape):
            return [f"{name} has shape {tuple(reader.full_shape(name))} there, {tuple(param.shape)} in the model"]
    return []


def adopt_checkpoint_model(cfg: Config) -> None:
    """With --init-from and the default model, the model's shape is the checkpoint's."""
    if not cfg.train.init_from or cfg.model.name != "tiny" or cfg.model.overrides or not Path(cfg.train.init_from).exists():
        return
    from meshpar.checkpoint import CheckpointError, open_checkpoint

    try:
        saved = open_checkpoint(cfg.train.init_from).meta["model"]
    except CheckpointError:
        return  # validate() reports it
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    name = saved.get("name") if saved.get("name") in PRESETS else "tiny"
    cfg.model = ModelSection(name=name, overrides={k: v for k, v in saved.items() if k in fields})


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _check_types(cfg: Config) -> list[str]:
    problems = []
    for section_name in ("parallel", "train"):
        section = getattr(cfg, section_name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            expected = {"int": int, "float": (int, float), "str": str, "bool": bool}
            kind = f.type.split(" |")[0]
            if value is None and "None" in f.type:
                continue
            if kind in expected and (not isinstance(value, expected[kind])
                                     or (kind != "bool" and isinstance(value, bool))):
                problems.append(f"{section_name}.{f.name}={value!r} must be of type {kind}")
    return problems


def validate(cfg: Config, env: dict[str, str] | None = None, dry_run: bool = False) -> list[str]:
    """Every problem with `cfg`, as messages naming the valid choices; [] if none.
    `dry_run`: the layout is only built on the meta device, so any model size will do."""
    problems = _check_types(cfg)
    if problems:
        return problems
    par, tr = cfg.parallel, cfg.train

    model = None
    if cfg.model.name not in PRESETS:
        problems.append(f"unknown model {cfg.model.name!r}; choose one of {', '.join(PRESETS)}")
    else:
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(cfg.model.overrides) - fields)
        if unknown:
            problems.append(f"unknown model field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
        else:
            model = cfg.model.resolve()
            problems += model.problems()
            if not problems and par.tp >= 1:
                problems += tensor_parallel_problems(model, par.tp, par.sequence_parallel, tr.seq_len)
            if not problems and par.pp >= 1 and par.virtual_stages >= 1:
                problems += split_problems(model, par.pp * par.virtual_stages, par.pp_layers)
            if cfg.model.name in LARGE_PRESETS and tr.device == "cpu" and not dry_run:
                problems.append(f"model {cfg.model.name} has {model.num_params() / 1e9:.1f}B parameters: "
                                f"too large to train on a CPU; use --device cuda, or tiny or small, "
                                f"or check the layout with --dry-run")

    for axis in ("dp", "tp", "pp", "cp"):
        if getattr(par, axis) < 1:
            problems.append(f"--{axis}={getattr(par, axis)} must be at least 1")
    if model is not None and par.cp > 1 and par.tp >= 1:
        problems += context_parallel_problems(model.num_heads, model.num_kv_heads, tr.seq_len, par.cp, par.tp,
                                              par.sequence_parallel, par.cp_impl)
    if par.virtual_stages < 1:
        problems.append(f"--virtual-stages={par.virtual_stages} must be at least 1")
    if par.schedule not in GENERATORS:
        problems.append(f"unknown schedule {par.schedule!r}; choose one of {', '.join(GENERATORS)}")
    elif par.schedule == "async" and par.pp == 1:
        problems.append("--schedule async pipelines across ranks; it needs --pp above 1")
    elif (par.schedule == "async" and par.pp > 1 and _batch_splits(tr, par.dp)
          and tr.num_microbatches(par.dp) < async_min_microbatches(par.pp)):
        fewest = async_min_microbatches(par.pp)
        problems.append(f"--schedule async at --pp {par.pp} needs at least {fewest} micro-batches per step "
                        f"(it has {tr.num_microbatches(par.dp)}): with fewer, the first ranks' warm-up runs "
                        f"the next step's forwards first and a batch's last backwards come after its "
                        f"gradient is applied; use a smaller --micro-batch-size or a larger "
                        f"--global-batch-size")
    elif par.virtual_stages > 1 and par.schedule != "interleaved-1f1b":
        problems.append(f"--virtual-stages {par.virtual_stages} needs --schedule interleaved-1f1b "
                        f"({par.schedule} runs one stage per rank)")
    elif (par.schedule == "interleaved-1f1b" and par.pp >= 1 and _batch_splits(tr, par.dp)
          and tr.num_microbatches(par.dp) % par.pp):
        problems.append(f"interleaved-1f1b needs the micro-batches per step "
                        f"({tr.num_microbatches(par.dp)}) to be a multiple of --pp={par.pp}; "
                        f"change --micro-batch-size")
    if par.recompute not in POLICIES:
        problems.append(f"unknown --recompute {par.recompute!r}; choose one of {', '.join(POLICIES)}")
    if par.recompute_every < 1:
        problems.append(f"--recompute-every={par.recompute_every} must be at least 1")
    elif par.recompute_every > 1 and par.recompute != "full":
        problems.append("--recompute-every applies to --recompute full")
    if tr.precision == "fp16" and par.schedule == "async" and par.pp > 1:
        problems.append("--precision fp16 with --schedule async is not supported: a batch's backwards span "
                        "two steps, between which the loss scale may change; use bf16")
    if par.recompute != "none" and par.schedule == "async" and par.pp > 1:
        problems.append("--recompute with --schedule async is not supported: the async schedule runs each "
                        "batch on its own weight snapshot, which recomputation in backward would not see")
    if par.bucket_mb <= 0:
        problems.append(f"parallel.bucket_mb={par.bucket_mb} must be positive")
    problems += zero_problems(cfg)
    env = os.environ if env is None else env
    if all(getattr(par, axis) >= 1 for axis in ("dp", "tp", "pp", "cp")):
        problems += communication_problems(cfg, env)

    for name in ("global_batch_size", "seq_len", "steps", "eval_batches"):
        if getattr(tr, name) < 1:
            problems.append(f"--{name.replace('_', '-')}={getattr(tr, name)} must be at least 1")
    for name in ("warmup_steps", "eval_every", "seed", "check_consistency_every"):
        if getattr(tr, name) < 0:
            problems.append(f"--{name.replace('_', '-')}={getattr(tr, name)} must be at least 0")
    if tr.precision not in PRECISIONS:
        problems.append(f"unknown --precision {tr.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if tr.loss_scale_initial <= 0 or not 0 < tr.loss_scale_backoff < 1:
        problems.append("the loss scale must start positive and back off by a factor in (0, 1)")
    if tr.loss_scale_growth_interval < 1 or tr.loss_scale_hysteresis < 1:
        problems.append("train.loss_scale_growth_interval and loss_scale_hysteresis must be at least 1")
    if tr.comm_timeout <= 0:
        problems.append(f"--comm-timeout={tr.comm_timeout} must be positive (seconds)")
    if tr.lr <= 0:
        problems.append(f"--lr={tr.lr} must be positive")
    if not 0 <= tr.min_lr_ratio <= 1:
        problems.append(f"train.min_lr_ratio={tr.min_lr_ratio} must be between 0 and 1")
    if tr.max_grad_norm < 0:
        problems.append(f"--max-grad-norm={tr.max_grad_norm} must be at least 0 (0 disables clipping)")
    if tr.weight_decay < 0:
        problems.append(f"train.weight_decay={tr.weight_decay} must be at least 0")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(tr, name) < 1:
            problems.append(f"train.{name}={getattr(tr, name)} must be in [0, 1)")
    if tr.lr_scale_from is not None and tr.lr_scale_from < 1:
        problems.append(f"--lr-scale-from={tr.lr_scale_from} must be at least 1")

    if par.dp >= 1 and tr.global_batch_size >= 1:
        if tr.global_batch_size % par.dp:
            problems.append(f"--dp={par.dp} does not divide --global-batch-size={tr.global_batch_size}; "
                            f"use a dp in {_divisors(tr.global_batch_size)}")
        elif tr.micro_batch_size is not None:
            per_rank = tr.global_batch_size // par.dp
            if tr.micro_batch_size < 1 or per_rank % tr.micro_batch_size:
                problems.append(f"--micro-batch-size={tr.micro_batch_size} must divide the per-rank "
                                f"batch {tr.global_batch_size}/{par.dp}={per_rank}; "
                                f"use one of {_divisors(per_rank)}")
    if model is not None and tr.seq_len > model.max_seq_len:
        problems.append(f"--seq-len={tr.seq_len} exceeds the model's max_seq_len={model.max_seq_len}")

    if "WORLD_SIZE" in env and "RANK" in env and int(env["WORLD_SIZE"]) != par.world_size:
        problems.append(f"torchrun started {env['WORLD_SIZE']} ranks but dp*tp*pp*cp = "
                        f"{par.world_size}; make the degrees multiply to the world size")
    problems += _check_device(tr.device, tr.backend, par.world_size, env)
    if tr.compile:
        problems += _check_compiler(tr.device, env)
    if tr.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        problems.append("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or meshpar[tensorboard]), or use --metrics-file and meshpar plot")
    if model is not None and not problems:
        problems += _checkpoint_problems(cfg)
    if tr.seq_len >= 1:
        problems += _check_data(tr.data, tr.seq_len, model.vocab_size if model else None)
    return problems


def _check_device(device: str, backend: str | None, world_size: int, env) -> list[str]:
    if device not in ("cpu", "cuda"):
        return [f"--device={device!r}; choose cpu or cuda"]
    if backend not in (None, "nccl", "gloo"):
        return [f"--backend={backend!r}; choose nccl or gloo"]
    if backend == "nccl" and device == "cpu":
        return ["--backend nccl needs --device cuda; on CPUs use gloo"]
    if device == "cuda":
        import torch
        available = torch.cuda.device_count()
        local_ranks = int(env.get("LOCAL_WORLD_SIZE", world_size))
        if available == 0:
            return ["--device cuda, but no CUDA device is visible; use --device cpu"]
        if local_ranks > available and backend != "gloo":
            return [f"--device cuda with {local_ranks} local ranks needs {local_ranks} GPUs "
                    f"(NCCL puts one rank on each); {available} visible. --backend gloo lets ranks "
                    f"share a GPU (slowly: for tests)"]
    return []


def _check_compiler(device: str, env) -> list[str]:
    """What torch.compile's code generator needs, there before it fails mid-run."""
    import shutil

    if device == "cpu":
        compilers = [env["CXX"]] if env.get("CXX") else ["g++", "clang++"]
        if not any(shutil.which(c) for c in compilers):
            return [f"--compile on CPUs needs a C++ compiler for the generated kernels ({' or '.join(compilers)} "
                    f"on PATH, or $CXX); install one or drop --compile"]
    elif device == "cuda" and importlib.util.find_spec("triton") is None:
        return ["--compile on GPUs needs triton for the generated kernels (PyTorch's CUDA wheels bring it); "
                "install it or drop --compile"]
    return []


def _check_data(path: str | None, seq_len: int, vocab_size: int | None) -> list[str]:
    from meshpar.train.data import DataError, corpus_split_sizes  # data imports numpy

    try:
        train_tokens, val_tokens = corpus_split_sizes(path, vocab_size)
    except DataError as err:
        return [str(err)]
    source = path or "the default corpus"
    problems = []
    for split, n in (("training", train_tokens), ("validation", val_tokens)):
        if n < seq_len + 1:
            problems.append(f"--seq-len={seq_len} is longer than {source} allows: its {split} "
                            f"split has {n} tokens and needs at least seq_len+1 = {seq_len + 1}")
    return problems


def check(cfg: Config, env: dict[str, str] | None = None, dry_run: bool = False) -> Config:
    """Raise ConfigError with every problem in `cfg`; return it (its model read from
    --init-from when none is given) if none."""
    adopt_checkpoint_model(cfg)
    problems = validate(cfg, env, dry_run)
    if problems:
        raise ConfigError(problems)
    return cfg
