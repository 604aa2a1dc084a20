"""Small pieces shared by several test files: the error measure, tiny open_clip configs and
dataset wrappers. (tests/ is on sys.path through pytest's ``pythonpath`` setting.)"""

import hashlib
import io
import json

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset

from tinyclip_fast.data.datacompdr import datacompdr_recipe
from tinyclip_fast.data.reinforced import TeacherInfo
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.train.config import DataConfig, DistillConfig, OptimConfig
from tinyclip_fast.train.engine import distill

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN/inf anywhere gives inf."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    if not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        return float("inf")
    denom = expected.norm().clamp_min(1e-30)
    return float((actual - expected).norm() / denom)


def ensemble_reference(x, y, scale, teachers, kind="soft_ce", square=True, label_offset=0):
    """Float64 (distill, contrastive) with the target P = mean_k softmax(B_k) per direction."""
    A = scale * x @ y.T
    logits = [b * xt @ yt.T for xt, yt, b in teachers]
    labels = torch.arange(x.shape[0]) + label_offset

    def direction(A, logits):
        log_q = A.log_softmax(dim=1)
        p = torch.stack([B.softmax(dim=1) for B in logits]).mean(dim=0)
        distill = -(p * log_q).sum(dim=1)
        if kind == "kl":
            distill = distill + torch.special.xlogy(p, p).sum(dim=1)
        return distill.mean(), -log_q[torch.arange(A.shape[0]), labels].mean()

    row = direction(A, logits)
    if not square:
        return row
    col = direction(A.T, [B.T for B in logits])
    return (row[0] + col[0]) / 2, (row[1] + col[1]) / 2


def sigmoid_reference(x, y, scale, bias, teachers, contrastive_weight=0.0):
    """Float64 (1 - w) L_d + w L_c of the sigmoid family: A = a x y^T + c, p the mean over
    teachers (xt, yt, b, c_t) of s(b xt yt^T + c_t), L_d the per-pair binary cross-entropy of
    s(A) against p, L_c SigLIP's -log s(z A) (z = +1 on the diagonal, else -1); both / n."""
    x, y = x.double(), y.double()
    f64 = torch.float64
    A = torch.as_tensor(scale, dtype=f64) * x @ y.T + torch.as_tensor(bias, dtype=f64)
    p = torch.stack(
        [
            torch.sigmoid(float(b) * xt.double() @ yt.double().T + float(c))
            for xt, yt, b, c in teachers
        ]
    ).mean(dim=0)
    n = x.shape[0]
    distill = -(
        p * torch.nn.functional.logsigmoid(A) + (1 - p) * torch.nn.functional.logsigmoid(-A)
    )
    z = 2 * torch.eye(n, dtype=torch.float64) - 1
    contrastive = -torch.nn.functional.logsigmoid(z * A)
    w = contrastive_weight
    return (1 - w) * distill.sum() / n + w * contrastive.sum() / n


TEXT = {"context_length": 16, "vocab_size": 1000}
TEACHER = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {**TEXT, "width": 64, "heads": 4, "layers": 4},
}


class PlainDataset(Dataset):
    """The same samples without a dataset's batched fast path (``get_batch``)."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        return self.inner[index]


def binary_masks(masked, seed=3):
    """log_alpha of +-20: deterministic masks exactly 0 or 1 (in fp32), about a quarter 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tower in (masked.visual_masks, masked.text_masks):
            for mask in tower.masks():
                keep = torch.rand(mask.log_alpha.shape, generator=g) > 0.25
                keep.view(-1)[0] = True
                mask.log_alpha.copy_(torch.where(keep, 20.0, -20.0))


# ---- tiny engine runs (CPU, PyTorch backend) ------------------------------------------

TEACHER_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {**TEXT, "width": 64, "heads": 2, "layers": 3},
}
STUDENT_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 32},
    "text_cfg": {**TEXT, "width": 32, "heads": 1, "layers": 2},
}


def make_teacher(seed: int = 1) -> open_clip.model.CLIP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return open_clip.model.CLIP(**TEACHER_CFG).eval()


# Hugging Face CLIPModel folders: open_clip's CLIP BPE (vocabulary 49,408), whose tokenizer
# files the export writes.
HF_TEACHER_CFG = {**TEACHER_CFG, "text_cfg": {**TEACHER_CFG["text_cfg"], "vocab_size": 49408}}


def write_hf_clip(folder, model_cfg=HF_TEACHER_CFG, seed: int = 1):
    """A transformers CLIPModel folder (weights, tokenizer, image processor) of a random open_clip
    CLIP of ``model_cfg``; returns (the folder, the model)."""
    from tinyclip_fast.inheritance.hf import save_hf_clip

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.model.CLIP(**model_cfg).eval()
    return save_hf_clip(model, folder), model


def make_config(tmp_path, stages, **overrides) -> DistillConfig:
    values = dict(
        stages=stages,
        data=DataConfig(kind="synthetic", size=48),
        optim=OptimConfig(lr=1e-3, warmup_steps=2),
        batch_size=16,
        precision="fp32",
        out_dir=str(tmp_path / "run"),
        log_every=1,
        save_every=0,
        progress=False,
    )
    values.update(overrides)
    return DistillConfig(**values)


def run(config, teacher=None, **kwargs):
    with force_backend("torch"):
        return distill(config, teacher=teacher or make_teacher(), device="cpu", **kwargs)


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def comparable(key, tensor):
    # The key bias gets an exactly zero gradient (softmax ignores a shift), so Adam turns the
    # rounding noise there into +-lr steps that no two summation orders share: leave it out.
    if key.endswith("attn.in_proj_bias"):
        third = tensor.shape[0] // 3
        return torch.cat([tensor[:third], tensor[2 * third :]])
    return tensor


def assert_same_weights(a, b, tol=None):
    """Bitwise equal (tol None) or every tensor within relative error ``tol``."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if tol is None:
            assert torch.equal(sa[key], sb[key]), key
        else:
            err = rel_err(comparable(key, sa[key]), comparable(key, sb[key]))
            assert err < tol, (key, err)


# ---- reinforced data: image shards and a tokenizer for them ---------------------------


class WordTokenizer:
    """Words -> ids by hash: ``[sot, w_1, ..., eot, 0, ...]`` with sot = vocab - 2 and eot =
    vocab - 1 (argmax pooling finds it); picklable, so loader workers can use it."""

    def __init__(self, context_length: int = 16, vocab_size: int = 1000):
        self.context_length, self.vocab_size = context_length, vocab_size

    def __call__(self, texts):
        tokens = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [
                int(hashlib.blake2b(w.encode(), digest_size=4).hexdigest(), 16)
                % (self.vocab_size - 3)
                + 1
                for w in text.split()
            ][: self.context_length - 2]
            ids = [self.vocab_size - 2, *words, self.vocab_size - 1]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens


def random_image(seed: int):
    """A PIL RGB image of random pixels and a random size in [28, 52] x [28, 52]."""
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(28, 53, size=2))
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def encode_image(image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_image_shards(folder, num_shards: int, per_shard: int, seed: int = 0, synthetic=2):
    """Tar shards ``folder/{00000..}.tar`` of PNG images, a ``txt`` caption each and
    ``synthetic`` captions in ``syn.json``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        path = folder / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                index = seed * 10_000 + shard * per_shard + i
                sample = {
                    "__key__": f"s{shard}-{i:03d}",
                    "png": encode_image(random_image(index)),
                    "txt": f"a photo of thing {index}",
                }
                if synthetic:
                    captions = [f"synthetic {j} of thing {index}" for j in range(synthetic)]
                    sample["syn.json"] = json.dumps({"syn_text": captions})
                sink.write(sample)
        paths.append(path)
    return paths


# ---- DataCompDR: shards in Apple's layout ------------------------------------------------

# MobileCLIP's RandAugment op ids (training/dr/transforms.py, RandAugment.op_names).
MOBILECLIP_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
DIMS = (8, 6)  # two teachers, as DataCompDR's 768 + 768
K, SYNTHETIC = 4, 3
TEACHERS = [TeacherInfo("t0", 8, None, 0.0), TeacherInfo("t1", 6, None, 0.0)]


def unit_rows(rows, generator):
    """``rows`` embeddings of the two teachers DIMS, each part unit-norm."""
    parts = torch.randn(rows, sum(DIMS), generator=generator).split(DIMS, dim=-1)
    return torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1)


def compressed_params(image, generator):
    """K augmentations in DataCompDR's compressed form: [[t, l, h, w], [[op id, mag], ...]]."""
    draws = []
    for k in range(K):
        drawn = datacompdr_recipe(224).sample(image.height, image.width, generator)
        ops = [[MOBILECLIP_OPS.index(name), mag] for name, mag in drawn["rand_augment"]]
        draws.append([drawn["crop"], None if k == 1 else ops])  # k = 1: RandAugment skipped
    return draws


def write_datacompdr_shards(folder):
    """Two shards: float32 npz embeddings with real captions, then bf16 pth.gz without."""
    generator = torch.Generator().manual_seed(0)
    stored = {}
    for shard in range(2):
        with wds.TarWriter(str(folder / f"{shard:08d}.tar")) as sink:
            for i in range(3):
                uid = f"{shard}{i:031x}"
                image = random_image(100 + 3 * shard + i)
                jpeg = encode_image(image, "JPEG")
                params = compressed_params(Image.open(io.BytesIO(jpeg)), generator)
                synthetic = [f"synthetic {j} of {uid[-3:]}" for j in range(SYNTHETIC)]
                image_emb = unit_rows(K, generator)
                text_emb = unit_rows(1 + SYNTHETIC, generator)  # real caption first
                sample = {
                    "__key__": uid,
                    "url.txt": f"https://example.com/{uid}.jpg",
                    "json": json.dumps({"uid": uid, "sha256": "0" * 64}),
                    "jpg": jpeg,
                    "syn.json": json.dumps({"syn_text": synthetic}),
                    # The Hugging Face copy stores param_aug as a JSON string: accept both.
                    "paug.json": json.dumps(
                        {"param_aug": json.dumps(params) if i == 2 else params}
                    ),
                }
                if shard == 0:
                    sample["txt"] = f"real caption {uid[-3:]}"
                    embeddings = {"image_emb": image_emb.numpy(), "text_emb": text_emb.numpy()}
                    sample["npz"] = embeddings
                else:
                    image_emb, text_emb = image_emb.bfloat16(), text_emb.bfloat16()
                    sample["pth.gz"] = {"image_emb": image_emb, "text_emb": text_emb}
                sink.write(sample)
                real = [sample["txt"]] if "txt" in sample else []
                rows = text_emb if real else text_emb[1:]
                stored[uid] = (jpeg, params, real + synthetic, image_emb, rows)
    return stored
