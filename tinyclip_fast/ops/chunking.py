"""Row chunks of the PyTorch paths of the loss ops: how many [chunk, N] rows at a time."""

# Elements of one [chunk, N] block: 8 MB in fp32 keeps the peak small while the chunk
# matmuls stay large enough to run at full speed.
CHUNK_ELEMENTS = 1 << 21
MIN_CHUNK_ROWS = 32
MAX_CHUNK_ROWS = 2048


def chunk_rows(num_cols: int) -> int:
    """Rows per chunk of a [rows, num_cols] block: CHUNK_ELEMENTS, within the row bounds."""
    rows = CHUNK_ELEMENTS // max(num_cols, 1)
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, rows))
