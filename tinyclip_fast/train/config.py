"""Run configuration: plain dataclasses with defaults, a JSON/TOML file on top, CLI overrides last.

Precedence (nanoGPT style): dataclass defaults < config file < ``--set key.sub=value`` and the
dedicated command-line flags. Every field is documented where it is declared; ``tinyclip-distill
--help`` prints the same text.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTIONS = ("sdpa", "xformers")
LOSS_KINDS = ("soft_ce", "kl")
SYNTHETIC_SIZE = 10_000


@dataclass
class TeacherConfig:
    """The frozen teacher; it stays the ORIGINAL model in every stage (SPEC 4)."""

    model: str = "ViT-B-32"  # open_clip model name, or "demo" for the built-in demo teacher
    pretrained: str | None = None  # local checkpoint file (offline) or open_clip pretrained tag
    cache: str | None = None  # teacher-embedding cache file: read it instead of running the teacher


@dataclass
class StageConfig:
    """One stage of progressive distillation. Exactly one way to get the stage's student:

    - ``preset`` or ``student_config``: manual inheritance from the teacher (SPEC 3a);
    - ``sparsity``: automatic inheritance, masks learned towards the target then pruned (SPEC 3b);
    - ``from_scratch``: random init with ``preset``/``student_config``'s architecture;
    - none of them: keep training the previous stage's student.
    Later manual/auto stages start from the previous stage's student, never from the teacher.
    """

    steps: int = 1000
    preset: str | None = None  # name in inheritance.presets.PRESETS
    student_config: dict[str, Any] | None = None  # open_clip model config (embed_dim, vision_cfg..)
    layer_selection: str = "every_k"  # manual inheritance: "every_k" (authors) or "even"
    sparsity: float | None = None  # auto: fraction of the ORIGINAL (teacher-sized) prunable
    # parameters removed by the end of this stage (0.25 -> 0.5 -> 0.75 in the authors' recipe)
    sparsity_warmup: int = 1000  # steps over which the sparsity target ramps up
    prune_step: int | None = None  # auto: prune after this many steps (None: at the stage end)
    from_scratch: bool = False

    @property
    def kind(self) -> str:
        """``"manual"``, ``"auto"``, ``"scratch"`` or ``"continue"``."""
        if self.from_scratch:
            return "scratch"
        if self.sparsity is not None:
            return "auto"
        if self.preset is not None or self.student_config is not None:
            return "manual"
        return "continue"

    def validate(self, index: int) -> None:
        where = f"stages[{index}]"
        if self.steps <= 0:
            raise ValueError(f"{where}.steps must be > 0, got {self.steps}")
        if self.sparsity is not None:
            if not 0.0 <= self.sparsity < 1.0:
                raise ValueError(f"{where}.sparsity must be in [0, 1), got {self.sparsity}")
            if self.preset is not None or self.student_config is not None or self.from_scratch:
                raise ValueError(f"{where}: sparsity (auto) excludes preset/student_config/scratch")
            if self.prune_step is not None and not 0 < self.prune_step <= self.steps:
                raise ValueError(f"{where}.prune_step must be in (0, steps], got {self.prune_step}")
        elif self.prune_step is not None:
            raise ValueError(f"{where}.prune_step needs sparsity (automatic inheritance)")
        if self.preset is not None and self.student_config is not None:
            raise ValueError(f"{where}: give preset or student_config, not both")
        if self.from_scratch and self.preset is None and self.student_config is None:
            raise ValueError(f"{where}: from_scratch needs preset or student_config")
        if self.layer_selection not in ("every_k", "even"):
            raise ValueError(f"{where}.layer_selection must be every_k or even")


@dataclass
class DataConfig:
    """Training data, handed to ``data.build_dataset`` (``options`` pass through verbatim)."""

    # "csv" (CSV/TSV, open_clip format), "webdataset", "synthetic" (random, for throughput
    # checks; the default), "demo" (the built-in demo data)
    kind: str = "synthetic"
    path: str | None = None  # csv/tsv file; webdataset shards "a-{000..009}.tar"; demo source
    size: int | None = None  # synthetic: number of samples (10,000); webdataset: per epoch
    options: dict[str, Any] = field(default_factory=dict)  # csv_img_key, csv_caption_key,
    # csv_separator, caption_key, image_size, vocab_size, ... (see data.build_dataset)

    def as_dict(self) -> dict[str, Any]:
        """The ``data_cfg`` dict of ``data.build_dataset`` for this kind."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.path is not None:
            key = {"csv": "path", "webdataset": "urls", "demo": "source"}.get(self.kind)
            if key is None:
                raise ValueError(f"data.path has no meaning for data kind {self.kind!r}")
            out[key] = self.path
        if self.kind == "synthetic":
            out["size"] = self.size or SYNTHETIC_SIZE
        elif self.kind == "webdataset" and self.size is not None:
            out["num_samples"] = self.size
        out.update(self.options)
        return out


@dataclass
class EvalConfig:
    """Zero-shot top-1 every ``every`` steps on a labelled set (0 switches it off)."""

    every: int = 0
    kind: str = "folder"  # "folder" (class-per-subfolder), "csv" (path,label), "demo"
    path: str | None = None
    class_names: str | None = None  # text file, one class name per line (default: folder names)
    templates: str | None = None  # text file, one prompt per line with "{}" (default: open_clip's)
    batch_size: int = 256


@dataclass
class LossConfig:
    """L = distill_weight * L_dist + contrastive_weight * L_clip (SPEC 2)."""

    distill_weight: float = 1.0
    contrastive_weight: float = 0.0
    kind: str = "soft_ce"  # "soft_ce" (TinyCLIP/open_clip values) or "kl" (same gradient)
    fixed_scale: float | None = None  # authors: 50 fixes BOTH scales; None: student learnable
    max_scale: float = 100.0  # clamp of the learnable student scale exp(logit_scale)


@dataclass
class OptimConfig:
    """AdamW with the authors' groups (SPEC 5) and a cosine schedule with linear warmup."""

    lr: float = 1e-4
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.2  # on >= 2-D weights only; not norms, biases, logit scale
    warmup_steps: int = 2000
    prune_warmup_steps: int = 200  # the rate ramps up again after an auto stage's pruning
    grad_clip: float = 5.0  # max global grad norm; 0 switches it off
    mask_lr: float = 0.02  # log_alpha of the hard-concrete masks (AdamW, no weight decay)
    lagrangian_lr: float = 0.02  # l1, l2 (gradient ascent)


@dataclass
class DistillConfig:
    """Everything one ``tinyclip-distill`` run needs."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    stages: list[StageConfig] = field(
        default_factory=lambda: [StageConfig(preset="ViT-40M-32-Text-19M")]
    )
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 256  # global batch (all ranks, all micro-batches)
    micro_batch_size: int | None = None  # per-rank micro-batch; < local batch = exact accumulation
    precision: str = "bf16"  # autocast dtype: fp32, bf16, fp16 (fp16 adds a GradScaler)
    compile: bool = False  # torch.compile the student
    attention: str = "sdpa"  # "sdpa" (torch) or "xformers" (CUDA, when installed)
    device: str | None = None  # default: cuda when available, else cpu
    seed: int = 0
    out_dir: str = "runs/distill"
    log_every: int = 10
    save_every: int = 500  # resumable checkpoint every k steps (and at every stage end)
    resume: bool = False  # continue from out_dir/checkpoint.pt
    num_workers: int = 0
    progress: bool = True  # tqdm bar

    def validate(self) -> None:
        """ValueError naming the first invalid field or stage."""
        if not self.stages:
            raise ValueError("stages is empty: give at least one stage")
        for i, stage in enumerate(self.stages):
            stage.validate(i)
        if self.stages[0].kind == "continue":
            raise ValueError(
                "stages[0] needs a student: preset, student_config, sparsity or scratch"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.loss.kind not in LOSS_KINDS:
            raise ValueError(f"loss.kind must be one of {LOSS_KINDS}, got {self.loss.kind!r}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if self.optim.warmup_steps < 0 or self.optim.prune_warmup_steps < 0:
            raise ValueError(
                f"optim.warmup_steps and optim.prune_warmup_steps must be >= 0, got "
                f"{self.optim.warmup_steps} and {self.optim.prune_warmup_steps}"
            )
        if self.log_every <= 0 or self.save_every < 0 or self.eval.every < 0:
            raise ValueError("log_every must be > 0; save_every and eval.every >= 0 (0 = off)")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {self.micro_batch_size}")

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def from_dict(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are an error naming the key."""
    if not isinstance(values, dict):
        raise TypeError(f"{where} must be a table/object, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown key {where}.{key}; known: {sorted(known)}")
        kwargs[key] = _convert(cls, known[key], value, f"{where}.{key}")
    return cls(**kwargs)


_NESTED = {
    "teacher": TeacherConfig,
    "data": DataConfig,
    "eval": EvalConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
}


def _convert(cls: type, f: dataclasses.Field, value: Any, where: str) -> Any:
    if cls is DistillConfig and f.name in _NESTED:
        return from_dict(_NESTED[f.name], value, where)
    if cls is DistillConfig and f.name == "stages":
        if not isinstance(value, list):
            raise TypeError(f"{where} must be a list of stage tables")
        return [from_dict(StageConfig, s, f"{where}[{i}]") for i, s in enumerate(value)]
    if f.name == "betas":
        return tuple(float(b) for b in value)
    return value


def load_config(path: str | Path | None = None) -> DistillConfig:
    """Defaults, overridden by the JSON (``.json``) or TOML (``.toml``) file at ``path``."""
    if path is None:
        return DistillConfig()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError as err:  # Python 3.10
            raise RuntimeError("TOML config files need Python >= 3.11; use JSON") from err
        values = tomllib.loads(text)
    elif path.suffix == ".json":
        values = json.loads(text)
    else:
        raise ValueError(f"config file must end in .json or .toml, got {path}")
    return from_dict(DistillConfig, values)


def apply_override(config: DistillConfig, assignment: str) -> None:
    """Apply ``"a.b=value"`` in place; value is parsed as JSON when it can be, else a string.

    ``stages`` accepts a JSON list of stage objects; ``stages.0.steps=100`` edits one stage.
    """
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"override must look like key.sub=value, got {assignment!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    parts = key.split(".")
    target: Any = config
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else getattr(target, part, None)
        if target is None:
            raise ValueError(f"unknown config key {key!r}")
    name = parts[-1]
    if not dataclasses.is_dataclass(target) or name not in {f.name for f in fields(target)}:
        raise ValueError(f"unknown config key {key!r}")
    f = next(f for f in fields(target) if f.name == name)
    setattr(target, name, _convert(type(target), f, value, key))
