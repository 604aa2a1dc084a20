"""The frozen teachers of a run, one or an ensemble of K <= 4, and the targets they give the loss.

Weight inheritance (manual and automatic) reads the FIRST teacher only. Every teacher scores
the same images and tokens, so each must share the first teacher's tokenizer and
preprocessing (train and eval): a difference is refused, naming it. Teachers only run
forward, through ``encode_image`` / ``encode_text``, so open_clip models with timm towers
(SigLIP, ConvNeXt, EVA) work as teachers; nothing here reads a tower's internals.

Per batch the loss gets, for K = 1, ``(I_t, T_t, b[, c])`` and for an ensemble lists of them
(the fused losses average the teachers' targets after softmax / after sigmoid): L2-normalised
features, the multiplicative scale b = exp(logit_scale) and, for the sigmoid family, the
bias c of the teacher's probabilities s(b x.y + c).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tinyclip_fast.train.config import MAX_TEACHERS, TeacherConfig
from tinyclip_fast.train.teacher import build_teacher

# Captions whose tokens tell tokenizers apart (case, punctuation, digits, length).
PROBE_TEXTS = (
    "a photo of a cat.",
    "A Diagram: 3 dogs & 1 bird, in 2024!",
    "an extraordinarily long caption " * 12,
)


def build_teachers(
    configs: Sequence[TeacherConfig],
) -> tuple[list[nn.Module], Callable, Callable, Callable]:
    """(teachers, tokenizer, train preprocess, eval preprocess): the processing is the first
    teacher's, which every other teacher must share (ValueError naming the difference)."""
    check_teacher_count(len(configs))
    built = [build_teacher(config) for config in configs]
    for k in range(1, len(built)):
        difference = input_difference(built[0], built[k])
        if difference:
            raise ValueError(
                f"teacher {k} ({configs[k].model}) does not read the inputs of teacher 0 "
                f"({configs[0].model}): {difference}. Every teacher of an ensemble scores the "
                "same images and tokens (teacher 0's preprocessing and tokenizer, the "
                "student's): pick teachers that share them"
            )
    model, tokenizer, train_tf, eval_tf = built[0]
    return [b[0] for b in built], tokenizer, train_tf, eval_tf


def check_teacher_count(count: int) -> None:
    if not 1 <= count <= MAX_TEACHERS:
        raise ValueError(f"{count} teachers given; give 1 to {MAX_TEACHERS}")


def input_difference(first: tuple, other: tuple) -> str | None:
    """What differs between two (teacher, tokenizer, train_tf, eval_tf) in the inputs they
    read: image size, preprocessing, tokens of probe captions; None when nothing does."""
    model_a, tok_a, train_a, eval_a = first
    model_b, tok_b, train_b, eval_b = other
    size_a, size_b = _image_size(model_a), _image_size(model_b)
    if size_a != size_b:
        return f"image size {size_a} != {size_b}"
    for what, a, b in (("eval", eval_a, eval_b), ("train", train_a, train_b)):
        if repr(a) != repr(b):
            return f"{what} preprocessing differs: {_one_line(a)} != {_one_line(b)}"
    tokens_a, tokens_b = tok_a(list(PROBE_TEXTS)), tok_b(list(PROBE_TEXTS))
    if tokens_a.shape != tokens_b.shape or not torch.equal(tokens_a, tokens_b):
        return (
            f"tokenizers differ (tokens of {PROBE_TEXTS[0]!r}: "
            f"{tokens_a[0, :8].tolist()}... != {tokens_b[0, :8].tolist()}..., context "
            f"{tokens_a.shape[-1]} vs {tokens_b.shape[-1]})"
        )
    return None


def _image_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", None)
    if isinstance(size, int):
        return (size, size)
    return tuple(size) if size is not None else None


def _one_line(transform: object) -> str:
    return " ".join(repr(transform).split())


def teacher_biases(
    configs: Sequence[TeacherConfig], own: Sequence[float | None], say: Callable[[str], None]
) -> list[float]:
    """The bias c_k of each teacher's sigmoid probabilities: the configured one, else the
    teacher's own ``own[k]``; a teacher with neither (a softmax CLIP teacher) is refused.
    ``configs`` holds one entry per teacher (ValueError otherwise, when one gives a bias)."""
    if len(configs) != len(own):
        if any(c.logit_bias is not None for c in configs):
            raise ValueError(
                f"{len(configs)} teacher configs give logit biases for {len(own)} teachers: "
                "give one entry per teacher"
            )
        configs = [TeacherConfig(model=f"#{k}") for k in range(len(own))]
    biases = []
    for k, (config, theirs) in enumerate(zip(configs, own, strict=True)):
        given = config.logit_bias
        if given is None and theirs is None:
            raise ValueError(
                f"--loss sigmoid: teacher {k} ({config.model}) has no logit_bias (a "
                "softmax-trained CLIP): give --teacher-logit-bias B (its targets become "
                "s(b x.y + B), e.g. -10), or distil from sigmoid (SigLIP) teachers"
            )
        if given is not None and theirs is not None and given != theirs:
            say(f"teacher {k} ({config.model}): logit bias {given:g} given, not its own {theirs:g}")
        biases.append(float(given if given is not None else theirs))
    return biases


@torch.no_grad()
def teacher_embeddings(
    teacher: nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    micro_batch: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (I_t, T_t) of one teacher in micro-batches, forward only.

    ``no_grad``, not ``inference_mode``: the loss saves these tensors for its backward.
    """
    image_parts, text_parts = [], []
    with autocast():
        for s in range(0, images.shape[0], micro_batch):
            image_parts.append(teacher.encode_image(images[s : s + micro_batch], normalize=True))
            text_parts.append(teacher.encode_text(texts[s : s + micro_batch], normalize=True))
    return torch.cat(image_parts), torch.cat(text_parts)


class TeacherLossArgs:
    """The teachers' arguments of the loss for a batch: ``(I_t, T_t, b[, c])``, each a list
    for an ensemble (K >= 2) and a single value for one teacher."""

    def __init__(
        self,
        scales: Sequence[torch.Tensor],
        biases: Sequence[float] | None,
        device: torch.device,
    ) -> None:
        self.scales = list(scales)
        self.biases = None
        if biases is not None:
            self.biases = [torch.tensor(float(b), device=device) for b in biases]

    def __len__(self) -> int:
        return len(self.scales)

    def pack(
        self, images: Sequence[torch.Tensor], texts: Sequence[torch.Tensor]
    ) -> tuple[object, ...]:
        """The loss's teacher arguments from every teacher's features (in teacher order)."""
        if len(images) != len(self) or len(texts) != len(self):
            raise ValueError(f"expected features of {len(self)} teachers, got {len(images)}")
        parts = [list(images), list(texts), self.scales]
        if self.biases is not None:
            parts.append(self.biases)
        if len(self) == 1:
            return tuple(part[0] for part in parts)
        return tuple(parts)
