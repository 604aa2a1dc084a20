"""bench/cost_model.py: its arithmetic on small cases computed by hand, its reading of the
sm_90 report, and the host op counts it holds against a recount on the CPU."""

import math

import cost_model as cm
import pytest
import torch
from tinyclip_fast.kernels import INTERPRETING
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

CARD = cm.Card("test", sms=4, l2_bytes=1e6, gemm_flops=1e12, hbm_bytes=1e11, l2_sm_bytes=1e12,
               sfu_ops=1e10, alu_ops=1e11)  # fmt: skip


@pytest.mark.parametrize(
    "registers,warps,shared,blocks",
    [
        (225, 8, 49152, 1),  # 232 x 32 = 7,424 registers per warp: 8 warps fit, one block
        (101, 8, 49152, 2),  # 104 x 32 = 3,328: 19 warps, two blocks of 8
        (64, 4, 0, 8),  # 2,048 per warp: 32 warps by registers, 8 blocks of 4 warps
        (32, 4, 100_000, 2),  # shared memory: 233,472 // 101,024 = 2
        (16, 1, 0, 32),  # the 32-block limit
    ],
)
def test_blocks_per_sm(registers, warps, shared, blocks):
    assert cm.blocks_per_sm(registers, warps, shared) == blocks


def test_kernel_time_is_the_slowest_resource_over_the_filled_share():
    # 6 programs on 4 SMs x 1 block: 1.5 waves, so 1.5 / 2 of the slots are busy.
    kernel = cm.Kernel("k", flops=1e9, hbm_bytes=2e8, l2_bytes=1e8, sfu=1e6, alu=1e6,
                       programs=6, blocks_per_sm=1, cublas=True)  # fmt: skip
    times = kernel.resource_times(CARD)
    assert times == pytest.approx(
        {"tensor": 1e-3, "L2": 1e-4, "HBM": 2e-3, "SFU": 1e-4, "ALU": 1e-5}
    )
    assert kernel.bound(CARD) == "HBM"
    assert kernel.waves(CARD) == 1.5
    assert kernel.fill(CARD) == 0.75
    assert kernel.seconds(CARD) == pytest.approx(2e-3 / 0.75 + cm.GPU_GAP_S)


def test_a_grid_within_one_wave_fills_its_share_of_the_sms():
    assert cm.Kernel("k", programs=2, blocks_per_sm=8).fill(CARD) == 0.5
    assert cm.Kernel("k", programs=12, blocks_per_sm=8).fill(CARD) == 1.0


def test_triton_dots_run_at_their_share_of_the_gemm_rate():
    kernel = cm.Kernel("k", flops=1e9, programs=4, dot_cost=6.0)
    assert kernel.resource_times(CARD)["tensor"] == pytest.approx(6e-3 / cm.TRITON_DOT_SHARE)


def test_predict_sums_kernels_or_takes_the_host_when_slower():
    kernel = cm.Kernel("k", hbm_bytes=1e8, programs=4)  # 1 ms
    assert cm.predict([kernel, kernel], CARD) == pytest.approx(2e-3 + 2 * cm.GPU_GAP_S)
    ops = math.ceil(1.0 / cm.HOST_OP_S)  # a second of host dispatch
    assert cm.predict([kernel], CARD, ops) == pytest.approx(ops * cm.HOST_OP_S)


def test_gemm_counts():
    kernel = cm.gemm(256, 128, 64, "bf16")
    assert kernel.flops == 2 * 256 * 128 * 64
    assert kernel.hbm_bytes == (256 * 64 + 64 * 128 + 256 * 128) * 2
    assert kernel.programs == 2 * 1
    assert cm.gemm(256, 128, 64, "fp32").hbm_bytes == 2 * kernel.hbm_bytes


def test_stats_kernel_counts_by_hand():
    # n = 256 square, d = 64, one teacher, bf16, 64 x 64 tiles: 4 x 4 tiles, each loading
    # (64 + 64) rows of the student's and the teacher's 64 dims.
    shape = cm.Shape(256, 256, d=64)
    registers = {("_affinity_stats_kernel", "bf16", "K=1 64x64x64 w8 s3"): (225, 49152)}
    kernel = cm._tile_loop(
        "_affinity_stats_kernel", shape, "K=1 64x64x64 w8 s3", registers, 256, 4, 4.0, 30.0
    )
    assert kernel.flops == 2 * 256 * 256 * 128
    assert kernel.l2_bytes == 16 * 128 * 128 * 2
    assert kernel.hbm_bytes == (256 + 256) * 128 * 2
    assert kernel.sfu == 4 * 256 * 256
    assert kernel.alu == 30 * 256 * 256
    assert kernel.blocks_per_sm == 1


def test_open_clip_eager_passes():
    # Per direction, forward: 2 + 2 + 2 + 3 + 1 = 10 passes over the [n, n] logits.
    shape = cm.Shape(128, 128, d=64)
    kernels = cm.open_clip_affinity(shape, "forward", "fp32")
    passes = sum(k.hbm_bytes for k in kernels if "GEMM" not in k.name) / (128 * 128 * 4)
    assert passes == 2 * 10
    assert sum("GEMM" in k.name for k in kernels) == 4


def test_reads_the_committed_report():
    registers = cm.read_report()
    assert registers["_affinity_stats_kernel", "bf16", "K=1 64x64x64 w8 s3"][0] > 0
    assert cm.configuration_blocks("K=1 64x128x32 w8 s3") == (64, 128, 32, 8)


def test_every_prediction_is_positive_and_finite():
    registers = cm.read_report()
    for family, shapes in (("affinity", cm.AFFINITY_SHAPES), ("sigmoid", cm.SIGMOID_SHAPES)):
        for shape in shapes:
            for card in cm.CARDS:
                times = cm.predicted_ms(family, shape, "full", card, registers)
                assert all(0 < t < math.inf for t in times.values())


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        opdef = custom_ops.OPDEFS.get(func._schema.name)
        if opdef is not None:  # the package's registered ops: count what their bodies dispatch
            with self:
                return opdef._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class _Stub:
    """A kernel launch that does nothing but count itself."""

    def __init__(self, counter):
        self.counter = counter

    def __getitem__(self, key):
        return self

    def __call__(self, *args, **kwargs):
        self.counter.ops += 1


def _forward_backward_ops(loss_fn, *args) -> tuple[int, int]:
    counter = _Count()
    with counter:
        loss = loss_fn(*args)
    forward, counter.ops = counter.ops, 0
    with counter:
        loss.backward()
    return forward, counter.ops


def _inputs(n=64, d=32):
    x = torch.randn(n, d, requires_grad=True)
    y = torch.randn(n, d, requires_grad=True)
    return x, y, torch.tensor(10.0, requires_grad=True), torch.randn(n, d), torch.randn(n, d)


def test_open_clip_host_ops():
    from open_clip.loss import DistillClipLoss, SigLipLoss

    x, y, scale, tx, ty = _inputs()
    distill = DistillClipLoss()
    ops = _forward_backward_ops(
        lambda *a: sum(distill(*a)), x, y, scale, tx, ty, torch.tensor(20.0)
    )
    assert ops == cm.HOST_OPS["affinity", "open_clip"]
    siglip = SigLipLoss()
    ops = _forward_backward_ops(siglip, x, y, scale, torch.tensor(-10.0, requires_grad=True))
    assert ops == cm.HOST_OPS["sigmoid", "open_clip"]


@pytest.mark.skipif(not INTERPRETING, reason="counts the kernel path on the CPU")
def test_our_host_ops(monkeypatch):
    import tinyclip_fast.kernels.affinity_loss as affinity
    import tinyclip_fast.kernels.sigmoid_loss as sigmoid

    from tinyclip_fast.ops.affinity_loss import affinity_loss_square
    from tinyclip_fast.ops.sigmoid_loss import siglip_loss

    x, y, scale, tx, ty = _inputs()
    counter = _Count()
    stub = _Stub(counter)
    for name in ("_STATS_KERNELS", "_GRAD_KERNELS"):
        monkeypatch.setattr(affinity, name, stub)
    monkeypatch.setattr(affinity, "combine_row_stats", stub)
    for name in ("_contrastive_kernel", "_distill_kernel"):
        monkeypatch.setattr(sigmoid, name, stub)

    def ours(*args):
        distill, contrastive = affinity_loss_square(*args, compute_contrastive=True)
        return distill + contrastive

    def count(loss_fn, *args):
        with counter:
            loss = loss_fn(*args)
        forward, counter.ops = counter.ops, 0
        with counter:
            loss.backward()
        backward, counter.ops = counter.ops, 0
        return forward, backward

    assert count(ours, x, y, scale, tx, ty, torch.tensor(20.0)) == cm.HOST_OPS["affinity", "ours"]
    bias = torch.tensor(-10.0, requires_grad=True)
    assert count(siglip_loss, x, y, scale, bias) == cm.HOST_OPS["sigmoid", "ours"]


def test_model_cells_and_cards():
    assert cm.model_cell(2.0, 3.0) == "2.000 (x1.50)"
    assert cm.model_cell(2.0, None) == "2.000"
    assert cm.card_for("NVIDIA H200") is cm.H200
    assert cm.card_for("NVIDIA H100 80GB HBM3") is cm.H100


def test_gpu_tables_print_the_model_beside_each_measurement():
    import bench_affinity_loss
    import bench_sigmoid_loss

    results = {("tinyclip_fast", 256, "full"): (1.0, 10.0), ("open_clip", 256, "full"): None}
    lines = bench_affinity_loss.gpu_report(results, [256], ("full",), "NVIDIA H100", 800.0, "v")
    row = lines[-1].split("|")
    predicted = cm.predicted_ms("affinity", cm.Shape(256, 256), "full", cm.H100, cm.read_report())
    assert row[-3].strip() == cm.model_cell(predicted["fused (ours)"], 1.0)
    assert row[-2].strip() == cm.model_cell(predicted["open_clip bf16 logits"], None)
    sigmoid = {
        (w, impl, 256, mode): (2.0, 5.0)
        for w in bench_sigmoid_loss.WORKLOADS
        for impl in bench_sigmoid_loss.IMPLS
        for mode in bench_sigmoid_loss.MODES
    }
    lines = bench_sigmoid_loss.gpu_report(sigmoid, [256], "NVIDIA H200", 800.0, "v")
    rows = [line for line in lines if line.startswith("| 256 |")]
    assert sum("(x" in row for row in rows) == len(bench_sigmoid_loss.MODES)


def test_summary_reads_the_model_error(tmp_path):
    from gpu_summary import model_summary

    (tmp_path / "affinity_loss_H100.md").write_text(
        "| n | ours model ms | open_clip model ms |\n|---|---|---|\n"
        "| 256 | 0.100 (x1.50) | 0.200 |\n| 512 | 0.100 (x0.50) | 0.300 (x2.00) |\n"
        "| 1024 | 0.100 (x1.00) | 0.300 |\n"
    )
    lines = model_summary(tmp_path, "H100")
    assert "ours model ms: median x1.00, from x0.50 to x1.50 over 3" in lines[1]
    assert "open_clip model ms: median x2.00, from x2.00 to x2.00 over 1" in lines[2]
    assert "sigmoid_loss: not measured" in lines[3]


LOCAL_SHAPES = [
    cm.Shape(m, n, square=False) for m in (1024, 2048, 4096) for n in (8192, 16384, 65536)
]


@pytest.mark.parametrize(
    "shape",
    [*LOCAL_SHAPES, *(cm.Shape(n, n) for n in (2048, 16384, 65536, 262144))],
    ids=lambda s: s.label,
)
def test_our_tile_kernels_fill_two_waves_of_132_sms(shape):
    """Local-loss shapes included; n < 2,048 has fewer tiles than two waves' programs."""
    registers = cm.read_report()
    for kernel in cm.fused_affinity(shape, "full", registers):
        if kernel.config:  # the Triton tile kernels (not cuBLAS, not the small combine)
            assert kernel.waves(cm.H100) >= 2, kernel
