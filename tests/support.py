"""Small pieces shared by several test files: the error measure, tiny open_clip configs and
dataset wrappers. (tests/ is on sys.path through pytest's ``pythonpath`` setting.)"""

import torch
from torch.utils.data import Dataset

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
