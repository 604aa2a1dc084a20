"""pytest plugin of bench/gpu_check.sh: tinyclip_fast's autotuned kernels keep one configuration.

Correctness tests on CUDA time nothing, yet a cold autotuner compiles and times every
candidate configuration of every kernel variant they launch (minutes of a short GPU
window; one fp32 masked-matmul configuration takes tens of seconds to compile). Loaded with
``-p autotune_first`` (bench/ on PYTHONPATH), before any kernel is defined it hands
``triton.autotune`` only the first candidate for kernels of ``tinyclip_fast.kernels``;
other kernels keep theirs. The benchmarks run without it and tune what they measure.
"""

import inspect

_PACKAGE = "tinyclip_fast.kernels"


def pytest_configure(config) -> None:
    """Patch once the initial conftest ran (it picks the interpreter before triton loads)."""
    import triton

    autotune = triton.autotune

    def first_configuration_only(*args, **kwargs):
        bound = inspect.signature(autotune).bind(*args, **kwargs)
        every = autotune(*bound.args, **bound.kwargs)
        bound.arguments["configs"] = list(bound.arguments["configs"])[:1]
        first = autotune(*bound.args, **bound.kwargs)
        return lambda fn: (first if fn.__module__.startswith(_PACKAGE) else every)(fn)

    triton.autotune = first_configuration_only
