"""Utility of a synthetic dataset (paper Sec. 4.3, "Classification Accuracy"):
train a classifier on synthetic images, test it on the REAL test split.

The paper uses logistic regression, an MLP and a CNN; LR and MLP come from
scikit-learn, the CNN is a small PyTorch convnet. Testing on real data is a
non-private evaluation: its number describes the release, it trains nothing.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privimage_core.data.imageset import ImageSet


class SmallCNN(nn.Module):
    def __init__(self, channels: int, num_classes: int, size: int):
        super().__init__()
        self.c1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(64 * (size // 4) ** 2, 128)
        self.out = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.out(self.drop(F.relu(self.fc(x.flatten(1)))))


def _flat(ds: ImageSet) -> np.ndarray:
    return ds.images.reshape(len(ds), -1).astype(np.float32) / 255.0


def _cnn(train: ImageSet, test: ImageSet, seed: int, epochs: int, batch_size: int = 128,
         lr: float = 1e-3) -> float:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = train.to_tensor(), torch.from_numpy(train.labels)
    model = SmallCNN(train.shape[2], train.num_classes, train.shape[0])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            b = perm[i:i + batch_size]
            # +-2 px random shifts: cheap augmentation against framing artefacts
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(x[b], shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    xt = test.to_tensor()
    with torch.no_grad():
        pred = torch.cat([model(xt[i:i + 1000]).argmax(1) for i in range(0, len(xt), 1000)])
    return float((pred.numpy() == test.labels).mean())


def train_eval_classifier(kind: str, train: ImageSet, test: ImageSet, seed: int = 0,
                          epochs: int = 3) -> float:
    """Accuracy on ``test`` of a ``kind`` classifier ('lr', 'mlp', 'cnn') trained on ``train``."""
    if kind == "cnn":
        return _cnn(train, test, seed, epochs)
    if kind == "lr":
        from sklearn.linear_model import LogisticRegression
        clf = LogisticRegression(max_iter=200 * max(1, epochs), random_state=seed)
    elif kind == "mlp":
        from sklearn.neural_network import MLPClassifier
        clf = MLPClassifier(hidden_layer_sizes=(256,), max_iter=20 * max(1, epochs),
                            random_state=seed, early_stopping=False)
    else:
        raise ValueError(f"unknown classifier '{kind}'; use lr, mlp or cnn")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings at capped iterations
        clf.fit(_flat(train), train.labels)
    return float((clf.predict(_flat(test)) == test.labels).mean())
