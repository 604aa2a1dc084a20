"""bench/gpu_check.sh fits its device time: the step budgets add up to at most its total."""

import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


def test_the_step_budgets_fit_the_total():
    text = SCRIPT.read_text()
    total = int(re.search(r"GPU_CHECK_BUDGET:-(\d+)", text).group(1))
    budgets = {name: int(s) for name, s in re.findall(r"^plan ([\w-]+) (\d+)", text, re.M)}
    assert {"install", "step-graph", "loss-bench", "loader-bench", "summary"} <= budgets.keys()
    assert sum(budgets.values()) <= total, budgets
