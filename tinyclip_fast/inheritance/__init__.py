"""Manual weight inheritance, the released TinyCLIP presets, and student files."""
