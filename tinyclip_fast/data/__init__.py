"""Image-text datasets, the resumable batch loader, and zero-shot evaluation."""
