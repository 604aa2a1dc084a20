"""The distillation loop: stages -> student -> steps -> checkpoints, nanoGPT-style.

:func:`distill` runs every stage of ``config.stages`` against the ORIGINAL teacher (SPEC 4),
or an ensemble of up to four (train/teachers.py: inheritance reads the first). A step:
teacher features (online under no_grad, read from the embedding cache, or carried by a
reinforced batch: train/reinforced_run.py, no teacher forward at all), student features,
the fused loss (train/objective.py: affinity mimicking, or the sigmoid family with a learned
student logit bias), backward (``step.train_step``, exact GradCache
accumulation), grad-norm clip, AdamW, cosine schedule. Automatic-inheritance stages add the
hard-concrete masks and the sparsity Lagrangian until ``prune_step``, then prune and continue
on the compact student: its optimizer keeps the AdamW moments of the kept channels and the
learning rate ramps up again; a line and a metrics record say how far the masks got
("pruned at step K: expected sparsity X of target S, params A -> B"). Hard-concrete masks
are drawn from a generator seeded by the step (``MaskedCLIP.fix_mask_sample``): every
micro-batch, both GradCache passes and every DDP rank use one mask sample per step, as one
forward over the whole batch would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm

from tinyclip_fast.data.datasets import build_dataset
from tinyclip_fast.data.loader import BadSampleLog, make_loader
from tinyclip_fast.data.reinforced import ReinforcedStream
from tinyclip_fast.inheritance.student_io import save_student
from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.pruning.sparsity import SparsityController
from tinyclip_fast.train.attention import check_attention, xformers_attention
from tinyclip_fast.train.checkpoint import (
    load_training_state,
    pack_student,
    save_training_state,
    unpack_student,
)
from tinyclip_fast.train.config import DistillConfig, StageConfig
from tinyclip_fast.train.evaluation import build_evaluator
from tinyclip_fast.train.objective import build_objective
from tinyclip_fast.train.optim import carry_optimizer_state, learning_rate, make_optimizer
from tinyclip_fast.train.reinforced_run import (
    StoredTeacher,
    is_reinforced_batch,
    register_reinforced_kinds,
)
from tinyclip_fast.train.run_folder import (
    CHECKPOINT_NAME,
    bad_samples_name,
    check_run_folder,
    cut_jsonl,
    remove_run_files,
)
from tinyclip_fast.train.runtime import (
    MetricsLog,
    StopFlag,
    all_rng_states,
    check_device,
    gather_objects,
    init_distributed,
    mean_over_ranks,
    resolve_device,
    resolve_precision,
)
from tinyclip_fast.train.step import set_rng_state, train_step
from tinyclip_fast.train.students import (
    add_logit_bias,
    count_parameters,
    relative_sparsity,
    sparsity_of_teacher,
    stage_student,
    teacher_prunable_params,
)
from tinyclip_fast.train.teacher import own_logit_bias
from tinyclip_fast.train.teachers import (
    TeacherLossArgs,
    build_teachers,
    check_teacher_count,
    teacher_biases,
    teacher_embeddings,
)

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# An auto stage that pruned at less than this share of its target gets a warning line.
FAR_BELOW_TARGET = 0.8


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    history: {"step", "stage", "loss", "lr", "images_per_s"[, "sparsity", "penalty",
        "bad_samples"]} every log_every steps, {"step", "stage", "top1"} after every
        evaluation, and {"step", "stage", "event": "pruned", "expected_sparsity",
        "target_sparsity", "params_before", "params_after"} when an auto stage prunes.
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
# The loop.


@dataclass
class _StageState:
    """What one stage trains and how; everything a checkpoint must restore."""

    model: nn.Module  # CLIP, or MaskedCLIP before pruning
    optimizer: torch.optim.Optimizer | None  # None: a stage pruned at its end, nothing to carry
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
        precision: str,
        teachers: list[nn.Module],
        dataset: torch.utils.data.Dataset,
        evaluator: Callable[[nn.Module], float] | None,
        device: torch.device,
        rank: int,
        world_size: int,
    ) -> None:
        self.config, self.evaluator = config, evaluator
        self.teachers, self.teacher = teachers, teachers[0]  # inheritance reads the first
        self.device, self.rank, self.world_size = device, rank, world_size
        self.precision = precision
        self.dataset = dataset
        self.local_batch = config.batch_size // world_size
        self.micro_batch = config.micro_batch_size or self.local_batch
        self.out_dir = Path(config.out_dir)
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME
        self.progress: tqdm | None = None
        self.cache = None
        if config.teacher.cache is not None:
            from tinyclip_fast.train.teacher_cache import TeacherEmbeddingCache

            if isinstance(dataset, IterableDataset):
                raise ValueError(
                    "--teacher-cache needs map-style data (csv, demo, in-memory tensors): a "
                    "webdataset stream has no dataset-wide sample index to look rows up by"
                )
            # Refuses a cache built on other samples (or in another order) or by another teacher.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.cache = TeacherEmbeddingCache.load(
                    config.teacher.cache, teacher=teachers, dataset=dataset, device=device
                )
            for warning in caught:
                self.say(f"warning: {warning.message}")
        self.loss_fn = build_objective(config.loss)
        self.sigmoid = config.loss.family == "sigmoid"
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.stored_teacher = None
        if isinstance(dataset, ReinforcedStream) and self.cache is None:
            self.stored_teacher = StoredTeacher(dataset, self.teacher, device, self.say)
        # The loss's teachers: those of the embedding cache, of the reinforced data, or online.
        if self.stored_teacher is not None:
            own_scales, own_biases = self.stored_teacher.logit_scales, self.stored_teacher.biases
        elif self.cache is not None:
            own_scales, own_biases = self.cache.logit_scales, self.cache.logit_biases
        else:
            own_scales = [t.logit_scale.detach().float() for t in teachers]
            own_biases = [own_logit_bias(t) for t in teachers]
        self.fixed_scale = None
        if config.loss.fixed_scale is not None:
            self.fixed_scale = torch.tensor(float(config.loss.fixed_scale), device=device)
            teacher_scales = [self.fixed_scale] * len(own_scales)
        else:
            teacher_scales = [torch.as_tensor(s, device=device).exp() for s in own_scales]
        teacher_bias = None
        if self.sigmoid:
            teacher_bias = teacher_biases(config.teacher_configs(), own_biases, self.say)
        self.targets = TeacherLossArgs(teacher_scales, teacher_bias, device)
        self.max_logit_scale = math.log(config.loss.max_scale)
        self.bad_samples = None
        if config.data.skip_bad_samples:
            self.bad_samples = BadSampleLog(
                self.out_dir / bad_samples_name(rank),
                config.data.max_bad_fraction,
                announce=self.say,
            )
        self.log: MetricsLog | None = None
        self.history: list[dict[str, Any]] = []
        self.stage_params: list[int] = []
        self.checkpoint_step: int | None = None  # the step of the last checkpoint written
        self._teacher_prunable: int | None = None

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

    def teacher_features(self, batch: dict[str, torch.Tensor]) -> tuple[object, ...]:
        """(I_t, T_t, b[, c]) of a local batch (lists for an ensemble): cached rows, the
        batch's stored embeddings, or the frozen teachers in micro-batches."""
        if self.stored_teacher is not None and is_reinforced_batch(batch):
            return self.targets.pack(*self.stored_teacher(batch))
        if self.cache is not None:
            return self.targets.pack(*self.cache.lookup_all(batch["index"]))
        features = [
            teacher_embeddings(t, batch["image"], batch["text"], self.micro_batch, self.autocast)
            for t in self.teachers
        ]
        return self.targets.pack([f[0] for f in features], [f[1] for f in features])

    def new_stage_state(self, stage: StageConfig, model: nn.Module) -> _StageState:
        model = model.to(self.device).train()
        if self.fixed_scale is not None:
            model.logit_scale.requires_grad_(False)
        state = _StageState(model, make_optimizer(model, self.config))
        if isinstance(model, MaskedCLIP):
            target = relative_sparsity(stage, model, self.teacher)
            state.controller = SparsityController(target, warmup_steps=stage.target_warmup).to(
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

    def save(self, stage_index: int, stage_step: int, step: int, st: _StageState) -> None:
        """Resumable state at ``stage_step`` of stage ``stage_index``; at the stage's last step
        it is the finished stage (without optimizer state when it pruned at its end)."""
        rng = all_rng_states(self.device, self.world_size)
        bad = None
        if self.bad_samples is not None:
            bad = gather_objects(self.bad_samples.state_dict(), self.world_size)
        self.checkpoint_step = step
        if self.rank != 0:
            return
        state = {
            "stage": stage_index,
            "stage_step": stage_step,
            "step": step,
            "student": pack_student(st.model),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "history": self.history,
            "stage_params": self.stage_params,
            "config": json.dumps(self.config.to_dict()),
        }
        if bad is not None:
            state["bad_samples"] = bad
        if st.optimizer is not None:
            state["optimizer"] = st.optimizer.state_dict()
        if st.masked:
            state["controller"] = st.controller.state_dict()
            state["mask_optimizer"] = st.mask_optimizer.state_dict()
            state["multiplier_optimizer"] = st.multiplier_optimizer.state_dict()
        save_training_state(self.checkpoint_path, state)

    def say(self, message: str) -> None:
        """One line on rank 0 (above the progress bar when there is one)."""
        if self.rank != 0:
            return
        if self.progress is not None:
            self.progress.write(message)
        else:
            print(message, flush=True)

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
            # Rebuilding the student draws random inits: restore the RNG only afterwards.
            student = unpack_student(resume["student"])
            self.history, self.stage_params = resume["history"], resume["stage_params"]
            rng = resume["rng"]
            if len(rng) != self.world_size:
                raise ValueError(
                    f"checkpoint was written by {len(rng)} ranks, this run has {self.world_size}"
                )
            set_rng_state(rng[self.rank], self.device)
            self.scaler.load_state_dict(resume["scaler"])
            self.checkpoint_step = step
            if self.bad_samples is not None:
                cut_jsonl(self.bad_samples.path, step)
                if resume.get("bad_samples"):
                    self.bad_samples.load_state_dict(resume["bad_samples"][self.rank])
        self.log = MetricsLog(self.out_dir, self.rank == 0, resume_step=step if resume else None)
        loader = make_loader(
            self.dataset,
            self.local_batch,
            seed=config.seed,
            start_step=step,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=config.num_workers,
            bad_samples=self.bad_samples,
        )
        self.say(
            f"distilling on {self.device} in {self.precision}: {len(config.stages)} stage(s), "
            f"{config.total_steps} steps, batch {config.batch_size}; run folder {self.out_dir}"
            + (f" (resumed at step {step})" if resume else "")
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
            with StopFlag() as stop:
                for stage_index in range(first_stage, len(config.stages)):
                    stage = config.stages[stage_index]
                    resumed = resume if resume and stage_index == first_stage else None
                    st, step, interrupted = self.run_stage(
                        stage_index, stage, student, step, loader, stop, resumed
                    )
                    student = st.model
                    if interrupted:
                        result.interrupted = True
                        break
                    self.stage_params[stage_index:] = [count_parameters(student)]
                    self.evaluate(student, stage_index, step)
                    self.save(stage_index, stage.steps, step, st)
        finally:
            self.progress.close()
            self.progress = None
            self.log.close()
        if self.bad_samples is not None and self.bad_samples.bad:
            self.say(
                f"skipped {self.bad_samples.bad} bad samples of {self.bad_samples.read} read "
                f"(rank 0's are in {self.bad_samples.path})"
            )
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
        stop: StopFlag,
        resume: dict[str, Any] | None,
    ) -> tuple[_StageState, int, bool]:
        """Train one stage; returns (its final state, global step, interrupted)."""
        config = self.config
        stage_step = resume["stage_step"] if resume else 0
        if stage_step > 0:
            model = student  # the checkpoint holds the stage's model in training
        elif stage_index == 0 and student is not None and stage.kind != "continue":
            model = MaskedCLIP(student) if stage.kind == "auto" else student
        else:
            model = stage_student(stage, self.teacher, student, config.seed)
        loss = config.loss
        if self.sigmoid and add_logit_bias(model, loss.init_logit_scale, loss.init_logit_bias):
            self.say(
                f"stage {stage_index}: the student gets a logit bias for the sigmoid loss: bias "
                f"{loss.init_logit_bias:g}, scale exp({loss.init_logit_scale:.4g}) (open_clip's "
                "SigLIP initialisation)"
            )
        st = self.new_stage_state(stage, model)
        if stage_step > 0:
            self.restore_stage(st, stage, stage_index, stage_step, resume)
        elif config.optim.warmup_steps >= stage.steps:
            self.say(
                f"warning: --warmup-steps {config.optim.warmup_steps} >= stage {stage_index}'s "
                f"{stage.steps} steps: the rate never reaches --lr {config.optim.lr:g}"
            )
        prune_step = stage.mask_steps
        pruned_at = prune_step if stage.kind == "auto" else None
        schedule = self.schedule_config(stage, pruned_at)
        wrapped = self.wrap(st.model)
        tick, images_seen = time.perf_counter(), 0

        while stage_step < stage.steps:
            if st.masked and stage_step == prune_step:
                pruned = self.new_stage_state(stage, self.prune(st.model, stage, stage_index, step))
                carry_optimizer_state(st.model, st.optimizer, pruned.model, pruned.optimizer)
                st = pruned
                wrapped = self.wrap(st.model)
            lr = learning_rate(stage_step, stage.steps, schedule, pruned_at)
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
                with_bias=self.sigmoid,
            )
            penalty = sparsity = None
            if st.masked:
                sparsity = st.model.expected_sparsity()
                penalty = st.controller(sparsity, stage_step)
                self.scaler.scale(penalty).backward()
            loss_value = mean_over_ranks(loss, self.world_size)
            if not math.isfinite(loss_value):
                raise FloatingPointError(self.non_finite_message(loss_value, step + 1, stage_index))
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
                if self.bad_samples is not None:
                    record["bad_samples"] = self.bad_samples.bad
                self.record(record)
                self.progress.set_postfix(
                    loss=f"{loss_value:.4f}", img_s=f"{record['images_per_s']:.0f}"
                )
                tick, images_seen = time.perf_counter(), 0
            self.progress.update(1)
            if config.eval.every and step % config.eval.every == 0:
                tick += self.evaluate(st.model, stage_index, step)  # images/s of training only
            if stop.agreed(self.world_size, self.device):
                self.save(stage_index, stage_step, step, st)
                self.say(
                    f"stopped by signal at step {step}; checkpoint saved to "
                    f"{self.checkpoint_path}; continue with --resume"
                )
                return st, step, True
            if config.save_every and step % config.save_every == 0 and stage_step < stage.steps:
                start = time.perf_counter()
                self.save(stage_index, stage_step, step, st)
                tick += time.perf_counter() - start

        if st.masked:  # prune_step == steps: prune at the end of the stage, nothing to carry
            st = _StageState(self.prune(st.model, stage, stage_index, step), optimizer=None)
        return st, step, False

    def restore_stage(
        self,
        st: _StageState,
        stage: StageConfig,
        stage_index: int,
        stage_step: int,
        resume: dict[str, Any],
    ) -> None:
        """Load a checkpoint's optimizer and mask states into ``st`` (a resumed stage)."""
        saved_steps = json.loads(resume["config"])["stages"][stage_index]["steps"]
        if "optimizer" not in resume:
            if stage_step < stage.steps:
                raise ValueError(
                    f"cannot extend stage {stage_index} past its step {stage_step}: it pruned "
                    "its student at its last step, so no optimizer state was kept; add a stage "
                    "that trains its student on (a [[stages]] entry with steps only)"
                )
            return
        st.optimizer.load_state_dict(resume["optimizer"])
        if st.masked:
            st.controller.load_state_dict(resume["controller"])
            st.mask_optimizer.load_state_dict(resume["mask_optimizer"])
            st.multiplier_optimizer.load_state_dict(resume["multiplier_optimizer"])
        if stage.steps != saved_steps:
            self.say(
                f"extending stage {stage_index} from {saved_steps} to {stage.steps} steps (at "
                f"its step {stage_step}): its cosine schedule now ends at step {stage.steps}"
            )

    def schedule_config(self, stage: StageConfig, pruned_at: int | None) -> DistillConfig:
        """The config the learning-rate schedule reads: the re-warm-up after pruning takes at
        most a quarter of the stage's steps left after pruning."""
        if pruned_at is None or pruned_at >= stage.steps:
            return self.config
        optim = self.config.optim
        warmup = min(optim.prune_warmup_steps, max(1, (stage.steps - pruned_at) // 4))
        return dataclasses.replace(
            self.config, optim=dataclasses.replace(optim, prune_warmup_steps=warmup)
        )

    def prune(
        self, masked: MaskedCLIP, stage: StageConfig, stage_index: int, step: int
    ) -> nn.Module:
        """The compact student of ``masked``; says (and records) how far the masks got."""
        if self._teacher_prunable is None:
            self._teacher_prunable = teacher_prunable_params(self.teacher)
        expected = sparsity_of_teacher(masked, self._teacher_prunable)
        before = count_parameters(masked.model)
        pruned = masked.prune()
        after = count_parameters(pruned)
        self.record(
            {
                "step": step,
                "stage": stage_index,
                "event": "pruned",
                "expected_sparsity": expected,
                "target_sparsity": stage.sparsity,
                "params_before": before,
                "params_after": after,
            }
        )
        self.say(
            f"stage {stage_index}: pruned at step {step}: expected sparsity {expected:.1%} of "
            f"target {stage.sparsity:.1%}, params {before:,} -> {after:,}"
        )
        if expected < FAR_BELOW_TARGET * stage.sparsity:
            self.say(
                f"warning: stage {stage_index} pruned far below its target sparsity: the masks "
                f"had {stage.mask_steps} steps at --mask-lr {self.config.optim.mask_lr:g} and "
                f"--lagrangian-lr {self.config.optim.lagrangian_lr:g}; raise these or "
                "--prune-step"
            )
        return pruned

    def record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self.log.write(record)

    def non_finite_message(self, value: float, step: int, stage_index: int) -> str:
        advice = "lower --lr, use bf16 instead of fp16, or check the data"
        head = (
            f"loss is {value} at step {step} (stage {stage_index}); stopped before updating "
            "the weights."
        )
        if self.checkpoint_step is None:
            every = self.config.save_every
            first = f"the first was due at step {every}" if every else "--save-every is 0"
            return (
                f"{head} No checkpoint was written yet ({first}): {advice}, then start again "
                "with --overwrite"
            )
        return (
            f"{head} The checkpoint of step {self.checkpoint_step} ({self.checkpoint_path}) is "
            f"intact: {advice}, then continue with --resume"
        )


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], resume: dict) -> None:
    """Refuse a resume that cannot continue the checkpoint's run: the same stages, batch and
    seed, except that the last stage may get more steps (extending a run)."""
    for key in ("batch_size", "seed"):
        if json.loads(json.dumps(current[key])) != saved[key]:
            raise ValueError(
                f"cannot resume: {key} differs from the checkpoint's ({saved[key]!r} there, "
                f"{current[key]!r} now); an exact resume needs the same {key}"
            )
    before, now = saved["stages"], json.loads(json.dumps(current["stages"]))
    last = len(before) - 1
    same_but_steps = len(now) == len(before) and all(
        a == b if i < last else {**a, "steps": 0} == {**b, "steps": 0}
        for i, (a, b) in enumerate(zip(before, now, strict=True))
    )
    if not same_but_steps:
        raise ValueError(
            "cannot resume: stages differ from the checkpoint's; a resume continues the same "
            "stages, and only the last stage's steps may change (to extend a finished run). "
            f"The checkpoint's stages: {before}"
        )
    done = resume["stage_step"] if resume["stage"] == last else 0
    if now[last]["steps"] < done:
        raise ValueError(
            f"cannot resume: the last stage is at its step {done}, past the {now[last]['steps']} "
            "steps given now"
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
    teacher: nn.Module | list[nn.Module] | None = None,
    student: nn.Module | None = None,
    train_dataset: torch.utils.data.Dataset | None = None,
    evaluator: Callable[[nn.Module], float] | None = None,
    tokenizer: Callable | None = None,
    preprocess: Callable | None = None,
    device: str | torch.device | None = None,
) -> DistillResult:
    """Distil ``teacher`` into a student through ``config.stages``; see :class:`DistillConfig`.

    ``teacher`` may be a list of 1..4 teachers (an ensemble; inheritance reads the first, all
    read the same inputs). Anything not passed is built from ``config``: the teachers from
    config.teacher / config.teachers, the data
    from config.data, the evaluator from config.eval. ``student`` replaces stage 0's
    construction: trained as given (manual/scratch), or masked then pruned (auto).
    ``evaluator(model) -> top1`` runs every config.eval.every steps and after each stage.
    Loss per step: (1 - w) L_dist + w L_clip with w = config.loss.contrastive_weight (SPEC 2),
    of config.loss.family (softmax affinity mimicking, or sigmoid: train/objective.py).
    Checkpoints, metrics.jsonl and the final ``student/`` export go to config.out_dir, which
    must not hold another run's files unless ``config.overwrite`` (they are replaced);
    ``config.resume`` continues the run there exactly (same data order, same RNG), its
    metrics cut back to the checkpoint's step; the last stage may be given more steps.
    Precision None: bf16 autocast on CUDA, fp32 on the CPU.
    """
    config.validate()
    if train_dataset is None:
        config.data.require()
    check_device(device or config.device)
    rank, world_size, created_group = init_distributed(device or config.device)
    try:
        device = resolve_device(device or config.device)
        precision = resolve_precision(config.precision, device)
        check_attention(config.attention, device)
        if config.batch_size % world_size:
            raise ValueError(
                f"batch_size {config.batch_size} is not divisible by the world size {world_size}"
            )
        out_dir = Path(config.out_dir)
        resume = None
        if config.resume:
            resume = load_training_state(out_dir / CHECKPOINT_NAME)
            _check_resumable(json.loads(resume["config"]), config.to_dict(), resume)
        else:
            found = check_run_folder(out_dir, config.overwrite)
            if rank == 0:
                remove_run_files(found)
            if config.overwrite and world_size > 1:
                dist.barrier()  # no rank writes before rank 0 has cleared the folder
        torch.manual_seed(config.seed + rank)
        eval_preprocess = preprocess
        if teacher is None:
            teachers, built_tokenizer, train_tf, eval_tf = build_teachers(config.teacher_configs())
            tokenizer = tokenizer or built_tokenizer
            # Cached teacher embeddings are those of un-augmented images.
            preprocess = preprocess or (eval_tf if config.teacher.cache else train_tf)
            eval_preprocess = eval_preprocess or eval_tf
        else:
            teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
            check_teacher_count(len(teachers))
        teachers = [t.to(device).eval().requires_grad_(False) for t in teachers]
        teacher = teachers[0]
        if train_dataset is None:
            register_reinforced_kinds()
            data_cfg = {
                **dataset_defaults(teacher, config.seed),
                **config.reinforced.data_options(),
                **config.data.as_dict(),
            }
            train_dataset = build_dataset(data_cfg, preprocess=preprocess, tokenizer=tokenizer)
        if evaluator is None and config.eval.enabled:
            evaluator = build_evaluator(
                config.eval, tokenizer=tokenizer, preprocess=eval_preprocess, device=device
            )
        runner = _Distiller(
            config, precision, teachers, train_dataset, evaluator, device, rank, world_size
        )
        return runner.run(student, resume)
    finally:
        if created_group:
            dist.destroy_process_group()
