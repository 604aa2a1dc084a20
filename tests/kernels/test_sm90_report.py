"""bench/sm90_report.py --check: no kernel configuration spills registers on sm_90.

The installed Triton compiles every kernel x autotune configuration x dtype ahead of time
(no GPU needed) and its bundled ptxas counts spills. bf16/fp16 configurations must not
spill, nor the affinity and sigmoid kernels' fp32 (3xTF32) ones.
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
