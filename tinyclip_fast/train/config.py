"""Run configuration: plain dataclasses whose fields carry their defaults and help.

Precedence (nanoGPT style): dataclass defaults < config file < the command-line flags <
``--set key.sub=value``. Each field is declared once, with :func:`setting` (help, allowed
values, and a flag for the options people type); the command line, ``--help`` and
docs/cli.md are generated from these declarations. Types are checked when values are read
(a file, a flag or ``--set``: config_io.py), ranges and allowed values by
:meth:`DistillConfig.validate`. Nothing here imports torch: the command line reports a bad
configuration in a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tinyclip_fast.data.options import DECODERS
from tinyclip_fast.inheritance import HF_PREFIX
from tinyclip_fast.kernels.limits import MAX_TEACHERS
from tinyclip_fast.train.config_io import (
    apply_override,
    check_choices,
    check_positive,
    check_range,
    from_dict,
    read_file,
    setting,
)
from tinyclip_fast.train.stage_config import StageConfig

__all__ = [
    "MAX_TEACHERS",
    "DistillConfig",
    "StageConfig",
    "apply_override",
    "from_dict",
    "load_config",
]

PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTIONS = ("sdpa", "xformers")
LOSS_KINDS = ("soft_ce", "kl", "mobileclip")
LOSS_FAMILIES = ("softmax", "sigmoid")
CACHE_DTYPE_NAMES = ("fp16", "bf16", "fp32")
CAPTION_MODE_NAMES = ("all", "real", "synthetic")
SYNTHETIC_SIZE = 10_000


@dataclass
class TeacherConfig:
    """The frozen teacher; it stays the ORIGINAL model in every stage (docs/method.md §4)."""

    model: str = setting(
        "ViT-B-32",
        flag="--teacher",
        metavar="NAME",
        help="open_clip model name (ViT-B-32), a path to an open_clip model-config JSON, "
        f"{HF_PREFIX}DIR (a transformers CLIPModel folder, no --pretrained) or 'demo'; --teacher "
        f"repeated (up to {MAX_TEACHERS}) is an ensemble, each followed by its --pretrained; "
        "weight inheritance reads the FIRST teacher",
    )
    pretrained: str | None = setting(
        None,
        flag="--pretrained",
        metavar="FILE|TAG",
        help="teacher weights: a local checkpoint file (offline) or an open_clip pretrained tag "
        "(downloads); with several --teacher, one per teacher, in order",
    )
    cache: str | None = setting(
        None,
        flag="--teacher-cache",
        metavar="FILE",
        help="per-sample teacher-embedding cache (safetensors), written by "
        "--build-teacher-cache and read instead of running the teacher: map-style data "
        "without random augmentation, the same samples in the same order; holds every "
        "teacher of an ensemble (set it here, not in teachers.N)",
    )
    logit_bias: float | None = setting(
        None,
        help="loss.family sigmoid: the bias c_t of this teacher's probabilities s(b x.y + c_t); "
        "null: the teacher's own logit_bias (SigLIP models have one; a softmax CLIP teacher "
        "has none: give one, e.g. -10)",
    )


@dataclass
class DataConfig:
    """Training data, handed to ``data.build_dataset`` (``options`` pass through verbatim).

    There is no default: a run names its data (``synthetic`` is random noise, for throughput
    checks only).
    """

    kind: str | None = setting(
        None,
        help="csv (CSV/TSV, open_clip format), webdataset, reinforced (a reinforced cache over "
        "webdataset/csv/folder data), datacompdr (Apple's DataCompDR shards), demo (the "
        "built-in demo data), synthetic (random pairs: throughput checks only), or a kind "
        "registered with data.datasets.register_dataset; folder (an image folder) only to "
        "build a reinforced cache from; the flag --data KIND:PATH sets kind and path",
    )
    path: str | None = setting(
        None,
        help="csv: the CSV/TSV file; webdataset and datacompdr: the shards 'a-{000..009}.tar'; "
        "reinforced: the data the cache was built over; demo: its source",
    )
    size: int | None = setting(
        None,
        help=f"synthetic: number of samples (null: {SYNTHETIC_SIZE:,}); webdataset: samples "
        "per epoch",
    )
    options: dict[str, Any] = setting(
        default_factory=dict,
        help="options of the data kind, e.g. csv: csv_img_key (filepath), csv_caption_key "
        "(title), csv_separator (default from the extension: .csv comma, else tab), also "
        "without csv_; every kind's keys: docs/cli.md (Data options); other keys are refused",
    )
    skip_bad_samples: bool = setting(
        False,
        help="skip unreadable samples, logged in the run folder's bad_samples.jsonl, instead "
        "of stopping at the first",
    )
    max_bad_fraction: float = setting(
        0.01,
        help="with skip_bad_samples: stop once more than this fraction of the samples read "
        "were bad",
    )
    decode: str = setting(
        "auto",
        choices=("auto", *DECODERS),
        help="training images of csv, webdataset (with the teacher's training transform), "
        "reinforced and datacompdr data: pil (PIL decode and the transform "
        "in the loader workers), tensor (workers decode with libjpeg-turbo and crop in uint8; "
        "the training device resizes, flips, jitters and normalises), nvjpeg (workers read "
        "bytes, the GPU decodes), auto (CUDA: nvjpeg where torchvision has it, else tensor; "
        "CPU: pil; docs/data.md)",
    )

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
    """The reinforced teacher cache (data/reinforced.py): built by ``--build-reinforced-cache``
    over webdataset/csv/folder data, read by the data kind ``reinforced`` (and the
    ``caption_mode`` by ``datacompdr``)."""

    cache_dir: str | None = setting(
        None,
        help="reinforced cache files' folder, for building and for --data reinforced:; null: "
        "beside the shards / CSV / image folder",
    )
    augmentations: int = setting(5, help="K stored augmentations per image (build)")
    dtype: str = setting("fp16", choices=CACHE_DTYPE_NAMES, help="stored embedding dtype (build)")
    caption_mode: str = setting(
        "all",
        choices=CAPTION_MODE_NAMES,
        help="the captions training picks among: real and synthetic, real, or synthetic",
    )

    def data_options(self) -> dict[str, Any]:
        """The ``data_cfg`` keys the reinforced data kinds read."""
        return {"cache_dir": self.cache_dir, "caption_mode": self.caption_mode}


@dataclass
class EvalConfig:
    """Zero-shot top-1 on a labelled set, or image-text retrieval recall@k on caption pairs,
    every ``every`` steps and after each stage; on when ``kind`` names the set (``--eval``)."""

    every: int = setting(
        1000, help="evaluate every K steps when an eval set is given (--eval); 0: off"
    )
    kind: str | None = setting(
        None,
        help="folder (one subfolder per class), csv (filepath,label; .csv comma, else tab), "
        "retrieval (filepath,title pairs, several captions per image allowed: recall@1/5/10 "
        "both ways), demo, or a registered kind; null: no evaluation; the flag --eval "
        "KIND:PATH sets kind and path",
    )
    path: str | None = setting(None, help="the eval set's folder or file")
    class_names: str | None = setting(
        None, help="text file, one class name per line (default: the folder names)"
    )
    templates: str | None = setting(
        None,
        help="text file, one prompt template per line with '{}' (default: open_clip's)",
    )
    batch_size: int = setting(256, help="images per evaluation batch")

    @property
    def enabled(self) -> bool:
        """Whether the run builds an evaluator from this set."""
        return self.kind is not None and self.every > 0

    def require_set(self) -> None:
        """ValueError when evaluation settings are given without an eval set (the command
        line's check: from Python, ``distill`` also takes an evaluator directly)."""
        if self.kind is not None:
            return
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("kind", "batch_size") and value not in (f.default, 0):
                raise ValueError(
                    f"eval.{f.name}={value} sets up an evaluation, but no --eval given: add "
                    "--eval folder:DIR, csv:FILE, retrieval:FILE or demo (eval.kind in a "
                    "config file)"
                )


@dataclass
class LossConfig:
    """L = (1 - contrastive_weight) L_dist + contrastive_weight L_clip (docs/method.md §2), the
    meaning ``affinity_mimicking_loss`` and ``AffinityMimickingLoss`` give the weight too."""

    contrastive_weight: float = setting(
        0.0,
        help="w in [0, 1]: the CLIP loss's share (0: pure affinity mimicking, TinyCLIP's; "
        "0.5: open_clip's 1:1 sum at half the scale)",
    )
    kind: str = setting(
        "soft_ce",
        choices=LOSS_KINDS,
        help="soft_ce (TinyCLIP/open_clip values; sigmoid: the binary cross-entropy) or kl "
        "(the same gradient, without the teacher entropy); sigmoid only: mobileclip "
        "(MobileCLIP's -log s((2p - 1) A))",
    )
    fixed_scale: float | None = setting(
        None,
        help="fix both logit scales to this value > 0 (the authors use 50); null: the "
        "student's scale is learnable (clamped to max_scale), the teacher keeps its own",
    )
    max_scale: float = setting(100.0, help="clamp of the learnable student scale exp(a)")
    family: str = setting(
        "softmax",
        flag="--loss",
        choices=LOSS_FAMILIES,
        help="softmax: TinyCLIP's affinity mimicking and the CLIP loss; sigmoid: per-pair "
        "binary cross-entropy against the teachers' sigmoid probabilities and the SigLIP "
        "loss, the student learning a logit bias",
    )
    init_logit_scale: float = setting(
        math.log(10),
        help="sigmoid: the logit scale a student without a logit bias starts from (open_clip's "
        "SigLIP init, log 10); one inherited from a teacher with a bias keeps the teacher's",
    )
    init_logit_bias: float = setting(
        -10.0, help="sigmoid: the logit bias such a student starts from (open_clip's SigLIP init)"
    )


@dataclass
class OptimConfig:
    """AdamW with the authors' groups (docs/method.md §5) and a cosine schedule with linear
    warmup."""

    lr: float = setting(1e-4, flag="--lr", help="peak learning rate")
    min_lr: float = setting(0.0, help="the rate the cosine ends at")
    betas: tuple[float, float] = setting((0.9, 0.98), help="AdamW betas")
    eps: float = setting(1e-6, help="AdamW epsilon")
    weight_decay: float = setting(
        0.2, help="on >= 2-D weights only: not norms, biases, the logit scale"
    )
    warmup_steps: int = setting(2000, help="linear warmup before the cosine")
    prune_warmup_steps: int = setting(
        200,
        help="auto stages: the rate ramps up again over this many steps after pruning (at most "
        "a quarter of the stage's steps left); the optimizer's moments carry over to the "
        "pruned student",
    )
    grad_clip: float = setting(5.0, help="max global grad norm; 0: off")
    mask_lr: float = setting(
        0.02,
        help="auto stages: AdamW rate of the masks' log_alpha (which start at 10), no weight "
        "decay; the default suits hundreds of mask-learning steps; a mask phase of tens of "
        "steps needs about 0.25 (docs/pruning-and-inheritance.md: the recipe for short mask "
        "phases)",
    )
    lagrangian_lr: float = setting(
        0.02, help="auto stages: rate of the sparsity Lagrangian's multipliers (gradient ascent)"
    )


@dataclass
class DistillConfig:
    """Everything one ``tinyclip-distill`` run needs."""

    teacher: TeacherConfig = setting(
        default_factory=TeacherConfig, help="the teacher (or teachers.N for an ensemble)"
    )
    teachers: list[TeacherConfig] = setting(
        default_factory=list,
        help=f"an ensemble of 2..{MAX_TEACHERS} teachers ([[teachers]] tables: model, "
        "pretrained, logit_bias) in place of teacher.model/pretrained/logit_bias; weight "
        "inheritance reads the FIRST; teacher.cache serves all",
    )
    stages: list[StageConfig] = setting(
        default_factory=lambda: [StageConfig()],
        help="progressive distillation: [[stages]] tables, run in order",
    )
    data: DataConfig = setting(default_factory=DataConfig, help="training data")
    reinforced: ReinforcedConfig = setting(
        default_factory=ReinforcedConfig, help="the reinforced teacher cache"
    )
    eval: EvalConfig = setting(default_factory=EvalConfig, help="zero-shot evaluation")
    loss: LossConfig = setting(default_factory=LossConfig, help="the loss")
    optim: OptimConfig = setting(default_factory=OptimConfig, help="the optimizer")
    batch_size: int = setting(256, flag=True, help="global batch (all ranks, all micro-batches)")
    micro_batch_size: int | None = setting(
        None,
        flag=True,
        help="per-rank micro-batch: exact gradient accumulation (GradCache); null: the whole "
        "per-rank batch at once",
    )
    precision: str | None = setting(
        None,
        flag=True,
        choices=PRECISIONS,
        help="autocast dtype; fp16 adds a GradScaler; null: bf16 on CUDA (fp16 where bf16 is "
        "unsupported), fp32 on the CPU (CPU bf16 is slower than fp32 on most x86 CPUs)",
    )
    compile: bool = setting(False, help="torch.compile the student")
    attention: str = setting(
        "sdpa", choices=ATTENTIONS, help="sdpa (torch) or xformers (CUDA, must be installed)"
    )
    device: str | None = setting(
        None, flag=True, help="cuda, cuda:1, cpu; null: cuda when available, else cpu"
    )
    seed: int = setting(0, flag=True, help="seed of the data order and initialisation")
    out_dir: str = setting(
        "runs/distill",
        flag=True,
        metavar="DIR",
        help="the run folder: checkpoint, metrics and student export",
    )
    log_every: int = setting(10, help="log metrics every K steps")
    save_every: int = setting(
        500, help="resumable checkpoint every K steps (and at every stage end); 0: stage ends only"
    )
    resume: bool = setting(
        False,
        flag=True,
        help="continue the run in out_dir from its checkpoint.pt (more --steps in the last "
        "stage extend a finished run)",
    )
    overwrite: bool = setting(
        False,
        flag=True,
        help="replace another run's files in out_dir (checkpoint, metrics, student)",
    )
    num_workers: int | None = setting(
        None,
        flag=True,
        help="data loader worker processes (null: 0 on the CPU; on CUDA the cores available "
        "per local GPU minus one, at most 12)",
    )
    progress: bool = setting(True, help="tqdm progress bar")
    export_hf: bool = setting(
        False,
        help="also write student-hf/, a transformers CLIPModel folder (tinyclip-fast[hf]); "
        "per-layer widths (automatic inheritance) stay in student/ only",
    )
    threads: int | None = setting(
        None,
        flag=True,
        help="CPU threads of each process (torch.set_num_threads); null: torch's choice, or "
        "under torchrun the cores shared among the node's processes",
    )

    def validate(self, student: bool = True) -> None:
        """ValueError naming the first invalid field or stage; ``student=False`` accepts a
        config that names no student (building a teacher cache trains none)."""
        if not self.stages:
            raise ValueError("stages is empty: give at least one stage")
        if student and self.stages[0].kind == "continue" and self.stages[0].init is None:
            from tinyclip_fast.inheritance.presets import PRESETS

            raise ValueError(
                "no student: give --preset NAME (manual inheritance; "
                f"{', '.join(PRESETS)}), --student-config FILE (manual, any open_clip "
                "architecture), --sparsity S (automatic inheritance), --from-scratch with "
                "--preset/--student-config, or --init hf:DIR (stages[0] in a config file)"
            )
        for i, stage in enumerate(self.stages):
            stage.validate(i)
        check_choices(self)
        self._validate_teachers()
        loss, optim = self.loss, self.optim
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
        check_range("loss.contrastive_weight", loss.contrastive_weight, 0.0, 1.0)
        if loss.fixed_scale is not None:
            check_positive("loss.fixed_scale", loss.fixed_scale)
        check_positive("loss.max_scale", loss.max_scale)
        for name in ("lr", "eps", "mask_lr", "lagrangian_lr"):
            check_positive(f"optim.{name}", getattr(optim, name))
        for name in ("min_lr", "weight_decay", "grad_clip", "warmup_steps", "prune_warmup_steps"):
            check_range(f"optim.{name}", getattr(optim, name), 0.0, math.inf)
        for i, beta in enumerate(optim.betas):
            check_range(f"optim.betas[{i}]", beta, 0.0, 1.0, closed_above=False)
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {self.micro_batch_size}")
        if self.log_every <= 0 or self.save_every < 0 or self.eval.every < 0:
            raise ValueError("log_every must be > 0; save_every and eval.every >= 0 (0 = off)")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads must be > 0, got {self.threads}")
        if self.eval.batch_size <= 0 or (self.num_workers or 0) < 0:
            raise ValueError("eval.batch_size must be > 0 and num_workers >= 0")
        if self.data.size is not None and self.data.size <= 0:
            raise ValueError(f"data.size must be > 0, got {self.data.size}")
        check_range("data.max_bad_fraction", self.data.max_bad_fraction, 0.0, 1.0)
        if self.reinforced.augmentations <= 0:
            raise ValueError(
                f"reinforced.augmentations must be > 0, got {self.reinforced.augmentations}"
            )
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


def load_config(path: str | Path | None = None) -> DistillConfig:
    """Defaults, overridden by the JSON (``.json``) or TOML (``.toml``) file at ``path``."""
    if path is None:
        return DistillConfig()
    return from_dict(DistillConfig, read_file(path))
