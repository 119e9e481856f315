"""Fashion-MNIST: the real IDX reading code on small files the test writes itself, and a smoke test
on the Debian package's files where they are installed (CI installs them)."""
import gzip
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from headsurgeon import HeadsurgeonError
from headsurgeon import data as D
from headsurgeon import recipe as R
from headsurgeon.cli import main

REAL = Path(D.FASHION_MNIST_ROOT)
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fashion-mnist.yaml"


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file written by hand from the format's definition (not by the reader under test)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fm(root: Path, per_class: tuple[int, int] = (12, 3), gz: bool = True) -> dict[str, np.ndarray]:
    """Train/test files with per_class images of each of the 10 classes; class c is a bright row band at c."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split_, n in zip(("train", "t10k"), per_class):
        labels = np.repeat(np.arange(10), n)
        rng.shuffle(labels)
        images = rng.integers(0, 60, (len(labels), 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c: 2 * c + 4] = 250
        for stem, arr in ((f"{split_}-images-idx3-ubyte", images), (f"{split_}-labels-idx1-ubyte", labels)):
            data = idx_bytes(arr)
            if gz:
                (root / (stem + ".gz")).write_bytes(gzip.compress(data))
            else:
                (root / stem).write_bytes(data)
        out[split_] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_reads_idx_files_gzipped_or_not(tmp_path, gz):
    made = write_fm(tmp_path, gz=gz)
    train, test = D.FashionMNIST("train", tmp_path), D.FashionMNIST("test", tmp_path)
    assert len(train) == 120 and len(test) == 30
    np.testing.assert_array_equal(train.images, made["train"][0])
    assert train.targets == made["train"][1].tolist()
    img, y = test[4]
    assert img.mode == "L" and img.size == (28, 28) and y == made["t10k"][1][4]
    np.testing.assert_array_equal(np.asarray(img), made["t10k"][0][4])
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert len(D.FashionMNIST("validation", tmp_path)) == 30  # the recipe default test_split name


def test_missing_truncated_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(HeadsurgeonError, match="apt-get install dataset-fashion-mnist.*data.root"):
        D.FashionMNIST("train", tmp_path / "nowhere")
    write_fm(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(HeadsurgeonError, match="t10k-labels-idx1-ubyte.*missing.*dataset-fashion-mnist"):
        D.FashionMNIST("test", tmp_path)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-100])
    with pytest.raises(HeadsurgeonError, match="truncated"):
        D.FashionMNIST("train", tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04" + raw[4:])
    with pytest.raises(HeadsurgeonError, match="bad header"):
        D.FashionMNIST("train", tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:-50])
    with pytest.raises(HeadsurgeonError, match="corrupt or truncated"):
        D.FashionMNIST("train", tmp_path)
    with pytest.raises(HeadsurgeonError, match="splits 'train' and 'test'"):
        D.FashionMNIST("extra", tmp_path)


def test_stratified_validation_carve_and_label_names(tmp_path):
    write_fm(tmp_path, per_class=(24, 3))
    flat, _ = R.load(None, ["data.dataset=fashion-mnist", f"data.root={tmp_path}", "data.stratify=true",
                            "data.val_fraction=0.25", "data.train_fraction=0.5", "data.label_noise=0.5"])
    sp = D.splits(flat)
    targets = sp.train.base.targets
    val_counts = np.bincount([targets[i] for i in sp.val.indices], minlength=10)
    train_counts = np.bincount([targets[i] for i in sp.train.indices], minlength=10)
    assert val_counts.tolist() == [6] * 10 and train_counts.tolist() == [9] * 10  # 24 -> 6 val, 18 -> 9 trained on
    assert not set(sp.val.indices) & set(sp.train.indices)
    assert sp.label_names == D.FASHION_MNIST_CLASSES and sp.sizes() == {"train": 90, "val": 60, "test": 30}
    assert sp.val.offsets == {} and len(sp.train.offsets) == 45  # noise on train only
    again = D.splits(flat)
    assert again.val.indices == sp.val.indices and again.train.indices == sp.train.indices  # fixed by split_seed


def test_one_channel_loader_normalises_with_the_recipe_statistics(tmp_path):
    write_fm(tmp_path)
    flat, _ = R.load(None, ["data.dataset=fashion-mnist", f"data.root={tmp_path}", "data.img_size=28",
                            "data.mean=[0.5]", "data.std=[0.25]", "data.batch_size=8"])
    sp = D.splits(flat)
    cfg = D.data_config(flat, {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}, in_chans=1)
    assert cfg["mean"] == (0.5,) and cfg["std"] == (0.25,) and cfg["input_size"] == (1, 28, 28)
    x, _ = next(iter(D.loader(sp.test, flat, cfg, False, torch.device("cpu"))))
    assert x.shape == (16, 1, 28, 28)
    img = sp.test.base.images[sp.test.indices[0]]
    torch.testing.assert_close(x[0, 0], (torch.from_numpy(img.copy()).float() / 255 - 0.5) / 0.25)
    with pytest.raises(HeadsurgeonError, match="data.mean has 1 values but the model takes 3 channels"):
        D.data_config(flat, None, in_chans=3)
    plain, _ = R.load(None, ["data.dataset=fashion-mnist", f"data.root={tmp_path}", "data.img_size=28", "data.batch_size=8"])
    cfg3 = D.data_config(plain, None, 3)
    x3, _ = next(iter(D.loader(sp.test, plain, cfg3, False, torch.device("cpu"))))
    assert x3.shape == (16, 3, 28, 28)  # grey replicated to RGB for a 3-channel (e.g. pretrained) model
    pixels = [x3[:, c] * cfg3["std"][c] + cfg3["mean"][c] for c in range(3)]
    torch.testing.assert_close(pixels[0], pixels[1])  # (assert_close returns None: one call per check)
    torch.testing.assert_close(pixels[0], pixels[2])
    torch.testing.assert_close(pixels[0][0], torch.from_numpy(img.copy()).float() / 255)


def test_averaged_statistics_for_a_one_channel_model():
    flat, _ = R.load(None, [])
    cfg = D.data_config(flat, {"mean": (0.4, 0.5, 0.6), "std": (0.1, 0.2, 0.3)}, in_chans=1)
    assert cfg["mean"] == pytest.approx((0.5,)) and cfg["std"] == pytest.approx((0.2,))


def test_train_on_small_fashion_files_writes_class_names(tmp_path):
    warnings.filterwarnings("ignore")
    write_fm(tmp_path / "fm", per_class=(16, 4))
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--set", "data.dataset=fashion-mnist", "--set", f"data.root={tmp_path / 'fm'}",
                                    "--set", "model_kwargs={channels: [8, 16, 32, 64], stem_width: 8, in_chans: 1}",
                                    "--set", "data.img_size=28", "--set", "data.batch_size=16", "--set", "epochs=1",
                                    "--set", "data.stratify=true", "--set", "data.val_fraction=0.25",
                                    "--set", "data.test_split=test", "-o", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_names"] == D.FASHION_MNIST_CLASSES
    assert summary["samples"] == {"train": 120, "val": 40, "test": 40}


def test_cli_missing_dataset_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--set", "data.dataset=fashion-mnist", "--set", f"data.root={tmp_path / 'none'}",
                                    "-o", str(out)])
    assert res.exit_code != 0
    assert "Traceback" not in res.output and "apt-get install dataset-fashion-mnist" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.skipif(not REAL.is_dir(), reason=f"the Debian package dataset-fashion-mnist is not installed ({REAL} is "
                                              f"missing); CI installs it in .ci/run")
def test_real_fashion_mnist_files():
    train, test = D.FashionMNIST("train"), D.FashionMNIST("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(train.targets).tolist() == [6000] * 10 and np.bincount(test.targets).tolist() == [1000] * 10
    raw = gzip.decompress((REAL / "train-images-idx3-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == "f4a8712d7a061bf5bd6d2ca38dc4d50a"  # upstream's decompressed checksum
    np.testing.assert_array_equal(train.images.reshape(-1), np.frombuffer(raw, np.uint8, offset=16))
    assert abs(train.images.mean() / 255 - 0.286) < 1e-3 and abs(train.images.std() / 255 - 0.353) < 1e-3


@pytest.mark.skipif(not REAL.is_dir(), reason=f"the Debian package dataset-fashion-mnist is not installed ({REAL} is "
                                              f"missing); CI installs it in .ci/run")
def test_shipped_recipe_learns_in_one_short_epoch(tmp_path):
    warnings.filterwarnings("ignore")
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", str(RECIPE), "--set", "epochs=1", "--set", "data.train_fraction=0.1",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == {"train": 5500, "val": 5000, "test": 10000}
    assert summary["heads"][summary["best_head"]]["test_top1"] > 50  # chance is 10 %
