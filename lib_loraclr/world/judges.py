"""Judges of the measuring world: a digit classifier with a "not a digit" class, and an identity score.

- `DigitClassifier`: a small MLP on 8×8 slots (``[n, 1, 8, 8]`` in [-1, 1]) → 11 logits: digits 0–9 and
  ``NOT_A_DIGIT`` (10). Trained on the real digits' train split plus synthetic negatives (noise, blobs,
  blends of two digits, shifted / cropped / half-erased digits, blank and inverted images).
- `IdentityJudge`: a fixed feature space (PCA of the real train digits, 20 components); a generated slot
  is identified as the concept (among a given set) whose reference images are closest on average over
  the ``k`` nearest references. The analogue of ArcFace identity alignment for faces.

Both are stored as safetensors (``assets/judges.safetensors``) and rebuilt by ``bench/world_train.py judges``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

NOT_A_DIGIT = 10
N_CLASSES = 11
JUDGES_FILE = Path(__file__).with_name("assets") / "judges.safetensors"


class DigitClassifier(nn.Module):
    """MLP 64 → 256 → 128 → 11 on a flattened 8×8 slot. ``forward(x [n,1,8,8]) → logits [n, 11]``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, N_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], 64))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class per slot image ``[n]`` (0–9, or ``NOT_A_DIGIT``)."""
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long)
        return self(x.float().clamp(-1, 1)).argmax(-1)


def make_negatives(digits: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` "not a digit" images ``[n, 1, 8, 8]`` in [-1, 1] built from real ``digits`` ``[m, 1, 8, 8]``."""
    kinds = torch.randint(0, 7, (n,), generator=gen)
    out = torch.empty(n, 1, 8, 8)
    m = digits.shape[0]
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    for i in range(n):
        k = int(kinds[i])
        a = digits[int(torch.randint(0, m, (1,), generator=gen))]
        b = digits[int(torch.randint(0, m, (1,), generator=gen))]
        if k == 0:  # noise
            img = torch.rand(1, 8, 8, generator=gen) * 2 - 1
        elif k == 1:  # one or two gaussian blobs
            img = torch.full((1, 8, 8), -1.0)
            for _ in range(int(torch.randint(1, 3, (1,), generator=gen))):
                cy, cx = (torch.rand(2, generator=gen) * 7).tolist()
                s = 0.8 + 2.0 * float(torch.rand(1, generator=gen))
                img = torch.maximum(img, 2 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)) - 1)
        elif k == 2:  # blend of two digits
            w = 0.35 + 0.3 * float(torch.rand(1, generator=gen))
            img = w * a + (1 - w) * b
            img = torch.maximum(a, b) if float(torch.rand(1, generator=gen)) < 0.5 else img
        elif k == 3:  # shifted digit (by 3-4 px)
            dy, dx = torch.randint(-4, 5, (2,), generator=gen).tolist()
            if abs(dy) < 3 and abs(dx) < 3:
                dx = 4 if dx >= 0 else -4
            img = torch.roll(a, shifts=(dy, dx), dims=(1, 2))
        elif k == 4:  # half erased
            img = a.clone()
            if float(torch.rand(1, generator=gen)) < 0.5:
                img[:, : int(torch.randint(3, 6, (1,), generator=gen))] = -1
            else:
                img[:, :, : int(torch.randint(3, 6, (1,), generator=gen))] = -1
        elif k == 5:  # blank or uniform grey
            img = torch.full((1, 8, 8), float(torch.rand(1, generator=gen)) * 1.2 - 1)
        else:  # inverted digit
            img = -a
        out[i] = img.clamp(-1, 1)
    return out


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, steps: int = 3000, seed: int = 0
) -> DigitClassifier:
    """Train on real digits ``images`` ``[n,1,8,8]`` / ``labels`` ``[n]`` plus fresh negatives each step.

    Augmentation: ±1 px shifts and small pixel noise, so that slightly imperfect generated digits count.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    negs = make_negatives(images, 6000, gen)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (128,), generator=gen)
        x = images[idx]
        sh = torch.randint(-1, 2, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=tuple(sh), dims=(2, 3)) if float(torch.rand(1, generator=gen)) < 0.3 else x
        x = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
        nidx = torch.randint(0, negs.shape[0], (40,), generator=gen)
        xb = torch.cat([x, negs[nidx]])
        yb = torch.cat([labels[idx], torch.full((40,), NOT_A_DIGIT)])
        loss = nn.functional.cross_entropy(clf(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return clf.eval()


class IdentityJudge:
    """Identification of generated slots among concepts by k-NN distance in a PCA feature space.

    mean: ``[64]``, components: ``[d, 64]`` (PCA of real train digits); ``refs``: concept name → reference
    slot images ``[m, 1, 8, 8]``.
    """

    def __init__(
        self, mean: torch.Tensor, components: torch.Tensor, refs: Mapping[str, torch.Tensor], k: int = 5
    ):
        self.mean = mean.float()
        self.components = components.float()
        self.k = k
        self.ref_feats = {name: self.features(r) for name, r in refs.items()}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, 1, 8, 8]`` → ``[n, d]``."""
        return (x.float().reshape(x.shape[0], 64).clamp(-1, 1) - self.mean) @ self.components.T

    def distances(self, x: torch.Tensor, concepts: Sequence[str]) -> torch.Tensor:
        """``[n, len(concepts)]``: mean distance to each concept's ``k`` nearest references."""
        f = self.features(x)
        cols = []
        for c in concepts:
            d = torch.cdist(f, self.ref_feats[c])
            kk = min(self.k, d.shape[1])
            cols.append(d.topk(kk, dim=1, largest=False).values.mean(1))
        return torch.stack(cols, 1)

    def identify(self, x: torch.Tensor, concepts: Sequence[str]) -> torch.Tensor:
        """Index into ``concepts`` of the closest concept for each slot ``[n]``."""
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long)
        return self.distances(x, concepts).argmin(1)


def fit_pca(images: torch.Tensor, d: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of ``[n, 1, 8, 8]`` images: ``(mean [64], components [d, 64])``."""
    x = images.reshape(images.shape[0], 64).double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = vh[:d]
    comps = comps * torch.sign(comps[:, :1] + 1e-12)  # fixed sign convention
    return mean.float(), comps.float()


def save_judges(clf: DigitClassifier, mean: torch.Tensor, components: torch.Tensor, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"classifier.{k}": v.contiguous() for k, v in clf.state_dict().items()}
    tensors["pca.mean"] = mean.contiguous()
    tensors["pca.components"] = components.contiguous()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"loraclr_world": "judges"})
    tmp.replace(path)


def load_judges(path: Path = JUDGES_FILE) -> tuple[DigitClassifier, torch.Tensor, torch.Tensor]:
    """``(classifier, pca_mean, pca_components)`` from the judges file."""
    from safetensors.torch import load_file

    st = load_file(str(path))
    clf = DigitClassifier()
    clf.load_state_dict({k[len("classifier.") :]: v for k, v in st.items() if k.startswith("classifier.")})
    return clf.eval(), st["pca.mean"], st["pca.components"]
