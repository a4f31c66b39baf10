"""The world's concepts: held-out digit classes and handwriting-style identities, each with a trigger.

- class concepts: a digit class the base never saw (``data.HELD_OUT``), e.g. ``sks`` = "2";
- identity concepts: one handwriting style cluster of a known digit (k-means, k = 2, on the PCA features
  of that class's train images), e.g. ``mth`` = the first style of "1", ``yte`` = the second.

The definitions (trigger, digit, member indices into ``load_digits``) are committed in
``assets/concepts.json`` so that they do not depend on the k-means of a scikit-learn version;
`build_concepts` regenerates them (fixed seeds).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lib_loraclr.world import data as wdata

CONCEPTS_FILE = Path(__file__).with_name("assets") / "concepts.json"
CLASS_CONCEPTS: tuple[tuple[str, int], ...] = (("sks", 2), ("ohwx", 5), ("szn", 8))
# (trigger of style 0, trigger of style 1, digit)
IDENTITY_CONCEPTS: tuple[tuple[str, str, int], ...] = (
    ("mth", "yte", 1),
    ("mib", "niu", 4),
    ("zas", "bsf", 7),
    ("cna", "ucn", 3),
    ("wbo", "pgs", 6),
)


@dataclass(frozen=True)
class Concept:
    """One concept. ``train``/``test``: indices into ``load_digit_data().images`` of its members.

    The train members are the LoRA's training images and the identity judge's references; the test
    members are held out (used to report the identity judge's accuracy on real images).
    """

    name: str
    trigger: str
    kind: str  # "class" | "identity"
    digit: int
    train: tuple[int, ...]
    test: tuple[int, ...]

    def images(self, split: str = "train") -> torch.Tensor:
        idx = list(self.train if split == "train" else self.test)
        return wdata.load_digit_data().images[idx]


def build_concepts(seed: int = 0) -> list[Concept]:
    """Concept definitions from the data (deterministic for a scikit-learn version)."""
    from sklearn.cluster import KMeans

    from lib_loraclr.world.judges import fit_pca

    d = wdata.load_digit_data()
    mean, comps = fit_pca(d.images[torch.from_numpy(d.train_idx)])
    feats = ((d.images.reshape(-1, 64) - mean) @ comps.T).numpy()
    out = [
        Concept(
            t, t, "class", c, tuple(d.subset("train", [c]).tolist()), tuple(d.subset("test", [c]).tolist())
        )
        for t, c in CLASS_CONCEPTS
    ]
    for t0, t1, c in IDENTITY_CONCEPTS:
        tr, te = d.subset("train", [c]), d.subset("test", [c])
        km = KMeans(2, n_init=10, random_state=seed).fit(feats[tr])
        # order clusters by their mean first PCA coordinate, so style 0 / 1 are stable
        order = np.argsort(km.cluster_centers_[:, 0])
        lab_tr = np.argsort(order)[km.labels_]
        lab_te = np.argsort(order)[km.predict(feats[te])]
        for s, t in enumerate((t0, t1)):
            out.append(
                Concept(t, t, "identity", c, tuple(tr[lab_tr == s].tolist()), tuple(te[lab_te == s].tolist()))
            )
    return out


def save_concepts(concepts: list[Concept], path: Path = CONCEPTS_FILE) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps([asdict(c) for c in concepts], indent=1))
    tmp.replace(path)


def load_concepts(path: Path = CONCEPTS_FILE) -> dict[str, Concept]:
    """Concepts by name, in definition order."""
    raw = json.loads(Path(path).read_text())
    return {
        r["name"]: Concept(
            r["name"], r["trigger"], r["kind"], int(r["digit"]), tuple(r["train"]), tuple(r["test"])
        )
        for r in raw
    }
