"""Small pieces shared by several test files: tiny open_clip configs and dataset wrappers."""

from torch.utils.data import Dataset

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
