"""The distillation engine on tiny open_clip models (CPU, PyTorch backend).

Oracles: an uninterrupted run (resume must be bitwise equal), the whole batch at once
(GradCache accumulation), one process (2-process gloo DDP), the online teacher (cache mode).
"""

import copy
import signal
import sys
import types

import open_clip
import pytest
import torch
import torch.multiprocessing as mp
from support import binary_masks, rel_err

from tinyclip_fast.data.datasets import SyntheticPairDataset, TensorPairDataset
from tinyclip_fast.data.zero_shot import ZeroShotEvaluator
from tinyclip_fast.demo.data import CompactTokenizer
from tinyclip_fast.inheritance.student_io import load_student
from tinyclip_fast.losses import AffinityMimickingLoss
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.train.checkpoint import CHECKPOINT_NAME, load_training_state
from tinyclip_fast.train.config import DataConfig, DistillConfig, OptimConfig, StageConfig
from tinyclip_fast.train.engine import (
    carry_optimizer_state,
    distill,
    learning_rate,
    make_optimizer,
    train_step,
    xformers_attention,
)
from tinyclip_fast.train.teacher_cache import TeacherEmbeddingCache

TEXT = {"context_length": 16, "vocab_size": 1000}
TEACHER_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {**TEXT, "width": 64, "heads": 2, "layers": 3},
}
STUDENT_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 32},
    "text_cfg": {**TEXT, "width": 32, "heads": 1, "layers": 2},
}


def make_teacher(seed: int = 1) -> open_clip.model.CLIP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return open_clip.model.CLIP(**TEACHER_CFG).eval()


def make_config(tmp_path, stages, **overrides) -> DistillConfig:
    values = dict(
        stages=stages,
        data=DataConfig(kind="synthetic", size=48),
        optim=OptimConfig(lr=1e-3, warmup_steps=2),
        batch_size=16,
        precision="fp32",
        out_dir=str(tmp_path / "run"),
        log_every=1,
        save_every=0,
        progress=False,
    )
    values.update(overrides)
    return DistillConfig(**values)


def run(config, teacher=None, **kwargs):
    with force_backend("torch"):
        return distill(config, teacher=teacher or make_teacher(), device="cpu", **kwargs)


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def _comparable(key, tensor):
    # The key bias gets an exactly zero gradient (softmax ignores a shift), so Adam turns the
    # rounding noise there into +-lr steps that no two summation orders share: leave it out.
    if key.endswith("attn.in_proj_bias"):
        third = tensor.shape[0] // 3
        return torch.cat([tensor[:third], tensor[2 * third :]])
    return tensor


def assert_same_weights(a, b, tol=None):
    """Bitwise equal (tol None) or every tensor within relative error ``tol``."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if tol is None:
            assert torch.equal(sa[key], sb[key]), key
        else:
            err = rel_err(_comparable(key, sa[key]), _comparable(key, sb[key]))
            assert err < tol, (key, err)


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
    for stop in (3, 6, 9):
        result = run(config, evaluator=_interrupt_at_call(3))
        assert result.interrupted
        assert load_training_state(tmp_path / "b" / "run" / CHECKPOINT_NAME)["step"] == stop
        config.resume = True
    result = run(config, evaluator=lambda model: 0.0)
    assert not result.interrupted

    assert_same_weights(result.student, full.student)
    assert losses(result.history) == losses(full.history)
    assert result.stage_params == full.stage_params
    assert full.stage_params[1] < full.stage_params[0]


def test_progressive_auto_stages_prune_further_each_stage(tmp_path):
    # SPEC 4: auto -> auto, targets as fractions of the ORIGINAL teacher's prunable params.
    stages = [
        StageConfig(steps=4, sparsity=0.5, prune_step=3, sparsity_warmup=2),
        StageConfig(steps=4, sparsity=0.8, prune_step=3, sparsity_warmup=2),
    ]
    optim = OptimConfig(lr=1e-3, warmup_steps=2, mask_lr=2.0)
    result = run(make_config(tmp_path, stages, optim=optim))
    teacher_params = sum(p.numel() for p in make_teacher().parameters())
    assert result.stage_params[1] < result.stage_params[0] < teacher_params
    assert all(torch.isfinite(torch.tensor(losses(result.history))))


def _loss_fn(*args):
    return AffinityMimickingLoss()(*args)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, images, texts, teacher_feats, micro, fixed_scale=None):
    model.zero_grad(set_to_none=True)
    with force_backend("torch"):
        loss = train_step(
            model,
            images,
            texts,
            teacher_feats,
            _loss_fn,
            micro_batch_size=micro,
            autocast=lambda: torch.autocast("cpu", enabled=False),
            scaler=torch.amp.GradScaler("cpu", enabled=False),
            fixed_scale=fixed_scale,
        )
    return loss, _grads(model)


@pytest.mark.parametrize(
    "variant", ["learnable_scale", "fixed_scale", "masked_eval", "masked_train"]
)
def test_grad_accumulation_equals_big_batch(variant):
    teacher = make_teacher()
    student = open_clip.model.CLIP(**STUDENT_CFG)
    if variant.startswith("masked"):
        # eval: deterministic masks, the same for any batch split. train: sampled masks, one
        # sample per step (fix_mask_sample), shared by every micro-batch and both passes.
        # log_alpha spread around 1 so the masks are soft and log_alpha gets gradients.
        student = MaskedCLIP(copy.deepcopy(make_teacher(seed=2)).requires_grad_(True))
        with torch.no_grad():
            for log_alpha in student.mask_parameters():
                log_alpha.copy_(torch.randn(log_alpha.shape) * 2 + 1)
        student.train(variant == "masked_train")
        student.fix_mask_sample(123)
    data = SyntheticPairDataset(20, image_size=32, **TEXT).__getitem__
    batch = [data(i) for i in range(20)]
    images = torch.stack([b["image"] for b in batch])
    texts = torch.stack([b["text"] for b in batch])
    with torch.no_grad():
        t_img, t_txt, t_scale = teacher(images, texts)
    fixed = torch.tensor(50.0) if variant == "fixed_scale" else None
    if fixed is not None:
        student.logit_scale.requires_grad_(False)
    loss_big, big = _step(student, images, texts, (t_img, t_txt, t_scale), 20, fixed)
    loss_acc, acc = _step(student, images, texts, (t_img, t_txt, t_scale), 6, fixed)  # 6+6+6+2
    assert rel_err(loss_acc, loss_big) < 1e-6
    assert big.keys() == acc.keys() and len(big) > 10
    if variant.startswith("masked"):
        assert any(n.endswith("log_alpha") for n in big)
    for name in big:
        assert rel_err(acc[name], big[name]) < 1e-5, (name, rel_err(acc[name], big[name]))


def test_grad_accumulation_replays_dropout():
    # With patch dropout, GradCache must backprop through the SAME tokens it dropped in the
    # no-grad pass. Oracle: the micro-batches run with grad in one graph, same RNG start.
    cfg = copy.deepcopy(STUDENT_CFG)
    cfg["vision_cfg"]["patch_dropout"] = 0.5
    student = open_clip.model.CLIP(**cfg).train()
    images, texts = torch.randn(12, 3, 32, 32), torch.randint(1, 999, (12, 16))
    t_img = torch.nn.functional.normalize(torch.randn(12, 24), dim=-1)
    t_txt = torch.nn.functional.normalize(torch.randn(12, 24), dim=-1)
    feats = (t_img, t_txt, torch.tensor(30.0))

    torch.manual_seed(5)
    parts = [student(images[s : s + 4], texts[s : s + 4]) for s in range(0, 12, 4)]
    with force_backend("torch"):
        loss = _loss_fn(
            torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[0][2], *feats
        )
    student.zero_grad()
    loss.backward()
    expected = _grads(student)

    torch.manual_seed(5)
    _, got = _step(student, images, texts, feats, 4)
    for name in expected:
        assert rel_err(got[name], expected[name]) < 1e-5, name


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


@pytest.mark.parametrize("kind", ["manual", "auto"])
def test_two_process_ddp_equals_one_process(tmp_path, kind):
    # auto: a manual stage, then masks sampled in training (one sample per step, the same on
    # every rank), pruned at step 3 of 4, the optimizer state carried over. (Masking the
    # teacher itself would start at the loss minimum, where gradients are rounding noise.)
    stages = [StageConfig(steps=3, student_config=STUDENT_CFG)]
    optim = OptimConfig(lr=1e-3, warmup_steps=2)
    if kind == "auto":
        stages.append(StageConfig(steps=4, sparsity=0.9, prune_step=3, sparsity_warmup=2))
        optim = OptimConfig(lr=1e-3, warmup_steps=2, mask_lr=2.0, prune_warmup_steps=2)
    single = run(make_config(tmp_path / "single", copy.deepcopy(stages), optim=optim))
    # Each rank: 8 of the 16 rows, in micro-batches of 4 (DDP no_sync + GradCache together).
    config = make_config(tmp_path / "ddp", copy.deepcopy(stages), micro_batch_size=4, optim=optim)
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
    with pytest.raises(ValueError, match="different teacher"):
        run(cached_config, make_teacher(seed=2), train_dataset=dataset)


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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = make_config(
        tmp_path, [StageConfig(steps=10, student_config=STUDENT_CFG)], save_every=2
    )
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 5 .*checkpoint"):
        run(config, train_dataset=_TurnsNaN(good=4))
    state = load_training_state(tmp_path / "run" / CHECKPOINT_NAME)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["student"]["state"].values())


def test_bad_inputs_give_clear_errors(tmp_path):
    stages = [StageConfig(steps=2, student_config=STUDENT_CFG)]
    config = make_config(tmp_path, copy.deepcopy(stages), resume=True)
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        run(config)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt training checkpoint"):
        run(config)
    config = make_config(tmp_path, copy.deepcopy(stages), data=DataConfig("csv", "missing.tsv"))
    with pytest.raises(ValueError, match="needs a preprocess and a tokenizer"):
        run(config)
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        run(config, tokenizer=lambda texts: None, preprocess=lambda image: image)
    config = make_config(tmp_path, copy.deepcopy(stages), attention="xformers")
    with pytest.raises(ValueError, match="xformers.*CUDA"):
        run(config)
    with pytest.raises(ValueError, match="sparsity must be in"):
        make_config(tmp_path, [StageConfig(steps=2, sparsity=1.5)]).validate()
    config = make_config(tmp_path, [StageConfig(steps=2, sparsity=0.01, prune_step=5)])
    with pytest.raises(ValueError, match="prune_step"):
        run(config)


def test_xformers_route_matches_torch_sdpa(monkeypatch):
    # A stand-in for xformers.ops with its [batch, tokens, heads, dim] layout, so the route's
    # layout handling is checked on the CPU; the real kernel needs CUDA.
    calls = []
    torch_sdpa = torch.nn.functional.scaled_dot_product_attention

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        calls.append(q.shape)
        out = torch_sdpa(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=attn_bias is not None, dropout_p=p, scale=scale,
        )  # fmt: skip
        return out.transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    ops.LowerTriangularMask = object
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)

    model = open_clip.model.CLIP(**STUDENT_CFG).train()
    images, texts = torch.randn(3, 3, 32, 32), torch.randint(1, 999, (3, 16))
    expected = model(images, texts)
    with xformers_attention():
        got = model(images, texts)
    assert torch.nn.functional.scaled_dot_product_attention is torch_sdpa  # restored
    assert len(calls) == 2  # the vision tower's layers; the causal text tower stays on torch
    for a, b in zip(got, expected, strict=True):
        assert rel_err(a, b) < 1e-6


def test_learning_rate_ramps_up_again_after_pruning(tmp_path):
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=3, prune_warmup_steps=4)
    config = make_config(tmp_path, [StageConfig(steps=20, sparsity=0.5)], optim=optim)
    plain = [learning_rate(s, 20, config) for s in range(20)]
    pruned = [learning_rate(s, 20, config, pruned_at=8) for s in range(20)]
    assert pruned[:8] == plain[:8]
    ramp = [pruned[s] / plain[s] for s in range(8, 12)]
    assert ramp == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert pruned[12:] == plain[12:]
    assert plain[2] == pytest.approx(1.0) and plain[19] > 0.1  # warmup, then cosine to min_lr
    early = [learning_rate(s, 20, config, pruned_at=1) for s in range(3)]  # inside warmup
    assert early == pytest.approx([plain[0], plain[1] * 0.25, plain[2] * 0.5])


def _adamw_step(model, optimizer, image, text, weights):
    image_f, text_f, scale = model(image, text)[:3]
    loss = (image_f * weights[0]).sum() + (text_f * weights[1]).sum() + 0.01 * scale
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def test_pruning_carries_adam_moments_so_training_continues(tmp_path):
    # With 0/1 masks the pruned model computes the masked model's function, so one AdamW
    # step on each after pruning must move the kept weights identically, which needs the
    # moments (and step count) carried over; fresh moments would move them by about +-lr.
    torch.manual_seed(0)
    masked = MaskedCLIP(make_teacher()).eval()  # eval: the deterministic masks
    binary_masks(masked)
    config = make_config(tmp_path, [StageConfig(steps=4, sparsity=0.5)])
    old = make_optimizer(masked, config)
    image, text = torch.randn(4, 3, 32, 32), torch.randint(1, 999, (4, 16))
    weights = (torch.randn(4, 32), torch.randn(4, 32))
    with force_backend("torch"):
        for _ in range(2):
            _adamw_step(masked, old, image, text, weights)
        pruned = masked.prune().eval()
        new = make_optimizer(pruned, config)
        carry_optimizer_state(masked, old, pruned, new)
        before = {n: p.detach().clone() for n, p in pruned.named_parameters()}
        _adamw_step(masked, old, image, text, weights)
        _adamw_step(pruned, new, image, text, weights)
    after_masked = masked.prune_like_weights(
        {n: p.detach() for n, p in masked.model.named_parameters()}
    )
    for name, param in pruned.named_parameters():
        assert int(new.state[param]["step"]) == 3, name
        moved = _comparable(name, param.detach() - before[name])
        expected = _comparable(name, after_masked[name] - before[name])
        assert rel_err(moved, expected) < 1e-3, (name, rel_err(moved, expected))
