"""Issue 27, silent wrong results and bad input: every case of the re-tested probe, as a table.

Each case ends in one of: a one-line error (``HeadsurgeonError`` / ``Error: ...``, exit 1, nothing
written), the correct behaviour, or (known, not yet fixed) a traceback. The tables below are the cases;
``test_documented_counts`` checks that docs/training.md ("Failure modes") states their tally.
"""
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from headsurgeon import HeadsurgeonError
from headsurgeon import data as D
from headsurgeon import recipe as R
from headsurgeon import train as T
from headsurgeon.cli import main
from headsurgeon.pipeline import collapse_dir

from test_train import TINY, _recipe, folder  # noqa: F401  (the tiny image-folder fixture)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"
ERROR, CORRECT, TRACEBACK = "one-line error", "correct", "traceback"


@pytest.fixture(autouse=True)
def _quiet_timm_files():
    warnings.filterwarnings("ignore", category=ResourceWarning)


def _quiet(m):
    return None


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _one_line(code, out, match):
    assert code == 1, out
    lines = [x for x in out.strip().splitlines() if x.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in out, out
    assert match in lines[0], out


def _refused(sets, match):
    with pytest.raises(HeadsurgeonError) as e:
        R.load(None, sets)
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


# ------------------------------------------------------------------ 1. values that reached a library unvalidated

SEED = "expected an integer >= 0 and <= 4294967295"
FINITE = "NaN and infinity are not allowed"
RECIPE_CASES = [  # (id, --set pairs, part of the one-line error); every one was accepted before
    ("seed-2^32", ["seed=4294967296"], f"'seed' is 4294967296; {SEED}"),
    ("split_seed-1e11", ["data.split_seed=99999999999"], f"'data.split_seed' is 99999999999; {SEED}"),
    ("noise_seed-2^32", ["data.noise_seed=4294967296"], f"'data.noise_seed' is 4294967296; {SEED}"),
    ("scale-nan", ["data.scale=[.nan, 1.0]"], f"'data.scale' is [nan, 1.0]: {FINITE}"),
    ("scale-zero", ["data.scale=[0, 1.0]"], "'data.scale' is [0.0, 1.0]; expected [lo, hi] with 0 < lo <= hi <= 1"),
    ("scale-negative", ["data.scale=[-0.5, 1.0]"], "expected [lo, hi] with 0 < lo <= hi <= 1"),
    ("scale-reversed", ["data.scale=[0.9, 0.5]"], "expected [lo, hi] with 0 < lo <= hi <= 1"),
    ("scale-above-1", ["data.scale=[0.5, 2.0]"], "expected [lo, hi] with 0 < lo <= hi <= 1"),
    ("ratio-inf", ["data.ratio=[.inf, .inf]"], f"'data.ratio' is [inf, inf]: {FINITE}"),
    ("ratio-zero", ["data.ratio=[0, 1]"], "'data.ratio' is [0.0, 1.0]; expected [lo, hi] with 0 < lo <= hi"),
    ("ratio-negative", ["data.ratio=[-1, 1]"], "expected [lo, hi] with 0 < lo <= hi (aspect ratios"),
    ("color_jitter-inf", ["data.color_jitter=.inf"], f"'data.color_jitter' is inf: {FINITE}"),
    ("color_jitter-nan", ["data.color_jitter=.nan"], f"'data.color_jitter' is nan: {FINITE}"),
    ("cutmix_minmax-nan", ["data.cutmix_minmax=[.nan, 1]"], f"'data.cutmix_minmax' is [nan, 1]: {FINITE}"),
    ("cutmix_minmax-reversed", ["data.cutmix_minmax=[0.9, 0.1]"], "expected [min, max] box ratios"),
    ("cutmix_minmax-empty-range", ["data.cutmix_minmax=[0.5, 0.52]", "data.img_size=16"], "needs max > min there"),
    ("lr-inf", ["optim.lr=.inf"], f"'optim.lr' is inf: {FINITE}"),
    ("weight_decay-inf", ["optim.weight_decay=.inf"], f"'optim.weight_decay' is inf: {FINITE}"),
    ("opt_eps-inf", ["optim.opt_eps=.inf"], f"'optim.opt_eps' is inf: {FINITE}"),
    ("clip_grad-inf", ["optim.clip_grad=.inf"], f"'optim.clip_grad' is inf: {FINITE}"),
    ("warmup_lr-inf", ["sched.warmup_lr=.inf"], f"'sched.warmup_lr' is inf: {FINITE}"),
    ("decay_epochs-inf", ["sched.decay_epochs=.inf"], f"'sched.decay_epochs' is inf: {FINITE}"),
    ("decay_rate-inf", ["sched.decay_rate=.inf"], f"'sched.decay_rate' is inf: {FINITE}"),
    ("temperature-inf", ["loss.temperature=.inf"], f"'loss.temperature' is inf: {FINITE}"),
    ("mixup-inf", ["data.mixup=.inf"], f"'data.mixup' is inf: {FINITE}"),
    ("cutmix-inf", ["data.cutmix=.inf"], f"'data.cutmix' is inf: {FINITE}"),
    ("mean-nan", ["data.mean=[.nan]"], f"'data.mean' is [nan]: {FINITE}"),
    ("std-inf", ["data.std=[.inf]"], f"'data.std' is [inf]: {FINITE}"),
    ("auto_augment-unknown", ["data.auto_augment=bogus"], "'data.auto_augment' is 'bogus', which timm cannot parse"),
    ("auto_augment-bad-section", ["data.auto_augment=rand-n-1"], "which timm cannot parse"),
    ("auto_augment-ignored-section", ["data.auto_augment=rand-mXX"], "section 'mXX' has no number"),
    ("img_size-100000", ["data.img_size=100000"], "'data.img_size' is 100000; expected an integer >= 8 and <= 4096"),
    ("heads-100000", ["split.heads=100000"], "'split.heads' is 100000; expected an integer >= 1 and <= 256"),
    ("step-estimate", ["data.img_size=4096", "data.batch_size=2048", "split.heads=8"],
     "TiB for one step's activations"),
    ("output-300-char-name", ["output=" + "a" * 300], "'output' has a name of 300 bytes"),
    ("output-5000-char-path", ["output=" + "/".join(["b" * 200] * 25)], "'output' is a path of 5,024 bytes"),
]


@pytest.mark.parametrize("sets, match", [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_recipe_values_no_library_takes_are_one_line(sets, match):
    _refused(sets, match)


CONTROLS = [  # boundary values that must stay accepted (not counted as probe cases)
    ["seed=4294967295", "data.split_seed=4294967295", "data.noise_seed=4294967295"],
    ["data.scale=[1.0, 1.0]", "data.ratio=[0.75, 1.3333]", "data.color_jitter=0.4"],
    ["data.auto_augment=rand-m9-mstd0.5-inc1"], ["data.auto_augment=augmix-m5-w4-d2"], ["data.auto_augment=original"],
    ["data.auto_augment=rand-m9-tweighted"], ["data.cutmix_minmax=[0.2, 0.8]"],
    ["data.img_size=4096", "data.batch_size=16"], ["split.heads=256", "split.at=[input]"], ["output=runs/" + "a" * 255],
]


@pytest.mark.parametrize("sets", CONTROLS, ids=lambda s: s[0][:40])
def test_valid_boundary_values_are_still_accepted(sets):
    R.load(None, sets)


CHECK_CASES = [
    (["data.img_size=100000"], "'data.img_size' is 100000"),
    (["split.heads=100000"], "'split.heads' is 100000"),
]


@pytest.mark.parametrize("sets, match", CHECK_CASES)
def test_recipe_check_refuses_what_cannot_be_allocated_before_building(sets, match):
    """`recipe --check` built the tree first: a 240 GB probe (DefaultCPUAllocator traceback)."""
    _one_line(*_cli("recipe", "--check", *[a for s in sets for a in ("--set", s)]), match)


LONG_NAME = "a" * 300
TRAIN_OUTPUTS = ["name", "path"]


@pytest.mark.parametrize("name", TRAIN_OUTPUTS)
def test_train_output_the_file_system_refuses_is_one_line(tmp_path, name):
    out = tmp_path / LONG_NAME if name == "name" else tmp_path.joinpath(*["b" * 200] * 25)
    _one_line(*_cli("train", "--set", "epochs=1", "-o", out), "run directory")
    assert os.listdir(tmp_path) == []


# storage.check_writable / check_output stat the -o first (Path.exists raises ENAMETOOLONG): outside this change
OTHER_OUTPUTS = [
    ("split-o-300", ["split", "resnet10t", "--at", "layer4", "--heads", "2", "-o", "{tmp}/" + LONG_NAME]),
    ("collapse-o-300", ["collapse", "{run}", "-o", "{tmp}/" + LONG_NAME]),
    ("recipe-o-300", ["recipe", "-o", "{tmp}/" + LONG_NAME + "/r.yaml"]),
]


@pytest.mark.parametrize("args", [c[1] for c in OTHER_OUTPUTS], ids=[c[0] for c in OTHER_OUTPUTS])
def test_other_outputs_the_file_system_refuses(run, tmp_path, args):
    r = CliRunner().invoke(main, [a.format(tmp=tmp_path, run=run) for a in args])
    assert isinstance(r.exception, SystemExit), repr(r.exception)  # was: OSError [Errno 36] File name too long
    _one_line(r.exit_code, r.output, "")


# ------------------------------------------------------------------ 2. image folders

def _folder(root: Path, classes=3, splits=("train", "validation"), n=6, size=12, mode="RGB") -> Path:
    rng = np.random.default_rng(0)
    for s in splits:
        for c in range(classes):
            d = root / s / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                if mode == "I;16":
                    Image.fromarray(np.full((size, size), 40000 + i, dtype=np.uint16)).save(d / f"{i}.png")
                else:
                    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _splits(root, *sets):
    return D.splits(R.load(None, [*TINY, "data.dataset=folder", f"data.root={root}", *sets])[0])


def _read_all(sp):
    for view in (sp.train, sp.val, sp.test):
        for i in range(len(view)):
            view[i]


def _truncate(p):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _bomb(p, side):
    Image.fromarray(np.zeros((side, side, 3), dtype=np.uint8)).save(p)


BROKEN = [  # (id, how the file is broken, part of the error besides its name); timm served its neighbour instead
    ("empty-file", lambda p: p.write_bytes(b""), "cannot be read (an empty file)"),
    ("truncated", _truncate, "cannot be read (OSError: image file is truncated"),
    ("not-an-image", lambda p: p.write_text("not a png"), "cannot be read (not an image PIL can identify)"),
    ("unreadable-dangling-link", lambda p: (p.unlink(), p.symlink_to(p.parent / "gone.png")),
     "cannot be read (FileNotFoundError"),
    ("decompression-bomb-warning", lambda p: _bomb(p, 12), "is too large for PIL"),  # 144 px > MAX_IMAGE_PIXELS 100
    ("decompression-bomb-error", lambda p: _bomb(p, 16), "is too large for PIL"),  # 256 px > 2 x 100
]


@pytest.mark.parametrize("damage, match", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_a_broken_image_is_an_error_naming_it(tmp_path, monkeypatch, damage, match):
    root = _folder(tmp_path / "data", size=8)  # 64 px: under the lowered bomb limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    bad = root / "train" / "class1" / "2.png"
    damage(bad)
    sp = _splits(root)
    with pytest.raises(HeadsurgeonError) as e:
        _read_all(sp)
    msg = str(e.value)
    assert f"image '{bad}'" in msg and match in msg and "\n" not in msg, msg
    assert "remove it" in msg


WORKERS = [0, 1]


@pytest.mark.parametrize("workers", WORKERS)
def test_train_stops_at_a_broken_image_in_one_line_and_leaves_nothing(folder, tmp_path, workers):  # noqa: F811
    """The broken file is a test image (every one is evaluated in epoch 1); with a worker process, torch's
    DataLoader re-raises it with the worker's traceback, which the error keeps to its one line."""
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    bad = root / "validation" / "class2" / "1.png"
    bad.write_bytes(b"")
    sets = [*TINY, "data.dataset=folder", f"data.root={root}", "epochs=1", f"data.workers={workers}"]
    _one_line(*_cli("train", *[a for s in sets for a in ("--set", s)], "-o", tmp_path / "r"), f"image '{bad}'")
    assert not (tmp_path / "r").exists()


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    """PIL's convert('RGB') of a 16-bit grey PNG ('I;16') clips every value above 255: all white before."""
    sp = _splits(_folder(tmp_path / "data", mode="I;16"))
    img, _ = sp.train[0]
    a = np.asarray(img)
    assert img.mode == "RGB" and a.min() >= round(40000 / 257) and a.max() <= round(40005 / 257), (a.min(), a.max())
    # also for other datasets' 16-bit images, and PIL's 32-bit 'I' mode read as 16-bit
    for mode_img in (Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)),
                     Image.fromarray(np.full((4, 4), 257 * 7, dtype=np.int32))):
        out = D.to_8bit(mode_img)
        assert out.mode == "L" and np.asarray(out).max() == (255 if mode_img.mode != "I" else 7)


FOLDERS = [  # (id, how the folder is made, extra --set, part of the one-line error)
    ("missing-train-split", lambda r: _folder(r, splits=("validation",)), [],
     "has no 'train' split folder (data.train_split 'train'; its sub-folders are validation)"),
    ("missing-test-split", lambda r: _folder(r, splits=("train",)), [],
     "has no 'validation' split folder (data.test_split 'validation'; its sub-folders are train)"),
    ("root-of-class-folders", lambda r: _folder(r, splits=(".",)), [],  # timm read it as both splits: test = train
     "has no 'train' split folder"),
    ("one-class", lambda r: _folder(r, classes=1), [], "'folder' has 1 class (class0)"),
    ("one-class-label-noise", lambda r: _folder(r, classes=1), ["data.label_noise=0.2"], "has 1 class"),
    ("num_classes-above-folders", lambda r: _folder(r), ["data.num_classes=10"],
     "data.num_classes is 10 but 'folder' lists 3 classes (class0, class1, class2): 7 outputs would never see"),
    ("num_classes-above-folders-noise", lambda r: _folder(r), ["data.num_classes=5", "data.label_noise=0.2"],
     "label noise would flip labels into them"),
    ("one-class-num_classes-2", lambda r: _folder(r, classes=1), ["data.num_classes=2"], "lists 1 class (class0)"),
]


@pytest.mark.parametrize("make, sets, match", [c[1:] for c in FOLDERS], ids=[c[0] for c in FOLDERS])
def test_folder_datasets_that_cannot_train_as_asked_are_one_line(tmp_path, make, sets, match):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(HeadsurgeonError) as e:
        _splits(root, *sets)
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


def _idx(path: Path, a: np.ndarray) -> None:
    path.write_bytes(b"\0\0\x08" + bytes([a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
                     + a.astype(np.uint8).tobytes())


def test_an_empty_test_split_is_an_error_not_a_nan_accuracy(tmp_path):
    """IDX files with 0 test images: every test accuracy was 0/0 = NaN, in summary.json and the card."""
    _idx(tmp_path / "train-images-idx3-ubyte", np.zeros((40, 28, 28)))
    _idx(tmp_path / "train-labels-idx1-ubyte", np.arange(40) % 10)
    _idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28)))
    _idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((0,)))
    with pytest.raises(HeadsurgeonError, match=r"the 'validation' split of 'fashion-mnist' at '.*' has no samples; "
                                               r"its accuracy would be 0/0"):
        D.splits(R.load(None, ["data.dataset=fashion-mnist", f"data.root={tmp_path}"])[0])


# ------------------------------------------------------------------ 3. a run's files after training

@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("run") / "run"
    T.train(_recipe(folder, "epochs=1", "checkpoint_hist=2"), output=str(out), log=_quiet)
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _edit_recipe(d):
    text = (d / "recipe.yaml").read_text()
    (d / "recipe.yaml").write_text(re.sub(r"img_size: 16", "img_size: 64", text))


COLLAPSE = [  # (id, what is done to the run): the export's preprocessing must stay the 16 px it was trained at
    ("recipe-edited", _edit_recipe),
    ("recipe-removed", lambda d: (d / "recipe.yaml").unlink()),
]


@pytest.mark.parametrize("change", [c[1] for c in COLLAPSE], ids=[c[0] for c in COLLAPSE])
def test_collapse_exports_the_preprocessing_the_run_was_trained_with(run, tmp_path, change):
    d = _copy(run, tmp_path)
    assert json.loads((d / "data_config.json").read_text())["input_size"] == [3, 16, 16]
    change(d)
    notes = []
    out, _ = collapse_dir(d, None, tmp_path / "m", log=notes.append)
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [3, 16, 16] and cfg["crop_pct"] == 1.0, cfg
    assert "at input size 3x16x16" in (out / "README.md").read_text()
    if (d / "recipe.yaml").exists():
        assert any("was edited after training" in n and "(trained with (3, 16, 16))" in n for n in notes), notes


def test_collapse_of_a_history_checkpoint_exports_the_runs_preprocessing(run, tmp_path):
    """history/epoch-NNN/ is a tree folder: its export carried the base model's pretrained size (176 px)."""
    out, _ = collapse_dir(run / "history" / "epoch-001", None, tmp_path / "m", log=_quiet)
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 16, 16]


def test_resume_keeps_the_recorded_preprocessing(folder, tmp_path):  # noqa: F811
    out = tmp_path / "r"
    T.train(_recipe(folder, "epochs=2"), output=str(out), stop_after=1, log=_quiet)
    first = (out / "data_config.json").stat().st_mtime_ns
    T.train(_recipe(folder, "epochs=2"), output=str(out), resume=True, log=_quiet)
    assert (out / "data_config.json").stat().st_mtime_ns == first


RUN_FILES = [  # (id, file, edit, part of the one-line error)
    ("record-label_names-string", "best/record.json", {"label_names": "cat"}, "label_names is 'cat', not a list"),
    ("summary-label_names-string", "summary.json", {"label_names": "cat"}, "label_names is 'cat', not a list"),
    ("record-nan-accuracy", "best/record.json", "nan", "test_top1 is nan, not a percentage 0..100"),
]
NEW_FILES = [  # the file this change adds, edited (not a probe case)
    ("data_config-edited", "data_config.json", {"input_size": "16"}, "data_config.json' is invalid"),
]


@pytest.mark.parametrize("name, edit, match", [c[1:] for c in RUN_FILES + NEW_FILES],
                         ids=[c[0] for c in RUN_FILES + NEW_FILES])
def test_collapse_refuses_run_files_that_would_mislabel_the_export(run, tmp_path, name, edit, match):
    d = _copy(run, tmp_path)
    data = json.loads((d / name).read_text())
    if edit == "nan":
        data["heads"][0]["test_top1"] = float("nan")  # json writes NaN, and reads it back
    else:
        data.update(edit)
    (d / name).write_text(json.dumps(data))
    _one_line(*_cli("collapse", d, "-o", tmp_path / "m"), match)
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------ the tally docs/training.md states

def _tally() -> dict[str, int]:
    counts = {ERROR: 0, CORRECT: 0, TRACEBACK: 0}
    counts[ERROR] += (len(RECIPE_CASES) + len(CHECK_CASES) + len(TRAIN_OUTPUTS) + len(BROKEN) + len(WORKERS)
                      + len(FOLDERS) + 1 + len(RUN_FILES) + len(OTHER_OUTPUTS))  # 1: the empty test split (NaN)
    counts[CORRECT] += 1 + len(COLLAPSE) + 1  # 16-bit images; collapse after recipe.yaml edited / removed; history
    return counts


def test_documented_counts():
    c = _tally()
    text = " ".join(DOCS.read_text().split())
    want = (f"re-tests {sum(c.values())} cases of its probe: {c[ERROR]} end in a one-line error, {c[CORRECT]} in "
            f"the correct behaviour, {c[TRACEBACK]} in a traceback and none in a silent wrong acceptance")
    assert want in text, want
