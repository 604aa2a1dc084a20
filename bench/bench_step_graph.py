"""Steady-state time of one distillation step eager, under torch.compile and replayed as a
CUDA graph, with CUDA's sync debug mode set to "error" (a host sync in the step fails it).

The step is a training step, not a loss call on prepared tensors: an open_clip student under
bf16 autocast (its features reach the loss in fp32, as F.normalize returns them on CUDA, so
the loss casts them once and runs its bf16 kernels), DistillClipLoss against fixed teacher
features with tensor scales, backward, fused AdamW (capturable). Every mode starts from the
same weights and runs the same steps on the same batch; the loss of the first step after
warm-up must agree with eager's (the kernels' float atomics sum in any order, hence a
tolerance, not equality).

GPU:  python bench/bench_step_graph.py [--quick] [--batch 256] [--out bench/results]
      ViT-B-32 student with random weights; writes <out>/step_graph_<gpu>.md (rewritten
      after every mode, so a timeout loses nothing measured) and prints it.
--dry-run: the plan, then one eager and one compiled step of a tiny model on the CPU
      (PyTorch path, no CUDA, nothing written).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from tinyclip_fast.losses import DistillClipLoss

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 2},
}
MODES = ("eager", "compile", "cuda_graph")
# Relative loss difference allowed against eager after the warm-up steps.
LOSS_TOLERANCE = 1e-2


class Step:
    """One training step of a student copy on a fixed batch: forward, loss, backward, AdamW."""

    def __init__(self, student, batch: dict, device: str, compiled: bool) -> None:
        self.model = copy.deepcopy(student).to(device).train()
        self.batch, self.device = batch, device
        cuda = device == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, fused=cuda, capturable=cuda
        )
        self.loss = DistillClipLoss()
        self.forward = torch.compile(self._forward, fullgraph=True) if compiled else self._forward
        if not cuda and compiled:  # the CPU dry run: no C++ toolchain needed
            self.forward = torch.compile(self._forward, fullgraph=True, backend="aot_eager")

    def _forward(self, image, text, teacher_image, teacher_text, teacher_scale):
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            image_features, text_features, scale = self.model(image, text)[:3]
            contrastive, distill = self.loss(
                image_features, text_features, scale, teacher_image, teacher_text, teacher_scale
            )
        return contrastive + distill

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=False)
        loss = self.forward(**self.batch)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def make_batch(batch: int, cfg: dict, device: str) -> dict:
    size, embed = cfg["vision_cfg"]["image_size"], cfg["embed_dim"]
    context, vocab = cfg["text_cfg"]["context_length"], cfg["text_cfg"]["vocab_size"]
    unit = lambda: F.normalize(torch.randn(batch, embed, device=device), dim=1)
    return {
        "image": torch.randn(batch, 3, size, size, device=device),
        "text": torch.randint(1, vocab, (batch, context), device=device),
        "teacher_image": unit(),
        "teacher_text": unit(),
        "teacher_scale": torch.tensor(100.0, device=device),
    }


def sync_errors(device: str):
    """CUDA's sync debug mode at "error" while the block runs (no-op on the CPU)."""
    if device != "cuda":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    return mode()


def run_mode(mode: str, student, batch: dict, device: str, warmup: int, iters: int):
    """(loss of the first step after warm-up, per-step seconds of ``iters`` steps)."""
    step = Step(student, batch, device, compiled=mode == "compile")
    cuda = device == "cuda"
    if mode == "cuda_graph":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (and autotuning) off the capture stream
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step()
        run = lambda: (graph.replay(), static_loss.clone())[1]
    else:
        for _ in range(warmup):  # autotuning and compiling synchronise: before the check
            step()
        run = step
    if cuda:
        torch.cuda.synchronize()
    starts, ends, losses, times = [], [], [], []
    with sync_errors(device):
        for _ in range(1 + iters):
            if cuda:
                starts.append(torch.cuda.Event(enable_timing=True))
                ends.append(torch.cuda.Event(enable_timing=True))
                starts[-1].record()
            begin = time.perf_counter()
            losses.append(run())
            times.append(time.perf_counter() - begin)
            if cuda:
                ends[-1].record()
    if cuda:  # the events' times: reading them synchronises, so after the timed steps
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)]
    return float(losses[0]), times[1:]


def table(rows: dict) -> str:
    lines = [
        "| mode | ms per step (median) | loss after warm-up | vs eager |",
        "| --- | ---: | ---: | --- |",
    ]
    eager = rows.get("eager")
    for mode, row in rows.items():
        if isinstance(row, str):
            lines.append(f"| {mode} | FAILED: {row} | | |")
            continue
        loss, times = row
        agree = "-"
        if eager is not None and not isinstance(eager, str) and mode != "eager":
            ok = abs(loss - eager[0]) <= LOSS_TOLERANCE * abs(eager[0])
            agree = "agrees" if ok else f"DIFFERS ({eager[0]:.5f})"
        lines.append(f"| {mode} | {statistics.median(times) * 1e3:.2f} | {loss:.5f} | {agree} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="batch size on the GPU")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (gpu_check)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="table folder")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, smoke-run")
    args = parser.parse_args()
    warmup, iters = 3, 5 if args.quick else 20
    if args.dry_run:
        print(f"plan: {', '.join(MODES)}; ViT-B-32 student, bf16 autocast, batch {args.batch},")
        print(f"  {warmup} warm-up + {iters} timed steps per mode under sync debug mode 'error'")
        print(f"  -> {args.out}/step_graph_<gpu>.md")
        print("smoke run: eager and compiled steps, tiny model, CPU (nothing written)")
        student = open_clip.CLIP(**TINY)
        batch = make_batch(4, TINY, "cpu")
        rows = {mode: run_mode(mode, student, batch, "cpu", 1, 1) for mode in MODES[:2]}
        print(table(rows))
        return
    torch.manual_seed(0)
    student = open_clip.create_model("ViT-B-32")
    cfg = open_clip.get_model_config("ViT-B-32")
    batch = make_batch(args.batch, cfg, "cuda")
    gpu = torch.cuda.get_device_name()
    path = args.out / f"step_graph_{gpu.replace(' ', '_').replace('/', '_')}.md"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for mode in MODES:
        try:
            rows[mode] = run_mode(mode, student, batch, "cuda", warmup, iters)
        except Exception as err:  # a mode that syncs or fails to capture is a table cell
            torch.cuda.set_sync_debug_mode(0)
            rows[mode] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        path.write_text(
            f"# One distillation step: eager, torch.compile, CUDA graph (ViT-B-32 student, "
            f"batch {args.batch}, bf16 autocast)\n\n{gpu}; torch {torch.__version__}; sync "
            f"debug mode 'error' during the timed steps\n\n{table(rows)}\n"
        )
    print(path.read_text())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
