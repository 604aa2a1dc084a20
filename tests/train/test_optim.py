"""The learning-rate schedule and carrying AdamW moments across pruning."""

import pytest
import torch
from support import binary_masks, comparable, make_config, make_teacher, rel_err

from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.train.config import OptimConfig, StageConfig
from tinyclip_fast.train.optim import carry_optimizer_state, learning_rate, make_optimizer


def test_learning_rate_ramps_up_again_after_pruning(tmp_path):
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=3, prune_warmup_steps=4)
    config = make_config(tmp_path, [StageConfig(steps=20, sparsity=0.5)], optim=optim)
    plain = [learning_rate(s, 20, config.optim) for s in range(20)]
    pruned = [learning_rate(s, 20, config.optim, pruned_at=8) for s in range(20)]
    assert pruned[:8] == plain[:8]
    ramp = [pruned[s] / plain[s] for s in range(8, 12)]
    assert ramp == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert pruned[12:] == plain[12:]
    assert plain[2] == pytest.approx(1.0) and plain[19] > 0.1  # warmup, then cosine to min_lr
    early = [learning_rate(s, 20, config.optim, pruned_at=1) for s in range(3)]  # inside warmup
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
        moved = comparable(name, param.detach() - before[name])
        expected = comparable(name, after_masked[name] - before[name])
        assert rel_err(moved, expected) < 1e-3, (name, rel_err(moved, expected))
