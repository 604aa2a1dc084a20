"""The distillation run: :func:`distill` assembles the parts, then the loop trains stage after
stage, nanoGPT-style.

Every stage of ``config.stages`` distils from the ORIGINAL teacher (docs/method.md §4), or an
ensemble of up to four (inheritance reads the first). The parts, each with one job:

- teachers/: the frozen teachers and the :class:`TeacherTargets` of a batch (online, the
  per-sample embedding cache, or the embeddings a reinforced batch carries);
- train/stage.py: the :class:`Stage` (model, AdamW, sparsity controller) that steps and
  prunes itself;
- train/run_output.py: lines, metrics records, progress, evaluation and its plot;
- train/checkpoint.py: the :class:`TrainingState` written every save_every steps, and read
  back by an exact resume.

A step: learning rate, batch, teacher targets, forward + backward (exact GradCache
accumulation, the fused loss of train/objective.py), the sparsity penalty of a masked stage,
the finite check, the optimizer step, then log / evaluate / checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tinyclip_fast.data.augment import AugmentRecipe
from tinyclip_fast.data.datasets import CsvPairDataset, WebDatasetPairs, build_dataset
from tinyclip_fast.data.decode import CropDecoder, resolve_decode
from tinyclip_fast.data.device_augment import DeviceAugment
from tinyclip_fast.data.feed import DeviceFeed
from tinyclip_fast.data.loader import (
    BadSampleLog,
    check_batch_settings,
    default_workers,
    make_loader,
)
from tinyclip_fast.data.reinforced import ReinforcedStream
from tinyclip_fast.inheritance.student_io import check_export_format, save_student
from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.teachers.embedding_cache import teacher_fingerprint
from tinyclip_fast.teachers.factory import build_targets
from tinyclip_fast.teachers.loading import build_teachers, check_teacher_count, dataset_defaults
from tinyclip_fast.teachers.reinforced_targets import register_reinforced_kinds
from tinyclip_fast.teachers.targets import TeacherTargets
from tinyclip_fast.train.attention import check_attention
from tinyclip_fast.train.checkpoint import Checkpointer, TrainingState, unpack_student
from tinyclip_fast.train.config import DistillConfig, StageConfig
from tinyclip_fast.train.evaluation import Evaluator, build_evaluator
from tinyclip_fast.train.objective import build_objective
from tinyclip_fast.train.resume_check import check_resume
from tinyclip_fast.train.run_folder import (
    CHECKPOINT_NAME,
    STUDENT_DIR,
    STUDENT_HF_DIR,
    bad_samples_name,
    check_run_folder,
    cut_jsonl,
    remove_run_files,
    write_run_config,
)
from tinyclip_fast.train.run_lock import RunFolderLocked, RunLock
from tinyclip_fast.train.run_output import RunOutput
from tinyclip_fast.train.runtime import (
    StopFlag,
    autocast_factory,
    broadcast_object,
    check_device,
    init_distributed,
    mean_over_ranks,
    resolve_device,
    resolve_precision,
    set_threads,
)
from tinyclip_fast.train.stage import Stage, StageContext
from tinyclip_fast.train.step import set_rng_state
from tinyclip_fast.train.students import (
    add_logit_bias,
    count_parameters,
    export_hf,
    stage_student,
)


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    history: {"step", "stage", "loss", "lr", "images_per_s", "data_wait_ms",
        "data_wait_share"[, "sparsity", "penalty", "bad_samples"]} every log_every steps,
        {"step", "stage", METRIC: value...} after every evaluation ("top1" for zero-shot, the
        recall@k of retrieval), and {"step", "stage", "event": "pruned", "expected_sparsity",
        "target_sparsity", "target_miss", "prune_reason", "params_before", "params_after"}
        when an auto stage prunes (target_miss: "under", "over" or None).
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


@dataclass
class _Run:
    """The parts of one run, as :func:`distill` assembled them."""

    config: DistillConfig
    precision: str
    rank: int
    world_size: int
    dataset: torch.utils.data.Dataset
    output: RunOutput
    targets: TeacherTargets
    ctx: StageContext
    checkpoints: Checkpointer
    bad_samples: BadSampleLog | None
    fingerprints: list[str]
    stage_params: list[int] = field(default_factory=list)
    tokenizer: Callable | None = None  # the student's (the teachers'): for export_hf
    augment: DeviceAugment | None = None  # the device half of the split image pipeline

    def save(self, stage: Stage, stage_step: int, step: int) -> None:
        self.checkpoints.save(
            stage=stage.index,
            stage_step=stage_step,
            step=step,
            model=stage.model,
            optimizer_states=stage.state_dicts(),
            scaler=self.ctx.scaler,
            history=self.output.history,
            stage_params=self.stage_params,
            config=self.config.to_dict(),
            teacher_fingerprints=self.fingerprints,
        )


def distill(
    config: DistillConfig,
    *,
    teacher: nn.Module | list[nn.Module] | None = None,
    student: nn.Module | None = None,
    train_dataset: torch.utils.data.Dataset | None = None,
    evaluator: Evaluator | None = None,
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
    ``evaluator(model) -> top1`` (or a dict of named metrics) runs every config.eval.every
    steps and after each stage.
    Loss per step: (1 - w) L_dist + w L_clip with w = config.loss.contrastive_weight
    (docs/method.md §2), of config.loss.family (softmax affinity mimicking, or sigmoid:
    train/objective.py).
    Checkpoints, config.json, metrics.jsonl, progress.png and the final ``student/`` export
    (and ``student-hf/``, a transformers CLIPModel folder, with config.export_hf) go to
    config.out_dir, which rank 0 locks for the run (:class:`RunLock`; another run's lock is a
    :class:`RunFolderLocked` naming it) and which must not hold another run's files unless
    ``config.overwrite`` (they are replaced); ``config.resume`` continues the run there exactly
    (same data order, same RNG), its metrics cut back to the checkpoint's step, and refuses
    what changes the training (train/resume_check.py: the whole config and the teachers'
    fingerprints); the last stage may be given more steps.
    Precision None: bf16 autocast on CUDA, fp32 on the CPU.
    """
    config.validate()
    if train_dataset is None:
        config.data.require()
    if config.export_hf:
        check_export_format("hf")  # transformers missing: say so now, not after training
    check_device(device or config.device)
    rank, world_size, created_group = init_distributed(device or config.device)
    lock = RunLock(config.out_dir) if rank == 0 else None
    try:
        _take_lock(lock, world_size)
        device = resolve_device(device or config.device)
        set_threads(config.threads)
        precision = resolve_precision(config.precision, device)
        check_attention(config.attention, device)
        check_batch_settings(config.batch_size, world_size)
        resume = _open_run_folder(config, rank, world_size)
        torch.manual_seed(config.seed + rank)
        eval_preprocess, train_tf, augment = preprocess, None, None
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
        fingerprints = [teacher_fingerprint(t) for t in teachers]
        changes = _check_resume(resume, config, fingerprints) if resume is not None else None
        if train_dataset is None:
            train_dataset, augment = _build_data(
                config, teachers[0], preprocess, train_tf, tokenizer, device
            )
        if hasattr(train_dataset, "__len__") and not isinstance(
            train_dataset, torch.utils.data.IterableDataset
        ):
            check_batch_settings(config.batch_size, world_size, num_samples=len(train_dataset))
        if evaluator is None and config.eval.enabled:
            evaluator = build_evaluator(
                config.eval, tokenizer=tokenizer, preprocess=eval_preprocess, device=device
            )
        if rank == 0:
            write_run_config(config.out_dir, config.to_dict())
        run = _assemble(
            config,
            precision,
            teachers,
            fingerprints,
            train_dataset,
            evaluator,
            device,
            rank,
            world_size,
        )
        run.tokenizer, run.augment = tokenizer, augment
        if changes:
            run.output.say(changes)
        return _train(run, student, resume)
    finally:
        if lock is not None:
            lock.release()
        if created_group:
            dist.destroy_process_group()


def _check_resume(
    resume: TrainingState, config: DistillConfig, fingerprints: list[str]
) -> str | None:
    """Refuse a resume that changes what the checkpoint's run trains; the line naming the
    changes it allows (None: none)."""
    last = len(config.stages) - 1
    return check_resume(
        json.loads(resume.config),
        config.to_dict(),
        done_steps=resume.stage_step if resume.stage == last else 0,
        saved_fingerprints=resume.teacher_fingerprints,
        fingerprints=fingerprints,
    )


def _take_lock(lock: RunLock | None, world_size: int) -> None:
    """Rank 0 takes the run folder's lock; every rank raises when it could not (so no rank
    waits in a collective for a rank 0 that stopped)."""
    if world_size > 1:
        # Every rank has made its own checks of the folder (the command line's) before rank 0
        # takes it: a slow rank never finds its own job's lock or config.json.
        dist.barrier()
    refusal = None
    if lock is not None:
        try:
            lock.acquire()
        except RunFolderLocked as err:
            refusal = str(err)
    if world_size > 1:
        refusal = broadcast_object(refusal)
    if refusal is not None:
        raise RunFolderLocked(refusal)


def _build_data(
    config: DistillConfig,
    teacher: nn.Module,
    preprocess: Callable | None,
    train_tf: Callable | None,
    tokenizer: Callable | None,
    device: torch.device,
) -> tuple[torch.utils.data.Dataset, DeviceAugment | None]:
    """The training data of config.data shaped for ``teacher``, and the device half of its
    image pipeline (None: the loader hands finished images)."""
    register_reinforced_kinds()
    data_cfg = {
        **dataset_defaults(teacher, config.seed),
        **config.reinforced.data_options(),
        **config.data.as_dict(),
    }
    dataset = build_dataset(data_cfg, preprocess=preprocess, tokenizer=tokenizer)
    return dataset, _split_pipeline(config, dataset, train_tf, device)


def _split_pipeline(
    config: DistillConfig,
    dataset: torch.utils.data.Dataset,
    train_tf: Callable | None,
    device: torch.device,
) -> DeviceAugment | None:
    """Hand ``dataset`` the loader's half of the split image pipeline (data/decode.py) and
    return the device's half, where data.decode resolves to tensor or nvjpeg on ``device``:
    csv and webdataset data read with the teacher's training transform, reinforced and
    DataCompDR data (their stored crops)."""
    decode = resolve_decode(config.data.decode, device)
    if decode == "pil":
        return None
    if isinstance(dataset, ReinforcedStream):
        dataset.decoder = CropDecoder(dataset.recipe, decode)
        return DeviceAugment(dataset.recipe)
    plain = isinstance(dataset, (CsvPairDataset, WebDatasetPairs))
    if plain and train_tf is not None and dataset.preprocess is train_tf:
        recipe = AugmentRecipe.from_transform(train_tf)
        dataset.preprocess = CropDecoder(recipe, decode)
        return DeviceAugment(recipe)
    if config.data.decode == "auto":
        return None
    raise ValueError(
        f"data.decode {decode!r} reads reinforced and datacompdr data, and csv and webdataset "
        "data augmented by the teacher's training transform; this run's data "
        f"({config.data.kind!r}"
        f"{', un-augmented for the teacher cache' if config.teacher.cache else ''}) is "
        "decoded with PIL: use data.decode auto or pil"
    )


def _open_run_folder(config: DistillConfig, rank: int, world_size: int) -> TrainingState | None:
    """The checkpoint to resume from (checked against the run once its teachers are
    loaded), or None after clearing the run folder (--overwrite)."""
    out_dir = Path(config.out_dir)
    if config.resume:
        return TrainingState.load(out_dir / CHECKPOINT_NAME)
    found = check_run_folder(out_dir, config.overwrite)
    if rank == 0:
        remove_run_files(found)
    if config.overwrite and world_size > 1:
        dist.barrier()  # no rank writes before rank 0 has cleared the folder
    return None


def _assemble(
    config: DistillConfig,
    precision: str,
    teachers: list[nn.Module],
    fingerprints: list[str],
    dataset: torch.utils.data.Dataset,
    evaluator: Evaluator | None,
    device: torch.device,
    rank: int,
    world_size: int,
) -> _Run:
    """The parts of a run: output, teacher targets, what stages share, checkpoints."""
    out_dir = Path(config.out_dir)
    output = RunOutput(config, rank, evaluator)
    autocast = autocast_factory(device, precision, config.attention)
    micro_batch = config.micro_batch_size or config.batch_size // world_size
    fixed_scale = None
    if config.loss.fixed_scale is not None:
        fixed_scale = torch.tensor(float(config.loss.fixed_scale), device=device)
    sigmoid = config.loss.family == "sigmoid"
    targets = build_targets(
        teachers,
        dataset,
        cache_path=config.teacher.cache,
        teacher_configs=config.teacher_configs(),
        fixed_scale=fixed_scale,
        sigmoid=sigmoid,
        micro_batch=micro_batch,
        autocast=autocast,
        device=device,
        say=output.say,
    )
    ctx = StageContext(
        config=config,
        teacher=teachers[0],  # inheritance and sparsity targets read the first teacher
        device=device,
        world_size=world_size,
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        loss_fn=build_objective(config.loss),
        autocast=autocast,
        micro_batch=micro_batch,
        fixed_scale=fixed_scale,
        sigmoid=sigmoid,
    )
    bad_samples = None
    if config.data.skip_bad_samples:
        bad_samples = BadSampleLog(
            out_dir / bad_samples_name(rank), config.data.max_bad_fraction, announce=output.say
        )
    checkpoints = Checkpointer(out_dir / CHECKPOINT_NAME, device, rank, world_size, bad_samples)
    if device.type == "cpu" and precision != "fp32":
        output.say(
            f"warning: {precision} autocast on the CPU is usually several times slower than "
            "fp32 (most CPUs lack fast 16-bit matrix units): --precision fp32"
        )
    return _Run(
        config,
        precision,
        rank,
        world_size,
        dataset,
        output,
        targets,
        ctx,
        checkpoints,
        bad_samples,
        fingerprints,
    )


def _train(run: _Run, student: nn.Module | None, resume: TrainingState | None) -> DistillResult:
    """Every stage from the first (or the checkpoint's), then the student export."""
    config, output = run.config, run.output
    step = resume.step if resume else 0
    if resume:
        student = _restore(run, resume)
    device = run.ctx.device
    workers = config.num_workers
    batches = make_loader(
        run.dataset,
        config.batch_size // run.world_size,
        seed=config.seed,
        start_step=step,
        rank=run.rank,
        world_size=run.world_size,
        num_workers=default_workers(device.type) if workers is None else workers,
        bad_samples=run.bad_samples,
        pin_memory=device.type == "cuda",
    )
    loader = DeviceFeed(batches, device, run.augment)
    output.say(
        f"distilling on {run.ctx.device} in {run.precision}: {len(config.stages)} stage(s), "
        f"{config.total_steps} steps, batch {config.batch_size}; run folder {Path(config.out_dir)}"
        + (f" (resumed at step {step})" if resume else "")
    )
    result = DistillResult(history=output.history, stage_params=run.stage_params)
    first_stage = resume.stage if resume else 0
    with output.open(step, resume.step if resume else None), StopFlag() as stop:
        for index in range(first_stage, len(config.stages)):
            spec = config.stages[index]
            resumed = resume if resume and index == first_stage else None
            stage, stage_step = _start_stage(run, index, spec, student, resumed)
            stage, step, interrupted = _train_stage(run, stage, stage_step, step, loader, stop)
            student = stage.model
            if interrupted:
                result.interrupted = True
                break
            run.stage_params[index:] = [count_parameters(student)]
            output.evaluate(student, index, step)
            run.save(stage, spec.steps, step)
    bad = run.bad_samples
    if bad is not None and bad.bad:
        output.say(f"skipped {bad.bad} bad samples of {bad.read} read (rank 0's are in {bad.path})")
    if not result.interrupted and run.rank == 0:
        save_student(student, Path(config.out_dir) / STUDENT_DIR)
        if config.export_hf:
            path = Path(config.out_dir) / STUDENT_HF_DIR
            output.say(export_hf(student, path, run.tokenizer, run.ctx.teacher))
    result.student = student.eval()
    result.params = count_parameters(student)
    return result


def _restore(run: _Run, resume: TrainingState) -> nn.Module:
    """The checkpoint's student, history, RNG, GradScaler and bad-sample counts."""
    # Rebuilding the student draws random inits: restore the RNG only afterwards.
    student = unpack_student(resume.student)
    run.output.history, run.stage_params = resume.history, resume.stage_params
    if len(resume.rng) != run.world_size:
        raise ValueError(
            f"checkpoint was written by {len(resume.rng)} ranks, this run has {run.world_size}"
        )
    set_rng_state(resume.rng[run.rank], run.ctx.device)
    run.ctx.scaler.load_state_dict(resume.scaler)
    run.checkpoints.last_step = resume.step
    if run.bad_samples is not None:
        cut_jsonl(run.bad_samples.path, resume.step)
        if resume.bad_samples:
            run.bad_samples.load_state_dict(resume.bad_samples[run.rank])
    return student


def _start_stage(
    run: _Run,
    index: int,
    spec: StageConfig,
    student: nn.Module | None,
    resume: TrainingState | None,
) -> tuple[Stage, int]:
    """The stage's student (inherited, masked, from scratch, or the checkpoint's), ready to
    train from its first step or the checkpoint's; returns it with that step."""
    config, say = run.config, run.output.say
    stage_step = resume.stage_step if resume else 0
    if stage_step > 0:
        model = student  # the checkpoint holds the stage's model in training
    elif index == 0 and student is not None and spec.kind != "continue":
        model = (
            MaskedCLIP(student, mask_hidden=spec.mask_hidden) if spec.kind == "auto" else student
        )
    else:
        model = stage_student(spec, run.ctx.teacher, student, config.seed)
    loss = config.loss
    if run.ctx.sigmoid and add_logit_bias(model, loss.init_logit_scale, loss.init_logit_bias):
        say(
            f"stage {index}: the student gets a logit bias for the sigmoid loss: bias "
            f"{loss.init_logit_bias:g}, scale exp({loss.init_logit_scale:.4g}) (open_clip's "
            "SigLIP initialisation)"
        )
    stage = Stage.start(index, spec, model, run.ctx)
    if stage_step > 0:
        _restore_stage(run, stage, stage_step, resume)
    elif config.optim.warmup_steps >= spec.steps:
        say(
            f"warning: optim.warmup_steps {config.optim.warmup_steps} >= stage {index}'s "
            f"{spec.steps} steps: the rate never reaches --lr {config.optim.lr:g}"
        )
    return stage, stage_step


def _restore_stage(run: _Run, stage: Stage, stage_step: int, resume: TrainingState) -> None:
    """Load a checkpoint's optimizer and mask states into a resumed stage."""
    index, steps = stage.index, stage.spec.steps
    saved_steps = json.loads(resume.config)["stages"][index]["steps"]
    if resume.optimizer is None:
        if stage_step < steps:
            raise ValueError(
                f"cannot extend stage {index} past its step {stage_step}: it pruned "
                "its student at its last step, so no optimizer state was kept; add a stage "
                "that trains its student on (a [[stages]] entry with steps only)"
            )
        return
    stage.load_state_dicts(resume)
    if steps != saved_steps:
        run.output.say(
            f"extending stage {index} from {saved_steps} to {steps} steps (at "
            f"its step {stage_step}): its cosine schedule now ends at step {steps}"
        )


def _train_stage(
    run: _Run,
    stage: Stage,
    stage_step: int,
    step: int,
    loader: DeviceFeed,
    stop: StopFlag,
) -> tuple[Stage, int, bool]:
    """Train one stage to its last step; returns (its final stage, global step, interrupted)."""
    config, output, spec, index = run.config, run.output, stage.spec, stage.index
    output.start_timing()
    while stage_step < spec.steps:
        if stage.prunes_at(stage_step):
            stage, report = stage.prune(stage_step)
            output.pruned(report, spec, index, step)
        lr = stage.set_learning_rate(stage_step)
        batch = next(loader)
        output.data_wait(loader.wait)
        loss = stage.backward(batch, run.targets(batch), step)
        sparsity, penalty = stage.add_penalty(stage_step)
        loss_value = mean_over_ranks(loss, run.world_size)
        if not math.isfinite(loss_value):
            last, path = run.checkpoints.last_step, run.checkpoints.path
            message = output.non_finite_message(loss_value, step + 1, index, last, path)
            raise FloatingPointError(message)
        stage.optimizer_step()
        stage_step, step = stage_step + 1, step + 1
        bad = run.bad_samples.bad if run.bad_samples is not None else None
        output.step_done(step, spec, index, stage_step, loss_value, lr, sparsity, penalty, bad)
        if config.eval.every and step % config.eval.every == 0:
            output.evaluate(stage.model, index, step)
        if stop.agreed(run.world_size, run.ctx.device):
            run.save(stage, stage_step, step)
            output.say(
                f"stopped by signal at step {step}; checkpoint saved to "
                f"{run.checkpoints.path}; continue with --resume"
            )
            return stage, step, True
        if config.save_every and step % config.save_every == 0 and stage_step < spec.steps:
            with output.untimed():
                run.save(stage, stage_step, step)
    if stage.masked:  # the trigger's last step is the stage's: prune, nothing to carry
        stage, report = stage.prune_at_end()
        output.pruned(report, spec, index, step)
    return stage, step, False
