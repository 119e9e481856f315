"""Sweep every architecture in ``timm.list_models()`` through split -> train step -> collapse.

For each model: create it (random init, ``num_classes=10``) inside ``split`` (which traces it in
both modes, cuts it and compares graph and cut with the eager model in both modes), run one SGD
step on the tree, collapse every head (strict load) and check its eval logits against the tree's
(<= 1e-5). Results are appended to a JSONL file (the sweep resumes where it stopped, smallest
models first) and ``docs/coverage.md`` is written from it.

To fit 2 cores and 24 GiB the checks stay and the work shrinks with size: the smallest input the
model accepts (meta-device probe; ``img_size`` where the class takes one), 4 heads at two split
points up to ``--big`` parameters, 2 heads at the last one above (copied branches above
``--copy-above``), and above ``--max-params`` the same class built with fewer blocks through its
own kwargs (``depth=2``, ``depths=[1, ...]``): a structural check of every code path. Before
each model the sweep waits until the machine has memory for it.

    python benchmarks/coverage.py                    # full sweep (hours on 2 cores; resumable)
    python benchmarks/coverage.py --filter 'resnet*' # a subset
    python benchmarks/coverage.py --report           # only rewrite docs/coverage.md
    python benchmarks/coverage.py --profile vit_large_patch16_224  # CPU seconds per phase
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "coverage.jsonl"
DOC = ROOT / "docs" / "coverage.md"
# timm's own fx test excludes these (tests/test_models.py EXCLUDE_FX_FILTERS).
TIMM_FX_EXCLUDED = ["vit_gi*", "hiera*", "gemma4_vit*"]


# Input sides tried from the smallest up; the first at which the model runs (on the meta device, in
# both modes, batch 2) and that holds 2x2 patches (models with a patch_embed) is used: 28 is 2x2
# patches of a /14 ViT, 32 of a /16 ViT; a /32 convnet at 28 ends on a 1x1 map.
SIDES = (28, 32, 48, 56, 64, 96, 112, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512, 518, 560)


def _meta_runs(name: str, kwargs: dict, size: tuple[int, int, int]) -> bool:
    """Whether ``name`` built with ``kwargs`` accepts a (2, *size) batch in eval and train mode (shapes only: meta)."""
    import timm
    import torch

    try:
        m = timm.create_model(name, device="meta", **kwargs)
        x = torch.empty(2, *size, device="meta")
        with torch.no_grad():
            m.eval()(x)
            m.train()(x)
        return True
    except Exception:
        return False


def smallest_input(name: str, kwargs: dict) -> tuple[dict, tuple[int, int, int], str]:
    """Create kwargs and input size for the cheapest run: the smallest side in ``SIDES`` the model accepts.

    Where the class takes ``img_size`` (ViT, Swin, EVA, ...: their position tables are built for it)
    it is set to that side, so the model is built for the small input rather than resampling; convnets
    simply get the small input. Models whose meta-device forward fails (data-dependent shapes) are
    probed for real at the old 1/4 and 1/2 sizes, then run at their own size.
    Returns (create kwargs, input size, how the size was chosen).
    """
    import inspect

    import timm
    from headsurgeon.models import default_input_size

    base = timm.create_model(name, device="meta", **kwargs)
    cfg = tuple(default_input_size(base))
    takes_img_size = "img_size" in inspect.signature(type(base).__init__).parameters
    fixed = getattr(base, "_traits", {}).get("fixed_input_size", base.pretrained_cfg.get("fixed_input_size", False))
    # at least a 2x2 grid of patches, so attention and position tables see more than one token
    patch = getattr(getattr(base, "patch_embed", None), "patch_size", None) or 1
    floor = 2 * max(patch if isinstance(patch, (tuple, list)) else (patch,))
    del base
    for side in SIDES:
        if side >= max(cfg[1:]):
            break
        if side < floor:
            continue
        size = (cfg[0], side, side)
        if takes_img_size and _meta_runs(name, {**kwargs, "img_size": side}, size):
            return {**kwargs, "img_size": side}, size, f"img_size={side} (meta probe)"
        if not fixed and _meta_runs(name, kwargs, size):
            return kwargs, size, "smallest input (meta probe)"
    return kwargs, cfg, "own input size"


# Reduced builds for models above --max-params: the same class and code paths, fewer blocks.
# Tried in order; the first that creates, keeps >= 1 split point and fits under --max-params wins.
def _reductions(base) -> list[dict]:
    import inspect

    sig = inspect.signature(type(base).__init__).parameters
    out: list[dict] = []
    blocks = getattr(base, "blocks", None)
    if "depth" in sig and "num_kv_heads" in sig and blocks is not None and len(blocks) >= 2:
        # per-block key/value heads (Sapiens2: full attention at both ends, grouped-query in the
        # middle): keep one block of each kind
        kv = [getattr(getattr(b, "attn", None), "num_kv_heads", None) for b in (blocks[0], blocks[len(blocks) // 2])]
        if all(isinstance(k, int) for k in kv):
            out.append({"depth": 2, "num_kv_heads": kv})
    if "depth" in sig:
        out.append({"depth": 2})
    if "depths" in sig:
        n = len(getattr(base, "stages", None) or getattr(base, "layers", None) or [None] * 4)
        out.append({"depths": [1] * n})
    if type(base).__name__ == "RegNet":  # kwargs overlay RegNetCfg: total block count and initial width
        # (regnety_2560's w0=640 gives fewer than 4 stages at a small depth, which RegNet refuses)
        out += [{"depth": d, "w0": 160} for d in (16, 12, 8)]
    return out


def reduced_kwargs(name: str, max_params: float) -> tuple[dict, float] | None:
    """Create kwargs that shrink ``name`` below ``max_params`` keeping its class, and the reduced size."""
    import timm

    base = timm.create_model(name, num_classes=10, device="meta")
    for kw in _reductions(base):
        try:
            m = timm.create_model(name, num_classes=10, device="meta", **kw)
        except Exception:
            continue
        n = sum(p.numel() for p in m.parameters())
        if n <= max_params and _split_candidates(m):
            return kw, n
    return None


def _legacy_input(name: str, kwargs: dict) -> tuple[dict, tuple[int, int, int]]:
    """The size policy of the first 835 models (1/4 or 1/2 side for fixed-size models, 64-128 px for
    convnets), checked with a real forward: the fallback when the smallest input fails."""
    import timm
    import torch
    from headsurgeon.models import default_input_size

    base = timm.create_model(name, device="meta", **kwargs)  # kwargs carry num_classes (run_one)
    cfg = tuple(default_input_size(base))
    fixed = getattr(base, "_traits", {}).get("fixed_input_size", base.pretrained_cfg.get("fixed_input_size", False))
    side = cfg[1]
    if fixed:
        cands = [({**kwargs, "img_size": s}, (cfg[0], s, s)) for s in (side // 4, side // 2) if s >= 32]
    else:
        s = max(64, min(128, side // 2))
        cands = [(kwargs, (cfg[0], s, s))]
    for kw, size in cands:
        try:
            m = timm.create_model(name, **{"num_classes": 10, **kw})  # kw carries num_classes from run_one
            with torch.no_grad():
                m.eval()(torch.randn(2, *size))
            return kw, size
        except Exception:
            continue
    return kwargs, cfg


def _split_candidates(model) -> list[str]:
    """``feature_info`` modules that exist (Twins/MViTv2 name ``block.N`` modules that do not; a name
    relative to a wrapper is taken under it when that is unambiguous),
    distinct (CoaT names one fused module for several stages); else the last stage containers.
    (``cut.feature_points`` answers this from a trace; the sweep picks its points before tracing.)"""
    from headsurgeon.trace import has_module

    feats = list(dict.fromkeys(f["module"] for f in getattr(model, "feature_info", None) or [] if isinstance(f, dict)))
    paths = [n for n, _ in model.named_modules()]

    def resolve(f: str) -> str | None:  # gemma4_vit names 'blocks.N' under its wrapper's 'encoder.'
        if has_module(model, f):
            return f
        inner = [p for p in paths if p.endswith("." + f)]
        return inner[0] if len(inner) == 1 else None

    feats = [r for r in map(resolve, feats) if r is not None]
    if len(feats) >= 2:
        return feats
    for container in ("stages", "blocks", "layers", "features"):
        mod = getattr(model, container, None)
        if mod is not None and hasattr(mod, "__len__") and len(mod) >= 2:
            return [f"{container}.{i}" for i in range(len(mod))]
    return feats


def plan(n_params: float, big: float, copy_above: float) -> tuple[int, int, str]:
    """(split points, heads, branch init) by size: the largest run 2 heads at the last split point."""
    if n_params <= big:
        return 2, 4, "independent"
    return 1, 2, "copy" if n_params > copy_above else "independent"


def run_one(name: str, big: float, copy_above: float = 300e6, kwargs: dict | None = None, how: str = "full") -> dict:
    """Split ``name`` (built with ``kwargs``) -> one SGD step -> collapse every head, at the smallest input.

    Checks, whatever the size: ``split`` traces both modes, cuts, and compares the traced graph and
    the cut chain with the eager model in train and eval mode; one training step through every head;
    ``collapse`` of every head with a strict ``load_state_dict`` and an eval-logit check (<= 1e-5).
    If the smallest input fails (an error or a failed check), the run is repeated once at the old (larger) input before a failure is recorded.
    """
    import gc

    t0 = time.time()
    kwargs = {"num_classes": 10, **(kwargs or {})}
    try:
        kw, size, chosen = smallest_input(name, kwargs)
        res = _check(name, kw, size, big, copy_above)
        if res["status"] != "pass":  # e.g. a random-init eval overflow at the tiny input: retry larger
            raise RuntimeError(res["reason"])
    except Exception as first:
        gc.collect()
        kw, size = _legacy_input(name, kwargs)
        chosen = f"fallback to the old input after: {type(first).__name__}: {str(first).strip().splitlines()[0][:120] if str(first).strip() else ''}"
        res = _check(name, kw, size, big, copy_above)
    res.update(model=name, input_choice=chosen, how=how, seconds=round(time.time() - t0, 1),
               kwargs={k: v for k, v in kw.items() if k != "num_classes"})
    return res


def _check(name: str, kw: dict, size: tuple[int, int, int], big: float, copy_above: float) -> dict:
    import zlib

    import timm
    import torch
    import torch.nn.functional as F

    import headsurgeon as hs
    from headsurgeon.verify import max_abs_diff

    meta = timm.create_model(name, device="meta", **kw)
    n_params = sum(p.numel() for p in meta.parameters())
    feats = _split_candidates(meta)
    del meta
    n_at, heads, init = plan(n_params, big, copy_above)
    at = feats[-n_at:]
    if not at:
        return {"status": "fail", "reason": "no feature_info modules to split at", "params": n_params}
    torch.manual_seed(zlib.crc32(name.encode()))  # reproducible per model, whatever ran before
    # split creates the model from its name: no separate instance to deep-copy
    tree = hs.split(name, at=at, heads=heads, branch_init=init, seed=0, input_size=size, verify=True, **kw)
    x = torch.randn(2, *size)
    y = torch.randint(0, 10, (2,))
    tree.train()
    opt = torch.optim.SGD(tree.parameters(), lr=1e-3)
    outs = tree(x)
    loss = sum(F.cross_entropy(o if torch.is_tensor(o) else o[0], y) for o in outs)
    loss.backward()
    # random-init models at batch 2 can have huge gradients (mobilenetv4_hybrid: 3e5); clip so the
    # step changes the weights without blowing them up
    torch.nn.utils.clip_grad_norm_(tree.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)  # frees the gradients before the collapsed copies are built
    del opt, outs, loss
    tree.eval()
    with torch.no_grad():
        outs = tree(x)
    if not all(torch.isfinite(o).all() for o in outs):
        return {"status": "fail", "params": n_params,
                "reason": "non-finite logits after one SGD step at batch 2 (training instability, not a cut mismatch)"}
    worst = 0.0
    for h in range(tree.num_heads):
        m = hs.collapse(tree, h, probe=x)
        with torch.no_grad():
            worst = max(worst, max_abs_diff(m(x), outs[h]))
        del m
    return {"status": "pass", "params": n_params, "at": at, "heads": heads, "input": list(size), "max_diff": worst,
            "mode": f"{heads} heads, {len(at)} split{'s' * (len(at) > 1)}, {init}"}


def worker(big: float, copy_above: float) -> None:
    """Read one JSON job per line on stdin (model, create kwargs, how), answer one JSON line each.

    One process for many models keeps timm imported; each model's objects are dropped and
    collected before the next (a worker that dies is replaced by the sweep)."""
    import gc
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("COVERAGE_THREADS", "1")))
    for line in sys.stdin:
        job = json.loads(line)
        name = job["model"]
        try:
            res = run_one(name, big, copy_above, job.get("kwargs"), job.get("how", "full"))
        except Exception as e:  # the sweep records every failure reason
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            res = {"model": name, "status": "fail", "reason": f"{type(e).__name__}: {msg}", "how": job.get("how", "full")}
        print(json.dumps(res), flush=True)
        gc.collect()


def _done() -> dict[str, dict]:
    out = {}
    if RESULTS.exists():
        for line in RESULTS.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:  # blank, or the line the running sweep is writing
                continue
            out[r["model"]] = r
    return out


def _meta_params(name: str) -> float:
    import timm

    try:
        return sum(p.numel() for p in timm.create_model(name, num_classes=10, device="meta").parameters())
    except Exception:
        return float("inf")


def _available() -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemAvailable:"))


def _memory_need(n_params: float) -> float:
    """Peak resident memory measured with --profile is about 8-11 bytes per parameter over a 0.8 GiB
    baseline; 12 bytes + 1 GiB is asked for."""
    return 12 * n_params + 2**30


def _wait_for_memory(n_params: float) -> None:
    """Hold the next model until the machine has room for it, so the sweep's worker is not the reason the
    kernel kills something (the machine is shared)."""
    need = _memory_need(n_params)
    waited = 0
    while True:
        avail = _available()
        if avail >= need:
            return
        if waited % 600 == 0:
            print(f"waiting for {need / 2**30:.1f} GiB free (have {avail / 2**30:.1f})", flush=True)
        time.sleep(30)
        waited += 30


def sweep(names: list[str], timeout: float, big: float, copy_above: float, max_params: float,
          retry_failed: bool = False) -> None:
    """Run every name not yet recorded, smallest first, one worker process; append each result as it comes.

    Size-skips recorded before reduced builds existed are run again (reduced)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    done = {k: v for k, v in _done().items() if v["status"] != "skip"}
    if retry_failed:  # only the failures this sweep covers (--filter): the others' records stay
        chosen = set(names)
        done = {k: v for k, v in done.items() if v["status"] != "fail" or k not in chosen}
    kept = _done()
    if len(done) != len(kept):
        RESULTS.write_text("".join(json.dumps(v) + "\n" for v in done.values()))
    todo = [n for n in names if n not in done]
    cache_file = RESULTS.parent / "params.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    for n in todo:
        if n not in cache:
            cache[n] = _meta_params(n)
    cache_file.write_text(json.dumps(cache, sort_keys=True))
    todo.sort(key=lambda n: cache[n])  # smallest first: a partial sweep covers the most architectures
    print(f"{len(names)} models, {len(done)} already recorded, {len(todo)} to run", flush=True)
    proc = None
    t_start = time.time()
    with RESULTS.open("a") as log:
        for i, name in enumerate(todo):
            if _done().get(name, {}).get("status", "skip") != "skip":  # recorded since this sweep started
                continue
            n_params = cache[name]
            job = {"model": name, "kwargs": {}, "how": "full"}
            if n_params == float("inf"):
                res = {"model": name, "status": "fail", "reason": "create: the model cannot be built (on the meta device)"}
            elif n_params > max_params:
                red = reduced_kwargs(name, max_params)
                if red is None:
                    res = {"model": name, "status": "skip", "params": n_params,
                           "reason": f"{n_params / 1e6:.0f} M parameters > {max_params / 1e6:.0f} M and no depth "
                                     f"kwarg to build it smaller"}
                else:
                    kw, n_red = red
                    job = {"model": name, "kwargs": kw, "params": n_red,
                           "how": f"reduced: {', '.join(f'{k}={v}' for k, v in kw.items())} "
                                  f"({n_red / 1e6:.0f} M of {n_params / 1e6:.0f} M parameters)"}
                    res = None
            else:
                res = None
            if res is None:
                if proc is not None and _available() < _memory_need(job.get("params", n_params)):
                    proc.stdin.close()  # the idle worker keeps the last model's heap: let it go before waiting
                    proc.wait()
                    proc = None
                _wait_for_memory(job.get("params", n_params))
                if proc is None or proc.poll() is not None:
                    proc = subprocess.Popen([sys.executable, __file__, "--worker", "--big", str(big),
                                             "--copy-above", str(copy_above)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
                proc.stdin.write(json.dumps(job) + "\n")
                proc.stdin.flush()
                t0 = time.time()
                line = _readline(proc, timeout)
                if line is None:
                    proc.kill()
                    proc.wait()
                    proc = None
                    why = "timeout" if time.time() - t0 >= timeout else "worker died (out of memory?)"
                    res = {"model": name, "status": "fail", "reason": f"{why} after {time.time() - t0:.0f} s",
                           "params": n_params, "how": job["how"]}
                else:
                    res = json.loads(line)
            res.setdefault("full_params", n_params)
            log.write(json.dumps(res) + "\n")
            log.flush()
            print(f"[{i + 1}/{len(todo)} {time.time() - t_start:.0f}s] {res['status']:4} {name} "
                  f"{res.get('reason', '')} {res.get('seconds', '')}", flush=True)
    if proc is not None:
        proc.stdin.close()
        proc.wait()


def _readline(proc: subprocess.Popen, timeout: float) -> str | None:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        return None
    line = proc.stdout.readline()
    return line or None


PROFILE = ROOT / "benchmarks" / "results" / "coverage-profile.json"


def profile(names: list[str], big: float, copy_above: float) -> None:
    """Time the phases of ``run_one`` on ``names`` (one thread) and store them in ``PROFILE``.

    Phases are timed by wrapping headsurgeon's public functions for the duration of the call;
    "deep copies + independent draws" is split's remainder, "training step + eval" the run's remainder.
    The figures are CPU seconds of this one-thread process, which other load on the machine
    changes far less than wall-clock time.
    """
    import resource

    import torch

    import headsurgeon as hs
    from headsurgeon import models, segments, tree, verify

    torch.set_num_threads(1)
    times: dict[str, float] = {}
    patched = []

    def wrap(owner, attr, label):
        f = getattr(owner, attr)
        patched.append((owner, attr, f))

        def timed(*a, **k):
            t = time.process_time()
            try:
                return f(*a, **k)
            finally:
                times[label] = times.get(label, 0.0) + time.process_time() - t
        setattr(owner, attr, timed)

    mod = sys.modules[__name__]
    wrap(mod, "smallest_input", "input probe (meta device)")
    wrap(models, "source", "split: create the model")
    wrap(segments, "trace", "split: trace train + eval")
    wrap(verify, "check_against_eager", "split: eager vs traced vs cut, both modes")
    wrap(hs, "split", "split")
    wrap(tree.HeadTree, "collapse", "collapse every head (create + strict load + logit check)")
    wrap(models, "model_from_peer", "of all the above: fresh instances (independent draws + collapse)")
    out = json.loads(PROFILE.read_text()) if PROFILE.exists() else {}
    try:
        for name in names:
            times.clear()
            t0 = time.process_time()
            r = run_one(name, big, copy_above)
            total = time.process_time() - t0
            ph = dict(times)
            ph["split: deep copies + independent draws"] = ph.get("split", 0) - sum(
                ph.get(k, 0) for k in ("split: create the model", "split: trace train + eval",
                                       "split: eager vs traced vs cut, both modes"))
            coll = "collapse every head (create + strict load + logit check)"
            ph["training step + eval forward"] = total - ph.get("split", 0) - ph.get(coll, 0) - ph.get(
                "input probe (meta device)", 0)
            ph.pop("split", None)
            ph[coll] = ph.pop(coll, 0.0)  # in run order
            ph["training step + eval forward"] = ph.pop("training step + eval forward")
            fresh = "of all the above: fresh instances (independent draws + collapse)"
            ph[fresh] = ph.pop(fresh, 0.0)
            out.setdefault(name, {})["after"] = {
                "status": r["status"], "mode": r.get("mode"), "input": r.get("input"), "total_s": round(total, 1), "clock": "process_time",
                "phases_s": {k: round(v, 1) for k, v in ph.items()},
                "maxrss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
            print(name, json.dumps(out[name]["after"]), flush=True)
    finally:
        for owner, attr, f in reversed(patched):
            setattr(owner, attr, f)
    PROFILE.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


def _profile_lines() -> list[str]:
    if not PROFILE.exists():
        return []
    prof = json.loads(PROFILE.read_text())
    lines = ["## Where a large model's time goes", "",
             "CPU seconds of the one-thread process (`time.process_time`: the machine was shared with other "
             "work, so wall-clock figures swung 2-3x; the grid and sweep were paused) "
             "(`python benchmarks/coverage.py --profile NAME...`, results in `benchmarks/results/coverage-profile.json`). "
             "\"before\" is the sweep as it was at commit 530578a (same wrapper, then private phase names), "
             "\"after\" the sweep now.", ""]
    order = ["input probe (create + eager forward)", "input probe (meta device)", "split: copy the source model",
             "split: create the model", "split: trace train + eval", "split: eager vs traced vs cut, both modes",
             "split: deep copies + independent draws", "training step + eval forward",
             "collapse every head (create + strict load + logit check)",
             "of all the above: fresh instances (independent draws + collapse)"]
    cols = [(name, when) for name in sorted(prof) for when in ("before", "after") if when in prof[name]]
    lines.append("| phase | " + " | ".join(f"`{n}` {w}" for n, w in cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for key, fmt in (("mode", str), ("input", lambda v: "x".join(map(str, v)))):
        lines.append(f"| {key} | " + " | ".join(fmt(prof[n][w][key]) for n, w in cols) + " |")
    for ph in order:
        if any(ph in prof[n][w]["phases_s"] for n, w in cols):
            lines.append(f"| {ph} | " + " | ".join(str(prof[n][w]["phases_s"].get(ph, "-")) for n, w in cols) + " |")
    lines.append("| **total** | " + " | ".join(f"**{prof[n][w]['total_s']}**" for n, w in cols) + " |")
    lines.append("| peak RSS (GiB) | " + " | ".join(str(prof[n][w]["maxrss_GiB"]) for n, w in cols) + " |")
    lines += ["", "What is left is mostly building fresh timm instances (random init of every weight): the model "
              "itself, one per independent branch, one per collapsed head (collapse builds the class and then "
              "loads over its init). The sweep cannot avoid these without weakening the check; skipping the init "
              "in `collapse` would be a library change.", ""]
    return lines


# Known failure classes: (pattern in the reason, class, cause, fix). A failure matching none is
# listed as "unclassified" until someone reads it and adds its class here.
FAILURE_CLASSES: list[tuple[str, str, str, str]] = [
    ("timeout", "time", "the model did not finish within --timeout on 2 CPU cores",
     "ours (sweep budget): rerun with a longer --timeout, or a smaller build"),
    ("worker died", "memory", "the worker was killed (out of memory on 24 GiB)",
     "ours (sweep budget): lower --max-params so it runs as a reduced build"),
    ("non-finite logits", "training instability", "one SGD step at batch 2 from random init overflows",
     "not a cut mismatch; the collapse check is not reached; a failed check at the smallest input now "
     "retries at the old input"),
    ("encoder without a classifier", "not a classifier", "timm's encoder-only models (qwen3_vit_*_enc) ignore "
     "num_classes and output tokens", "out of scope: split/create now refuse them in one line (models.create)"),
]


def _classify(reason: str) -> tuple[str, str, str]:
    for pat, cls, cause, fix in FAILURE_CLASSES:
        if pat in reason:
            return cls, cause, fix
    return "unclassified", reason, "to investigate"


def report(names: list[str]) -> str:
    """Rewrite docs/coverage.md from the results file: how each model was checked, failures by class, the tally."""
    import collections
    import statistics

    import timm
    import torch

    done = _done()
    rows = [done[n] for n in names if n in done]
    excluded = [r for r in rows if any(fnmatch.fnmatch(r["model"], p) for p in TIMM_FX_EXCLUDED)]
    counted = [r for r in rows if r not in excluded]
    passed = [r for r in counted if r["status"] == "pass"]
    failed = [r for r in counted if r["status"] == "fail"]
    skipped = [r for r in counted if r["status"] == "skip"]
    reduced = [r for r in passed if r.get("how", "full") != "full"]
    ran = len(passed) + len(failed)
    not_run = len(names) - len(rows) + len(skipped)
    pct = 100 * len(passed) / ran if ran else 0.0
    partial = not_run > 0
    lines = [
        "# Coverage of the timm zoo",
        "",
        "Every architecture in `timm.list_models()` is split, trained one SGD step, and every head is collapsed",
        "back into its timm class with a strict `load_state_dict` and its eval logits compared with the tree's",
        "(max abs difference <= 1e-5). `split` itself traces the model in train and eval mode, cuts it, and",
        "compares the traced graph and the cut chain with the eager model in both modes. What changes with",
        "size is only how many heads, where, and at what input:",
        "",
        "- up to 100 M parameters: 4 heads at the last two split points (fan-out 2,2), independent branches;",
        "- 100-300 M: 2 heads at the last split point, independent branches;",
        "- 300 M-1.2 B: 2 heads at the last split point, copied branches (saves building a third full instance);",
        "- above 1.2 B: the same class built smaller through its own kwargs (`depth=2`, `depths=[1, ...]`,",
        "  RegNet `depth`), then the full check above: same code paths, fewer blocks (\"reduced\" below).",
        "",
        "Input: the 839 models of the first sweep (all but `aimv2_huge_patch14_224` below 60 M; records without",
        "a `how` field) ran at 1/4-1/2 of their own size with the same checks; later ones at the",
        "smallest side the model accepts (probed on the meta device in both modes, at least 2x2 patches for",
        "patch models; `img_size` is set to it where the class takes one), falling back to the old size if",
        "the smallest fails. Each row below gives the input used.",
        "",
        f"Produced by `python benchmarks/coverage.py` with timm {timm.__version__}, torch {torch.__version__}, "
        f"on {platform.machine()} CPU ({os.cpu_count()} cores).",
        "",
        "## timm versions",
        "",
        f"Covered: timm {timm.__version__} only. It is the newest release the package index here serves "
        "(`pip index versions timm`, checked 2026-12-02: 1.0.31 latest; the timm source mirror is older, "
        "1.0.29.dev0), so there are no newer architectures to sweep yet. The package requires timm >= 1.0.31: "
        "collapse rebuilds a head from the create kwargs timm records on the model (`_model_args`), which "
        "1.0.30 and older do not record (1.0.16 cannot even import headsurgeon: no `get_notrace_functions`; "
        "1.0.17 fails 13 of 29 core tests). `make test-timm-floor` runs the core against the declared floor.",
        "",
    ]
    def mode(r: dict) -> str:  # the first 835 records predate the branch init in "mode"
        m = r.get("mode", "4 heads, 2 splits")
        return m if m.endswith(("copy", "independent")) else m + ", independent"

    how = collections.Counter((r.get("how", "full") if r.get("how", "full") == "full" else "reduced build", mode(r))
                              for r in passed)
    lines += _profile_lines()
    lines += ["## How the passing models were checked", "", "| build | heads and splits | models |", "|---|---|---|"]
    lines += [f"| {h} | {m} | {n} |" for (h, m), n in sorted(how.items())]
    lines.append("")
    if reduced:
        lines += ["## Reduced builds (structural: every code path, fewer blocks)", "",
                  "| model | how | input | seconds |", "|---|---|---|---|"]
        lines += [f"| `{r['model']}` | {r['how']} | {'x'.join(map(str, r['input']))} | {r['seconds']} |"
                  for r in sorted(reduced, key=lambda r: r["model"])]
        lines.append("")
    if failed:
        lines += ["## Failures", "", "| model | class | cause | fix |", "|---|---|---|---|"]
        for r in sorted(failed, key=lambda r: r["model"]):
            cls, cause, fix = _classify(r.get("reason", ""))
            lines.append(f"| `{r['model']}` | {cls} | {r.get('reason', '').replace('|', '/')} | {fix} |")
        lines.append("")
    excluded_failed = [r for r in excluded if r["status"] != "pass"]
    if excluded_failed:
        lines += ["## Failures among the models timm's fx test excludes (not counted)", "",
                  "timm itself does not support torch.fx for these (its tests skip them), so they are outside the "
                  "pass rate; each is listed with what happened here. The untraceable gemma4_vit classifiers split "
                  "when their encoder is kept whole (`--leaf-module timm.models.gemma4_vit:Gemma4VitEncoder`, recipe "
                  "key `split.leaf_modules`): as instances (`--at input`), checked with a collapse back to timm on a "
                  "reduced build in `tests/test_cli.py`.", "", "| model | cause |", "|---|---|"]
        lines += [f"| `{r['model']}` | {r.get('reason', '').replace('|', '/')} |"
                  for r in sorted(excluded_failed, key=lambda r: r["model"])]
        lines.append("")
    missing = [n for n in names if n not in done]
    if skipped or missing:
        lines += ["## Not run", ""]
        if skipped:
            lines += ["| model | reason |", "|---|---|"]
            lines += [f"| `{r['model']}` | {r['reason']} |" for r in skipped]
            lines.append("")
        if missing:
            lines += [f"{len(missing)} not reached yet by the sweep (it runs smallest first): "
                      + ", ".join(f"`{n}`" for n in missing), ""]
    lines += ["## Passing", "", "| model | params (M) | split at | heads | input | build | seconds |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(passed + [e for e in excluded if e["status"] == "pass"], key=lambda r: r["model"]):
        lines.append(f"| `{r['model']}` | {r['params'] / 1e6:.1f} | {', '.join(r['at'])} | {r['heads']} | "
                     f"{'x'.join(map(str, r['input']))} | {r.get('how', 'full')} | {r['seconds']} |")
    classes = collections.Counter(_classify(r.get("reason", ""))[0] for r in failed)
    # sweep time: what the recorded runs took (wall-clock, as each row says), and for the models not
    # run yet the median of this policy's runs of the same size class
    cache_file = RESULTS.parent / "params.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    bounds = [(0, 100e6), (100e6, 300e6), (300e6, 1.2e9), (1.2e9, float("inf"))]

    def size_class(n: str) -> int:
        v = cache.get(n, done.get(n, {}).get("full_params", 0)) or 0
        return next(i for i, (lo, hi) in enumerate(bounds) if lo <= v <= hi)

    spent = sum(r.get("seconds", 0) for r in rows)
    per_class: dict[int, list[float]] = collections.defaultdict(list)
    for r in rows:
        if "how" in r and r["status"] == "pass":
            per_class[size_class(r["model"])].append(r["seconds"])
    todo_names = missing + [r["model"] for r in skipped]
    every = [t for v in per_class.values() for t in v]
    est = sum(statistics.median(per_class.get(size_class(n)) or every or [0]) for n in todo_names)
    lines += [
        "",
        "## Summary" + (" (partial: the sweep has not reached every model yet)" if partial else ""),
        "",
        f"**{len(passed)} of {ran} run architectures pass ({pct:.1f}%)**; {not_run} of {len(names)} not run "
        f"({100 * not_run / len(names):.1f}%). {len(reduced)} of the passes are reduced builds. Not counted: "
        f"{len(excluded)} that timm's own fx test excludes ({', '.join(TIMM_FX_EXCLUDED)}; "
        f"{sum(r['status'] == 'pass' for r in excluded)} of them pass anyway).",
        "",
        ("Failures by class: " + ", ".join(f"{c} {n}" for c, n in classes.most_common()) + ".") if failed
        else "No failures.",
        "",
        f"Sweep time: the {len(rows)} recorded runs took {spent / 3600:.1f} h of wall-clock time (one worker, "
        f"niced, on a machine shared with other jobs)"
        + (f"; the {len(todo_names)} not run would take about {est / 3600:.1f} h more at the median time of "
           f"this policy's runs of their size class." if todo_names else "."),
    ]
    text = "\n".join(lines) + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(DOC)
    print(f"{len(passed)}/{ran} pass ({pct:.1f}%), {not_run} not run; wrote {DOC}")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filter", default="*", help="fnmatch pattern over timm.list_models()")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per model")
    ap.add_argument("--big", type=float, default=100e6, help="parameters above which 2 heads / 1 split are used")
    ap.add_argument("--copy-above", type=float, default=300e6,
                    help="parameters above which the 2 branches are copies (saves building a fresh instance)")
    ap.add_argument("--max-params", type=float, default=1.2e9,
                    help="parameters above which the model is built smaller (depth kwargs) for a structural check")
    ap.add_argument("--report", action="store_true", help="only rewrite docs/coverage.md")
    ap.add_argument("--retry-failed", action="store_true", help="run recorded failures again")
    ap.add_argument("--profile", nargs="+", metavar="NAME", help="time the phases on these models (see PROFILE)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.big, args.copy_above)
        return
    if args.profile:
        profile(args.profile, args.big, args.copy_above)
        return
    import timm

    names = timm.list_models(args.filter)
    if not args.report:
        sweep(names, args.timeout, args.big, args.copy_above, args.max_params, args.retry_failed)
    report(timm.list_models())


if __name__ == "__main__":
    main()
