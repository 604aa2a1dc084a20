"""bench/sm90_report.py: the kernels compile for sm_90 without a GPU, and --check: no kernel
configuration spills registers there.

The installed Triton compiles every kernel x autotune configuration x dtype ahead of time
(no GPU needed) and its bundled ptxas counts spills. bf16/fp16 configurations must not
spill, nor the affinity and sigmoid kernels' fp32 (3xTF32) ones. The interpreter never
compiles, so the fast test builds one configuration of each family as a launch would.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "sm90_report.py"

FAMILIES = [
    pytest.param("affinity_loss", "bf16,fp16,fp32", 600, id="affinity_loss"),
    pytest.param("affinity_ensemble", "bf16,fp16,fp32", 900, id="affinity_ensemble"),
    pytest.param("sigmoid_loss", "bf16,fp16,fp32", 600, id="sigmoid_loss"),
    pytest.param("masked_matmul", "bf16,fp16", 1200, id="masked_matmul"),
]


_FIRST_VARIANT = """
import sys
sys.path.insert(0, {bench!r})
import sm90_report
variant = next(sm90_report.FAMILIES[{family!r}](({dtype!r},)))
report = sm90_report.compile_variant(variant)
assert not report.error, report.error
print(variant.kernel, variant.label, report.registers)
"""


@pytest.mark.parametrize(
    "family,dtype",
    [("affinity_loss", "fp32"), ("affinity_ensemble", "bf16"), ("sigmoid_loss", "bf16")],
)
def test_one_configuration_compiles_for_sm90(family, dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = _FIRST_VARIANT.format(bench=str(SCRIPT.parent), family=family, dtype=dtype)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(1300)
@pytest.mark.parametrize("family,dtypes,seconds", FAMILIES)
def test_no_register_spills_on_sm90(family, dtypes, seconds):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [
        sys.executable, str(SCRIPT), "--check", "--fail-fast", "--families", family,
        "--dtypes", dtypes, "--check-dtypes", dtypes, "--jobs", str(min(os.cpu_count() or 1, 4)),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def _ptx(*body: str) -> str:
    return "\n".join(["\t.entry k(", ")", "{", *body, "\tret;", "}"])


MMA = "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, 1, 1, 1, 1;"


@pytest.mark.parametrize(
    "ptx,expected",
    [
        (_ptx("\tadd.s32 %r1, %r1, 1;"), "no wgmma"),
        (_ptx(MMA, "\twgmma.wait_group.sync.aligned 0;"), "no (wgmma outside loops)"),
        # The tile loop (BB0_1) holds two dot loops; the depths are read per inner loop.
        (
            _ptx(
                "$L__BB0_1:", "$L__BB0_2:", MMA, MMA, "\twgmma.wait_group.sync.aligned 1;",
                "\t@%p1 bra \t$L__BB0_2;", "\twgmma.wait_group.sync.aligned 0;", "$L__BB0_3:",
                MMA, MMA, "\twgmma.wait_group.sync.aligned 1;", "\t@%p2 bra \t$L__BB0_3;",
                "\tbra.uni \t$L__BB0_1;",
            ),
            "yes: 2 loops x 2 mma, wait 1",
        ),
        # A forward branch is no loop; a wait 0 inside the loop is reported as such.
        (
            _ptx("\t@%p1 bra \t$L__BB0_9;", "$L__BB0_4:", MMA, "\twgmma.wait_group.sync.aligned 0;",
                 "\t@%p2 bra \t$L__BB0_4;", "$L__BB0_9:"),
            "yes: 1 loop x 1 mma, wait 0",
        ),
    ],
    ids=["none", "outside", "pipelined", "serialised"],
)  # fmt: skip
def test_loop_wgmma_reads_the_loops(ptx, expected):
    sys.path.insert(0, str(SCRIPT.parent))
    import sm90_report

    assert sm90_report.loop_wgmma(ptx) == expected
