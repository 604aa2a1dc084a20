"""Manual weight inheritance, the released TinyCLIP presets, and student files."""

HF_PREFIX = "hf:"  # "hf:DIR" names a transformers CLIPModel folder (a teacher, a stage's init)
