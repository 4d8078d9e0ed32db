"""The paper's configurations (configs/cifar10.yaml, configs/celeba32.yaml)
pass every pre-data check of ``privimage run`` when pointed at generated
stand-ins of their data: a sharded public pool (scripts/make_public_pool.py)
and RGB ImageFolders at 32x32. What they set is the paper's: 3 channels at
32 px, the ~1.8M-parameter generator, its batch sizes and iterations."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from services.cli import main
from tests.pool_helpers import make_pool

ROOT = Path(__file__).resolve().parents[1]
# config file -> (sensitive classes of its stand-in, the paper's fine-tuning steps)
PAPER = {"cifar10.yaml": (10, 152), "celeba32.yaml": (2, 618)}


def _rgb_folder(root: Path, classes: int, per_class: int, size: int = 32) -> Path:
    rng = np.random.default_rng(classes)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / f"class{c}" / f"{i}.png")
    return root


def _validate(capsys, config: str, tmp: Path, size: int = 32) -> tuple[int, str, str]:
    classes = PAPER[config][0]
    pool = make_pool(tmp / "pool", images=480, classes=40, shards=2)
    train = _rgb_folder(tmp / f"train{size}", classes, 6, size)
    test = _rgb_folder(tmp / f"test{size}", classes, 3, size)
    rc = main(["validate", "--config", str(ROOT / "configs" / config),
               "--set", f"data.sensitive=folder:{train}",
               "--set", f"data.sensitive_test=folder:{test}",
               "--set", f"data.public=[shards:{pool}]", "--set", f"run.output_dir={tmp / 'runs'}",
               "--set", f"run.ledger_store={tmp / 'ledgers'}"])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("config", sorted(PAPER))
def test_a_paper_config_passes_every_check_on_stand_in_data(config, tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "configs" / config).read_text())
    assert (cfg["data"]["channels"], cfg["data"]["image_size"]) == (3, 32)
    assert cfg["generator"]["preset"] == "small" and cfg["ray"]["use_gpu"] is True
    assert cfg["data"]["public"][0].startswith("shards:")
    rc, out, err = _validate(capsys, config, tmp_path)
    assert rc == 0, err
    got = json.loads(out)
    assert got["ok"] and got["classes"] == PAPER[config][0]
    assert got["dataset_size_source"] == "declared"  # the published size, never the data's
    assert got["dp_stages"]["finetune"]["steps"] == PAPER[config][1]
    assert 9 < got["planned_epsilon"] <= cfg["privacy"]["target_epsilon"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_check_reads_the_stand_ins(tmp_path, capsys):
    # control: the same config on 28x28 images is refused, naming the key
    rc, out, err = _validate(capsys, "cifar10.yaml", tmp_path, size=28)
    assert rc == 2 and not out and "data.image_size" in err
