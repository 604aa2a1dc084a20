"""Static sm_90 report of the Triton kernels: registers, spills, shared memory, loop wgmma.

Every kernel, every autotune configuration the CUDA launchers may pick, and every feature
dtype (bf16, fp16, fp32) is compiled ahead of time for sm_90a by the installed Triton (no GPU
needed); the bundled ptxas then reports registers and spills of the PTX, the PTX's loops
show whether they issue Hopper's wgmma (``loop_wgmma``), and bench/cost_model.py turns the
registers and shared memory into blocks per SM and predicted waves. A spill in a bf16/fp16
main loop is a performance bug: ``--check`` exits 1 when one spills (fp32 variants are
reported, not checked, unless ``--check-dtypes`` names fp32 too).

    python bench/sm90_report.py                 # all kernels -> bench/results/sm90_<triton>.md
    python bench/sm90_report.py --check --dtypes bf16,fp16   # what the test suite runs
    python bench/sm90_report.py --families affinity_loss --out bench/results
    python bench/sm90_report.py --families masked_matmul --jobs 2

Each kernel family describes its variants in one function below (``FAMILIES``): the kernel,
the pointer dtypes of its signature, the constexprs of the launch, and the configurations.
Integer arguments are specialised as a real launch at the ViT-B shapes would be (Triton turns
an int equal to 1 into a constant and marks ints divisible by 16): ``unit`` names the
arguments that are 1 (unit strides), ``odd`` the ones not divisible by 16; every other int
and every pointer counts as divisible by 16. Without these hints the report would describe
code that no launch runs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cost_model

DTYPES = ("bf16", "fp16", "fp32")
# (m, n) of the waves column: the square benchmark shape and a local-loss one.
WAVE_SHAPES = ((16384, 16384), (2048, 16384))
CHECKED_DTYPES = ("bf16", "fp16")


@dataclass(frozen=True)
class Variant:
    """One compile: kernel ``module.kernel`` with these constexprs and launch options."""

    family: str
    module: str
    kernel: str
    dtype: str
    label: str
    pointers: tuple[tuple[str, str], ...]  # (argument, Triton type) of pointer and float args
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int
    unit: tuple[str, ...] = ()  # int arguments equal to 1 at launch
    odd: tuple[str, ...] = ()  # int arguments not divisible by 16 at launch
    # Tuple arguments: (argument, element types), an element "1" being an int equal to 1.
    tuples: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass
class Report:
    variant: Variant
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared_bytes: int = -1
    # The wgmma of the main loop (the loop with the most wgmma.mma_async): see loop_wgmma.
    loop: str = ""
    blocks_per_sm: int = 0
    # Ordered memory operations in the PTX: acq_rel / acquire / release atomics and fences.
    ordered: int = 0
    seconds: float = 0.0
    error: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def _config_values(config) -> tuple[dict, int, int]:
    return dict(config.kwargs), config.num_warps, config.num_stages


# ---------------------------------------------------------------------------- kernel families


def _affinity_variants(family: str, dtypes: tuple[str, ...], teachers: tuple[int, ...]):
    """The affinity kernels with K teachers and the column terms on (their heaviest form),
    and for K >= 2 the mixture-entropy pass of the ensemble KL."""
    import tinyclip_fast.kernels.affinity_loss as kernels
    import tinyclip_fast.kernels.mixture_entropy as entropy
    import tinyclip_fast.kernels.row_stats_combine as combine

    scalars = {
        "scale_ptr": "*fp32", "teacher_scale_ptr": "*fp32", "row_out_ptr": "*fp32",
        "col_shift_ptr": "*fp32", "col_acc_ptr": "*fp64", "row_lse_ptr": "*fp32",
        "col_lse_ptr": "*fp32", "coeff_ptr": "*fp32", "dscale_ptr": "*fp32",
        "partial_ptr": "*fp32", "row_active_ptr": "*i8",
    }  # fmt: skip
    for num_teachers in teachers:
        count = kernels._teacher_class(num_teachers)
        # Each teacher's features as a launch passes them: contiguous, unit dim strides.
        strides = ("i32", "1", "i32", "1") * num_teachers
        passes = [
            (kernels, "_affinity_stats_kernel", kernels._STATS_SHAPES),
            (kernels, "_affinity_grad_logits_kernel", kernels._GRAD_SHAPES),
        ]
        if num_teachers > 1:
            passes.append((entropy, "_mixture_entropy_kernel", entropy._ENTROPY_SHAPES))
        for source, kernel, shapes in passes:
            module = source.__name__
            fn = getattr(source, kernel)
            unit = [n for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")]
            for dtype in dtypes:
                pointers = {
                    name: scalars.get(name, f"*{dtype}")
                    for name in fn.arg_names
                    if name.endswith("_ptr")
                }
                tuples = (
                    ("teacher_x", (f"*{dtype}",) * num_teachers),
                    ("teacher_y", (f"*{dtype}",) * num_teachers),
                    ("teacher_dims", ("i32",) * num_teachers),
                    ("teacher_strides", strides),
                )
                kind = "fp32" if dtype == "fp32" else "half"
                for bm, bn, bd, warps, stages in shapes[kind, count]:
                    # The stats kernel as the forward launches it: every row needed.
                    active = {"ACTIVE_ROWS": False} if "ACTIVE_ROWS" in fn.arg_names else {}
                    consts = dict(
                        NUM_TEACHERS=num_teachers, COLUMNS=True, **active, UPCAST=False,
                        FP32_DOT=dtype == "fp32", DOT_PRECISION="tf32x3",
                        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                    )  # fmt: skip
                    yield Variant(
                        family, module, kernel, dtype,
                        f"K={num_teachers} {bm}x{bn}x{bd} w{warps} s{stages}",
                        tuple(pointers.items()), tuple(consts.items()), warps, stages,
                        unit=tuple(unit), tuples=tuples,
                    )  # fmt: skip
        # The merge of the statistics kernel's column splits (fp32 partials, any dtype).
        yield Variant(
            family, combine.__name__, "_combine_row_stats_kernel", "fp32",
            f"K={num_teachers} {combine.BLOCK} rows w4 s1",
            (("partial_ptr", "*fp32"), ("row_out_ptr", "*fp32")),
            (("NUM_TEACHERS", num_teachers), ("BLOCK", combine.BLOCK)), 4, 1,
        )  # fmt: skip


def affinity_loss_variants(dtypes: tuple[str, ...]) -> Iterator[Variant]:
    """The affinity kernels with one teacher, and the merge of the column splits."""
    yield from _affinity_variants("affinity_loss", dtypes, (1,))


def affinity_ensemble_variants(dtypes: tuple[str, ...]) -> Iterator[Variant]:
    """The affinity kernels for ensembles of 2 and 4 teachers, the merge and the entropy pass."""
    yield from _affinity_variants("affinity_ensemble", dtypes, (2, 4))


def masked_matmul_variants(dtypes: tuple[str, ...]) -> Iterator[Variant]:
    """The compact-form kernels as masked_linear launches them, every mask on: the matmul as
    forward (bias, unit stride along the weight's reduction) and input gradient (no bias, unit
    stride along the output), dense or with the weight gathered on the reduction side, the
    output side (then scattered into the full width) or both; the weight gradient dense or
    gathered the same ways. Each form with the configurations its autotuner may pick."""
    import tinyclip_fast.kernels.masked_matmul as kernels

    module = "tinyclip_fast.kernels.masked_matmul"
    # (reduction side gathered, output side gathered): dense, then the three gathered forms.
    forms = [(False, False), (True, False), (False, True), (True, True)]
    for dtype in dtypes:
        # fp32 runs the kernels with TF32 only (exact fp32 takes cuBLAS, see masked_linear).
        dot = dict(DOT_FP32=False, INPUT_PRECISION="tf32")
        matmul = {
            "a_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
            "c_ptr": f"*{dtype}", "r_idx_ptr": "*i32", "c_idx_ptr": "*i32",
            "c_pruned_ptr": "*i32", "r_scale_ptr": "*fp32", "c_scale_ptr": "*fp32",
        }  # fmt: skip
        wgrad = {
            "dy_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}",
            "dw_ptr": "*fp32", "d_in_ptr": "*fp32", "d_out_ptr": "*fp32", "db_ptr": "*fp32",
            "out_idx_ptr": "*i32", "in_idx_ptr": "*i32", "out_scale_ptr": "*fp32",
            "in_scale_ptr": "*fp32",
        }  # fmt: skip
        for gather_r, gather_c in forms:
            gathered = gather_r or gather_c
            where = {
                (False, False): "dense", (True, False): "gather-r", (False, True): "gather-c",
                (True, True): "gather-rc",
            }[(gather_r, gather_c)]  # fmt: skip
            size = 4 if dtype == "fp32" else 2
            for config in kernels.matmul_configs(gathered, size):
                blocks, warps, stages = _config_values(config)
                label = "x".join(str(v) for v in blocks.values())
                for role, weight_unit, bias in (
                    ("fwd", "stride_wr", True),
                    ("dgrad", "stride_wc", False),
                ):
                    consts = dict(
                        HAS_BIAS=bias, HAS_R_SCALE=True, HAS_C_SCALE=True, GATHER_R=gather_r,
                        GATHER_C=gather_c, SCATTER_C=gather_c, **dot, **blocks,
                    )  # fmt: skip
                    yield Variant(
                        "masked_matmul", module, "_masked_matmul_kernel", dtype,
                        f"{role} {where} {label} w{warps} s{stages}", tuple(matmul.items()),
                        tuple(consts.items()), warps, stages, unit=(weight_unit,),
                    )  # fmt: skip
            for config in kernels.weight_grad_configs(gathered, size):
                blocks, warps, stages = _config_values(config)
                consts = dict(
                    HAS_OUT_SCALE=True, HAS_IN_SCALE=True, GATHER_OUT=gather_c,
                    GATHER_IN=gather_r, NEED_DW=True, NEED_D_IN=True, NEED_D_OUT=True,
                    **dot, **blocks,
                )  # fmt: skip
                label = "x".join(str(v) for v in blocks.values())
                yield Variant(
                    "masked_matmul", module, "_masked_weight_grad_kernel", dtype,
                    f"{where} {label} w{warps} s{stages}", tuple(wgrad.items()),
                    tuple(consts.items()), warps, stages, unit=("stride_wk",),
                )  # fmt: skip


def sigmoid_loss_variants(dtypes: tuple[str, ...]) -> Iterator[Variant]:
    """The sigmoid-loss kernel as each autotuner launches it, gradient written (GRAD on):
    SigLIP alone, and four teachers (the heaviest ensemble) with the contrastive term for
    each distillation target."""
    import tinyclip_fast.kernels.sigmoid_loss as kernels

    module = "tinyclip_fast.kernels.sigmoid_loss"
    fn = kernels._sigmoid_loss_kernel
    scalars = {"affine_ptr": "*fp32", "teacher_affine_ptr": "*fp32", "partial_ptr": "*fp32"}
    units = [f"stride_{p}d" for p in ("x", "y")]
    forms = (
        ("siglip", kernels._CONTRASTIVE_SHAPES, 0, 1),
        *(
            (f"4 teachers {kind}", kernels._DISTILL_SHAPES, code, 4)
            for kind, code in kernels.KINDS.items()
        ),
    )
    for dtype in dtypes:
        pointers = {
            name: scalars.get(name, f"*{dtype}") for name in fn.arg_names if name.endswith("_ptr")
        }
        pointers.update(weight_c="fp32", weight_d="fp32")
        for form, shapes, kind, teachers in forms:
            tuples = (
                ("teacher_x", (f"*{dtype}",) * teachers),
                ("teacher_y", (f"*{dtype}",) * teachers),
                ("teacher_dims", ("i32",) * teachers),
                ("teacher_strides", ("i32", "1", "i32", "1") * teachers),
            )
            if dtype == "fp32":
                shapes = {
                    id(kernels._DISTILL_SHAPES): kernels._DISTILL_FP32_SHAPES,
                    id(kernels._CONTRASTIVE_SHAPES): kernels._CONTRASTIVE_FP32_SHAPES,
                }[id(shapes)]
            for bm, bn, bd, warps, stages in shapes:
                consts = dict(
                    NUM_TEACHERS=teachers, CONTRASTIVE=True, KIND=kind, GRAD=True, UPCAST=False,
                    FP32_DOT=dtype == "fp32", TEACHER_FP32_DOT=dtype == "fp32",
                    DOT_PRECISION="tf32x3", BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                )  # fmt: skip
                yield Variant(
                    "sigmoid_loss", module, fn.__name__, dtype,
                    f"{form} {bm}x{bn}x{bd} w{warps} s{stages}", tuple(pointers.items()),
                    tuple(consts.items()), warps, stages, unit=tuple(units),
                    odd=("label_offset", "row_start"), tuples=tuples,
                )  # fmt: skip


FAMILIES: dict[str, Callable[[tuple[str, ...]], Iterator[Variant]]] = {
    "affinity_loss": affinity_loss_variants,
    "affinity_ensemble": affinity_ensemble_variants,
    "masked_matmul": masked_matmul_variants,
    "sigmoid_loss": sigmoid_loss_variants,
}


# ---------------------------------------------------------------------------- compile + ptxas


def _ptxas() -> str:
    from triton.backends.nvidia import compiler

    try:
        tool = compiler.get_ptxas(90)
    except TypeError:  # older Triton: no arch argument
        tool = compiler.get_ptxas()
    path = getattr(tool, "path", tool[0] if isinstance(tool, tuple) else tool)
    return str(path)


_REGISTERS = re.compile(r"Used (\d+) registers")
# Atomics with acquire/release semantics and memory fences (not wgmma's proxy fences): a
# column sum or a partial needs none of them (Triton's default atomic is acq_rel; the
# kernels ask for relaxed ones).
_ORDERED = re.compile(
    r"\b(?:atom|red)\.[\w.]*(?:acq_rel|acquire|release)|\bmembar\.|\bfence\.(?:acq_rel|sc)\b"
)
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


_LABEL = re.compile(r"^(\$L__\w+):", re.MULTILINE)
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_WAIT = re.compile(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)")


def loop_wgmma(ptx: str) -> str:
    """Whether the PTX's loops issue wgmma, read from the loops themselves: a loop runs from
    a label to a branch back to it. Names the innermost loops holding wgmma.mma_async (the
    dot loops inside the tile loop), their MMAs per iteration and the wait_group depths
    there: ``wait 0`` inside such a loop waits for each MMA group before the next issues."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    loops = []
    for end, line in enumerate(lines):
        branch = _BRANCH.search(line)
        start = labels.get(branch.group(1)) if branch else None
        if start is not None and start < end:
            body = lines[start : end + 1]
            mma = sum("wgmma.mma_async" in text for text in body)
            waits = tuple(sorted({int(w) for text in body for w in _WAIT.findall(text)}))
            if mma:
                loops.append((start, end, mma, waits))
    if not any("wgmma.mma_async" in line for line in lines):
        return "no wgmma"
    inner = [
        (mma, waits)
        for start, end, mma, waits in loops
        if not any(start <= s and e <= end and (s, e) != (start, end) for s, e, _, _ in loops)
    ]
    if not inner:
        return "no (wgmma outside loops)"
    kinds = sorted(set(inner), reverse=True)
    return "yes: " + "; ".join(
        f"{inner.count(kind)} loop{'s' if inner.count(kind) > 1 else ''} x {kind[0]} mma, "
        f"wait {'/'.join(map(str, kind[1])) or 'none'}"
        for kind in kinds
    )


def _kernel_fn(variant: Variant):
    import importlib

    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(variant.module), variant.kernel)
    while not isinstance(kernel, JITFunction):  # unwrap @triton.autotune / heuristics
        kernel = kernel.fn
    return kernel


def compile_variant(variant: Variant) -> Report:
    """Compile one variant for sm_90a and read ptxas' resource usage of its PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = Report(variant)
    start = time.perf_counter()
    try:
        fn = _kernel_fn(variant)
        consts = {**dict(variant.constexprs), **{name: 1 for name in variant.unit}}
        pointers, tuples = dict(variant.pointers), dict(variant.tuples)
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                signature[name] = "constexpr"
                continue
            if name not in tuples:
                signature[name] = pointers.get(name, "i32")
                if name not in variant.odd and not signature[name].startswith("fp"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
                continue
            # Triton specialises tuple elements as it does arguments: 1 becomes a constant.
            signature[name] = tuple("constexpr" if t == "1" else t for t in tuples[name])
            for j, element in enumerate(tuples[name]):
                if element == "1":
                    consts[(i, j)] = 1
                else:
                    attrs[(i, j)] = [["tt.divisibility", 16]]
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
        )
        ptx = compiled.asm["ptx"]
        report.loop = loop_wgmma(ptx)
        report.ordered = len(_ORDERED.findall(ptx))
        report.shared_bytes = int(compiled.metadata.shared)
        with tempfile.TemporaryDirectory() as folder:
            source = Path(folder) / "kernel.ptx"
            source.write_text(ptx)
            done = subprocess.run(
                [_ptxas(), "-v", "--gpu-name", "sm_90a", str(source), "-o", os.devnull],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
        log = done.stdout + done.stderr
        registers = _REGISTERS.search(log)
        spills = _SPILLS.search(log)
        report.registers = int(registers.group(1)) if registers else -1
        report.blocks_per_sm = cost_model.blocks_per_sm(
            report.registers, variant.num_warps, report.shared_bytes
        )
        if spills:
            report.spill_stores, report.spill_loads = int(spills.group(1)), int(spills.group(2))
    except Exception as err:  # a variant that fails to compile is reported, not fatal
        report.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    report.seconds = time.perf_counter() - start
    return report


def collect(families: list[str], dtypes: tuple[str, ...]) -> list[Variant]:
    return [v for family in families for v in FAMILIES[family](dtypes)]


def table(reports: list[Report], versions: str, families: list[str]) -> str:
    lines = [
        "# sm_90 static report of the Triton kernels",
        "",
        f"{versions}; families: {', '.join(families)}. Compiled ahead of time for sm_90a (no "
        "GPU), registers and spills from the bundled ptxas -v, shared memory from Triton's "
        "metadata, blocks/SM from both and the warps (bench/cost_model.py), loop wgmma = the "
        "innermost PTX loops (label to back-branch) issuing wgmma.mma_async, their MMAs per "
        "iteration and wait_group depths (wait 0 in a loop serialises), waves = programs / "
        "(132 SMs x blocks/SM) at n = 16,384 (square) and m = 2,048 x n = 16,384 (local), "
        "ordered = its acq_rel / acquire / "
        "release atomics and fences. Every autotune configuration a CUDA "
        "launch may pick; bf16/fp16 variants must not spill, nor the fp32 ones of the "
        "affinity, ensemble and sigmoid kernels (tests/kernels/test_sm90_report.py).",
        "",
        "| kernel | dtype | configuration | registers | spill stores / loads (B) | shared (B) "
        "| blocks/SM | loop wgmma | waves square / local | ordered | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        v = r.variant
        if r.error:
            lines.append(f"| {v.kernel} | {v.dtype} | {v.label} | error: {r.error} |" + " |" * 7)
            continue
        spill = f"{r.spill_stores} / {r.spill_loads}" + (" **SPILL**" if r.spills else "")
        lines.append(
            f"| {v.kernel} | {v.dtype} | {v.label} | {r.registers} | {spill} | "
            f"{r.shared_bytes} | {r.blocks_per_sm} | {r.loop} | {_waves(r)} | {r.ordered} "
            f"| {r.seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _waves(report: Report) -> str:
    """Predicted waves on 132 SMs at the square and the local benchmark shape."""
    v = report.variant
    size = 4 if v.dtype == "fp32" else 2
    waves = []
    for m, n in WAVE_SHAPES:
        programs = cost_model.grid_programs(v.kernel, v.label, m, n, size)
        if programs is None or report.blocks_per_sm < 1:
            return "-"
        waves.append(f"{programs / (cost_model.H100.sms * report.blocks_per_sm):.1f}")
    return " / ".join(waves)


def versions() -> str:
    import torch
    import triton

    python = sys.version.split()[0]
    return f"triton {triton.__version__}, torch {torch.__version__}, Python {python}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--out", type=Path, default=None, help="write sm90_<triton>.md here")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a checked variant spills or fails"
    )
    parser.add_argument(
        "--check-dtypes", default=",".join(CHECKED_DTYPES), help="dtypes --check holds to it"
    )
    parser.add_argument(
        "--fail-fast", action="store_true", help="with --check: stop at the first failure"
    )
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    checked = tuple(d for d in args.check_dtypes.split(",") if d)
    if set(dtypes + checked) - set(DTYPES):
        parser.error(f"dtypes must be among {DTYPES}")
    variants = collect(families, dtypes)
    print(f"compiling {len(variants)} variants for sm_90a with {args.jobs} jobs")
    reports = []
    failed = lambda r: r.variant.dtype in checked and (r.spills or r.error)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for report in pool.map(compile_variant, variants):
            v = report.variant
            status = report.error or (
                f"{report.registers} regs, spills {report.spill_stores}/{report.spill_loads}, "
                f"{report.blocks_per_sm} blocks/SM, loop wgmma {report.loop}, "
                f"ordered {report.ordered}"
            )
            print(f"  {v.kernel} {v.dtype} {v.label}: {status} ({report.seconds:.1f} s)")
            reports.append(report)
            if args.check and args.fail_fast and failed(report):
                print(f"stopping after the first failure ({len(reports)} of {len(variants)})")
                pool.shutdown(wait=True, cancel_futures=True)
                break
    text = table(reports, versions(), families)
    if args.out is not None:
        import triton

        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"sm90_triton_{triton.__version__}.md"
        path.write_text(text)
        print(f"wrote {path}")
    bad = [r for r in reports if failed(r)]
    if bad:
        print(f"{len(bad)} {'/'.join(checked)} variants spill or fail to compile:")
        for r in bad:
            print(
                f"  {r.variant.kernel} {r.variant.dtype} {r.variant.label}: "
                f"{r.error or f'{r.spill_stores} B spill stores, {r.spill_loads} B loads'}"
            )
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    # The kernels must be defined for compilation, not for the interpreter. Only the script
    # clears the switch: a test process that imports this module keeps its interpreter.
    os.environ.pop("TRITON_INTERPRET", None)
    raise SystemExit(main())
