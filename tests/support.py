"""Small pieces shared by several test files: the error measure, tiny open_clip configs and
dataset wrappers. (tests/ is on sys.path through pytest's ``pythonpath`` setting.)"""

import open_clip
import torch
from torch.utils.data import Dataset

from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.train.config import DataConfig, DistillConfig, OptimConfig
from tinyclip_fast.train.engine import distill

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN/inf anywhere gives inf."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    if not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        return float("inf")
    denom = expected.norm().clamp_min(1e-30)
    return float((actual - expected).norm() / denom)


TEXT = {"context_length": 16, "vocab_size": 1000}
TEACHER = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {**TEXT, "width": 64, "heads": 4, "layers": 4},
}


class PlainDataset(Dataset):
    """The same samples without a dataset's batched fast path (``get_batch``)."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        return self.inner[index]


def binary_masks(masked, seed=3):
    """log_alpha of +-20: deterministic masks exactly 0 or 1 (in fp32), about a quarter 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tower in (masked.visual_masks, masked.text_masks):
            for mask in (tower.hidden, tower.head, tower.intermediate):
                keep = torch.rand(mask.log_alpha.shape, generator=g) > 0.25
                keep.view(-1)[0] = True
                mask.log_alpha.copy_(torch.where(keep, 20.0, -20.0))


# ---- tiny engine runs (CPU, PyTorch backend) ------------------------------------------

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


def comparable(key, tensor):
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
            err = rel_err(comparable(key, sa[key]), comparable(key, sb[key]))
            assert err < tol, (key, err)
