"""timm train.py features in the training loop: mixup/cutmix, accumulation, clipping modes, a longer
resumed run, the device key, and their bad values."""
import json

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from headsurgeon import HeadsurgeonError
from headsurgeon import recipe as R
from headsurgeon import train as T

from test_train import _recipe, folder  # noqa: F401


def _quiet(m):
    return None


def test_mixup_targets_and_hard_term_by_hand():
    recipe, _ = R.load(None, ["data.mixup=0.4", "loss.label_smoothing=0.1", "split.heads=2", "split.at=[layer4]"])
    mixup = T.mixup_for(recipe, 5)
    assert mixup is not None and T.objective_for(recipe).label_smoothing == 0.0  # smoothing moves into the targets
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64)  # float64: the images' checks within 1e-12
    y = torch.tensor([0, 3, 1, 4])
    np.random.seed(1)
    xm, t = mixup(x.clone(), y)
    lam = ((xm - x.flip(0)) / (x - x.flip(0)))[0, 0, 0, 0].item()  # x' = lam x + (1 - lam) x.flip(0)
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0), rtol=0, atol=1e-12)
    smooth = lambda c: torch.full((5,), 0.1 / 5).index_fill(0, torch.tensor([c]), 0.9 + 0.1 / 5)  # noqa: E731
    by_hand = torch.stack([lam * smooth(int(a)) + (1 - lam) * smooth(int(b)) for a, b in zip(y, y.flip(0))])
    # timm's targets are float32 whatever x is: two roundings of values <= 1, far inside float32's rtol 1.3e-6
    torch.testing.assert_close(t, by_hand)
    z = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    out = T.objective_for(recipe)(z, t)
    for i in range(2):  # float64 logits (the targets are cast): a sum of 5 terms of ~1 within 1e-12
        hard = -(t.double() * F.log_softmax(z[i], 1)).sum(1).mean()
        torch.testing.assert_close(out.hard[i], hard, rtol=0, atol=1e-12)


def test_without_mixup_the_objective_sees_the_labels_unchanged():
    recipe, _ = R.load(None, ["loss.label_smoothing=0.1"])
    assert T.mixup_for(recipe, 10) is None and T.objective_for(recipe).label_smoothing == 0.1


def test_training_with_mixup_cutmix_and_random_erasing(folder, tmp_path):  # noqa: F811
    s = T.train(_recipe(folder, "data.mixup=0.2", "data.cutmix=1.0", "data.reprob=0.5", "epochs=2",
                        "data.mixup_off_epoch=1"), output=str(tmp_path / "r"), log=_quiet)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert s["finished"] and all(np.isfinite(r["train_loss"]) for r in rows)


VIT = ["model=vit_tiny_patch16_224", "model_kwargs={img_size: 16, patch_size: 8, embed_dim: 16, depth: 2, num_heads: 2}",
       "split.at=[blocks.1]", "split.heads=2", "data.no_aug=true", "sched.sched=none", "optim.opt=momentum",
       "epochs=1", "optim.clip_grad=0.5"]


def test_accumulated_micro_batches_update_like_one_batch(folder, tmp_path):  # noqa: F811
    """No batch-norm (a ViT): 2 micro-batches of 3 give the update of one batch of 6 (36 images: 6 steps)."""
    a = T.train(_recipe(folder, *VIT, "data.batch_size=6"), output=str(tmp_path / "a"), log=_quiet)
    b = T.train(_recipe(folder, *VIT, "data.batch_size=3", "optim.grad_accum_steps=2"), output=str(tmp_path / "b"),
                log=_quiet)
    wa = safetensors.torch.load_file(str(tmp_path / "a" / "last" / "tree.safetensors"))
    wb = safetensors.torch.load_file(str(tmp_path / "b" / "last" / "tree.safetensors"))
    start = T.tree_for(_recipe(folder, *VIT, "data.batch_size=6"), 3).state_dict()
    moved = max((wa[k] - start[k]).abs().max().item() for k in wa)
    assert moved > 1e-3  # the updates are real
    # float32 (a training run): each step's gradient (one mean of 6, or two means of 3 summed) differs by a few
    # ulps of |g| <= 0.5 (clipped); over 6 momentum steps (<= 1/(1-0.9) = 10x) at lr 0.05 each ulp adds up to
    # 6 * 0.05 * 10 * 0.5 * eps32 = 1.8e-7: atol 1e-6 for ~5 (1.1e-8 seen); 6 updates round w by <= 3 eps32 |w|
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-6)
    assert a["epochs_done"] == b["epochs_done"] == 1


@pytest.mark.parametrize("mode", ["value", "agc"])
def test_clip_modes_train(folder, tmp_path, mode, monkeypatch):  # noqa: F811
    """Clipping runs at every optimizer step with the recipe's value and mode (finishing alone would not show it)."""
    import timm.utils

    real, seen = timm.utils.dispatch_clip_grad, []

    def spy(parameters, value, mode="norm", norm_type=2.0):
        parameters = [p for p in parameters if p.grad is not None]
        real(parameters, value, mode=mode, norm_type=norm_type)
        seen.append((value, mode, max(p.grad.abs().max().item() for p in parameters)))

    monkeypatch.setattr(timm.utils, "dispatch_clip_grad", spy)
    s = T.train(_recipe(folder, "epochs=1", "optim.clip_grad=0.01", f"optim.clip_mode={mode}"),
                output=str(tmp_path / "r"), log=_quiet)
    assert s["finished"]
    assert len(seen) == 4  # 36 training images in batches of 8, the last one dropped: 4 optimizer steps
    assert {(v, m) for v, m, _ in seen} == {(0.01, mode)}
    if mode == "value":  # every gradient entry clipped to [-0.01, 0.01]
        assert all(g <= 0.01 for _, _, g in seen)


def test_a_finished_run_is_extended_with_a_longer_schedule(folder, tmp_path):  # noqa: F811
    out = tmp_path / "r"
    T.train(_recipe(folder, "epochs=2"), output=str(out), log=_quiet)
    with pytest.raises(HeadsurgeonError, match="already finished its 2 epochs"):
        T.train(_recipe(folder, "epochs=2"), output=str(out), resume=True, log=_quiet)
    with pytest.raises(HeadsurgeonError, match="changed recipe: epochs: 2 -> 1"):
        T.train(_recipe(folder, "epochs=1"), output=str(out), resume=True, log=_quiet)
    s = T.train(_recipe(folder, "epochs=4"), output=str(out), resume=True, log=_quiet)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert s["finished"] and s["epochs"] == 4 and [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert R.read(out / "recipe.yaml")["epochs"] == 4
    assert rows[2]["lr"] > rows[3]["lr"] > 0  # the cosine of the 4-epoch schedule, continued


@pytest.mark.parametrize("sets,match", [
    (["data.mixup=-1"], "'data.mixup' is -1"), (["data.mixup_prob=1.5"], "'data.mixup_prob' is 1.5"),
    (["optim.grad_accum_steps=0"], "'optim.grad_accum_steps' is 0"), (["data.mixup_mode=row"], "'data.mixup_mode'"),
    (["optim.layer_decay=1.5"], "'optim.layer_decay' is 1.5"), (["optim.clip_mode=max"], "'optim.clip_mode'"),
    (["data.reprob=2"], "'data.reprob' is 2"), (["device=tpu"], "'device' is 'tpu'"),
])
def test_bad_values_of_the_new_keys(sets, match):
    with pytest.raises(HeadsurgeonError, match=match):
        R.load(None, sets)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line(folder, tmp_path):  # noqa: F811
    with pytest.raises(HeadsurgeonError, match="device 'cuda' was asked for but torch sees no CUDA GPU"):
        T.train(_recipe(folder, "device=cuda"), output=str(tmp_path / "r"), log=_quiet)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kill_epoch", [0, 1])
def test_killed_mid_epoch_resumes_bit_identical(folder, tmp_path, kill_epoch):  # noqa: F811
    """A real SIGKILL of a training subprocess between recovery points; the resumed run ends with the weights,
    optimizer state and metrics of a run that was never killed (CPU, fixed seed; mixup and augmentation on)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sets = ["data.mixup=0.2", "data.reprob=0.25", "recovery_interval=1", "epochs=2", "data.batch_size=4", "ema=0.9"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess runs on 1 thread too (and this environment's ISA): the same kernels
    try:
        straight = tmp_path / "straight"
        T.train(_recipe(folder, *sets), output=str(straight), log=_quiet)
        killed = tmp_path / "killed"
        _kill_mid_epoch(folder, sets, killed, kill_epoch)
        assert (killed / "last").exists() == (kill_epoch > 0)
        T.train(_recipe(folder, *sets), output=str(killed), resume=True, log=_quiet)
    finally:
        torch.set_num_threads(threads)
    for name in ("tree.safetensors", "ema.safetensors"):
        a = safetensors.torch.load_file(str(straight / "last" / name))
        b = safetensors.torch.load_file(str(killed / "last" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ma = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    drop = lambda m: {k: v for k, v in m.items() if k != "time_s"}  # noqa: E731
    assert [drop(m) for m in ma] == [drop(m) for m in mb]
    assert not (killed / "recovery").exists()


def _kill_mid_epoch(folder, sets, killed, epoch):  # noqa: F811
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (f"import sys; from click.testing import CliRunner; from headsurgeon.cli import main; "
            f"sys.exit(CliRunner().invoke(main, ['train', *{[x for s in [*TINY_SETS(folder), *sets] for x in ('--set', s)]!r}, "
            f"'-o', {str(killed)!r}]).exit_code)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # kill once the second epoch has a recovery point
            rec = killed / "recovery" / "state.pt"
            if rec.is_file() and torch.load(rec, weights_only=True)["epoch"] == epoch:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"no recovery point in epoch {epoch} within 300 s")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "recovery" / "state.pt").is_file()


def TINY_SETS(folder):  # noqa: N802, F811
    from test_train import TINY

    return [*TINY, "data.dataset=folder", f"data.root={folder}"]


def test_layer_decay_scales_every_branch_copy_like_the_source_model():
    import timm
    from timm.optim import create_optimizer_v2

    from headsurgeon import split

    kw = dict(img_size=16, patch_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=3)
    tree = split("vit_tiny_patch16_224", at=["blocks.2"], heads=2, input_size=(3, 16, 16), **kw)
    plain = timm.create_model("vit_tiny_patch16_224", **kw)
    scale = {}
    for group in create_optimizer_v2(plain, "sgd", lr=0.1, weight_decay=0.05, layer_decay=0.5).param_groups:
        for p in group["params"]:
            scale[id(p)] = (group["lr_scale"], group["weight_decay"])
    by_name = {n: scale[id(p)] for n, p in plain.named_parameters()}
    tree_scale = {}
    for group in create_optimizer_v2(tree, "sgd", lr=0.1, weight_decay=0.05, layer_decay=0.5).param_groups:
        for p in group["params"]:
            tree_scale[id(p)] = (group["lr_scale"], group["weight_decay"])
    names = list(tree.named_parameters())
    assert len({n.split(".", 3)[3] for n, _ in names}) == len(by_name)
    for n, p in names:
        assert tree_scale[id(p)] == by_name[n.split(".", 3)[3]], n
    assert len({s for s, _ in by_name.values()}) == 6  # embeddings, 4 blocks, head: a real decay


def test_layer_decay_in_a_run(folder, tmp_path):  # noqa: F811
    s = T.train(_recipe(folder, *VIT, "optim.layer_decay=0.75", "optim.opt=adamw", "optim.opt_betas=[0.9, 0.99]",
                        "optim.opt_eps=1e-6"), output=str(tmp_path / "r"), log=_quiet)
    assert s["finished"]
    with pytest.raises(HeadsurgeonError, match="'optim.opt' is 'bogus', not a timm optimizer"):
        T.train(_recipe(folder, "optim.opt=bogus"), output=str(tmp_path / "r2"), log=_quiet)


def test_checkpoint_history_keeps_the_best_epochs(folder, tmp_path):  # noqa: F811
    out = tmp_path / "r"
    T.train(_recipe(folder, "epochs=4", "checkpoint_hist=2"), output=str(out), log=_quiet)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    score = [max(h["top1"] for h in r["val"]["heads"]) for r in rows]
    want = sorted(range(1, 5), key=lambda e: (-score[e - 1], e))[:2]
    kept = sorted(int(d.name[6:]) for d in (out / "history").iterdir())
    assert kept == sorted(want)
    for e in kept:
        rec = json.loads((out / "history" / f"epoch-{e:03d}" / "record.json").read_text())
        assert rec["best_epoch"] == e and rec["heads"][rec["best_head"]]["val_top1"] == score[e - 1]
        assert (out / "history" / f"epoch-{e:03d}" / "tree.safetensors").is_file()
