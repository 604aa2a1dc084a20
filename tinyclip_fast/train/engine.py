"""The distillation loop: stages -> student -> steps -> checkpoints, nanoGPT-style.

:func:`distill` runs every stage of ``config.stages`` against the ORIGINAL teacher (SPEC 4).
A step: teacher features (online under no_grad, or read from the embedding cache), student
features, the fused affinity-mimicking loss, backward, grad-norm clip, AdamW, cosine schedule.
Automatic-inheritance stages add the hard-concrete masks and the sparsity Lagrangian until
``prune_step``, then prune and continue on the compact student: its optimizer keeps the
AdamW moments of the kept channels and the learning rate ramps up again.

Gradient accumulation is EXACT for the batch-level loss (GradCache, Gao et al. 2021): the
loss couples every row with every column, so a sum of per-micro-batch losses would be a
different loss. Instead (1) features of every micro-batch without grad, (2) the loss on the
whole batch and its gradient w.r.t. the features and the scale, (3) every micro-batch again
with grad, backpropagating its slice of (2). Pass (3) replays the RNG state of pass (1), so
dropout samples match between the passes. Hard-concrete masks are drawn from a generator
seeded by the step (``MaskedCLIP.fix_mask_sample``): every micro-batch, both passes and every
DDP rank use one mask sample per step, as one forward over the whole batch would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from tinyclip_fast.data.datasets import build_dataset, make_loader
from tinyclip_fast.inheritance.manual import manual_inherit, preset_config
from tinyclip_fast.inheritance.student_io import (
    CompactResidualBlock,
    build_student,
    save_student,
    student_config,
)
from tinyclip_fast.losses import AffinityMimickingLoss
from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.pruning.sparsity import SparsityController
from tinyclip_fast.train.checkpoint import CHECKPOINT_NAME, load_training_state, save_training_state
from tinyclip_fast.train.config import DistillConfig, EvalConfig, StageConfig, TeacherConfig

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    history: {"step", "stage", "loss", "lr", "images_per_s"[, "sparsity", "penalty"]} every
        log_every steps, and {"step", "stage", "top1"} after every evaluation.
    student: the final compact, mask-free, open_clip-compatible student (eval mode), or the
        student in training when the run was interrupted.
    params: its parameter count; stage_params: the count after every finished stage.
    interrupted: True when SIGINT/SIGTERM stopped the run (after saving a checkpoint).
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    student: nn.Module | None = None
    params: int = 0
    stage_params: list[int] = field(default_factory=list)
    interrupted: bool = False


# ---------------------------------------------------------------------------------------------
# Building blocks: teacher, students, optimizer, schedule, one step.


def build_teacher(config: TeacherConfig) -> tuple[nn.Module, Callable, Callable, Callable]:
    """(teacher, tokenizer, train preprocess, eval preprocess) from an open_clip name or "demo".

    ``model`` may also be a path to an open_clip model-config JSON (registered under its stem).
    ``pretrained`` is a local checkpoint file (works offline) or an open_clip pretrained tag.
    """
    if config.model == "demo":
        from tinyclip_fast.demo.run import build_demo_teacher

        return build_demo_teacher(config.pretrained)
    name = config.model
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"teacher model config {path} does not exist")
        open_clip.add_model_config(path)
        name = path.stem
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    pretrained = config.pretrained
    if pretrained is not None and _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise FileNotFoundError(f"teacher checkpoint {pretrained} does not exist")
    if pretrained is None:
        raise ValueError(
            "teacher.pretrained is required: a local checkpoint file or an open_clip tag "
            f"(open_clip.list_pretrained_tags_by_model({name!r}))"
        )
    try:
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, require_pretrained=True
        )
    except (RuntimeError, OSError) as err:
        # open_clip raises RuntimeError for unknown tags, failed downloads, bad state dicts.
        raise ValueError(f"cannot load teacher {name} from {pretrained!r}: {err}") from err
    return model, open_clip.get_tokenizer(name), train_tf, eval_tf


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (mask log_alphas included for a MaskedCLIP)."""
    return sum(p.numel() for p in model.parameters())


def _stage_student(
    stage: StageConfig, teacher: nn.Module, previous: nn.Module | None, seed: int
) -> nn.Module:
    """The student a stage starts from (a MaskedCLIP for automatic inheritance)."""
    source = teacher if previous is None else previous
    if stage.kind == "continue":
        return previous
    if stage.kind == "auto":
        base = copy.deepcopy(source).requires_grad_(True)
        return MaskedCLIP(base)
    model_cfg = preset_config(stage.preset) if stage.preset else copy.deepcopy(stage.student_config)
    if stage.kind == "scratch":
        # Seeded apart from the run's RNG stream, so a scratch student is the same model
        # whatever ran before it (the demo compares students built in different orders).
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return open_clip.model.CLIP(**model_cfg)
    return manual_inherit(source, model_cfg, layer_selection=stage.layer_selection)


def _relative_sparsity(stage: StageConfig, masked: MaskedCLIP, teacher: nn.Module) -> float:
    """The target for this model such that ``stage.sparsity`` of the ORIGINAL is removed."""
    full_teacher = MaskedCLIP(teacher).full_prunable_params()
    full_here = masked.full_prunable_params()
    target = 1.0 - (1.0 - stage.sparsity) * full_teacher / full_here
    if target <= 0.0:
        raise ValueError(
            f"sparsity {stage.sparsity} of the original is already reached by this stage's "
            f"student ({full_here} of {full_teacher} prunable parameters left)"
        )
    return target


def learning_rate(
    step: int, total: int, config: DistillConfig, pruned_at: int | None = None
) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to min_lr at ``total``.

    ``pruned_at``: the stage step at which the student was pruned; from there the rate
    ramps up again over ``optim.prune_warmup_steps`` (the compact model is a new start).
    """
    optim = config.optim
    if step < optim.warmup_steps:
        lr = optim.lr * (step + 1) / optim.warmup_steps
    else:
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
        lr = optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))
    if pruned_at is not None and step >= pruned_at and optim.prune_warmup_steps > 0:
        lr *= min(1.0, (step - pruned_at + 1) / optim.prune_warmup_steps)
    return lr


def carry_optimizer_state(
    masked: MaskedCLIP,
    old: torch.optim.Optimizer,
    pruned: nn.Module,
    new: torch.optim.Optimizer,
) -> None:
    """Give ``new`` (over the pruned model) the AdamW state of ``old`` (over the masked
    model): moments cut to the kept channels and heads and rescaled for the folded soft mask
    values, so pruning does not restart the optimizer from zero moments (a jolt that costs
    the student accuracy it then has to win back). Parameters without state keep none."""
    names = dict(masked.model.named_parameters())
    states = {name: old.state[p] for name, p in names.items() if "exp_avg" in old.state.get(p, {})}
    if not states:
        return
    moments = {
        key: masked.prune_like_weights({n: s[key] for n, s in states.items()}, power)
        for key, power in (("exp_avg", -1), ("exp_avg_sq", -2))
    }
    trained = {id(p) for group in new.param_groups for p in group["params"]}
    for name, param in pruned.named_parameters():
        if id(param) in trained and name in states:
            new.state[param] = {
                "step": states[name]["step"].clone(),
                **{
                    key: moments[key][name].to(device=param.device, dtype=param.dtype)
                    for key in ("exp_avg", "exp_avg_sq")
                },
            }


def make_optimizer(model: nn.Module, config: DistillConfig) -> torch.optim.AdamW:
    """AdamW with the authors' groups (SPEC 5): weight decay on >= 2-D weights only, none on
    norms, biases and the logit scale. Mask parameters are not included (own optimizer)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or name.endswith("log_alpha"):
            continue
        (decay if param.ndim >= 2 and "logit_scale" not in name else no_decay).append(param)
    optim = config.optim
    on_cuda = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        fused=True if on_cuda else None,
    )


def _rng_state(device: torch.device) -> list[torch.Tensor]:
    state = [torch.get_rng_state()]
    if device.type == "cuda":
        state.append(torch.cuda.get_rng_state(device))
    return state


def _set_rng_state(state: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    teacher_features: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    *,
    micro_batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
    scaler: torch.amp.GradScaler,
    fixed_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward + backward of one local batch; returns the detached loss.

    ``model(images, texts) -> (image_features, text_features, exp(logit_scale))`` with
    L2-normalised features; ``loss_fn(I_s, T_s, a, I_t, T_t, b)``. A batch larger than
    ``micro_batch_size`` takes the GradCache path (module docstring): the same gradients
    as the whole batch at once, within floating-point rounding.
    """
    n = images.shape[0]
    if micro_batch_size >= n:
        with autocast():
            image_f, text_f, scale = model(images, texts)
            scale = scale if fixed_scale is None else fixed_scale
            loss = loss_fn(image_f, text_f, scale, *teacher_features)
        scaler.scale(loss).backward()
        return loss.detach()

    raw = model.module if isinstance(model, DistributedDataParallel) else model
    device = images.device
    slices = [slice(s, s + micro_batch_size) for s in range(0, n, micro_batch_size)]
    rng_states, image_parts, text_parts = [], [], []
    with torch.no_grad(), autocast():
        for part in slices:
            rng_states.append(_rng_state(device))
            image_f, text_f, scale = raw(images[part], texts[part])
            image_parts.append(image_f)
            text_parts.append(text_f)
    image_all = torch.cat(image_parts).requires_grad_()
    text_all = torch.cat(text_parts).requires_grad_()
    scale_leaf = (scale if fixed_scale is None else fixed_scale).detach()
    scale_leaf.requires_grad_(fixed_scale is None)
    with autocast():
        loss = loss_fn(image_all, text_all, scale_leaf, *teacher_features)
    scaler.scale(loss).backward()

    last = len(slices) - 1
    for i, part in enumerate(slices):
        # DDP all-reduces on the last backward only; earlier ones accumulate locally.
        sync = model.no_sync() if i < last and raw is not model else contextlib.nullcontext()
        cuda = [device] if device.type == "cuda" else []
        with sync, torch.random.fork_rng(devices=cuda):
            _set_rng_state(rng_states[i], device)
            with autocast():
                image_f, text_f, scale = model(images[part], texts[part])
            outputs, grads = [image_f, text_f], [image_all.grad[part], text_all.grad[part]]
            if fixed_scale is None:
                # The scale's gradient enters once; a zero elsewhere still marks the parameter
                # used, as DDP requires without find_unused_parameters.
                outputs.append(scale)
                grads.append(scale_leaf.grad if i == last else torch.zeros_like(scale_leaf.grad))
            torch.autograd.backward(outputs, grads)
    return loss.detach()


# ---------------------------------------------------------------------------------------------
# Run plumbing: process group, signals, metrics, checkpoints.


def _init_distributed(device: str | torch.device | None) -> tuple[int, int, bool]:
    """(rank, world_size, created): joins torchrun's process group when one is announced."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = torch.cuda.is_available() and (
            device is None or torch.device(device).type == "cuda"
        )
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _resolve_device(device: str | torch.device | None) -> torch.device:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_attention(attention: str, device: torch.device) -> None:
    if attention != "xformers":
        return
    if device.type != "cuda":
        raise ValueError("attention='xformers' needs a CUDA device; use attention='sdpa'")
    try:
        import xformers.ops  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "attention='xformers' but xformers is not installed: "
            "pip install 'tinyclip-fast[xformers]', or use attention='sdpa'"
        ) from err


@contextlib.contextmanager
def xformers_attention() -> Iterator[None]:
    """Route torch SDPA calls through xformers' memory-efficient kernel while active.

    Covers every attention that calls ``F.scaled_dot_product_attention`` at run time: open_clip's
    nn.MultiheadAttention in training, MaskedCLIP, pruned students. Calls with an explicit
    ``attn_mask`` (the text tower's additive causal mask) stay on torch SDPA.
    """
    import xformers.ops as xops

    torch_sdpa = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or kw:
            return torch_sdpa(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=scale, **kw,
            )  # fmt: skip
        # torch's layout is [batch, heads, tokens, dim]; xformers' is [batch, tokens, heads, dim].
        out = xops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            attn_bias=xops.LowerTriangularMask() if is_causal else None, p=dropout_p, scale=scale,
        )  # fmt: skip
        return out.transpose(1, 2)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = torch_sdpa


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and stops.

    A second signal raises KeyboardInterrupt at once (the user really wants out)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, world_size: int, device: torch.device) -> bool:
        """Whether any rank got a signal (all ranks must stop at the same step)."""
        flag = torch.tensor(float(self.signal is not None), device=device)
        if world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


class _MetricsLog:
    """metrics.jsonl (always) and TensorBoard (when installed); rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.file = self.tensorboard = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "stage"):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        for handle in (self.file, self.tensorboard):
            if handle is not None:
                handle.close()


def pack_student(model: nn.Module) -> dict[str, Any]:
    """Architecture (student_io config, so pruned students rebuild) + weights (+ masks)."""
    masked = isinstance(model, MaskedCLIP)
    base = model.model if masked else model
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = student_config(base)
    if any(isinstance(m, CompactResidualBlock) for m in base.modules()):
        # A pruned student whose layers happen to be uniform would rebuild with open_clip's
        # blocks (other attention kernels): bitwise resume needs the same module classes.
        config["open_clip_compatible"] = False
    return {"config": json.dumps(config), "masked": masked, "state": state}


def unpack_student(packed: dict[str, Any]) -> nn.Module:
    model = build_student(json.loads(packed["config"]))
    if packed["masked"]:
        model = MaskedCLIP(model)
    model.load_state_dict(packed["state"])
    return model


def _all_rng_states(device: torch.device, world_size: int) -> list[list[torch.Tensor]]:
    """Every rank's RNG state (each rank draws its own dropout samples)."""
    mine = _rng_state(device)
    if world_size == 1:
        return [mine]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, [t.cpu() for t in mine])
    return states


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclass
class _StageState:
    """What one stage trains and how; everything a checkpoint must restore."""

    model: nn.Module  # CLIP, or MaskedCLIP before pruning
    optimizer: torch.optim.Optimizer
    controller: SparsityController | None = None
    mask_optimizer: torch.optim.Optimizer | None = None
    multiplier_optimizer: torch.optim.Optimizer | None = None

    @property
    def masked(self) -> bool:
        return isinstance(self.model, MaskedCLIP)


class _Distiller:
    """The state shared by all stages of one run; :meth:`run` is the loop."""

    def __init__(
        self,
        config: DistillConfig,
        teacher: nn.Module,
        dataset: torch.utils.data.Dataset,
        evaluator: Callable[[nn.Module], float] | None,
        device: torch.device,
        rank: int,
        world_size: int,
    ) -> None:
        self.config, self.teacher, self.evaluator = config, teacher, evaluator
        self.device, self.rank, self.world_size = device, rank, world_size
        self.dataset = dataset
        self.local_batch = config.batch_size // world_size
        self.micro_batch = config.micro_batch_size or self.local_batch
        self.out_dir = Path(config.out_dir)
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME
        self.cache = None
        if config.teacher.cache is not None:
            from tinyclip_fast.train.teacher_cache import TeacherEmbeddingCache

            size = len(dataset) if hasattr(dataset, "__len__") else None
            # Refuses a cache built for another dataset size or by another teacher.
            self.cache = TeacherEmbeddingCache.load(
                config.teacher.cache, num_samples=size, teacher=teacher, device=device
            )
        weights = config.loss
        self.total_weight = weights.distill_weight + weights.contrastive_weight
        self.loss_module = AffinityMimickingLoss(
            contrastive_weight=weights.contrastive_weight / self.total_weight, kind=weights.kind
        )
        self.autocast_dtype = AUTOCAST_DTYPES[config.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        self.fixed_scale = None
        if weights.fixed_scale is not None:
            self.fixed_scale = torch.tensor(float(weights.fixed_scale), device=device)
            self.teacher_scale = self.fixed_scale
        elif self.cache is not None:
            self.teacher_scale = torch.tensor(math.exp(self.cache.logit_scale), device=device)
        else:
            self.teacher_scale = teacher.logit_scale.detach().float().exp()
        self.max_logit_scale = math.log(weights.max_scale)
        self.log = _MetricsLog(self.out_dir, enabled=rank == 0)
        self.progress: tqdm | None = None
        self.history: list[dict[str, Any]] = []
        self.stage_params: list[int] = []

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision (and the xformers attention route) of every forward pass."""
        stack = contextlib.ExitStack()
        stack.enter_context(
            torch.autocast(
                self.device.type,
                dtype=self.autocast_dtype,
                enabled=self.autocast_dtype is not None,
            )
        )
        if self.config.attention == "xformers":
            stack.enter_context(xformers_attention())
        return stack

    def loss_fn(self, *args: torch.Tensor) -> torch.Tensor:
        return self.total_weight * self.loss_module(*args)

    def teacher_features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(I_t, T_t, b) of a local batch: cached rows, or the frozen teacher in micro-batches."""
        if self.cache is not None:
            image_t, text_t = self.cache.lookup(batch["index"])
            return image_t, text_t, self.teacher_scale
        images, texts = batch["image"], batch["text"]
        parts = []
        # no_grad, not inference_mode: the loss saves these tensors for its backward.
        with torch.no_grad(), self.autocast():
            for s in range(0, images.shape[0], self.micro_batch):
                image_t, text_t, _ = self.teacher(
                    images[s : s + self.micro_batch], texts[s : s + self.micro_batch]
                )
                parts.append((image_t, text_t))
        image_t = torch.cat([p[0] for p in parts])
        text_t = torch.cat([p[1] for p in parts])
        return image_t, text_t, self.teacher_scale

    def new_stage_state(self, stage: StageConfig, model: nn.Module) -> _StageState:
        model = model.to(self.device).train()
        if self.fixed_scale is not None:
            model.logit_scale.requires_grad_(False)
        state = _StageState(model, make_optimizer(model, self.config))
        if isinstance(model, MaskedCLIP):
            target = _relative_sparsity(stage, model, self.teacher)
            state.controller = SparsityController(target, warmup_steps=stage.sparsity_warmup).to(
                self.device
            )
            state.mask_optimizer, state.multiplier_optimizer = state.controller.build_optimizers(
                model.mask_parameters(), self.config.optim.mask_lr, self.config.optim.lagrangian_lr
            )
        return state

    def wrap(self, model: nn.Module) -> nn.Module:
        """torch.compile and DDP, as configured (nanoGPT order: compile, then DDP)."""
        if self.config.compile:
            model = torch.compile(model)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        return model

    def save(
        self,
        stage_index: int,
        stage_step: int,
        step: int,
        st: _StageState | None,
        student: nn.Module,
    ) -> None:
        """Resumable state; ``st`` None means 'stage ``stage_index`` starts from ``student``'."""
        rng = _all_rng_states(self.device, self.world_size)
        if self.rank != 0:
            return
        state = {
            "stage": stage_index,
            "stage_step": stage_step,
            "step": step,
            "student": pack_student(student),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "history": self.history,
            "stage_params": self.stage_params,
            "config": json.dumps(self.config.to_dict()),
        }
        if st is not None:
            state["optimizer"] = st.optimizer.state_dict()
            if st.masked:
                state["controller"] = st.controller.state_dict()
                state["mask_optimizer"] = st.mask_optimizer.state_dict()
                state["multiplier_optimizer"] = st.multiplier_optimizer.state_dict()
        save_training_state(self.checkpoint_path, state)

    def say(self, message: str) -> None:
        if self.rank == 0:
            self.progress.write(message)

    def evaluate(self, model: nn.Module, stage_index: int, step: int) -> float:
        """Zero-shot top-1 into the history (rank 0); returns the seconds it took."""
        if self.evaluator is None or self.rank != 0:
            return 0.0
        last = self.history[-1] if self.history else {}
        if last.get("step") == step and "top1" in last:
            return 0.0  # the stage ended on an eval step
        start = time.perf_counter()
        top1 = float(self.evaluator(model))
        record = {"step": step, "stage": stage_index, "top1": top1}
        self.history.append(record)
        self.log.write(record)
        self.say(f"step {step} stage {stage_index}: zero-shot top-1 {top1:.4f}")
        return time.perf_counter() - start

    def run(self, first_student: nn.Module | None, resume: dict[str, Any] | None) -> DistillResult:
        config = self.config
        first_stage = resume["stage"] if resume else 0
        step = resume["step"] if resume else 0
        student = first_student
        if resume:
            _check_resumable(json.loads(resume["config"]), config.to_dict())
            # Rebuilding the student draws random inits: restore the RNG only afterwards.
            student = unpack_student(resume["student"])
            self.history, self.stage_params = resume["history"], resume["stage_params"]
            rng = resume["rng"]
            if len(rng) != self.world_size:
                raise ValueError(
                    f"checkpoint was written by {len(rng)} ranks, this run has {self.world_size}"
                )
            _set_rng_state(rng[self.rank], self.device)
            self.scaler.load_state_dict(resume["scaler"])
        loader = make_loader(
            self.dataset,
            self.local_batch,
            seed=config.seed,
            start_step=step,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=config.num_workers,
        )
        self.progress = tqdm(
            total=config.total_steps,
            initial=step,
            unit="step",
            dynamic_ncols=True,
            disable=not config.progress or self.rank != 0,
        )
        result = DistillResult(history=self.history, stage_params=self.stage_params)
        try:
            with _StopFlag() as stop:
                for stage_index in range(first_stage, len(config.stages)):
                    stage = config.stages[stage_index]
                    resumed = resume if resume and stage_index == first_stage else None
                    student, step, interrupted = self.run_stage(
                        stage_index, stage, student, step, loader, stop, resumed
                    )
                    if interrupted:
                        result.interrupted = True
                        break
                    self.stage_params.append(count_parameters(student))
                    self.evaluate(student, stage_index, step)
                    self.save(stage_index + 1, 0, step, None, student)
        finally:
            self.progress.close()
            self.log.close()
        if not result.interrupted and self.rank == 0:
            save_student(student, self.out_dir / "student")
        result.student = student.eval()
        result.params = count_parameters(student)
        return result

    def run_stage(
        self,
        stage_index: int,
        stage: StageConfig,
        student: nn.Module | None,
        step: int,
        loader: Iterator[dict[str, torch.Tensor]],
        stop: _StopFlag,
        resume: dict[str, Any] | None,
    ) -> tuple[nn.Module, int, bool]:
        """Train one stage; returns (its final student, global step, interrupted)."""
        config = self.config
        stage_step = resume["stage_step"] if resume else 0
        if stage_step > 0:
            model = student  # the checkpoint holds the stage's model in training
        elif stage_index == 0 and student is not None and stage.kind != "continue":
            model = MaskedCLIP(student) if stage.kind == "auto" else student
        else:
            model = _stage_student(stage, self.teacher, student, config.seed)
        st = self.new_stage_state(stage, model)
        if stage_step > 0:
            st.optimizer.load_state_dict(resume["optimizer"])
            if st.masked:
                st.controller.load_state_dict(resume["controller"])
                st.mask_optimizer.load_state_dict(resume["mask_optimizer"])
                st.multiplier_optimizer.load_state_dict(resume["multiplier_optimizer"])
        prune_step = stage.prune_step or stage.steps
        pruned_at = prune_step if stage.kind == "auto" else None
        wrapped = self.wrap(st.model)
        tick, images_seen = time.perf_counter(), 0

        while stage_step < stage.steps:
            if st.masked and stage_step == prune_step:
                pruned = self.new_stage_state(stage, st.model.prune())
                carry_optimizer_state(st.model, st.optimizer, pruned.model, pruned.optimizer)
                st = pruned
                wrapped = self.wrap(st.model)
            lr = learning_rate(stage_step, stage.steps, config, pruned_at)
            for group in st.optimizer.param_groups:
                group["lr"] = lr
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(loader).items()}
            if st.masked:  # one mask sample per step, shared by micro-batches and ranks
                st.model.fix_mask_sample(config.seed * 1_000_003 + step)
            loss = train_step(
                wrapped,
                batch["image"],
                batch["text"],
                self.teacher_features(batch),
                self.loss_fn,
                micro_batch_size=self.micro_batch,
                autocast=self.autocast,
                scaler=self.scaler,
                fixed_scale=self.fixed_scale,
            )
            penalty = sparsity = None
            if st.masked:
                sparsity = st.model.expected_sparsity()
                penalty = st.controller(sparsity, stage_step)
                self.scaler.scale(penalty).backward()
            loss_value = _mean_over_ranks(loss, self.world_size)
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"loss is {loss_value} at step {step + 1} (stage {stage_index}); stopped "
                    f"before updating the weights. The last good checkpoint "
                    f"{self.checkpoint_path} is intact: lower --lr, use bf16 instead of fp16, "
                    "or check the data; then --resume"
                )
            optimizers = [st.optimizer] + (
                [st.mask_optimizer, st.multiplier_optimizer] if st.masked else []
            )
            if config.optim.grad_clip > 0:
                self.scaler.unscale_(st.optimizer)
                weights = [p for g in st.optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(weights, config.optim.grad_clip)
            for optimizer in optimizers:
                self.scaler.step(optimizer)
            self.scaler.update()
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                if self.fixed_scale is None:
                    st.model.logit_scale.clamp_(0.0, self.max_logit_scale)
                if st.masked:
                    st.model.clamp_masks()
            stage_step, step = stage_step + 1, step + 1
            images_seen += config.batch_size

            if step % config.log_every == 0 or stage_step == stage.steps:
                elapsed = time.perf_counter() - tick
                record = {
                    "step": step,
                    "stage": stage_index,
                    "loss": loss_value,
                    "lr": lr,
                    "images_per_s": images_seen / max(elapsed, 1e-9),
                }
                if sparsity is not None:
                    record["sparsity"] = float(sparsity.detach())
                    record["penalty"] = float(penalty.detach())
                self.history.append(record)
                self.log.write(record)
                self.progress.set_postfix(
                    loss=f"{loss_value:.4f}", img_s=f"{record['images_per_s']:.0f}"
                )
                tick, images_seen = time.perf_counter(), 0
            self.progress.update(1)
            if config.eval.every and step % config.eval.every == 0:
                tick += self.evaluate(st.model, stage_index, step)  # images/s of training only
            if stop.agreed(self.world_size, self.device):
                self.save(stage_index, stage_step, step, st, st.model)
                self.say(
                    f"stopped by signal at step {step}; checkpoint saved to "
                    f"{self.checkpoint_path}; continue with --resume"
                )
                return st.model, step, True
            if config.save_every and step % config.save_every == 0 and stage_step < stage.steps:
                start = time.perf_counter()
                self.save(stage_index, stage_step, step, st, st.model)
                tick += time.perf_counter() - start

        if st.masked:  # prune_step == steps: prune at the end of the stage
            st.model = st.model.prune()
        return st.model, step, False


def _check_resumable(saved: dict[str, Any], current: dict[str, Any]) -> None:
    for key in ("stages", "batch_size", "seed"):
        if json.loads(json.dumps(current[key])) != saved[key]:
            raise ValueError(
                f"cannot resume: {key} differs from the checkpoint's ({saved[key]!r} there, "
                f"{current[key]!r} now); an exact resume needs the same {key}"
            )


def _mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        value = value.detach().float().clone()
        dist.all_reduce(value)
        value /= world_size
    return float(value)


def build_evaluator(
    config: EvalConfig, *, tokenizer: Callable, preprocess: Callable, device: torch.device
) -> Callable[[nn.Module], float]:
    """Zero-shot top-1 on a class-per-folder tree, a CSV of (filepath, label) or the demo set."""
    from tinyclip_fast.data import zero_shot

    if config.kind == "demo":
        from tinyclip_fast.demo.data import load_demo_split

        return load_demo_split(config.path or "auto", "test").evaluator(device, config.batch_size)
    if config.path is None:
        raise ValueError("eval.path is required for eval.kind 'folder' and 'csv'")
    if tokenizer is None or preprocess is None:
        raise ValueError("zero-shot evaluation needs the teacher's tokenizer and preprocess")
    if config.kind == "folder":
        images, names = zero_shot.load_image_folder(config.path, preprocess)
    elif config.kind == "csv":
        images, names = zero_shot.load_labelled_csv(config.path, preprocess), None
    else:
        raise ValueError(f"eval.kind must be folder, csv or demo, got {config.kind!r}")
    if config.class_names is not None:
        names = zero_shot.load_names(config.class_names)
    if names is None:
        raise ValueError("eval.kind 'csv' needs eval.class_names (a file, one name per line)")
    templates = (
        zero_shot.load_names(config.templates)
        if config.templates is not None
        else list(zero_shot.DEFAULT_TEMPLATES)
    )
    return zero_shot.ZeroShotEvaluator(
        images, None, names, templates, tokenizer, device, config.batch_size
    )


def dataset_defaults(teacher: nn.Module, seed: int) -> dict[str, Any]:
    """Synthetic/demo data shaped for the teacher (image size, context length, vocabulary)."""
    size = teacher.visual.image_size
    return {
        "image_size": size[0] if isinstance(size, (tuple, list)) else size,
        "context_length": teacher.context_length,
        "vocab_size": teacher.vocab_size,
        "seed": seed,
    }


def distill(
    config: DistillConfig,
    *,
    teacher: nn.Module | None = None,
    student: nn.Module | None = None,
    train_dataset: torch.utils.data.Dataset | None = None,
    evaluator: Callable[[nn.Module], float] | None = None,
    tokenizer: Callable | None = None,
    preprocess: Callable | None = None,
    device: str | torch.device | None = None,
) -> DistillResult:
    """Distil ``teacher`` into a student through ``config.stages``; see :class:`DistillConfig`.

    Anything not passed is built from ``config``: the teacher from config.teacher, the data
    from config.data, the evaluator from config.eval. ``student`` replaces stage 0's
    construction: trained as given (manual/scratch), or masked then pruned (auto).
    ``evaluator(model) -> top1`` runs every config.eval.every steps and after each stage.
    Loss per step: distill_weight * L_dist + contrastive_weight * L_clip (SPEC 2).
    Checkpoints, metrics.jsonl and the final ``student/`` export go to config.out_dir;
    ``config.resume`` continues a run there exactly (same data order, same RNG).
    """
    config.validate()
    if config.loss.distill_weight + config.loss.contrastive_weight <= 0:
        raise ValueError("loss.distill_weight + loss.contrastive_weight must be > 0")
    rank, world_size, created_group = _init_distributed(device or config.device)
    try:
        device = _resolve_device(device or config.device)
        _check_attention(config.attention, device)
        if config.batch_size % world_size:
            raise ValueError(
                f"batch_size {config.batch_size} is not divisible by the world size {world_size}"
            )
        resume = None
        if config.resume:
            resume = load_training_state(Path(config.out_dir) / CHECKPOINT_NAME)
        torch.manual_seed(config.seed + rank)
        eval_preprocess = preprocess
        if teacher is None:
            teacher, built_tokenizer, train_tf, eval_tf = build_teacher(config.teacher)
            tokenizer = tokenizer or built_tokenizer
            # Cached teacher embeddings are those of un-augmented images.
            preprocess = preprocess or (eval_tf if config.teacher.cache else train_tf)
            eval_preprocess = eval_preprocess or eval_tf
        teacher = teacher.to(device).eval().requires_grad_(False)
        if train_dataset is None:
            data_cfg = {**dataset_defaults(teacher, config.seed), **config.data.as_dict()}
            train_dataset = build_dataset(data_cfg, preprocess=preprocess, tokenizer=tokenizer)
        if evaluator is None and config.eval.every > 0:
            evaluator = build_evaluator(
                config.eval, tokenizer=tokenizer, preprocess=eval_preprocess, device=device
            )
        runner = _Distiller(config, teacher, train_dataset, evaluator, device, rank, world_size)
        return runner.run(student, resume)
    finally:
        if created_group:
            dist.destroy_process_group()
