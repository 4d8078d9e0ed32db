"""Utility of a synthetic dataset (paper Sec. 4.3, "Classification Accuracy"):
train a classifier on synthetic images, test it on the REAL test split.

The paper uses logistic regression, an MLP and a CNN; LR and MLP come from
scikit-learn on flattened [0, 1] pixels, the CNN is a small PyTorch convnet.
Testing on real data is a non-private evaluation: its number describes the
release, it trains nothing that is released.

``utility_matrix`` gives the four train/test combinations of the utility
experiment in seed 002 (p1 real->real, p2 synthetic->real, p3 real->synthetic,
p4 synthetic->synthetic; "accuracy loss" = p1 - p2).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from torch import nn

from privimage_core.data.imageset import ImageSet, writable_tensor
from privimage_core.errors import DataError

KINDS = ("lr", "mlp", "cnn")


class SmallCNN(nn.Module):
    """LeNet-sized convnet: two conv blocks with BatchNorm (not DP-trained, so
    BN is fine and converges fastest), then adaptive average pooling to 7x7 (identity at 28x28),
    so one network serves 28x28, 32x32 and 64x64 inputs. About 1M multiply-
    adds per 28x28 image: the shared 2-core CPUs train 3 epochs of 10k MNIST
    images in well under a minute (a 3-block 32/64/128 net took 200 s there)."""

    def __init__(self, channels: int, num_classes: int, width: int = 16):
        super().__init__()
        w = width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(channels, w), block(w, 2 * w), nn.AdaptiveAvgPool2d(7))
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(2 * w * 49, num_classes)

    def forward(self, x):
        return self.out(self.drop(self.features(x).flatten(1)))


def check_pair(train: ImageSet, test: ImageSet) -> None:
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"cannot evaluate a classifier with {len(train)} training and {len(test)} "
                        "test images; pass non-empty datasets")
    if train.shape != test.shape:
        raise DataError(f"train images are {train.shape} but test images are {test.shape} (H,W,C); "
                        "resize one split to match (load_source(..., image_size=, channels=, resize=True))")
    if list(train.class_names) != list(test.class_names):
        raise DataError(f"train classes {train.class_names[:5]}... differ from test classes "
                        f"{test.class_names[:5]}...; evaluate against the matching dataset")


def _flat(ds: ImageSet) -> np.ndarray:
    return ds.images.reshape(len(ds), -1).astype(np.float32) / 255.0


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(pred) == labels).mean())


def _train_cnn(train: ImageSet, seed: int, epochs: int, batch_size: int, lr: float,
               augment: bool, num_classes: int, min_steps: int = 200,
               device: str | torch.device = "cpu") -> SmallCNN:
    device = torch.device(device)
    # fork_rng: seed the init and shuffles without changing the caller's global
    # RNG (on a GPU also its CUDA RNG, which dropout draws from there)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        # the init and the shuffles stay CPU draws, so a GPU trains from the
        # same start on the same batches
        x, y = train.to_tensor().to(device), writable_tensor(train.labels).to(device)
        model = SmallCNN(train.shape[2], num_classes).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        per_epoch = (len(x) + batch_size - 1) // batch_size
        # small sets (a few hundred images, e.g. the detector's) get more
        # epochs so training always takes >= min_steps Adam steps; 3 epochs of
        # 10k images (237 steps) are unchanged
        epochs = max(epochs, -(-min_steps // per_epoch))
        steps = max(1, epochs * per_epoch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                b = perm[i:i + batch_size].to(device)
                if len(b) < 2:  # BatchNorm cannot normalise a single row in training mode
                    continue
                xb = x[b]
                if augment:
                    # +-2 px random shifts: cheap augmentation so a classifier
                    # trained on synthetic data does not latch onto framing artefacts
                    dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
                    xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
                loss = F.cross_entropy(model(xb), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.inference_mode()
def _predict_cnn(model: nn.Module, ds: ImageSet, batch_size: int = 1000) -> np.ndarray:
    x = ds.to_tensor()
    dev = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch_size].to(dev)).argmax(1).cpu()
                      for i in range(0, len(x), batch_size)]).numpy()


def _sklearn_model(kind: str, seed: int, epochs: int, max_iter: int | None):
    if kind == "lr":
        # lbfgs iterations, capped for speed (full convergence on 50k MNIST-size
        # images takes minutes and moves accuracy by well under a point)
        return LogisticRegression(max_iter=max_iter or 30 * max(1, epochs), random_state=seed)
    # max_iter = Adam epochs for MLPClassifier
    return MLPClassifier(hidden_layer_sizes=(128,), max_iter=max_iter or 4 * max(1, epochs),
                         batch_size=128, random_state=seed, early_stopping=False)


def train_classifier(kind: str, train: ImageSet, seed: int = 0, epochs: int = 3,
                     batch_size: int = 128, lr: float = 1e-2, augment: bool = True,
                     max_iter: int | None = None, min_steps: int = 200,
                     device: str | torch.device = "cpu"):
    """A fitted classifier with ``.predict_images(ImageSet) -> labels``.
    ``device``: where the CNN trains and predicts (scikit-learn's LR and MLP
    run on the CPU whatever it says)."""
    if kind not in KINDS:
        raise ValueError(f"unknown classifier '{kind}'; use one of {KINDS}")
    if len(train) == 0:
        raise DataError("cannot train a classifier on an empty dataset; pass training images")
    if kind == "cnn":
        model = _train_cnn(train, seed, epochs, batch_size, lr, augment, train.num_classes,
                           min_steps, device)
        model.predict_images = lambda ds: _predict_cnn(model, ds)  # type: ignore[attr-defined]
        return model
    clf = _sklearn_model(kind, seed, epochs, max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at capped iterations is expected
        clf.fit(_flat(train), train.labels)
    clf.predict_images = lambda ds: clf.predict(_flat(ds))  # type: ignore[attr-defined]
    return clf


def train_eval_classifier(kind: str, train: ImageSet, test: ImageSet, seed: int = 0,
                          epochs: int = 3, batch_size: int = 128, lr: float = 1e-2,
                          augment: bool = True, max_iter: int | None = None,
                          min_steps: int = 200) -> float:
    """Accuracy on ``test`` of a ``kind`` classifier ('lr', 'mlp', 'cnn') trained on ``train``.

    ``epochs``: CNN epochs (raised so that the CNN gets at least
    ``min_steps`` optimizer steps on small sets); for the scikit-learn models it scales the
    iteration cap (LR: 30 * epochs lbfgs iterations, MLP: 4 * epochs Adam
    epochs) unless ``max_iter`` is given. Deterministic given ``seed`` on a
    fixed machine and thread count.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown classifier '{kind}'; use one of {KINDS}")
    check_pair(train, test)
    clf = train_classifier(kind, train, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                           augment=augment, max_iter=max_iter, min_steps=min_steps)
    return accuracy(clf.predict_images(test), test.labels)


def utility_report(synthetic: ImageSet, real_train: ImageSet | None, real_test: ImageSet,
                   kinds=KINDS, include_real_ceiling: bool = True, seed: int = 0,
                   **kw) -> dict[str, float]:
    """{'synthetic/<kind>': acc, 'real/<kind>': acc, ...}: each classifier
    trained on synthetic data and, as the ceiling the paper's "NonPriv" row
    reports, on the real training split; both tested on the real test split."""
    out: dict[str, float] = {}
    for kind in kinds:
        out[f"synthetic/{kind}"] = train_eval_classifier(kind, synthetic, real_test, seed=seed, **kw)
        if include_real_ceiling:
            if real_train is None:
                raise DataError("include_real_ceiling=True needs real_train; pass it or set "
                                "include_real_ceiling=False")
            out[f"real/{kind}"] = train_eval_classifier(kind, real_train, real_test, seed=seed, **kw)
    return out


def score_matrix(models: dict, real_test: ImageSet, syn_test: ImageSet) -> dict[str, float]:
    """Seed 002's utility table from two TRAINED classifiers, ``models`` =
    {'real': ..., 'synthetic': ...}: each scored on both test sets. Keys
    'real->real' (p1), 'synthetic->real' (p2), 'real->synthetic' (p3),
    'synthetic->synthetic' (p4), and 'accuracy_loss' = p1 - p2."""
    out: dict[str, float] = {}
    for tname in ("real", "synthetic"):
        for ename, te in (("real", real_test), ("synthetic", syn_test)):
            out[f"{tname}->{ename}"] = accuracy(models[tname].predict_images(te), te.labels)
    out["accuracy_loss"] = out["real->real"] - out["synthetic->real"]
    return out


def utility_matrix(real_train: ImageSet, real_test: ImageSet, syn_train: ImageSet,
                   syn_test: ImageSet, kind: str = "cnn", seed: int = 0, **kw) -> dict[str, float]:
    """The four train->test accuracies of seed 002's utility table (see
    ``score_matrix``), training one model per training set."""
    for tr, te in ((real_train, real_test), (syn_train, real_test), (real_train, syn_test)):
        check_pair(tr, te)
    models = {tname: train_classifier(kind, tr, seed=seed, **kw)
              for tname, tr in (("real", real_train), ("synthetic", syn_train))}
    return score_matrix(models, real_test, syn_test)
