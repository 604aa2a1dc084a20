"""Image-text retrieval recall@k of a CLIP model on a CSV of (image path, caption) pairs.

An image may have several captions (one row each). Recall@k as clip_benchmark defines it
(metrics/zeroshot_retrieval.py), on cosine similarities s(text, image):

- text retrieval (image to text): an image is a hit at k when ANY of its captions is among
  the k captions it scores highest; ``text_retrieval_recall@k`` is the fraction of images hit.
- image retrieval (text to image): a caption is a hit at k when its image is among the k
  images it scores highest; ``image_retrieval_recall@k`` is the fraction of captions hit.

Ties rank against the query: a wrong candidate scoring exactly as high as the best right one
is ranked above it, so a model whose embeddings are all equal hits only when k exceeds the
number of wrong candidates, never by luck of the sort order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from tinyclip_fast.data.zero_shot import LabelledImageFiles, beside, read_csv_rows

RECALL_KS = (1, 5, 10)
QUERY_BLOCK = 1024  # queries scored at once: [QUERY_BLOCK, candidates] similarities in memory


def _ranks_of_best_positive(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """[q] number of negatives scoring at least the best positive of each query row (a NaN
    score ranks below everything, so NaN features never hit)."""
    scores = scores.nan_to_num(nan=float("-inf"))
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best) & ~positive).sum(dim=1)


def retrieval_recalls(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image: torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """clip_benchmark's recall@k from L2-normalised image [I, d] and text [T, d] features;
    ``text_image`` [T] is the index of each caption's image (every image needs one)."""
    if text_image.shape != (text_features.shape[0],):
        raise ValueError(
            f"text_image must have shape ({text_features.shape[0]},), got {tuple(text_image.shape)}"
        )
    num_images = image_features.shape[0]
    text_image = text_image.to(image_features.device)
    if torch.bincount(text_image, minlength=num_images).min() == 0:
        raise ValueError("every image needs at least one caption")
    images = torch.arange(num_images, device=image_features.device)
    text_ranks, image_ranks = [], []
    for start in range(0, num_images, QUERY_BLOCK):
        block = images[start : start + QUERY_BLOCK]
        scores = image_features[block] @ text_features.T
        text_ranks.append(_ranks_of_best_positive(scores, block[:, None] == text_image[None]))
    for start in range(0, text_features.shape[0], QUERY_BLOCK):
        owners = text_image[start : start + QUERY_BLOCK]
        scores = text_features[start : start + QUERY_BLOCK] @ image_features.T
        image_ranks.append(_ranks_of_best_positive(scores, owners[:, None] == images[None]))
    text_rank, image_rank = torch.cat(text_ranks), torch.cat(image_ranks)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = float((image_rank < k).double().mean())
        metrics[f"text_retrieval_recall@{k}"] = float((text_rank < k).double().mean())
    return metrics


class RetrievalEvaluator:
    """``evaluator(model) -> {metric: value}`` (recall@k both ways, see the module doc) on fixed
    images and captions; the model is left as it was.

    ``images`` is a float tensor [I, 3, H, W] or a Dataset whose items are dicts with "image"
    (e.g. :class:`LabelledImageFiles`); ``text_image`` [T] names each caption's image.
    """

    def __init__(
        self,
        images: torch.Tensor | Dataset,
        captions: Sequence[str],
        text_image: Sequence[int] | torch.Tensor,
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        ks: Sequence[int] = RECALL_KS,
    ) -> None:
        num_images = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        text_image = torch.as_tensor(text_image, dtype=torch.long)
        if len(captions) == 0 or num_images == 0:
            raise ValueError("retrieval needs at least one image and one caption")
        if text_image.shape != (len(captions),):
            raise ValueError(f"text_image must have one image index per caption ({len(captions)})")
        if text_image.min() < 0 or text_image.max() >= num_images:
            raise ValueError(f"text_image indices must lie in [0, {num_images})")
        self.images, self.captions, self.text_image = images, list(captions), text_image
        self.tokenizer, self.device, self.batch_size = tokenizer, torch.device(device), batch_size
        self.ks = tuple(ks)

    def _image_batches(self) -> Iterator[torch.Tensor]:
        size = self.images.shape[0] if isinstance(self.images, torch.Tensor) else len(self.images)
        for start in range(0, size, self.batch_size):
            stop = min(start + self.batch_size, size)
            if isinstance(self.images, torch.Tensor):
                yield self.images[start:stop]
            else:
                yield torch.stack([self.images[i]["image"] for i in range(start, stop)])

    @torch.no_grad()
    def features(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised fp32 image [I, d] and caption [T, d] features of ``model``."""
        images = [model.encode_image(batch.to(self.device)) for batch in self._image_batches()]
        texts = []
        for start in range(0, len(self.captions), self.batch_size):
            tokens = self.tokenizer(self.captions[start : start + self.batch_size])
            texts.append(model.encode_text(tokens.to(self.device)))
        image = F.normalize(torch.cat(images).float(), dim=-1)
        return image, F.normalize(torch.cat(texts).float(), dim=-1)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            image, text = self.features(model)
        finally:
            model.train(was_training)
        return retrieval_recalls(image, text, self.text_image, self.ks)


def load_retrieval_pairs(
    path: str | Path,
    preprocess: Callable,
    *,
    img_key: str = "filepath",
    caption_key: str = "title",
    separator: str | None = None,
) -> tuple[LabelledImageFiles, list[str], list[int]]:
    """CSV of (image path relative to the CSV's folder, caption), one row per caption:
    (the distinct images in first-seen order, the captions, each caption's image index).
    The separator defaults to the extension's: ``.csv`` comma, else tab."""
    path = Path(path)
    table = read_csv_rows(path, (img_key, caption_key), "retrieval CSV", separator)
    rows = [(row[img_key], row[caption_key]) for row in table]
    image_index: dict[str, int] = {}
    text_image = [image_index.setdefault(image, len(image_index)) for image, _ in rows]
    paths = [beside(path, image) for image in image_index]
    images = LabelledImageFiles(paths, list(range(len(paths))), preprocess)
    return images, [caption for _, caption in rows], text_image
