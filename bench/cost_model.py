"""Cost model of the loss kernels on the H100 and H200: counts, waves, a predicted time.

For a kernel, a shape and a configuration: FLOPs, HBM bytes, L2-to-SM bytes, special-function
operations (exp2, log2) and fp32 instructions, programs, blocks per SM (registers and shared
memory read from the committed sm_90 report) and waves. A kernel's predicted time is the
longest of its five resource times (each count divided by the card's rate), divided by the
share of the machine its grid keeps busy (waves / whole waves), plus one launch. The same for
open_clip's eager losses (one kernel per [n, n] pass of the autograd graph) and for cuBLAS
GEMMs. A prediction, never a result: the GPU check prints it beside every measured time so
that the first run on a card states the model's error.

    python bench/cost_model.py                       # the tables, both cards
    python bench/cost_model.py --out bench/results   # also writes bench/results/cost_model.md
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPORT = RESULTS / "sm90_triton_3.8.0.md"

# ------------------------------------------------------------------------------- the cards

# Per-SM limits of compute capability 9.0 (CUDA C Programming Guide, "Compute Capabilities"):
# 64K 32-bit registers allocated per warp in units of 256, 228 KB of shared memory of which
# 1 KB is reserved per block, 64 warps and 32 blocks.
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED = 1024
WARPS_PER_SM = 64
BLOCKS_PER_SM = 32


@dataclass(frozen=True)
class Card:
    """Rates of one card. Sources: KINDS.md readings on this workplace's machines (measured),
    the vendor datasheets, and the assumptions marked as such (the first GPU run checks)."""

    name: str
    sms: int
    l2_bytes: float
    gemm_flops: float  # cuBLAS bf16, 8192^3, random data: measured
    hbm_bytes: float  # device-to-device copy, bytes read + written per second: measured
    l2_sm_bytes: float  # L2 to the SMs, bytes per second: assumption
    sfu_ops: float  # exp2 / log2 per second
    alu_ops: float  # fp32 instructions per second


# H100 SXM5 80 GB (KINDS.md, 2026-11-13: 132 SMs, 50 MB L2, 798 TFLOP/s bf16 GEMM, 3.0 TB/s
# copy). L2-to-SM: ~5.5 TB/s, the figure recalled (not re-checked here) from Chips and
# Cheese's "Nvidia's H100: Funny L2, and Tons of Bandwidth" (2023), measured on an H100 PCIe
# (114 SMs, 1,755 MHz): an assumption until a GPU run measures it. SFU: 3.9 T exp2/s
# (FlashAttention-3 paper: "989 TFLOPS of FP16 matmul but only 3.9 TFLOPS of special
# functions"). ALU: 128 fp32 lanes x 132 SMs x 1.98 GHz.
H100 = Card("H100", 132, 50e6, 798e12, 3.0e12, 5.5e12, 3.9e12, 33.4e12)
# H200 SXM (KINDS.md, 2026-10-28: 132 SMs, 60 MB L2, 788 TFLOP/s, 4.3 TB/s copy); the same
# chip as the H100 otherwise (H200.md), so the same L2, SFU and ALU rates.
H200 = replace(H100, name="H200", l2_bytes=60e6, gemm_flops=788e12, hbm_bytes=4.3e12)
CARDS = (H100, H200)

# Assumptions of the model (the first GPU run corrects them):
HOST_OP_S = 4e-6  # host time of one dispatched PyTorch op or kernel launch
GPU_GAP_S = 1.5e-6  # device time between two kernels of a stream
TRITON_DOT_SHARE = 0.6  # share of the cuBLAS rate a Triton tile loop's tl.dot reaches
# Tensor-core time per FLOP relative to bf16: fp32 features take 3xTF32 (three TF32 MMAs at
# half the bf16 rate) in the kernels; cuBLAS fp32 GEMMs run on the fp32 lanes (no TF32).
DOT_COST = {"bf16": 1.0, "fp16": 1.0, "fp32": 6.0}
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# fp32 instructions per online-softmax statistic and logit (mask, max, subtract, exp2, sum,
# rescale) and per extra weighted sum (multiply, add): counted from the kernels' source.
ALU_PER_STAT = 6
ALU_PER_SUM = 2


@dataclass(frozen=True)
class Shape:
    """m rows against n columns (square: m == n, both directions), feature dim d, K teachers
    of dim d each, features' dtype."""

    m: int
    n: int
    d: int = 512
    teachers: int = 1
    dtype: str = "bf16"
    square: bool = True

    @property
    def label(self) -> str:
        what = f"n = {self.n:,}" if self.square else f"m = {self.m:,} x n = {self.n:,}"
        return f"{what}, d = {self.d}, K = {self.teachers}, {self.dtype}"


@dataclass(frozen=True)
class Kernel:
    """One launch's counts. ``cublas``: its FLOPs run at the GEMM rate (else Triton's)."""

    name: str
    flops: float = 0.0
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    sfu: float = 0.0
    alu: float = 0.0
    programs: int = 1
    blocks_per_sm: int = 1
    cublas: bool = False
    dot_cost: float = 1.0
    config: str = ""

    def waves(self, card: Card) -> float:
        return self.programs / (card.sms * self.blocks_per_sm)

    def fill(self, card: Card) -> float:
        """Share of the machine busy: of the SMs within one wave, else of the block slots
        over the kernel's whole waves."""
        waves = self.waves(card)
        if waves <= 1:
            return min(self.programs, card.sms) / card.sms
        return waves / math.ceil(waves)

    def resource_times(self, card: Card) -> dict[str, float]:
        rate = card.gemm_flops * (1.0 if self.cublas else TRITON_DOT_SHARE)
        return {
            "tensor": self.flops * self.dot_cost / rate,
            "L2": self.l2_bytes / card.l2_sm_bytes,
            "HBM": self.hbm_bytes / card.hbm_bytes,
            "SFU": self.sfu / card.sfu_ops,
            "ALU": self.alu / card.alu_ops,
        }

    def bound(self, card: Card) -> str:
        times = self.resource_times(card)
        return max(times, key=times.get)

    def seconds(self, card: Card) -> float:
        return max(self.resource_times(card).values()) / self.fill(card) + GPU_GAP_S


# Ops dispatched on the host per call (views and kernel launches included), counted on the
# CPU at n = 64 with one teacher (tests/test_cost_model.py recounts them): ours with the
# kernel launches stubbed out under the interpreter, open_clip eager as is. (forward,
# backward) of distill + contrastive (affinity) and of SigLIP alone (sigmoid).
HOST_OPS = {
    ("affinity", "ours"): (136, 53),
    ("affinity", "open_clip"): (39, 53),
    ("sigmoid", "ours"): (85, 27),
    ("sigmoid", "open_clip"): (14, 20),
}


def host_ops(family: str, design: str, mode: str) -> int:
    """Dispatched ops of one call of a design in a mode (the second design: as ours)."""
    forward, backward = HOST_OPS[family, "open_clip" if "open_clip" in design else "ours"]
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def predict(kernels: list[Kernel], card: Card, ops: int = 0) -> float:
    """Seconds of kernels run one after another, or of the host dispatching ``ops`` ops
    when that takes longer (small problems: the device waits for the host)."""
    return max(sum(k.seconds(card) for k in kernels), ops * HOST_OP_S)


# ----------------------------------------------------------------------- the sm_90 report


def blocks_per_sm(registers: int, warps: int, shared: int) -> int:
    """Resident blocks per SM allowed by registers, shared memory and warps."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = REGISTERS_PER_SM // per_warp // warps
    by_shared = SHARED_PER_SM // (shared + SHARED_RESERVED)
    return max(0, min(by_registers, by_shared, WARPS_PER_SM // warps, BLOCKS_PER_SM))


def read_report(path: Path = REPORT) -> dict[tuple[str, str, str], tuple[int, int]]:
    """(kernel, dtype, configuration) -> (registers, shared bytes) from an sm_90 report."""
    lines = path.read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| kernel |"))
    names = [c.strip() for c in lines[header].strip("|").split("|")]
    found = {}
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        row = dict(zip(names, (c.strip() for c in line.strip("|").split("|")), strict=False))
        if row["registers"].isdigit():
            key = (row["kernel"], row["dtype"], row["configuration"])
            found[key] = (int(row["registers"]), int(row["shared (B)"]))
    return found


_CONFIG = re.compile(r"(\d+)x(\d+)x(\d+) w(\d+) s(\d+)")


def configuration_blocks(label: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, warps) of a report label such as 'K=1 64x64x64 w8 s3'."""
    bm, bn, bd, warps, _ = (int(v) for v in _CONFIG.search(label).groups())
    return bm, bn, bd, warps


# ------------------------------------------------------------------------------- families


def gemm(m: int, n: int, k: int, dtype: str, name: str = "cuBLAS GEMM") -> Kernel:
    """[m, k] @ [k, n] in cuBLAS: every operand read and the output written once."""
    size = ELEMENT_BYTES[dtype]
    cost = 12.0 if dtype == "fp32" else 1.0  # fp32 lanes: 67 against ~800 TFLOP/s
    tiles = math.ceil(m / 128) * math.ceil(n / 128)
    return Kernel(
        name, flops=2.0 * m * n * k, hbm_bytes=(m * k + k * n + m * n) * size, programs=tiles,
        blocks_per_sm=1, cublas=True, dot_cost=cost,
    )  # fmt: skip


def _tile_loop(
    name: str, shape: Shape, config: str, registers: dict, rows: int, programs: int,
    sfu_per_logit: float, alu_per_logit: float, extra_hbm: float = 0.0,
    column_programs: int = 1,
) -> Kernel:  # fmt: skip
    """A Triton kernel that forms every [BLOCK_M, BLOCK_N] student and teacher tile of
    ``rows`` x n once, loading both operand blocks of each tile from L2 (dot_tile reloads
    them per tile). ``column_programs`` programs share each row block (a 2-D grid, row
    blocks fastest): each sweeps the row features once, from HBM when they exceed the L2.
    With one (every program sweeps all columns), the column features come from HBM once per
    wave when they exceed the L2."""
    bm, bn, _, warps = configuration_blocks(config)
    size = ELEMENT_BYTES[shape.dtype]
    dims = shape.d * (1 + shape.teachers)
    logits = float(rows) * shape.n
    tiles = math.ceil(rows / bm) * math.ceil(shape.n / bn)
    regs, shared = registers[name, shape.dtype, config]
    kernel = Kernel(
        name, flops=2.0 * logits * dims, l2_bytes=tiles * (bm + bn) * dims * size,
        sfu=logits * sfu_per_logit, alu=logits * alu_per_logit, programs=programs,
        blocks_per_sm=blocks_per_sm(regs, warps, shared), dot_cost=DOT_COST[shape.dtype],
        config=config,
    )  # fmt: skip
    row_bytes, column_bytes = rows * dims * size, shape.n * dims * size
    sweeps = math.ceil(kernel.waves(H100)) if column_programs == 1 else column_programs
    if column_programs == 1:
        column_bytes *= sweeps if column_bytes > H100.l2_bytes else 1
    elif row_bytes > H100.l2_bytes:
        row_bytes *= sweeps
    hbm = row_bytes + column_bytes + extra_hbm
    return replace(kernel, hbm_bytes=hbm)


def _configs(shape: Shape, shapes: dict) -> list[str]:
    """Report labels of the autotune candidates of an affinity kernel for this shape."""
    from tinyclip_fast.kernels.affinity_loss import _teacher_class

    kind = ("fp32" if shape.dtype == "fp32" else "half", _teacher_class(shape.teachers))
    return [f"K={shape.teachers} {bm}x{bn}x{bd} w{w} s{s}" for bm, bn, bd, w, s in shapes[kind]]


def _fastest(kernels: list[Kernel]) -> Kernel:
    """The candidate the model predicts fastest: autotuning is assumed to find it."""
    return min(kernels, key=lambda k: k.seconds(H100))


def fused_affinity(shape: Shape, mode: str, registers: dict) -> list[Kernel]:
    """This package's fused kernels: the statistics pass over row blocks x column splits and
    the merge of its partials (forward), the dL/dA pass per gradient chunk and its two cuBLAS
    GEMMs (backward)."""
    import tinyclip_fast.kernels.affinity_loss as kernels
    from tinyclip_fast.kernels.common import column_splits
    from tinyclip_fast.kernels.row_stats_combine import partial_fields

    k, columns = shape.teachers, 1 + shape.square
    out = []
    if mode in ("forward", "full"):
        stats = (1 + k) * columns
        alu = stats * ALU_PER_STAT + (k + (k == 1)) * columns * ALU_PER_SUM + 3
        splits = column_splits(shape.m, shape.n)
        candidates = []
        for config in _configs(shape, kernels._STATS_SHAPES):
            programs = math.ceil(shape.m / configuration_blocks(config)[0]) * splits
            kernel = _tile_loop(
                "_affinity_stats_kernel", shape, config, registers, shape.m, programs, stats,
                alu, extra_hbm=splits * partial_fields(k) * shape.m * 4, column_programs=splits,
            )  # fmt: skip
            candidates.append(kernel)
        out.append(_fastest(candidates))
        out.append(_combine(shape.m, splits, k))
    if mode in ("backward", "full"):
        out += _affinity_backward(shape, registers)
    return out


def _combine(m: int, splits: int, teachers: int) -> Kernel:
    """The log-sum-exp merge of the column splits' partial row statistics (read twice)."""
    from tinyclip_fast.kernels import row_stats_combine
    from tinyclip_fast.kernels.row_stats_combine import partial_fields

    fields = partial_fields(teachers)
    return Kernel(
        "_combine_row_stats_kernel", hbm_bytes=4.0 * m * (2 * splits * fields + fields),
        sfu=2.0 * m * splits * (1 + teachers), programs=math.ceil(m / row_stats_combine.BLOCK),
        blocks_per_sm=8,
    )  # fmt: skip


def _affinity_backward(shape: Shape, registers: dict) -> list[Kernel]:
    """Per gradient chunk of rows: the dL/dA kernel (writes G once) and the two GEMMs (their
    operand bytes count G's two reads)."""
    import tinyclip_fast.kernels.affinity_loss as kernels
    from tinyclip_fast.kernels.common import grad_chunk_rows

    size = ELEMENT_BYTES[shape.dtype]
    chunk = grad_chunk_rows(shape.m, shape.n, size)
    softmaxes = (1 + shape.teachers) * (1 + shape.square)
    candidates = []
    for config in _configs(shape, kernels._GRAD_SHAPES):
        bm, bn, _, _ = configuration_blocks(config)
        column_programs = math.ceil(shape.n / bn)
        kernel = _tile_loop(
            "_affinity_grad_logits_kernel", replace(shape, m=chunk), config, registers, chunk,
            math.ceil(chunk / bm) * column_programs, softmaxes, softmaxes * ALU_PER_STAT + 8,
            extra_hbm=chunk * shape.n * size, column_programs=column_programs,
        )  # fmt: skip
        candidates.append(kernel)
    out = []
    for start in range(0, shape.m, chunk):
        rows = min(chunk, shape.m - start)
        out.append(_fastest(candidates))
        out.append(gemm(rows, shape.d, shape.n, shape.dtype, "cuBLAS dX = G Y"))
        out.append(gemm(shape.n, shape.d, rows, shape.dtype, "cuBLAS dY = G^T X"))
    return out


def _eager_pass(name: str, shape: Shape, logit_bytes: int, passes: float, sfu: float = 0.0):
    """An elementwise or reduction op over the [m, n] logits: ``passes`` reads + writes."""
    elements = float(shape.m) * shape.n
    return Kernel(
        name, hbm_bytes=passes * elements * logit_bytes, sfu=sfu * elements,
        alu=4 * elements, programs=max(1, int(elements // (256 * 8))), blocks_per_sm=8,
    )  # fmt: skip


# open_clip DistillClipLoss (loss.py): per direction (image->text, text->image) of the student
# and the teacher: a logits GEMM; cross_entropy = log_softmax + nll; dist_loss = softmax of
# the teacher, log_softmax of the student, their product, a row sum. (name, passes, exps) per
# direction; the backward of each, per direction, with the gradient of the logits summed from
# both terms; then two GEMMs per direction for the feature gradients.
_EAGER_FORWARD = (
    ("log_softmax (contrastive)", 2, 1),
    ("softmax (teacher)", 2, 1),
    ("log_softmax (student, distill)", 2, 1),
    ("product P * log Q", 3, 0),
    ("row sum", 1, 0),
)
_EAGER_BACKWARD = (
    ("mul backward", 2, 0),
    ("log_softmax backward (distill)", 4, 1),
    ("nll backward (one-hot scatter)", 1, 0),
    ("log_softmax backward (contrastive)", 4, 1),
    ("sum of the two gradients", 3, 0),
)


def open_clip_affinity(shape: Shape, mode: str, logits_dtype: str) -> list[Kernel]:
    """open_clip's eager DistillClipLoss (distill + contrastive) with one teacher."""
    size = ELEMENT_BYTES[logits_dtype]
    dtype = shape.dtype
    out = []
    # The local (rectangular) loss is one direction of m rows against n columns.
    for direction in ("image", "text")[: 1 + shape.square]:
        if mode in ("forward", "full"):
            for who in ("student", "teacher"):
                out.append(gemm(shape.m, shape.n, shape.d, logits_dtype, f"{who} {direction} GEMM"))
            out += [
                _eager_pass(f"{direction} {name}", shape, size, p, e)
                for name, p, e in _EAGER_FORWARD
            ]
        if mode in ("backward", "full"):
            out += [
                _eager_pass(f"{direction} {name}", shape, size, p, e)
                for name, p, e in _EAGER_BACKWARD
            ]
            out.append(gemm(shape.m, shape.d, shape.n, dtype, f"{direction} dX GEMM"))
            out.append(gemm(shape.n, shape.d, shape.m, dtype, f"{direction} dY GEMM"))
    return out


def blocked_affinity(shape: Shape, mode: str) -> list[Kernel]:
    """The second design (predicted only): cuBLAS writes each student and teacher logit block
    (features' dtype) and bandwidth-bound kernels read each block once per pass: the row and
    column statistics in the forward, dL/dA in the backward (logits recomputed there), then
    the two feature-gradient GEMMs."""
    k, columns = shape.teachers, 1 + shape.square
    size = ELEMENT_BYTES[shape.dtype]
    elements = float(shape.m) * shape.n
    blocks = [
        gemm(shape.m, shape.n, shape.d, shape.dtype, "cuBLAS logit block") for _ in range(1 + k)
    ]
    out = []
    if mode in ("forward", "full"):
        out += blocks
        out.append(
            Kernel(
                "statistics over the blocks",
                hbm_bytes=(1 + k) * elements * size,
                sfu=(1 + k) * columns * elements,
                alu=(1 + k) * columns * ALU_PER_STAT * elements,
                programs=max(1, int(elements // 8192)),
                blocks_per_sm=4,
            )  # fmt: skip
        )
    if mode in ("backward", "full"):
        out += blocks
        out.append(
            Kernel(
                "dL/dA over the blocks",
                hbm_bytes=(2 + k) * elements * size,
                sfu=(1 + k) * columns * elements,
                alu=(1 + k) * columns * ALU_PER_STAT * elements,
                programs=max(1, int(elements // 8192)),
                blocks_per_sm=4,
            )  # fmt: skip
        )
        out.append(gemm(shape.m, shape.d, shape.n, shape.dtype, "cuBLAS dX = G Y"))
        out.append(gemm(shape.n, shape.d, shape.m, shape.dtype, "cuBLAS dY = G^T X"))
    return out


def fused_sigmoid(shape: Shape, mode: str, registers: dict) -> list[Kernel]:
    """SigLIP (no teachers): one pass writes G with the loss (GRAD on, any mode with a
    backward), then the two GEMMs; the forward alone is the same pass without G."""
    import tinyclip_fast.kernels.common as common
    import tinyclip_fast.kernels.sigmoid_loss as kernels

    grad = mode != "forward"
    size = ELEMENT_BYTES[shape.dtype]
    shapes = (
        kernels._CONTRASTIVE_FP32_SHAPES if shape.dtype == "fp32" else kernels._CONTRASTIVE_SHAPES
    )
    candidates = []
    for bm, bn, bd, w, s in shapes:
        config = f"siglip {bm}x{bn}x{bd} w{w} s{s}"
        column_programs = min(math.ceil(shape.n / bn), common.COLUMN_PROGRAMS)
        programs = math.ceil(shape.m / bm) * column_programs
        extra = shape.m * shape.n * size if grad else 0.0
        candidates.append(
            _tile_loop(
                "_sigmoid_loss_kernel",
                shape,
                config,
                registers,
                shape.m,
                programs,
                2.0,
                14.0,
                extra_hbm=extra,
            )  # fmt: skip
        )
    out = [_fastest(candidates)]
    if grad:
        out.append(gemm(shape.m, shape.d, shape.n, shape.dtype, "cuBLAS dX = G Y"))
        out.append(gemm(shape.n, shape.d, shape.m, shape.dtype, "cuBLAS dY = G^T X"))
    return out


# open_clip SigLipLoss (loss.py): logits GEMM, + bias, labels = 2 eye - 1 (in the logits'
# dtype), labels * logits, logsigmoid (keeps a buffer for its backward), sum; the backward
# of each, then the two feature-gradient GEMMs. (name, passes, exps)
_SIGLIP_FORWARD = (
    ("+ bias", 2, 0),
    ("labels 2 eye - 1", 5, 0),
    ("labels * logits", 3, 0),
    ("logsigmoid", 3, 2),
    ("sum", 1, 0),
)
_SIGLIP_BACKWARD = (("logsigmoid backward", 4, 1), ("mul backward", 3, 0), ("bias grad", 1, 0))


def open_clip_sigmoid(shape: Shape, mode: str, logits_dtype: str) -> list[Kernel]:
    """open_clip's eager SigLipLoss on one device."""
    size = ELEMENT_BYTES[logits_dtype]
    out = []
    if mode in ("forward", "full"):
        out.append(gemm(shape.m, shape.n, shape.d, logits_dtype, "logits GEMM"))
        out += [_eager_pass(name, shape, size, p, e) for name, p, e in _SIGLIP_FORWARD]
    if mode in ("backward", "full"):
        out += [_eager_pass(name, shape, size, p, e) for name, p, e in _SIGLIP_BACKWARD]
        out.append(gemm(shape.m, shape.d, shape.n, shape.dtype, "dX GEMM"))
        out.append(gemm(shape.n, shape.d, shape.m, shape.dtype, "dY GEMM"))
    return out


# --------------------------------------------------------------------------------- tables

MODES = ("forward", "backward", "full")
AFFINITY_SHAPES = (
    *(Shape(n, n) for n in (256, 2048, 16384, 65536, 262144)),
    *(Shape(m, n, square=False) for m, n in ((1024, 8192), (2048, 16384), (4096, 65536))),
)
SIGMOID_SHAPES = tuple(Shape(n, n, teachers=0) for n in (2048, 16384, 65536))


def affinity_designs(shape: Shape, mode: str, registers: dict) -> dict[str, list[Kernel]]:
    """Every implementation the model prices for one affinity shape and mode."""
    designs = {
        "fused (ours)": fused_affinity(shape, mode, registers),
        "blocks (2nd design)": blocked_affinity(shape, mode),
    }
    if shape.teachers == 1:
        designs["open_clip bf16 logits"] = open_clip_affinity(shape, mode, "bf16")
        designs["open_clip fp32 logits"] = open_clip_affinity(shape, mode, "fp32")
    return designs


def sigmoid_designs(shape: Shape, mode: str, registers: dict) -> dict[str, list[Kernel]]:
    return {
        "fused (ours)": fused_sigmoid(shape, mode, registers),
        "open_clip bf16 logits": open_clip_sigmoid(shape, mode, "bf16"),
        "open_clip fp32 logits": open_clip_sigmoid(shape, mode, "fp32"),
    }


def predicted_ms(family: str, shape: Shape, mode: str, card: Card, registers: dict) -> dict:
    """Predicted milliseconds of each design: what the GPU check prints beside a measurement."""
    designs = (affinity_designs if family == "affinity" else sigmoid_designs)(
        shape, mode, registers
    )
    return {
        name: 1e3 * predict(kernels, card, host_ops(family, name, mode))
        for name, kernels in designs.items()
    }


def grid_programs(kernel: str, config: str, m: int, n: int, size: int = 2) -> int | None:
    """Programs of a launch of ``kernel`` (a loss kernel of the sm_90 report) with the blocks
    of ``config`` on m rows x n columns (features of ``size`` bytes); None for others."""
    from tinyclip_fast.kernels import common, row_stats_combine

    if kernel == "_combine_row_stats_kernel":
        return math.ceil(m / row_stats_combine.BLOCK)
    if kernel not in _GRIDS:
        return None
    bm, bn, _, _ = configuration_blocks(config)
    rows, columns = _GRIDS[kernel]
    rows = common.grad_chunk_rows(m, n, size) if rows == "chunk" else m
    tiles = math.ceil(n / bn)
    split = {
        "splits": common.column_splits(m, n),
        "tiles": tiles,
        "capped": min(tiles, common.COLUMN_PROGRAMS),
    }[columns]
    return math.ceil(rows / bm) * split


# Per kernel: (rows of one launch: all m, or a gradient chunk; programs per row block).
_GRIDS = {
    "_affinity_stats_kernel": ("m", "splits"),
    "_affinity_grad_logits_kernel": ("chunk", "tiles"),
    "_mixture_entropy_kernel": ("m", "capped"),
    "_sigmoid_loss_kernel": ("chunk", "capped"),
}


def card_for(name: str) -> Card:
    """The model's card for a device name (an H200 by name, else the H100's rates)."""
    return H200 if "H200" in name.upper() else H100


def model_cell(predicted_ms: float, measured_ms: float | None) -> str:
    """A GPU table's model cell: the prediction and measured / predicted (the model's
    error: x1.30 = 30% slower than predicted)."""
    if measured_ms is None:
        return f"{predicted_ms:.3f}"
    return f"{predicted_ms:.3f} (x{measured_ms / predicted_ms:.2f})"


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3f}"


def design_table(family: str, shapes, registers: dict) -> list[str]:
    heads = " | ".join(f"{c.name} {what}" for c in CARDS for what in ("ours ms", "others ms"))
    lines = [
        f"| shape | mode | {heads} |",
        "|---|---|" + "---|" * (2 * len(CARDS)),
    ]
    for shape in shapes:
        for mode in MODES:
            cells = []
            for card in CARDS:
                times = predicted_ms(family, shape, mode, card, registers)
                ours = times.pop("fused (ours)")
                others = ", ".join(
                    f"{name} {ms:.3f} ({ms / ours:.2f}x)" for name, ms in times.items()
                )
                cells += [f"{ours:.3f}", others]
            lines.append(f"| {shape.label} | {mode} | {' | '.join(cells)} |")
    return lines


def kernel_table(family: str, shapes, registers: dict, card: Card) -> list[str]:
    lines = [
        "| shape | kernel | configuration | GFLOP | HBM GB | L2 GB | programs | blocks/SM | waves "
        "| bound | ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    designs = affinity_designs if family == "affinity" else sigmoid_designs
    for shape in shapes:
        kernels = designs(shape, "full", registers)["fused (ours)"]
        for k in dict.fromkeys(kernels):  # each chunk's launches once, with their count
            count = kernels.count(k)
            name = f"{k.name} (x{count}, per launch)" if count > 1 else k.name
            lines.append(
                f"| {shape.label} | {name} | {k.config or '-'} | {k.flops / 1e9:.1f} | "
                f"{k.hbm_bytes / 1e9:.3f} | {k.l2_bytes / 1e9:.2f} | {k.programs:,} | "
                f"{k.blocks_per_sm} | {k.waves(card):.2f} | {k.bound(card)} | "
                f"{_ms(k.seconds(card))} |"
            )
    return lines


def assumptions() -> str:
    rates = "; ".join(
        f"{c.name}: {c.sms} SMs, L2 {c.l2_bytes / 1e6:.0f} MB, bf16 GEMM "
        f"{c.gemm_flops / 1e12:.0f} TFLOP/s and copy {c.hbm_bytes / 1e12:.1f} TB/s (measured, "
        f"KINDS.md), L2-to-SM {c.l2_sm_bytes / 1e12:.1f} TB/s (assumed), SFU "
        f"{c.sfu_ops / 1e12:.1f} T/s, fp32 {c.alu_ops / 1e12:.1f} T instructions/s"
        for c in CARDS
    )
    return (
        f"Predictions of bench/cost_model.py, not measurements. Rates (sources in the file): "
        f"{rates}. Assumed: one dispatched PyTorch op or launch costs {HOST_OP_S * 1e6:.0f} us "
        f"of host time and {GPU_GAP_S * 1e6:.1f} us of device time between kernels; a Triton "
        f"tl.dot loop reaches {TRITON_DOT_SHARE:.0%} of the cuBLAS rate; fp32 features cost "
        "6x bf16 per FLOP (3xTF32). A kernel's time = max(FLOPs / rate, HBM bytes / copy "
        "rate, L2 bytes / L2 rate, exp2 / SFU rate, fp32 instructions / ALU rate) / (waves / "
        "whole waves); a call's time = the larger of its kernels' sum and its host ops "
        "(counted on the CPU) x the host cost. dot_tile reloads both operand blocks from L2 "
        "for every tile; an operand larger than the L2 comes from HBM again for every "
        "sweep over it (each wave of column-sweeping programs, each column program of a 2-D "
        "grid). open_clip eager = one kernel per op of its autograd graph, each reading and "
        "writing the [n, n] logits (the passes are listed in the file). Blocks per SM come "
        f"from the registers and shared memory of the sm_90 report ({REPORT.name}); "
        "autotuning is assumed to pick the candidate the model predicts fastest; the second "
        "design (blocks) is priced, not built."
    )


def report(registers: dict) -> str:
    lines = ["# Cost model of the loss kernels (predicted, H100 and H200)", "", assumptions(), ""]
    lines += [
        "## Affinity loss: predicted ms, ours beside the other designs (x = their time / ours)",
        "",
    ]
    lines += design_table("affinity", AFFINITY_SHAPES, registers)
    for card in CARDS:
        lines += [
            "",
            f"## Affinity loss, full (forward + backward): our kernels on the {card.name}",
            "",
        ]
        lines += kernel_table("affinity", AFFINITY_SHAPES, registers, card)
    lines += ["", "## Sigmoid (SigLIP) loss: predicted ms", ""]
    lines += design_table("sigmoid", SIGMOID_SHAPES, registers)
    lines += ["", "## Sigmoid loss, full: our kernels on the H100", ""]
    lines += kernel_table("sigmoid", SIGMOID_SHAPES, registers, H100)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=REPORT, help="the sm_90 report to read")
    parser.add_argument("--out", type=Path, default=None, help="write cost_model.md here")
    args = parser.parse_args(argv)
    text = report(read_report(args.report))
    sys.stdout.write(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cost_model.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
