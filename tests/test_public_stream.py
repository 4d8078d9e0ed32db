"""The sharded public pool on Ray Data (services/public_data.py): the index
built by a map over shards, the image stream, the query function trained from
it, PDP-Diffusion's whole-pool pre-training images, and a pre-trained
classifier plugged in as the query function."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from privimage_core.config import SemanticQueryConfig, from_dict
from privimage_core.data.shards import open_streamed
from privimage_core.errors import ConfigError, DataError
from privimage_core.selection.pretrained import PretrainedQuery, build_network, match_classes
from privimage_core.selection.public_index import PublicIndex
from privimage_core.selection.semantic_query import predict_topk
from privimage_core.selection.stream_query import to_model_input
from services.actors import PublicSelector
from services.public_data import index_parts, iter_images
from services.public_query import pretrained_query, train_query_stream
from tests.pool_helpers import make_pool

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pools") / "pool", images=3000, classes=10, shards=4)


@pytest.fixture(scope="module")
def index(pool, tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("index")
    parts, stats = index_parts([open_streamed(f"shards:{pool}")], str(tmp / "cache"), 1)
    assert stats["shards"] == 4 and stats["reused"] == 0
    return PublicIndex.build_sources(None, parts, tmp / "idx", tmp / "cache", (32, 32, 3))


def test_the_ray_data_map_indexes_as_the_process_does(index, pool, tmp_path):
    parts, stats = index_parts([open_streamed(f"shards:{pool}")], str(tmp_path), 0)
    local = PublicIndex.build_sources(None, parts, tmp_path / "idx", tmp_path, (32, 32, 3))
    assert local.table.equals(index.table) and stats["rows"] == 3000


def test_the_stream_reads_each_row_once_and_a_seed_fixes_its_order(index):
    sel = index.select([1, 4, 6]).sort_by("id")
    want = index.load(sel).images
    seen = {}
    for shuffle in (None, 5, 5, 6):
        out, order = np.zeros_like(want), []
        for images, labels, pos in iter_images(index, sel, 1, 100, shuffle_seed=shuffle):
            out[pos] = images
            order += pos.tolist()
            assert set(labels.tolist()) <= {1, 4, 6}
        assert sorted(order) == list(range(sel.num_rows)) and np.array_equal(out, want)
        seen.setdefault(shuffle, []).append(order)
    assert seen[5][0] == seen[5][1]  # the same seed, the same stream
    assert seen[5][0] != seen[6][0] and seen[5][0] != seen[None][0]  # control


def test_query_function_from_the_stream_beats_chance(index, tmp_path):
    torch.set_num_threads(1)
    q = SemanticQueryConfig(width=8, epochs=2, batch_size=64, lr=3e-3, val_fraction=0.1)
    model, metrics = train_query_stream(index, q, seed=0, workers=1, storage=tmp_path)
    assert metrics["train_workers"] == 0  # Ray Train's local mode, fed by Ray Data
    assert metrics["train_steps"] == 2 * (2700 // 64) and metrics["train_images_per_second"] > 0
    assert not any(tmp_path.iterdir())  # Ray Train's run is removed once the model is back
    assert metrics["public_val_accuracy"] > 0.25, metrics  # chance: 0.1
    # control: the same network untrained scores about chance on the same rows
    val = index.load(index.table.take(np.arange(0, 3000, 10)))
    untrained = type(model)(10, 3, 8).eval()
    acc0 = (predict_topk(untrained, to_model_input(val.images), 1)[:, 0] == val.labels).mean()
    acc1 = (predict_topk(model, to_model_input(val.images), 1)[:, 0] == val.labels).mean()
    assert acc0 < 0.25 < acc1


def test_two_ray_train_workers_share_the_stream_data_parallel(index, tmp_path, monkeypatch):
    q = SemanticQueryConfig(width=8, epochs=2, batch_size=64, lr=3e-3, val_fraction=0.1,
                            train_workers=2)
    model, metrics = train_query_stream(index, q, seed=0, workers=1, storage=tmp_path)
    # each worker a batch of 32 from its half: the same global batch and steps
    assert metrics["train_workers"] == 2 and metrics["train_steps"] == 2 * (2700 // 64)
    assert metrics["train_images"] == 2 * 2 * (2700 // 64) * 32
    assert metrics["public_val_accuracy"] > 0.25, metrics  # chance: 0.1
    # control: without a CPU for the workers and a read task, local mode
    import ray
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.5})
    q.max_images_per_epoch, q.epochs = 256, 1
    assert train_query_stream(index, q, seed=0, workers=1, storage=tmp_path,
                              log=lambda s: None)[1]["train_workers"] == 0


def test_pdp_whole_pool_pretraining_reads_a_seeded_subsample(pool, tmp_path):
    cfg = from_dict({"run": {"output_dir": str(tmp_path)},
                     "data": {"public": [f"shards:{pool}"], "image_size": 16, "channels": 1,
                              "public_max_per_class": None, "public_pool_pretrain_max": 500}})
    sel = PublicSelector(cfg.to_dict(), str(tmp_path / "run"))
    info = sel.build_index()
    assert info["num_public_images"] == 3000 and info["index_shards"] == 4
    images, labels = sel.pool_images(num_classes=3, seed=7)
    assert images.shape == (500, 16, 16, 1) and set(labels.tolist()) == {0, 1, 2}
    again, _ = sel.pool_images(num_classes=3, seed=7)
    other, _ = sel.pool_images(num_classes=3, seed=8)
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    sel.cfg.data.public_pool_pretrain_max = None  # control: the whole pool
    assert sel.pool_images(num_classes=3, seed=7)[0].shape[0] == 3000
    # PrivImage reads only the selection, relabelled
    x, y = sel.selected_images({0: [2], 1: [5, 9]})
    assert len(x) == int(sel.index.counts_per_label()[[2, 5, 9]].sum()) and set(y) == {0, 1}
    # a second build reuses every shard's part
    assert PublicSelector(cfg.to_dict(), str(tmp_path / "run2")).build_index()[
        "index_shards_reused"] == 4


def test_a_pretrained_classifier_is_matched_to_the_public_labels_by_name(index, tmp_path):
    names = ["ring-ember-solid", "zebra", "disc-ember-solid", "ring-ember-solid"]
    torch.manual_seed(0)
    net = build_network("resnet18", len(names)).eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    q = SemanticQueryConfig(architecture="resnet18", pretrained=str(tmp_path / "w.pt"),
                            pretrained_classes=str(tmp_path / "classes.txt"),
                            pretrained_input_size=32)
    model, metrics = pretrained_query(index, q, seed=0, workers=0, sample=50)
    assert metrics["matched_public_labels"] == 2 and 0 <= metrics["public_val_accuracy"] <= 1
    x = to_model_input(index.load(index.table.slice(0, 8)).images)
    out = model(x)
    with torch.no_grad():
        raw = net((((x + 1) / 2) - model.mean) / model.std)
    ring, disc = index.label_names.index("pool/ring-ember-solid"), index.label_names.index(
        "pool/disc-ember-solid")
    assert torch.allclose(out[:, disc], raw[:, 2], atol=1e-5)
    assert torch.allclose(out[:, ring], torch.maximum(raw[:, 0], raw[:, 3]), atol=1e-5)
    assert torch.isinf(out[:, [i for i in range(10) if i not in (ring, disc)]]).all()
    assert set(predict_topk(model, x, 1)[:, 0].tolist()) <= {ring, disc}
    # a top-k beyond the labels it knows would vote for labels it cannot see: refused
    from privimage_core.privacy.ledger import PrivacyLedger
    cfg = from_dict({"run": {"output_dir": str(tmp_path)}, "selection": {"k1": 3, "k2": 1},
                     "data": {"public": [f"shards:{tmp_path}"], "image_size": 32, "channels": 3}})
    sel = PublicSelector(cfg.to_dict(), str(tmp_path / "run"))
    sel.index, sel.model = index, model
    sensitive = (index.load(index.table.slice(0, 4)).images, np.array([0, 1, 0, 1]))
    ledger = PrivacyLedger(10.0, 1e-5).state_dict()
    with pytest.raises(ConfigError, match="k1=3 exceeds the 2 public labels the pre-trained"):
        sel.query(ledger, sensitive, 2, 1.0)
    sel.cfg.selection.k1 = 2  # control: within them it runs
    assert sel.query(ledger, sensitive, 2, 1.0)["k1"] == 2
    with pytest.raises(DataError, match="none of the classifier's classes names a public label"):
        match_classes(["zebra"], index.label_names)
    with pytest.raises(DataError, match="semantic_query.pretrained: .* does not hold resnet18"):
        pretrained_query(index, SemanticQueryConfig(
            architecture="resnet18", pretrained=str(tmp_path / "classes.txt"),
            pretrained_classes=str(tmp_path / "classes.txt")), 0, 0)


def test_an_imagenet_classifier_needs_no_download():
    """The ImageNet-1k names come with torchvision; the weights are a local file."""
    from privimage_core.selection.pretrained import classifier_class_names
    names = classifier_class_names("imagenet")
    assert len(names) == 1000 and names[0] == "tench"
    net = PretrainedQuery(build_network("mobilenet_v3_small", 1000), "mobilenet_v3_small", 32,
                          [0, 1], [1, 0], 2).eval()
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 2)


def test_without_a_free_cpu_the_stream_reads_in_process(index, monkeypatch):
    """A one-CPU node whose CPU the selector holds: Ray Data would wait for ever."""
    import ray

    from services import public_data
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0})
    assert public_data.ray_data_workers(2) == 0
    monkeypatch.setattr(public_data.ray.data, "from_items", None)  # fails if Ray Data is used
    sel = index.select([3]).sort_by("id")
    assert np.array_equal(public_data.read_images(index, sel, 2), index.load(sel).images)
