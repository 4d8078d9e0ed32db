"""A pre-trained classifier as the semantic query function (Sec. 3.2): the
paper's query function is a classifier of the public semantics trained on
public data; one trained elsewhere on public data (e.g. ImageNet) serves as
well, loaded from a LOCAL weights file (nothing is downloaded).

Its classes are matched to the public pool's labels by name: a pool label
``<prefix>/<name>`` is the classifier's class ``<name>``. Logits of classes
the pool does not hold are dropped, and pool labels the classifier does not
know get -inf (never predicted). The classifier sees the images as it was
trained: RGB at ``input_size``, normalised as its architecture expects.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from privimage_core.errors import DataError
from privimage_core.selection.semantic_query import predict_topk
from privimage_core.selection.stream_query import to_model_input

# architecture -> (mean, std) of its input normalisation. EfficientNet-Lite
# was trained on inputs scaled to about [-1, 1]; torchvision's on ImageNet
# statistics.
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NORMALISATION = {"efficientnet_lite0": ((0.498,) * 3, (0.502,) * 3), "resnet18": _IMAGENET,
                 "resnet50": _IMAGENET, "mobilenet_v3_small": _IMAGENET,
                 "efficientnet_b0": _IMAGENET}


def classifier_class_names(spec: str) -> list[str]:
    """``imagenet`` (the 1,000 ImageNet-1k names torchvision ships) or a
    text file, one class name per line, line i naming output i."""
    if spec == "imagenet":
        # lazy: torchvision only when a pre-trained classifier is configured
        from torchvision.models._meta import _IMAGENET_CATEGORIES
        return list(_IMAGENET_CATEGORIES)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"semantic_query.pretrained_classes: {spec} is not a file; give a text "
                        "file with one class name per line, or imagenet")
    names = [ln.strip() for ln in path.read_text().splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise DataError(f"semantic_query.pretrained_classes: {spec} has empty lines; write one "
                        "class name per line")
    return names


def build_network(architecture: str, num_classes: int) -> nn.Module:
    """The architecture's network, untrained, with ``num_classes`` outputs."""
    if architecture == "efficientnet_lite0":
        try:
            # lazy: an optional package, imported only when this architecture is chosen
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise DataError("semantic_query.architecture: efficientnet_lite0 needs the package "
                            "efficientnet-lite-pytorch; pip install efficientnet-lite-pytorch "
                            "or choose a torchvision architecture") from None
        return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    # lazy: torchvision only when a pre-trained classifier is configured
    import torchvision
    return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)


def load_classifier(weights: str, architecture: str, num_classes: int) -> nn.Module:
    """The network with the weights of the local file ``weights`` (a state
    dict, or a checkpoint holding one under 'state_dict'), in eval mode."""
    path = Path(weights)
    if not path.is_file():
        raise DataError(f"semantic_query.pretrained: {weights} is not a file; give a local "
                        "weights file (nothing is downloaded)")
    net = build_network(architecture, num_classes)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        net.load_state_dict(state)
    except Exception as e:  # torch raises several types for a wrong file
        raise DataError(f"semantic_query.pretrained: {weights} does not hold {architecture} "
                        f"weights for {num_classes} classes ({(str(e) or type(e).__name__).splitlines()[0][:120]}); "
                        "check semantic_query.architecture and pretrained_classes") from e
    return net.eval()


def match_classes(classifier_names: list[str], pool_names: list[str]) -> tuple[list, list]:
    """(classifier outputs, pool labels) of the same name, pairwise."""
    by_name: dict[str, list[int]] = {}
    for j, name in enumerate(pool_names):
        by_name.setdefault(name.split("/", 1)[-1], []).append(j)
    pairs = [(i, j) for i, n in enumerate(classifier_names) for j in by_name.get(n, [])]
    if not pairs:
        raise DataError("semantic_query.pretrained_classes: none of the classifier's classes "
                        "names a public label (<source>/<name>); give the public data the "
                        "classifier's class names, or another classifier")
    return [i for i, _ in pairs], [j for _, j in pairs]


class PretrainedQuery(nn.Module):
    """Images in [-1, 1] (1 or 3 channels, any size) -> logits over the
    public pool's labels, from a pre-trained classifier."""

    def __init__(self, net: nn.Module, architecture: str, input_size: int,
                 classifier_ids: list[int], pool_ids: list[int], num_pool_labels: int):
        super().__init__()
        self.net, self.input_size, self.num_pool_labels = net, input_size, num_pool_labels
        mean, std = NORMALISATION[architecture]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.register_buffer("clf_ids", torch.tensor(classifier_ids, dtype=torch.long))
        self.register_buffer("pool_ids", torch.tensor(pool_ids, dtype=torch.long))
        # the pool labels it can predict: a top-k beyond them would draw
        # among labels of logit -inf, which it does not know
        self.num_known_labels = len(set(pool_ids))
        # it sees every image at input_size (224 by default): predict in
        # batches that fit in memory, not the small network's 1,000
        self.predict_batch_size = 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        logits = self.net((x - self.mean) / self.std)[:, self.clf_ids]
        out = torch.full((len(x), self.num_pool_labels), float("-inf"), dtype=logits.dtype,
                         device=logits.device)
        # a pool label named by several classifier classes takes their best logit
        return out.scatter_reduce(1, self.pool_ids.expand(len(x), -1), logits, reduce="amax")


def classifier_predictor(weights: str, architecture: str, classes: str, input_size: int,
                         batch_size: int = 256) -> tuple[Callable[[np.ndarray], np.ndarray],
                                                         list[str]]:
    """(predict, class names) of a pre-trained classifier: ``predict`` maps
    uint8 [N, H, W, C] images to the index of its top class; what labels
    public data that has none (data/label_shards.py)."""
    names = classifier_class_names(classes)
    every = list(range(len(names)))
    model = PretrainedQuery(load_classifier(weights, architecture, len(names)), architecture,
                            input_size, every, every, len(names)).eval()

    def predict(images: np.ndarray) -> np.ndarray:
        return predict_topk(model, to_model_input(images), k=1, batch_size=batch_size)[:, 0]

    return predict, names
