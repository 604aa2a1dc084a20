"""Tiny open_clip model configs shared by the model-level tests (fast on a CPU)."""

TEXT = {"context_length": 16, "vocab_size": 1000}
TEACHER = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {**TEXT, "width": 64, "heads": 4, "layers": 4},
}
