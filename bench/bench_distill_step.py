"""Images/s of one full distillation step in the mask-learning phase (docs/method.md §3b),
four ways.

- tinyclip_fast: ``train.step.train_step`` on a MaskedCLIP student (masks inside the matmuls),
  the fused affinity loss, fused AdamW; teacher run online under no_grad.
- tinyclip_fast+cache: the same step reading teacher embeddings from a TeacherEmbeddingCache.
- tinyclip_fast+reinforced: the same step with the teacher targets a reinforced batch carries
  (fp16 embeddings, as the loader hands them over, moved to the device and turned into
  targets by ``teacher_targets``, as ``teachers.reinforced_targets.StoredTargets`` does): no
  teacher forward, with augmentation (the replay itself is loader work, see
  bench_reinforced_cache.py). It and a second tinyclip_fast step are timed in turns (A B A
  B ...), so the online-vs-cache ratio holds on a shared machine; the table beside it gives
  the cache's bytes per sample.
- tinyclip_fast (xformers attention): on CUDA with xformers installed, the first variant with
  the engine's ``attention=xformers`` instead of torch SDPA (which of the two is faster).
- tinyclip_way: the same student written the TinyCLIP way: open_clip's modules at full size,
  every mask applied by a separate multiply on full-size activations, open_clip's
  DistillClipLoss (materialised [n, n] soft cross-entropy), torch AdamW (foreach).

Every variant does the same work per step: teacher features, student forward + backward,
the sparsity Lagrangian, grad-norm clip, AdamW on weights, masks and multipliers.

GPU:  python bench/bench_distill_step.py [--quick] [--batch 1024] [--out bench/results]
      teacher ViT-B-32 -> masked ViT-B-32 student, bf16 autocast, random weights (the speed
      does not depend on them); writes <out>/distill_step_<gpu>.md with card and versions,
      rewritten after every variant (a timeout loses nothing measured).
CPU:  python bench/bench_distill_step.py --cpu [--out bench/results]
      tiny models (width 64, 3 layers, 32x32 images), fp32; <out>/distill_step_cpu.md.
Both: images/s = batch / the median time of one step (each step timed on its own, after
warm-up steps). --dry-run: the plan, and one step of every variant on the tiny models on
the CPU (nothing written; needs no GPU).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import DistillClipLoss
from torch import nn

from tinyclip_fast.data.augment import AugmentRecipe
from tinyclip_fast.data.reinforced import TEACHER_IMAGE, TEACHER_TEXT, TeacherInfo, teacher_targets
from tinyclip_fast.losses import AffinityMimickingLoss
from tinyclip_fast.pruning.hard_concrete import HardConcreteMask
from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.pruning.sparsity import SparsityController, TowerMaskProbs, expected_sparsity
from tinyclip_fast.teachers.embedding_cache import TeacherEmbeddingCache
from tinyclip_fast.train.attention import xformers_attention
from tinyclip_fast.train.config import DistillConfig
from tinyclip_fast.train.optim import make_optimizer
from tinyclip_fast.train.step import train_step

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 3},
}
VARIANTS = ("tinyclip_fast", "tinyclip_fast+cache", "tinyclip_way")
# Online teacher vs reinforced cache, timed in turns after the baseline (a GPU check that
# runs out of time keeps the baseline).
PAIRED = ("tinyclip_fast", "tinyclip_fast+reinforced")
PAIRED_ONLINE = "tinyclip_fast (in turns with +reinforced)"


class TinyClipWayMasks(nn.Module):
    """The reference student: open_clip CLIP weights, masks multiplied onto activations.

    Per tower: hidden z_h [width], heads z_head [layers, heads], MLP z_int [layers, mlp];
    every matmul runs at full size and each mask is one more elementwise pass.
    """

    def __init__(self, model: open_clip.model.CLIP) -> None:
        super().__init__()
        self.model = model
        self.masks = nn.ModuleDict()
        for tower, blocks, width in (
            ("visual", model.visual.transformer.resblocks, model.visual.conv1.out_channels),
            ("text", model.transformer.resblocks, model.token_embedding.embedding_dim),
        ):
            heads, mlp = blocks[0].attn.num_heads, blocks[0].mlp.c_fc.out_features
            self.masks[tower] = nn.ModuleList(
                [
                    HardConcreteMask((width,)),
                    HardConcreteMask((len(blocks), heads)),
                    HardConcreteMask((len(blocks), mlp)),
                ]
            )

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def mask_parameters(self) -> list[nn.Parameter]:
        return [m.log_alpha for tower in self.masks.values() for m in tower]

    def expected_sparsity(self) -> torch.Tensor:
        towers = []
        for tower in self.masks.values():
            hidden, head, intermediate = tower
            towers.append(
                TowerMaskProbs(
                    p_h=hidden.prob_nonzero(),
                    p_head=head.prob_nonzero(),
                    p_int=intermediate.prob_nonzero(),
                    width=hidden.log_alpha.shape[0],
                    heads=head.log_alpha.shape[1],
                )  # fmt: skip
            )
        return expected_sparsity(towers)

    @staticmethod
    def _blocks(x, blocks, z_h, z_head, z_int, attn_mask):
        for layer, block in enumerate(blocks):
            h = block.ln_1(x)
            batch, tokens, width = h.shape
            heads = block.attn.num_heads
            qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
            q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            mask = None if attn_mask is None else attn_mask.to(q.dtype)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            context = context * z_head[layer].view(1, heads, 1, 1)
            out = F.linear(
                context.transpose(1, 2).reshape(batch, tokens, width),
                block.attn.out_proj.weight,
                block.attn.out_proj.bias,
            )
            x = x + out * z_h
            h = block.mlp.gelu(block.mlp.c_fc(block.ln_2(x))) * z_int[layer]
            x = x + block.mlp.c_proj(h) * z_h
        return x

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        model, visual = self.model, self.model.visual
        z_h, z_head, z_int = (m() for m in self.masks["visual"])
        x = visual.conv1(image).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = (torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)) * z_h
        x = self._blocks(
            visual.ln_pre(x) * z_h, visual.transformer.resblocks, z_h, z_head, z_int, None
        )
        image_features = (visual.ln_post(x[:, 0]) * z_h) @ visual.proj

        z_h, z_head, z_int = (m() for m in self.masks["text"])
        x = (model.token_embedding(text) + model.positional_embedding) * z_h
        x = self._blocks(x, model.transformer.resblocks, z_h, z_head, z_int, model.attn_mask)
        x = model.ln_final(x) * z_h
        pooled = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
        text_features = pooled @ model.text_projection
        return (
            F.normalize(image_features, dim=-1),
            F.normalize(text_features, dim=-1),
            model.logit_scale.exp(),
        )


def make_step(
    variant: str, teacher: nn.Module, images: torch.Tensor, texts: torch.Tensor, dtype
) -> Callable[[], torch.Tensor]:
    """One full training step of ``variant`` as a closure returning the loss."""
    device = images.device
    base = copy.deepcopy(teacher).requires_grad_(True).train()
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    config = DistillConfig()
    if variant == "tinyclip_way":
        student = TinyClipWayMasks(base).to(device)
        reference = DistillClipLoss()
        loss_fn = lambda *args: reference(*args)[1]  # (contrastive, distill): alpha = 1
        optimizer = torch.optim.AdamW(
            [p for n, p in student.named_parameters() if not n.endswith("log_alpha")],
            lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2,
        )  # fmt: skip
    else:
        student = MaskedCLIP(base).to(device)
        loss_fn = AffinityMimickingLoss()
        optimizer = make_optimizer(student, config)
    controller = SparsityController(0.5, warmup_steps=100).to(device)
    mask_opt, multiplier_opt = controller.build_optimizers(student.mask_parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    cache = None
    if variant.endswith("+cache"):
        with torch.no_grad(), autocast():
            t_img, t_txt, t_scale = teacher(images, texts)
        cache = TeacherEmbeddingCache(t_img.float(), t_txt.float(), float(t_scale.log()))
        indices = torch.randperm(images.shape[0], device=device)
    stored = None
    if variant.endswith("+reinforced"):
        with torch.no_grad(), autocast():
            t_img, t_txt, _ = teacher(images, texts)
        stored = {TEACHER_IMAGE: t_img.half().cpu(), TEACHER_TEXT: t_txt.half().cpu()}
        log_scale = float(teacher.logit_scale)
        teachers = [TeacherInfo("teacher", t_img.shape[1], None, log_scale)]
    steps = [0]

    def step() -> torch.Tensor:
        if cache is not None:
            t_img, t_txt = cache.lookup(indices)
            t_scale = torch.tensor(cache.logit_scale, device=device).exp()
        elif stored is not None:
            batch = {k: v.to(device, non_blocking=True) for k, v in stored.items()}
            t_img, t_txt, t_scale, _ = teacher_targets(batch, teachers, device)[0]
        else:
            with torch.no_grad(), autocast():
                t_img, t_txt, t_scale = teacher(images, texts)
        loss = train_step(
            student, images, texts, (t_img, t_txt, t_scale), loss_fn,
            micro_batch_size=images.shape[0], autocast=autocast, scaler=scaler,
        )  # fmt: skip
        penalty = controller(student.expected_sparsity(), steps[0])
        penalty.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], 5.0
        )
        for opt in (optimizer, mask_opt, multiplier_opt):
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[0] += 1
        return loss

    return step


def images_per_second(
    step: Callable[[], torch.Tensor], batch: int, warmup: int, iters: int
) -> float:
    """batch / the median of ``iters`` step times, each synchronised, after ``warmup`` steps."""
    device_sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        device_sync()
        start = time.perf_counter()
        step()
        device_sync()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def images_per_second_in_turns(
    steps: dict[str, Callable[[], torch.Tensor]], batch: int, warmup: int, iters: int
) -> dict[str, float]:
    """batch / median step time of each of ``steps``, timed in turns (A B A B ...): on a
    shared machine a change of load hits all of them alike."""
    device_sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            device_sync()
            start = time.perf_counter()
            step()
            device_sync()
            times[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def run(
    model_cfg,
    batch: int,
    device: str,
    dtype,
    warmup: int,
    iters: int,
    on_result: Callable[[dict[str, float]], None] = lambda results: None,
) -> dict[str, float]:
    """images/s of every variant; ``on_result`` sees the results after each one."""
    torch.manual_seed(0)
    if isinstance(model_cfg, str):
        teacher = open_clip.create_model(model_cfg)
    else:
        teacher = open_clip.model.CLIP(**model_cfg)
    teacher = teacher.to(device).eval().requires_grad_(False)
    size = teacher.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size, device=device)
    texts = torch.randint(1, teacher.vocab_size - 1, (batch, teacher.context_length), device=device)
    texts[:, -1] = teacher.vocab_size - 1  # end-of-text for argmax pooling
    results = {}
    for variant in VARIANTS:
        step = make_step(variant, teacher, images, texts, dtype)
        results[variant] = images_per_second(step, batch, warmup, iters)
        on_result(results)
        del step
        if device == "cuda":
            torch.cuda.empty_cache()
    online, reinforced = (make_step(v, teacher, images, texts, dtype) for v in PAIRED)
    rates = images_per_second_in_turns(
        {"online": online, "reinforced": reinforced}, batch, warmup, iters
    )
    results[PAIRED_ONLINE], results[PAIRED[1]] = rates["online"], rates["reinforced"]
    on_result(results)
    del online, reinforced
    if device == "cuda":
        torch.cuda.empty_cache()
    if device == "cuda" and importlib.util.find_spec("xformers") is not None:
        # The engine's attention=xformers against the default torch SDPA, same step.
        step = make_step("tinyclip_fast", teacher, images, texts, dtype)
        with xformers_attention():
            results["tinyclip_fast (xformers attention)"] = images_per_second(
                step, batch, warmup, iters
            )
        on_result(results)
    return results


def table(results: dict[str, float]) -> str:
    reference = results.get("tinyclip_way")
    lines = ["| variant | images/s | vs TinyCLIP way |", "|---|---|---|"]
    for variant, rate in results.items():
        ratio = f"{rate / reference:.2f}x" if reference else "-"
        lines.append(f"| {variant} | {rate:,.0f} | {ratio} |")
    return "\n".join(lines)


def teacher_table(results: dict[str, float]) -> str:
    """The online teacher against the reinforced cache, same step otherwise, timed in turns."""
    online = results.get(PAIRED_ONLINE)
    lines = ["| teacher targets (steps timed in turns) | images/s | vs online |", "|---|---|---|"]
    for label, variant in (
        ("online teacher forward (no_grad)", PAIRED_ONLINE),
        ("reinforced cache (stored fp16 embeddings)", PAIRED[1]),
    ):
        if variant in results:
            rate = results[variant]
            ratio = f"{rate / online:.2f}x" if online else "-"
            lines.append(f"| {label} | {rate:,.0f} | {ratio} |")
    return "\n".join(lines)


def cache_bytes_table(image_size: int) -> str:
    """Bytes per sample of the reinforced cache (bench_reinforced_cache's layouts), the params
    JSON measured on open_clip's training transform at ``image_size`` over 200..640 px images."""
    from bench_reinforced_cache import cache_cost_rows

    recipe, generator = AugmentRecipe(size=image_size), torch.Generator().manual_seed(0)
    sizes = torch.randint(200, 641, (64, 2), generator=generator).tolist()
    drawn = [recipe.sample(h, w, generator) for h, w in sizes]
    per_aug = len(json.dumps(drawn)) / len(drawn)
    lines = [
        f"| cache layout (params JSON {per_aug:.0f} B per augmentation) | bytes/sample "
        "| per 1M samples |",
        "|---|---|---|",
    ]
    for name, size in cache_cost_rows(per_aug):
        lines.append(f"| {name} | {size:,.0f} | {size * 1e6 / 2**30:.1f} GiB |")
    return "\n".join(lines)


def versions() -> str:
    import triton

    cuda = torch.version.cuda or "none"
    return (
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {cuda}, "
        f"open_clip {open_clip.__version__}, Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--batch", type=int, default=None, help="1024 on GPU, 64 on CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (10 GPU, 5 CPU)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="table folder")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (for gpu_check)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, smoke-run")
    args = parser.parse_args()
    # A dry run describes the GPU plan unless --cpu: that is what it prepares.
    cuda = not args.cpu and (args.dry_run or torch.cuda.is_available())
    warmup = 3 if cuda else 2
    iters = args.iters or (5 if args.quick else 10 if cuda else 5)
    batch = args.batch or (1024 if cuda else 64)
    if args.dry_run:
        models = "ViT-B-32 -> masked ViT-B-32, bf16" if cuda else "tiny models, fp32"
        print(
            f"plan: {', '.join(VARIANTS)}, then {' and '.join(PAIRED)} timed in turns "
            "(+ xformers attention on CUDA when installed)"
        )
        print(f"  {models}, batch {batch}, {warmup} warm-up + {iters} timed steps each")
        print(f"  -> {args.out}/distill_step_{'<gpu>' if cuda else 'cpu'}.md")
        print("smoke run: one step of each variant, tiny models, CPU (nothing written)")
        results = run(TINY, 8, "cpu", None, warmup=0, iters=1)
        print(f"{table(results)}\n\n{teacher_table(results)}\n\n{cache_bytes_table(224)}")
        return
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        model, device, dtype = "ViT-B-32", "cuda", torch.bfloat16
        where = torch.cuda.get_device_name()
        title = f"# Distillation step, teacher ViT-B-32 -> masked ViT-B-32, batch {batch}, bf16"
    else:
        model, device, dtype = TINY, "cpu", None
        load = os.getloadavg()[0]  # a shared machine's load moves the sequential rows most
        where = f"CPU ({torch.get_num_threads()} threads, load average {load:.1f} at the start)"
        title = f"# Distillation step on the CPU, tiny models, batch {batch}, fp32"
    args.out.mkdir(parents=True, exist_ok=True)
    name = where.replace(" ", "_").replace("/", "_") if cuda else "cpu"
    path = args.out / f"distill_step_{name}.md"

    image_size = 224 if cuda else TINY["vision_cfg"]["image_size"]
    cost = cache_bytes_table(image_size)

    def write(results: dict[str, float]) -> None:
        text = (
            f"{title}\n\n{where}; {versions()}; images/s = batch / median step time of "
            f"{iters} steps after {warmup}\n\n{table(results)}\n\n{teacher_table(results)}"
            f"\n\n{cost}\n"
        )
        path.write_text(text)

    run(model, batch, device, dtype, warmup=warmup, iters=iters, on_result=write)
    print(path.read_text())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
