"""The frozen teachers and the targets they give the loss: loading them, the per-sample
embedding cache, the reinforced cache, and one interface over where targets come from."""
