"""Run configuration: plain dataclasses with defaults, a JSON/TOML file on top, CLI overrides last.

Precedence (nanoGPT style): dataclass defaults < config file < the dedicated command-line flags <
``--set key.sub=value``. Every field is documented where it is declared; values are checked
against the declared types when they are read (a file or ``--set``), ranges by
:meth:`DistillConfig.validate`. Nothing here imports torch: the command line reports a bad
configuration in a fraction of a second.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTIONS = ("sdpa", "xformers")
LOSS_KINDS = ("soft_ce", "kl", "mobileclip")
LOSS_FAMILIES = ("softmax", "sigmoid")
MAX_TEACHERS = 4  # the fused losses stream at most four teachers' tiles
CACHE_DTYPE_NAMES = ("fp16", "bf16", "fp32")
CAPTION_MODE_NAMES = ("all", "real", "synthetic")
SYNTHETIC_SIZE = 10_000
DEFAULT_SPARSITY_WARMUP = 1000  # the authors' ramp of the sparsity target


@dataclass
class TeacherConfig:
    """The frozen teacher; it stays the ORIGINAL model in every stage (SPEC 4)."""

    model: str = "ViT-B-32"  # open_clip model name, or "demo" for the built-in demo teacher
    pretrained: str | None = None  # local checkpoint file (offline) or open_clip pretrained tag
    cache: str | None = None  # teacher-embedding cache file: read it instead of running the teacher
    # (of every teacher of an ensemble: set it here, not in [[teachers]] entries)
    # loss.family "sigmoid": the bias c_t of this teacher's probabilities s(b x.y + c_t); None:
    # the teacher's own logit_bias (a softmax CLIP teacher has none: give one, e.g. -10)
    logit_bias: float | None = None


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
    sparsity_warmup: int | None = None  # steps over which the target ramps up; None: the
    # authors' 1000, at most half of the steps before pruning (the masks need time at the target)
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

    @property
    def mask_steps(self) -> int:
        """Steps of mask learning before an auto stage prunes."""
        return self.steps if self.prune_step is None else self.prune_step

    @property
    def target_warmup(self) -> int:
        """The sparsity target's ramp (``sparsity_warmup``, or its default)."""
        if self.sparsity_warmup is not None:
            return self.sparsity_warmup
        return min(DEFAULT_SPARSITY_WARMUP, max(1, self.mask_steps // 2))

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
                raise ValueError(
                    f"{where}.prune_step must be in (0, steps={self.steps}], got {self.prune_step}"
                )
            if self.sparsity_warmup is not None and not 0 <= self.sparsity_warmup <= (
                self.mask_steps
            ):
                raise ValueError(
                    f"{where}.sparsity_warmup ({self.sparsity_warmup}) must be in [0, "
                    f"{self.mask_steps}], the steps before pruning: the target would still be "
                    "ramping up when the masks are pruned"
                )
        elif self.prune_step is not None or self.sparsity_warmup is not None:
            raise ValueError(
                f"{where}: prune_step and sparsity_warmup need sparsity (automatic inheritance)"
            )
        if self.preset is not None and self.student_config is not None:
            raise ValueError(f"{where}: give preset or student_config, not both")
        if self.preset is not None:
            from tinyclip_fast.inheritance.presets import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(
                    f"{where}.preset {self.preset!r} is unknown; presets: {', '.join(PRESETS)}"
                )
        if self.from_scratch and self.preset is None and self.student_config is None:
            raise ValueError(f"{where}: from_scratch needs preset or student_config")
        if self.layer_selection not in ("every_k", "even"):
            raise ValueError(f"{where}.layer_selection must be every_k or even")


@dataclass
class DataConfig:
    """Training data, handed to ``data.build_dataset`` (``options`` pass through verbatim).

    There is no default: a run names its data (``synthetic`` is random noise, for throughput
    checks only).
    """

    # "csv" (CSV/TSV, open_clip format), "webdataset", "synthetic" (random pairs), "demo" (the
    # built-in demo data), "reinforced" (a reinforced teacher cache over webdataset/csv/folder
    # data), "datacompdr" (Apple's DataCompDR shards), or a kind registered with
    # data.datasets.register_dataset; "folder" (an image folder) only to build a cache from
    kind: str | None = None
    path: str | None = None  # csv/tsv file; webdataset shards "a-{000..009}.tar"; demo source;
    # reinforced: the data the cache was built over; datacompdr: its shards
    size: int | None = None  # synthetic: number of samples (10,000); webdataset: per epoch
    options: dict[str, Any] = field(default_factory=dict)  # csv_img_key, csv_caption_key,
    # csv_separator, caption_key, image_size, vocab_size, ... (see data.build_dataset)
    skip_bad_samples: bool = False  # skip (and log) unreadable samples instead of stopping
    max_bad_fraction: float = 0.01  # with skip_bad_samples: stop once more are bad

    def require(self) -> None:
        """ValueError when no training data is named."""
        if self.kind is None:
            raise ValueError(
                "no training data: give --data csv:FILE, webdataset:'shards-{000..099}.tar', "
                "demo, or --data synthetic for random pairs (throughput checks only)"
            )

    def as_dict(self) -> dict[str, Any]:
        """The ``data_cfg`` dict of ``data.build_dataset`` for this kind."""
        self.require()
        out: dict[str, Any] = {"kind": self.kind}
        if self.path is not None:
            out["path"] = self.path
        if self.size is not None:
            out["num_samples"] = self.size
        elif self.kind == "synthetic":
            out["num_samples"] = SYNTHETIC_SIZE
        if self.skip_bad_samples:
            out["skip_bad_samples"] = True
        out.update(self.options)
        return out


@dataclass
class ReinforcedConfig:
    """The reinforced teacher cache (data/reinforced.py): built by ``--build-teacher-cache``
    over webdataset/csv/folder data, read by the data kind ``reinforced`` (and the
    ``caption_mode`` by ``datacompdr``)."""

    cache_dir: str | None = None  # cache files' folder; None: beside the shards / CSV / folder
    augmentations: int = 5  # K stored augmentations per image (build)
    dtype: str = "fp16"  # stored embedding dtype: fp16, bf16 or fp32 (build)
    caption_mode: str = "all"  # training picks among "all", "real" or "synthetic" captions

    def data_options(self) -> dict[str, Any]:
        """The ``data_cfg`` keys the reinforced data kinds read."""
        return {"cache_dir": self.cache_dir, "caption_mode": self.caption_mode}

    def validate(self) -> None:
        if self.augmentations <= 0:
            raise ValueError(f"reinforced.augmentations must be > 0, got {self.augmentations}")
        if self.dtype not in CACHE_DTYPE_NAMES:
            raise ValueError(
                f"reinforced.dtype must be one of {CACHE_DTYPE_NAMES}, got {self.dtype!r}"
            )
        if self.caption_mode not in CAPTION_MODE_NAMES:
            raise ValueError(
                f"reinforced.caption_mode must be one of {CAPTION_MODE_NAMES}, got "
                f"{self.caption_mode!r}"
            )


@dataclass
class EvalConfig:
    """Zero-shot top-1 every ``every`` steps on a labelled set (0 switches it off)."""

    every: int = 0
    # "folder" (class-per-subfolder), "csv" (filepath,label; .csv comma, else tab), "demo"
    kind: str = "folder"
    path: str | None = None
    class_names: str | None = None  # text file, one class name per line (default: folder names)
    templates: str | None = None  # text file, one prompt per line with "{}" (default: open_clip's)
    batch_size: int = 256


@dataclass
class LossConfig:
    """L = (1 - contrastive_weight) L_dist + contrastive_weight L_clip (SPEC 2), the meaning
    ``affinity_mimicking_loss`` and ``AffinityMimickingLoss`` give the weight too."""

    contrastive_weight: float = 0.0  # in [0, 1]; 0 is TinyCLIP's pure affinity mimicking
    kind: str = "soft_ce"  # "soft_ce" (TinyCLIP/open_clip values) or "kl" (same gradient)
    fixed_scale: float | None = None  # authors: 50 fixes BOTH scales; None: student learnable
    max_scale: float = 100.0  # clamp of the learnable student scale exp(logit_scale)
    # "softmax": affinity mimicking (TinyCLIP); "sigmoid": per-pair binary cross-entropy against
    # the teachers' sigmoid probabilities, L_clip SigLIP's loss; the student gets a logit bias.
    # kind under sigmoid: soft_ce is the binary cross-entropy, kl drops the teacher entropy,
    # mobileclip is MobileCLIP's -log s((2p - 1) A)
    family: str = "softmax"
    # sigmoid: a student without a logit bias gets one, and its scale, as open_clip initialises
    # SigLIP models (log 10, -10); one inherited from a teacher with a bias keeps the teacher's
    init_logit_scale: float = math.log(10)
    init_logit_bias: float = -10.0


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
    # (over at most a quarter of the stage's steps left after pruning)
    grad_clip: float = 5.0  # max global grad norm; 0 switches it off
    # log_alpha of the hard-concrete masks (AdamW, no weight decay), from 10. With the authors'
    # 0.02 and lagrangian_lr 0.02 the masks reach the target given 200 or more steps before
    # pruning (demo teacher: 51% of 50% at 200 steps, 3% at 100); tens need ~0.25 and 0.05.
    mask_lr: float = 0.02
    lagrangian_lr: float = 0.02  # l1, l2 of the sparsity Lagrangian (gradient ascent)


@dataclass
class DistillConfig:
    """Everything one ``tinyclip-distill`` run needs."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # an ensemble of 2..4 teachers ([[teachers]] tables: model, pretrained, logit_bias), in place
    # of teacher.model/pretrained; weight inheritance reads the FIRST; teacher.cache serves all
    teachers: list[TeacherConfig] = field(default_factory=list)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    data: DataConfig = field(default_factory=DataConfig)
    reinforced: ReinforcedConfig = field(default_factory=ReinforcedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 256  # global batch (all ranks, all micro-batches)
    micro_batch_size: int | None = None  # per-rank micro-batch; < local batch = exact accumulation
    # autocast dtype: fp32, bf16, fp16 (fp16 adds a GradScaler); None: bf16 on CUDA (fp16 where
    # bf16 is unsupported), fp32 on the CPU (CPU bf16 is slower than fp32 on most x86 CPUs)
    precision: str | None = None
    compile: bool = False  # torch.compile the student
    attention: str = "sdpa"  # "sdpa" (torch) or "xformers" (CUDA, when installed)
    device: str | None = None  # default: cuda when available, else cpu
    seed: int = 0
    out_dir: str = "runs/distill"
    log_every: int = 10
    save_every: int = 500  # resumable checkpoint every k steps (and at every stage end)
    resume: bool = False  # continue from out_dir/checkpoint.pt
    overwrite: bool = False  # replace the run files of another run in out_dir
    num_workers: int = 0
    progress: bool = True  # tqdm bar

    def validate(self, student: bool = True) -> None:
        """ValueError naming the first invalid field or stage; ``student=False`` accepts a
        config that names no student (building a teacher cache trains none)."""
        if not self.stages:
            raise ValueError("stages is empty: give at least one stage")
        if student and self.stages[0].kind == "continue":
            from tinyclip_fast.inheritance.presets import PRESETS

            raise ValueError(
                "no student: give --preset NAME (manual inheritance; "
                f"{', '.join(PRESETS)}), --student-config FILE (manual, any open_clip "
                "architecture), --sparsity S (automatic inheritance), or --from-scratch with "
                "--preset/--student-config (stages[0] in a config file)"
            )
        for i, stage in enumerate(self.stages):
            stage.validate(i)
        self._validate_teachers()
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        loss, optim = self.loss, self.optim
        if loss.kind not in LOSS_KINDS:
            raise ValueError(f"loss.kind must be one of {LOSS_KINDS}, got {loss.kind!r}")
        if loss.family not in LOSS_FAMILIES:
            raise ValueError(f"loss.family must be one of {LOSS_FAMILIES}, got {loss.family!r}")
        if loss.family == "softmax" and loss.kind == "mobileclip":
            raise ValueError("loss.kind mobileclip is a sigmoid loss: add --loss sigmoid")
        if loss.family == "sigmoid" and loss.fixed_scale is not None:
            raise ValueError(
                "loss.fixed_scale is for the softmax loss: a sigmoid teacher's probabilities "
                "depend on its own scale and bias, and the student learns both"
            )
        for name in ("init_logit_scale", "init_logit_bias"):
            if not math.isfinite(getattr(loss, name)):
                raise ValueError(f"loss.{name} must be finite, got {getattr(loss, name)}")
        _check_range("loss.contrastive_weight", loss.contrastive_weight, 0.0, 1.0)
        if loss.fixed_scale is not None:
            _check_positive("loss.fixed_scale", loss.fixed_scale)
        _check_positive("loss.max_scale", loss.max_scale)
        for name in ("lr", "eps", "mask_lr", "lagrangian_lr"):
            _check_positive(f"optim.{name}", getattr(optim, name))
        for name in ("min_lr", "weight_decay", "grad_clip", "warmup_steps", "prune_warmup_steps"):
            _check_range(f"optim.{name}", getattr(optim, name), 0.0, math.inf)
        for i, beta in enumerate(optim.betas):
            _check_range(f"optim.betas[{i}]", beta, 0.0, 1.0, closed_above=False)
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {self.micro_batch_size}")
        if self.log_every <= 0 or self.save_every < 0 or self.eval.every < 0:
            raise ValueError("log_every must be > 0; save_every and eval.every >= 0 (0 = off)")
        if self.eval.batch_size <= 0 or self.num_workers < 0:
            raise ValueError("eval.batch_size must be > 0 and num_workers >= 0")
        if self.data.size is not None and self.data.size <= 0:
            raise ValueError(f"data.size must be > 0, got {self.data.size}")
        _check_range("data.max_bad_fraction", self.data.max_bad_fraction, 0.0, 1.0)
        self.reinforced.validate()
        if self.resume and self.overwrite:
            raise ValueError(
                "resume and overwrite exclude each other: continue the run or replace it"
            )

    def teacher_configs(self) -> list[TeacherConfig]:
        """The run's teachers: ``teachers`` when given (an ensemble), else ``[teacher]``."""
        return list(self.teachers) if self.teachers else [self.teacher]

    def _validate_teachers(self) -> None:
        if len(self.teachers) > MAX_TEACHERS:
            raise ValueError(
                f"{len(self.teachers)} teachers given; an ensemble has at most {MAX_TEACHERS}"
            )
        if self.teachers and (
            self.teacher.model != TeacherConfig.model
            or self.teacher.pretrained is not None
            or self.teacher.logit_bias is not None
        ):
            raise ValueError(
                "give the teachers either as teacher.model/pretrained/logit_bias or as "
                "[[teachers]] entries, not both (teacher.cache serves both)"
            )
        for i, entry in enumerate(self.teachers):
            if entry.cache is not None:
                raise ValueError(
                    f"teachers[{i}].cache: one cache holds every teacher; set teacher.cache"
                )
        biases = [t.logit_bias for t in self.teacher_configs() if t.logit_bias is not None]
        if self.loss.family == "softmax" and biases:
            raise ValueError(
                "a teacher logit_bias is for --loss sigmoid (a scalar bias drops out of "
                "softmax targets)"
            )
        if any(not math.isfinite(b) for b in biases):
            raise ValueError(f"teacher logit biases must be finite, got {biases}")

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_range(
    name: str, value: float, low: float, high: float, closed_above: bool = True
) -> None:
    inside = low <= value <= high if closed_above else low <= value < high
    if not (math.isfinite(value) and inside):
        bracket = "]" if closed_above else ")"
        upper = "inf)" if high == math.inf else f"{high}{bracket}"
        raise ValueError(f"{name} must be in [{low}, {upper}, got {value}")


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


# ---------------------------------------------------------------------------------------------
# Reading values: a config file and --set, checked against the declared field types.

_REMOVED = {
    "loss.distill_weight": "the loss is (1 - contrastive_weight) L_dist + contrastive_weight "
    "L_clip; open_clip's 1:1 sum is contrastive_weight = 0.5 (half the scale, the same AdamW "
    "steps)",
}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ')}s"
    if origin is list:
        return "a list"
    if origin is dict or is_dataclass(hint):
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint)
    )


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` declares; TypeError naming ``where`` and the type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except TypeError:
                continue
    elif is_dataclass(hint):
        return from_dict(hint, value, where)
    elif origin is list and args and is_dataclass(args[0]):
        if isinstance(value, list):
            return [from_dict(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(
                _coerce(v, a, f"{where}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
    elif origin is dict:
        if isinstance(value, dict):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise TypeError(f"{where} must be {_describe(hint)}, got {value!r}")


def from_dict(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and values of the wrong type
    are errors naming the key."""
    if not isinstance(values, dict):
        raise TypeError(f"{where} must be a table/object, got {type(values).__name__}")
    hints = _hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{where}.{key}"
        if key not in known:
            removed = _REMOVED.get(dotted.removeprefix("config."))
            if removed:
                raise ValueError(f"{dotted} no longer exists: {removed}")
            raise ValueError(f"unknown key {dotted}; known: {sorted(known)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


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
            raise ValueError("TOML config files need Python >= 3.11; use JSON") from err
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {path} is not valid TOML: {err}") from None
    elif path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
    else:
        raise ValueError(f"config file must end in .json or .toml, got {path}")
    return from_dict(DistillConfig, values)


def _parse_value(raw: str, hint: Any) -> Any:
    """JSON when it parses, else the raw text; string fields keep the text as written."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    if value is not None and not isinstance(value, str) and _accepts_str_only(hint):
        return raw  # --set out_dir=2024 is the folder "2024"
    return value


def _accepts_str_only(hint: Any) -> bool:
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return options == [str]


def apply_override(config: DistillConfig, assignment: str) -> None:
    """Apply ``"a.b=value"`` in place; value is parsed as JSON when it can be, else a string.

    Paths go through tables (``optim.lr``), stage indices (``stages.0.steps``, ``stages.1``
    for a whole stage table) and free tables (``data.options.csv_separator``). Values are
    checked against the field's declared type.
    """
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set must look like key.sub=value, got {assignment!r}")
    where = f"--set {assignment}"
    parts = key.split(".")
    target: Any = config
    walked: list[str] = []
    entry_type: Any = StageConfig  # the dataclass of the list walked into (stages, teachers)
    for part in parts[:-1]:
        if is_dataclass(target) and part in {f.name for f in fields(target)}:
            entry_type = (typing.get_args(_hints(type(target))[part]) or (entry_type,))[0]
        target = _child(target, part, walked, where)
        walked.append(part)
    name, here = parts[-1], ".".join(walked) or "the config"
    if isinstance(target, list):
        index = _index(target, name, here, where)
        try:
            target[index] = from_dict(entry_type, _parse_value(raw, dict), key)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None
    elif isinstance(target, dict):
        target[name] = _parse_value(raw, Any)
    elif is_dataclass(target) and name in {f.name for f in fields(target)}:
        hint = _hints(type(target))[name]
        try:
            value = _coerce(_parse_value(raw, hint), hint, key)
        except TypeError as err:
            raise TypeError(f"{where}: {err}") from None
        setattr(target, name, value)
    else:
        removed = _REMOVED.get(key)
        raise ValueError(
            f"{where}: {key} no longer exists: {removed}"
            if removed
            else (f"{where}: unknown config key {key!r}" + _known(target))
        )


def _known(target: Any) -> str:
    if is_dataclass(target):
        return f"; {type(target).__name__} has {sorted(f.name for f in fields(target))}"
    return ""


def _index(items: list, part: str, here: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ValueError(
            f"{where}: {here} has {len(items)} {'entry' if len(items) == 1 else 'entries'} "
            f"(indices 0..{len(items) - 1}), there is no {here}.{part}"
        )
    return int(part)


def _child(target: Any, part: str, walked: list[str], where: str) -> Any:
    here = ".".join(walked) or "the config"
    if isinstance(target, list):
        return target[_index(target, part, here, where)]
    if isinstance(target, dict):
        if not isinstance(target.get(part), (dict, list)):
            raise ValueError(f"{where}: {here}.{part} is not a table")
        return target[part]
    if is_dataclass(target) and part in {f.name for f in fields(target)}:
        child = getattr(target, part)
        if child is None and _hints(type(target))[part] == (dict[str, Any] | None):
            child = {}
            setattr(target, part, child)
        if not (is_dataclass(child) or isinstance(child, (list, dict))):
            raise ValueError(f"{where}: {'.'.join([*walked, part])} is a value, not a table")
        return child
    raise ValueError(f"{where}: unknown config key {'.'.join([*walked, part])!r}" + _known(target))
