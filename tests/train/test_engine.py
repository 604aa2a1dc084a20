"""The distillation engine on tiny open_clip models (CPU, PyTorch backend).

Oracles: an uninterrupted run (resume must be bitwise equal), the whole batch at once
(GradCache accumulation), one process (2-process gloo DDP), the online teacher (cache mode).
"""

import copy
import json
import math
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from support import (
    STUDENT_CFG,
    TEXT,
    assert_same_weights,
    ensemble_reference,
    losses,
    make_config,
    make_teacher,
    run,
    sigmoid_reference,
)

from tinyclip_fast.data.datasets import SyntheticPairDataset, TensorPairDataset, WebDatasetPairs
from tinyclip_fast.data.loader import make_loader
from tinyclip_fast.data.zero_shot import ZeroShotEvaluator
from tinyclip_fast.demo.data import CompactTokenizer
from tinyclip_fast.inheritance.student_io import load_student
from tinyclip_fast.ops.affinity_loss import affinity_mimicking_loss
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.teachers.embedding_cache import TeacherEmbeddingCache
from tinyclip_fast.train.checkpoint import load_training_state
from tinyclip_fast.train.config import (
    DataConfig,
    LossConfig,
    OptimConfig,
    StageConfig,
    TeacherConfig,
)
from tinyclip_fast.train.run_folder import CHECKPOINT_NAME
from tinyclip_fast.train.run_lock import LOCK_NAME, RunFolderLocked, RunLock
from tinyclip_fast.train.students import add_logit_bias, stage_student


def test_tiny_run_loss_falls_eval_runs_and_exports(tmp_path):
    names = ["cat", "dog", "bird"]
    templates = ["a photo of a {}.", "a {}."]
    tokenizer = CompactTokenizer([t.format(n) for n in names for t in templates], 16)
    evaluator = ZeroShotEvaluator(
        torch.randn(12, 3, 32, 32), torch.arange(12) % 3, names, templates, tokenizer
    )
    teacher = make_teacher()
    before = copy.deepcopy(teacher.state_dict())
    config = make_config(
        tmp_path, [StageConfig(steps=16, student_config=STUDENT_CFG)], save_every=8
    )
    config.eval.every = 8
    result = run(config, teacher, evaluator=evaluator)

    curve = losses(result.history)
    assert len(curve) == 16 and all(torch.isfinite(torch.tensor(curve)))
    assert sum(curve[-4:]) / 4 < 0.8 * sum(curve[:4]) / 4, curve
    top1 = [h for h in result.history if "top1" in h]
    assert [h["step"] for h in top1] == [8, 16]
    assert all(0.0 <= h["top1"] <= 1.0 for h in top1)
    # The teacher is frozen and untouched.
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # Exported student (weights only) == returned student; metrics and checkpoint written.
    exported = load_student(tmp_path / "run" / "student")
    assert_same_weights(exported, result.student)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 16 + 2
    assert load_training_state(tmp_path / "run" / CHECKPOINT_NAME)["step"] == 16
    assert result.params == sum(p.numel() for p in result.student.parameters())


def _interrupt_at_call(n):
    """An evaluator that delivers SIGINT (as Ctrl-C does) at its n-th call."""
    calls = [0]

    def evaluator(model):
        calls[0] += 1
        if calls[0] == n:
            signal.raise_signal(signal.SIGINT)
        return 0.0

    return evaluator


def test_resume_after_interrupts_equals_uninterrupted_bitwise(tmp_path):
    # A manual stage, then an auto stage (masks + Lagrangian, pruned at its step 3); the run
    # is cut mid-manual (step 3), mid-mask-learning (6) and after pruning (9).
    stages = [
        StageConfig(steps=4, student_config=STUDENT_CFG),
        StageConfig(steps=6, sparsity=0.9, prune_step=3, sparsity_warmup=2),
    ]
    # A large mask learning rate, so three mask steps already prune channels.
    optim = OptimConfig(lr=1e-3, warmup_steps=2, mask_lr=2.0)
    config = make_config(tmp_path / "a", copy.deepcopy(stages), micro_batch_size=8, optim=optim)
    config.eval.every = 1  # the evaluator runs after every step
    full = run(config, evaluator=lambda model: 0.0)

    config = make_config(tmp_path / "b", copy.deepcopy(stages), micro_batch_size=8, optim=optim)
    config.eval.every = 1
    # Step 4 ends stage 0: the resume starts at a stage boundary.
    for stop, call in ((3, 3), (4, 1), (6, 2), (9, 3)):
        result = run(config, evaluator=_interrupt_at_call(call))
        assert result.interrupted
        assert load_training_state(tmp_path / "b" / "run" / CHECKPOINT_NAME)["step"] == stop
        config.resume = True
    result = run(config, evaluator=lambda model: 0.0)
    assert not result.interrupted

    assert_same_weights(result.student, full.student)
    assert losses(result.history) == losses(full.history)
    assert result.stage_params == full.stage_params
    assert full.stage_params[1] < full.stage_params[0]


# An auto stage on the tiny teacher whose masks reach 30% and hold it within 2% for 3 steps
# after about 20 steps (two-sided control, mask learning rate 0.2).
HOLDING_STAGE = StageConfig(
    steps=30, sparsity=0.3, prune_step="auto", sparsity_warmup=8, prune_hold_steps=3
)
HOLDING_OPTIM = OptimConfig(lr=1e-3, warmup_steps=2, mask_lr=0.2)


def test_auto_prune_step_prunes_where_the_target_held_and_resumes_mid_hold_bitwise(tmp_path):
    config = make_config(tmp_path / "a", [copy.deepcopy(HOLDING_STAGE)], optim=HOLDING_OPTIM)
    config.eval.every = 1
    full = run(config, evaluator=lambda model: 0.0)
    (pruned,) = [h for h in full.history if h.get("event") == "pruned"]
    at, tolerance = pruned["step"], HOLDING_STAGE.sparsity_tolerance
    assert pruned["prune_reason"] == "auto: held within 2.0% of the target for 3 steps"
    assert HOLDING_STAGE.sparsity_warmup <= at < HOLDING_STAGE.steps
    assert abs(pruned["expected_sparsity"] - 0.3) <= tolerance and pruned["target_miss"] is None
    # The expected sparsity the masks had at the steps before held too (the records of steps
    # at-1 and at carry the sparsity the trigger saw at stage steps at-2 and at-1).
    seen = {h["step"]: h["sparsity"] for h in full.history if "sparsity" in h}
    assert all(abs(seen[step] - 0.3) <= tolerance for step in (at - 1, at))

    # Cut one step before the prune: the trigger has seen one held step of three.
    config = make_config(tmp_path / "b", [copy.deepcopy(HOLDING_STAGE)], optim=HOLDING_OPTIM)
    config.eval.every = 1
    assert run(config, evaluator=_interrupt_at_call(at - 1)).interrupted
    state = load_training_state(tmp_path / "b" / "run" / CHECKPOINT_NAME)
    assert state["prune_trigger"] == {"held": 1, "asked": at - 2}
    config.resume = True
    result = run(config, evaluator=lambda model: 0.0)
    assert_same_weights(result.student, full.student)
    assert losses(result.history) == losses(full.history)
    assert [h for h in result.history if h.get("event") == "pruned"] == [pruned]
    # After the prune the checkpoint keeps the step it happened at (the re-warm-up's start).
    state = load_training_state(tmp_path / "b" / "run" / CHECKPOINT_NAME)
    assert state["pruned_at"] == at and "prune_trigger" not in state


def _two_stages(control, prune_steps):
    """Targets 25% then 50% of the teacher's prunable parameters, 30 steps each."""
    return [
        StageConfig(
            steps=30, sparsity=target, prune_step=prune, sparsity_warmup=8, sparsity_control=control
        )
        for target, prune in zip((0.25, 0.5), prune_steps, strict=True)
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "control, prune_steps",
    # The one-sided form crosses the tolerance band within a step on its way past the target:
    # it ends near it only when pruned at a fixed step just as it gets there.
    [("two_sided", ("auto", "auto")), ("one_sided", (26, 26))],
)
def test_two_auto_stages_each_end_within_the_tolerance_of_their_target(
    tmp_path, capsys, control, prune_steps
):
    config = make_config(tmp_path, _two_stages(control, prune_steps), optim=HOLDING_OPTIM)
    result = run(config)
    pruned = [h for h in result.history if h.get("event") == "pruned"]
    assert [h["target_sparsity"] for h in pruned] == [0.25, 0.5]
    for record in pruned:
        assert abs(record["expected_sparsity"] - record["target_sparsity"]) <= 0.02, record
        assert record["target_miss"] is None
    if control == "two_sided":
        assert all(h["prune_reason"].startswith("auto: held") for h in pruned)
    assert "warning" not in capsys.readouterr().out


def test_one_sided_auto_overshoots_prunes_at_its_bound_and_says_so(tmp_path, capsys):
    stage = StageConfig(
        steps=30, sparsity=0.25, prune_step="auto", sparsity_warmup=8, sparsity_control="one_sided"
    )
    result = run(make_config(tmp_path, [stage], optim=HOLDING_OPTIM))
    (pruned,) = [h for h in result.history if h.get("event") == "pruned"]
    assert pruned["step"] == 30 and pruned["target_miss"] == "over"
    assert pruned["prune_reason"] == "auto: the last allowed prune step 30"
    lines = [line for line in capsys.readouterr().out.splitlines() if "stage 0" in line]
    assert lines[0].startswith("stage 0: pruned at step 30: expected sparsity ")
    assert lines[0].endswith(" (auto: the last allowed prune step 30)")
    assert lines[1].startswith("warning: stage 0: the expected sparsity did not hold within 2.0%")
    assert lines[2].startswith("warning: stage 0 pruned above its target sparsity: expected ")


def test_progressive_auto_stages_prune_further_each_stage(tmp_path):
    # docs/method.md §4: auto -> auto, targets as fractions of the ORIGINAL teacher's
    # prunable params.
    stages = [
        StageConfig(steps=4, sparsity=0.5, prune_step=3, sparsity_warmup=2),
        StageConfig(steps=4, sparsity=0.8, prune_step=3, sparsity_warmup=2),
    ]
    optim = OptimConfig(lr=1e-3, warmup_steps=2, mask_lr=2.0)
    result = run(make_config(tmp_path, stages, optim=optim))
    teacher_params = sum(p.numel() for p in make_teacher().parameters())
    assert result.stage_params[1] < result.stage_params[0] < teacher_params
    assert all(torch.isfinite(torch.tensor(losses(result.history))))
    # Each prune is a record (and a line) saying how far the masks got.
    pruned = [h for h in result.history if h.get("event") == "pruned"]
    assert [(h["step"], h["target_sparsity"]) for h in pruned] == [(3, 0.5), (7, 0.8)]
    assert [h["params_after"] for h in pruned] == result.stage_params
    assert all(0 < h["expected_sparsity"] < 1 and h["params_after"] < h["params_before"]
               for h in pruned)  # fmt: skip


def test_accumulated_run_matches_big_batch_run(tmp_path):
    stages = [StageConfig(steps=3, student_config=STUDENT_CFG)]
    big = run(make_config(tmp_path / "a", copy.deepcopy(stages)))
    acc = run(make_config(tmp_path / "b", copy.deepcopy(stages), micro_batch_size=5))
    assert_same_weights(acc.student, big.student, tol=1e-4)
    for a, b in zip(losses(acc.history), losses(big.history), strict=True):
        assert abs(a - b) < 1e-5 * abs(b)


def _ddp_worker(rank, world_size, init_file, tmp_path, config):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        result = run(config)
        torch.save(result.student.state_dict(), tmp_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["manual", "auto", "sigmoid"])
def test_two_process_ddp_equals_one_process(tmp_path, kind):
    # auto: a manual stage, then masks sampled in training (one sample per step, the same on
    # every rank), pruned at step 3 of 4, the optimizer state carried over. (Masking the
    # teacher itself would start at the loss minimum, where gradients are rounding noise.)
    # sigmoid: the student's logit bias learned, every rank's rows against the gathered texts.
    stages = [StageConfig(steps=3, student_config=STUDENT_CFG)]
    optim = OptimConfig(lr=1e-3, warmup_steps=2)
    if kind == "auto":
        stages.append(StageConfig(steps=4, sparsity=0.9, prune_step=3, sparsity_warmup=2))
        optim = OptimConfig(lr=1e-3, warmup_steps=2, mask_lr=2.0, prune_warmup_steps=2)
    loss = LossConfig(family="sigmoid", contrastive_weight=0.3) if kind == "sigmoid" else None
    extra = {"loss": loss} if loss else {}
    single_config = make_config(tmp_path / "single", copy.deepcopy(stages), optim=optim, **extra)
    single_config.teacher.logit_bias = -3.0 if loss else None
    single = run(single_config)
    # Each rank: 8 of the 16 rows, in micro-batches of 4 (DDP no_sync + GradCache together).
    config = make_config(
        tmp_path / "ddp", copy.deepcopy(stages), micro_batch_size=4, optim=optim, **extra
    )
    config.teacher.logit_bias = single_config.teacher.logit_bias
    mp.spawn(_ddp_worker, args=(2, tmp_path / "pg", tmp_path, config), nprocs=2, join=True)
    ranks = [copy.deepcopy(single.student) for _ in range(2)]
    for r, model in enumerate(ranks):
        model.load_state_dict(torch.load(tmp_path / f"rank{r}.pt"))
    assert_same_weights(ranks[0], ranks[1])  # DDP keeps the replicas identical
    assert_same_weights(ranks[0], single.student, tol=1e-4)


def test_cache_mode_equals_online_teacher(tmp_path):
    teacher = make_teacher()
    source = SyntheticPairDataset(32, image_size=32, **TEXT)
    items = [source[i] for i in range(32)]
    dataset = TensorPairDataset(
        torch.stack([x["image"] for x in items]), torch.stack([x["text"] for x in items])
    )
    cache_path = tmp_path / "teacher.safetensors"
    TeacherEmbeddingCache.build(teacher, dataset, cache_path, batch_size=7)
    stages = [StageConfig(steps=4, student_config=STUDENT_CFG)]
    online = run(make_config(tmp_path / "a", copy.deepcopy(stages)), teacher, train_dataset=dataset)
    cached_config = make_config(tmp_path / "b", copy.deepcopy(stages))
    cached_config.teacher.cache = str(cache_path)
    cached = run(cached_config, teacher, train_dataset=dataset)
    assert_same_weights(cached.student, online.student, tol=1e-4)
    for a, b in zip(losses(cached.history), losses(online.history), strict=True):
        assert abs(a - b) < 1e-5 * abs(b)
    cached_config.overwrite = True
    with pytest.raises(ValueError, match="different teacher"):
        run(cached_config, make_teacher(seed=2), train_dataset=dataset)
    shuffled = TensorPairDataset(dataset.images.flip(0), dataset.texts.flip(0))
    with pytest.raises(ValueError, match="built on other data: sample 0"):
        run(cached_config, teacher, train_dataset=shuffled)


class _TurnsNaN(TensorPairDataset):
    """Finite batches until ``good`` batches were served, then NaN images."""

    def __init__(self, good):
        super().__init__(torch.randn(32, 3, 32, 32), torch.randint(1, 999, (32, 16)))
        self.good, self.served = good, 0

    def get_batch(self, indices):
        batch = super().get_batch(indices)
        self.served += 1
        if self.served > self.good:
            batch["image"] = torch.full_like(batch["image"], float("nan"))
        return batch


def test_nan_stop_then_resume_logs_every_step_once(tmp_path):
    # Steps logged after the checkpoint (here 5) are logged once, by the resumed run.
    config = make_config(tmp_path, [StageConfig(steps=8, student_config=STUDENT_CFG)], save_every=2)
    with pytest.raises(FloatingPointError) as info:
        run(config, train_dataset=_TurnsNaN(good=5))
    # The message names the checkpoint only when there is one.
    assert "loss is nan at step 6 (stage 0)" in str(info.value)
    assert "checkpoint of step 4" in str(info.value) and "--resume" in str(info.value)
    state = load_training_state(tmp_path / "run" / CHECKPOINT_NAME)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["student"]["state"].values())
    config.resume = True
    run(config, train_dataset=_TurnsNaN(good=100))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert steps == list(range(1, 9))


def test_nan_stop_before_any_checkpoint_says_so(tmp_path):
    config = make_config(
        tmp_path, [StageConfig(steps=10, student_config=STUDENT_CFG)], save_every=5
    )
    with pytest.raises(FloatingPointError, match="No checkpoint was written yet .the first was "
                       "due at step 5.: .*start again with --overwrite") as info:  # fmt: skip
        run(config, train_dataset=_TurnsNaN(good=2))
    assert "--resume" not in str(info.value) and "intact" not in str(info.value)


def test_loss_mixes_terms_as_the_loss_api_does(tmp_path):
    # The engine mixes the terms by contrastive_weight exactly as the loss function does.
    teacher = make_teacher()
    dataset = TensorPairDataset(torch.randn(16, 3, 32, 32), torch.randint(1, 999, (16, 16)))
    stage = StageConfig(steps=1, student_config=STUDENT_CFG)
    config = make_config(tmp_path, [stage], loss=LossConfig(contrastive_weight=0.3))
    logged = losses(run(config, teacher, train_dataset=dataset).history)[0]
    student = stage_student(stage, teacher, None, config.seed).train()
    batch = next(make_loader(dataset, 16, seed=config.seed))
    with torch.no_grad(), force_backend("torch"):
        image, text, scale = student(batch["image"], batch["text"])
        t_image, t_text, t_scale = teacher(batch["image"], batch["text"])
        expected = affinity_mimicking_loss(
            image, text, scale, t_image, t_text, t_scale, contrastive_weight=0.3
        )
    assert abs(logged - float(expected)) < 1e-5 * abs(float(expected))


def test_resume_extends_the_last_stage_or_says_why_not(tmp_path):
    stage = StageConfig(steps=3, student_config=STUDENT_CFG)
    config = make_config(tmp_path, [stage], save_every=2)
    run(config)
    config.resume = True
    config.stages[0].steps = 5  # extending a finished run trains on
    result = run(config)
    assert [h["step"] for h in result.history if "loss" in h] == [1, 2, 3, 4, 5]
    config.stages[0].steps = 4
    with pytest.raises(ValueError, match="the last stage is at its step 5, past the 4 steps"):
        run(config)
    config.stages = [StageConfig(steps=5, preset="ViT-8M-16-Text-3M")]
    with pytest.raises(ValueError, match='stages.0.preset null there, "ViT-8M-16-Text-3M" now'):
        run(config)
    # A stage that pruned at its very end kept no optimizer state to continue from.
    auto = make_config(tmp_path / "auto", [StageConfig(steps=2, sparsity=0.3)])
    run(auto)
    auto.resume = True
    auto.stages[0].steps = 4
    with pytest.raises(ValueError, match="cannot extend stage 0 past its step 2: it pruned"):
        run(auto)


def test_a_held_run_folder_is_refused_before_anything_is_written(tmp_path):
    # Two runs that passed the command line's look at once: the lock decides.
    config = make_config(tmp_path, [StageConfig(steps=2, student_config=STUDENT_CFG)])
    with RunLock(config.out_dir):
        with pytest.raises(RunFolderLocked, match="is in use by another run"):
            run(config)
        assert [p.name for p in Path(config.out_dir).iterdir()] == [LOCK_NAME]
    result = run(config)  # released: the folder is free again, and the lock goes at the end
    assert result.params > 0 and not (Path(config.out_dir) / LOCK_NAME).exists()
    assert json.loads((Path(config.out_dir) / "config.json").read_text()) == json.loads(
        json.dumps(config.to_dict())
    )


def test_bad_inputs_give_clear_errors(tmp_path):
    stages = [StageConfig(steps=2, student_config=STUDENT_CFG)]
    config = make_config(tmp_path, copy.deepcopy(stages), resume=True)
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        run(config)
    (tmp_path / "run").mkdir(exist_ok=True)  # the run lock made the folder
    (tmp_path / "run" / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt training checkpoint"):
        run(config)
    # A new run never writes over another run's files.
    with pytest.raises(ValueError, match="holds another run .checkpoint.pt.: continue it with"):
        run(make_config(tmp_path, copy.deepcopy(stages)))
    assert (tmp_path / "run" / CHECKPOINT_NAME).read_bytes() == b"not a checkpoint"
    config = make_config(
        tmp_path / "csv", copy.deepcopy(stages), data=DataConfig("csv", "missing.tsv")
    )
    with pytest.raises(ValueError, match="needs a preprocess and a tokenizer"):
        run(config)
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        run(config, tokenizer=lambda texts: None, preprocess=lambda image: image)
    with pytest.raises(ValueError, match="no training data: give --data"):
        run(make_config(tmp_path / "none", copy.deepcopy(stages), data=DataConfig()))
    # A cache with webdataset data says it needs map-style data.
    (tmp_path / "s.tar").write_bytes(b"")
    stream = WebDatasetPairs(str(tmp_path / "s.tar"), preprocess=None, tokenizer=None)
    config = make_config(tmp_path / "w", copy.deepcopy(stages))
    config.teacher.cache = str(tmp_path / "cache.safetensors")
    with pytest.raises(ValueError, match="--teacher-cache needs map-style data"):
        run(config, train_dataset=stream)
    config = make_config(tmp_path / "x", copy.deepcopy(stages), attention="xformers")
    with pytest.raises(ValueError, match="xformers.*CUDA"):
        run(config)
    with pytest.raises(ValueError, match="sparsity must be in"):
        make_config(tmp_path, [StageConfig(steps=2, sparsity=1.5)]).validate()
    config = make_config(tmp_path / "p", [StageConfig(steps=2, sparsity=0.01, prune_step=5)])
    with pytest.raises(ValueError, match="prune_step"):
        run(config)


# ---- sigmoid loss and teacher ensembles ---------------------------------------------


def _sigmoid_loss(**overrides):
    return LossConfig(family="sigmoid", **overrides)


def test_sigmoid_run_learns_the_bias_and_checkpoints_keep_it(tmp_path):
    stages = [StageConfig(steps=8, student_config=STUDENT_CFG)]
    loss = _sigmoid_loss(init_logit_bias=-2.0)
    config = make_config(tmp_path / "a", copy.deepcopy(stages), loss=loss, save_every=2)
    config.teacher.logit_bias = -2.0  # a softmax teacher: its targets s(b x.y - 2)
    config.eval.every = 1
    full = run(config, evaluator=lambda model: 0.0)
    curve = losses(full.history)
    assert sum(curve[-2:]) / 2 < 0.8 * sum(curve[:2]) / 2, curve
    bias, scale = full.student.logit_bias, full.student.logit_scale.detach()
    assert bias is not None and bias.requires_grad
    bias = bias.detach()
    assert math.isfinite(float(bias)) and float(bias) != -2.0  # learned
    assert float(scale) != pytest.approx(math.log(10), abs=1e-6)
    exported = load_student(tmp_path / "a" / "run" / "student")
    assert float(exported.logit_bias.detach()) == float(bias)
    assert_same_weights(exported, full.student)
    # An interrupted and resumed run rebuilds the bias and ends bitwise where the full one did.
    config = make_config(tmp_path / "b", copy.deepcopy(stages), loss=loss, save_every=2)
    config.teacher.logit_bias = -2.0
    config.eval.every = 1
    assert run(config, evaluator=_interrupt_at_call(3)).interrupted
    state = load_training_state(tmp_path / "b" / "run" / CHECKPOINT_NAME)
    assert state["step"] == 3 and "logit_bias" in state["student"]["state"]
    config.resume = True
    resumed = run(config, evaluator=lambda model: 0.0)
    assert_same_weights(resumed.student, full.student)
    assert losses(resumed.history) == curve


def _ensemble_step(tmp_path, family, teachers, biases):
    """(logged loss of one engine step, the float64 formula on the same batch)."""
    dataset = TensorPairDataset(torch.randn(16, 3, 32, 32), torch.randint(1, 999, (16, 16)))
    stage = StageConfig(steps=1, student_config=STUDENT_CFG)
    loss = LossConfig(family=family, contrastive_weight=0.3)
    config = make_config(tmp_path, [stage], loss=loss, micro_batch_size=6)
    if family == "sigmoid":
        config.teachers = [TeacherConfig(logit_bias=b) for b in biases]
    logged = losses(run(config, teachers, train_dataset=dataset).history)[0]
    student = stage_student(stage, teachers[0], None, config.seed).train()
    batch = next(make_loader(dataset, 16, seed=config.seed))
    with torch.no_grad():
        if family == "sigmoid":
            add_logit_bias(student, math.log(10), -10.0)
        image, text, scale, *bias = student(batch["image"], batch["text"])
        outputs = [t(batch["image"], batch["text"]) for t in teachers]
    if family == "sigmoid":
        targets = [(i, t, s, c) for (i, t, s), c in zip(outputs, biases, strict=True)]
        expected = sigmoid_reference(
            image, text, scale, bias[0].detach(), targets, contrastive_weight=0.3
        )
    else:
        double = [tuple(v.double() for v in out) for out in outputs]
        distill, contrastive = ensemble_reference(
            image.double(), text.double(), scale.double(), double
        )
        expected = 0.7 * distill + 0.3 * contrastive
    return logged, float(expected)


@pytest.mark.parametrize("family", ["sigmoid", "softmax"])
def test_ensemble_step_equals_the_mean_of_teacher_probabilities(tmp_path, family):
    # Two teachers, GradCache micro-batches: the logged loss is the formula with the target
    # mean_k s(B_k) (sigmoid) or mean_k softmax(B_k) (softmax) on the same features.
    logged, expected = _ensemble_step(
        tmp_path, family, [make_teacher(1), make_teacher(2)], [-4, -6]
    )
    assert abs(logged - expected) < 1e-5 * abs(expected)
    # One teacher: the same formula with K = 1 (the plain sigmoid step).
    logged, expected = _ensemble_step(tmp_path / "one", family, [make_teacher(1)], [-4])
    assert abs(logged - expected) < 1e-5 * abs(expected)


def test_two_teacher_cache_equals_online_and_refuses_another_list(tmp_path):
    teachers = [make_teacher(1), make_teacher(2)]
    dataset = TensorPairDataset(torch.randn(16, 3, 32, 32), torch.randint(1, 999, (16, 16)))
    cache_path = tmp_path / "teachers.safetensors"
    TeacherEmbeddingCache.build(teachers, dataset, cache_path, batch_size=5)
    stages = [StageConfig(steps=3, student_config=STUDENT_CFG)]

    def config_for(folder, cache):
        config = make_config(folder, copy.deepcopy(stages), loss=_sigmoid_loss())
        config.teachers = [TeacherConfig(logit_bias=-3.0), TeacherConfig(logit_bias=-5.0)]
        config.teacher.cache = cache
        return config

    online = run(config_for(tmp_path / "a", None), teachers, train_dataset=dataset)
    cached = run(config_for(tmp_path / "b", str(cache_path)), teachers, train_dataset=dataset)
    assert_same_weights(cached.student, online.student, tol=1e-4)
    for a, b in zip(losses(cached.history), losses(online.history), strict=True):
        assert abs(a - b) < 1e-5 * abs(b)
    swapped = config_for(tmp_path / "c", str(cache_path))
    with pytest.raises(ValueError, match="different teacher teacher 0 .*list or order"):
        run(swapped, teachers[::-1], train_dataset=dataset)
    with pytest.raises(ValueError, match="built by 2 teacher.s., this run has 1"):
        run(make_config(tmp_path / "d", copy.deepcopy(stages), teacher=TeacherConfig(
            cache=str(cache_path))), teachers[0], train_dataset=dataset)  # fmt: skip


def test_sigmoid_and_ensemble_bad_inputs(tmp_path):
    stages = [StageConfig(steps=1, student_config=STUDENT_CFG)]
    config = make_config(tmp_path / "a", copy.deepcopy(stages), loss=_sigmoid_loss())
    with pytest.raises(ValueError, match=r"teacher 0 .* has no logit_bias.*teacher.logit_bias"):
        run(config)
    with pytest.raises(ValueError, match="5 teachers given; give 1 to 4"):
        run(make_config(tmp_path / "b", copy.deepcopy(stages)), [make_teacher()] * 5)
    config = make_config(tmp_path / "c", copy.deepcopy(stages))
    config.teachers = [TeacherConfig(model=f"m{k}") for k in range(5)]
    with pytest.raises(ValueError, match="5 teachers given; an ensemble has at most 4"):
        config.validate()
    config = make_config(
        tmp_path / "d", copy.deepcopy(stages), loss=_sigmoid_loss(fixed_scale=50.0)
    )
    with pytest.raises(ValueError, match="fixed_scale is for the softmax loss"):
        config.validate()
    config = make_config(tmp_path / "e", copy.deepcopy(stages))
    config.teacher.logit_bias = -10.0
    with pytest.raises(ValueError, match="logit_bias is for --loss sigmoid"):
        config.validate()


def test_sigmoid_auto_stage_prunes_a_student_with_a_bias(tmp_path):
    stages = [StageConfig(steps=4, sparsity=0.5, prune_step=3, sparsity_warmup=2)]
    optim = OptimConfig(lr=1e-3, warmup_steps=2, mask_lr=2.0)
    config = make_config(tmp_path, stages, optim=optim, loss=_sigmoid_loss(init_logit_bias=-3.0))
    config.teacher.logit_bias = -3.0
    result = run(config)
    assert all(math.isfinite(v) for v in losses(result.history))
    assert [h["step"] for h in result.history if h.get("event") == "pruned"] == [3]
    bias = float(result.student.logit_bias.detach())
    assert math.isfinite(bias) and bias != -3.0
