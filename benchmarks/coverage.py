"""Sweep every architecture in ``timm.list_models()`` through split -> train step -> collapse.

For each model: create it (random init, ``num_classes=10``), split at the last two
``feature_info`` modules into 4 heads (fan-out 2,2, independent branches), run one training
step on the tree, collapse every head and check its eval logits against the tree's
(<= 1e-5). Results are appended to a JSONL file (the sweep resumes where it stopped) and
``docs/coverage.md`` is written from it.

To fit 2 cores and 24 GiB, each model runs at a reduced input where its constructor allows
(``img_size`` for fixed-size models, a 64-128 px probe for convnets). Models above
``--big`` parameters are verified with 2 heads at one split point (fan-out 2, copied
branches: no fresh instances) so that the tree, its gradients and the collapsed copy fit
in memory; above ``--max-params`` they are skipped and listed with their size.

    python benchmarks/coverage.py                    # full sweep (hours on 2 cores)
    python benchmarks/coverage.py --filter 'resnet*' # a subset
    python benchmarks/coverage.py --report           # only rewrite docs/coverage.md
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


def _small_model(name: str):
    """Create ``name`` at a reduced input size where it runs at one, else at its own size."""
    import torch

    model, size, n = _try_small(name)
    try:
        with torch.no_grad():
            model.eval()(torch.randn(2, *size))
        return model, size, n
    except Exception:
        import timm
        from headsurgeon.models import default_input_size

        model = timm.create_model(name, num_classes=10)
        return model, tuple(default_input_size(model)), n


def _try_small(name: str):
    import timm
    from headsurgeon.models import default_input_size

    base = timm.create_model(name, pretrained=False, num_classes=10, device="meta")
    cfg = default_input_size(base)
    n_params = sum(p.numel() for p in base.parameters())
    fixed = getattr(base, "_traits", {}).get("fixed_input_size", base.pretrained_cfg.get("fixed_input_size", False))
    side = cfg[1]
    if fixed:
        for small in (side // 4, side // 2):
            if small < 32:
                continue
            try:
                m = timm.create_model(name, num_classes=10, img_size=small)
                return m, (cfg[0], small, small), n_params
            except Exception:
                continue
        return timm.create_model(name, num_classes=10), tuple(cfg), n_params
    small = max(64, min(128, side // 2))
    return timm.create_model(name, num_classes=10), (cfg[0], small, small), n_params


def _split_candidates(model) -> list[str]:
    """``feature_info`` modules that exist (Twins/MViTv2 name ``block.N`` modules that do not),
    distinct (CoaT names one fused module for several stages); else the last stage containers.
    (``cut.feature_points`` answers this from a trace; the sweep picks its points before tracing.)"""
    from headsurgeon.trace import has_module

    feats = list(dict.fromkeys(f["module"] for f in getattr(model, "feature_info", None) or [] if isinstance(f, dict)))
    feats = [f for f in feats if has_module(model, f)]
    if len(feats) >= 2:
        return feats
    for container in ("stages", "blocks", "layers", "features"):
        mod = getattr(model, container, None)
        if mod is not None and hasattr(mod, "__len__") and len(mod) >= 2:
            return [f"{container}.{i}" for i in range(len(mod))]
    return feats


def run_one(name: str, big: float) -> dict:
    import torch
    import torch.nn.functional as F

    import headsurgeon as hs
    from headsurgeon.verify import max_abs_diff

    t0 = time.time()
    import zlib

    torch.manual_seed(zlib.crc32(name.encode()))  # reproducible per model, whatever ran before
    model, size, n_params = _small_model(name)
    feats = _split_candidates(model)
    large = n_params > big
    at = feats[-1:] if large else feats[-2:]
    if not at:
        return {"model": name, "status": "fail", "reason": "no feature_info modules to split at", "params": n_params}
    heads = 2 if large else 4
    tree = hs.split(model, at=at, heads=heads, branch_init="copy" if large else "independent", seed=0,
                    input_size=size, verify=True)
    del model
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
    opt.zero_grad(set_to_none=True)
    del opt, outs, loss
    tree.eval()
    with torch.no_grad():
        outs = tree(x)
    if not all(torch.isfinite(o).all() for o in outs):
        return {"model": name, "status": "fail", "params": n_params,
                "reason": "non-finite logits after one SGD step at batch 2 (training instability, not a cut mismatch)"}
    worst = 0.0
    for h in range(tree.num_heads):
        m = hs.collapse(tree, h, probe=x)
        with torch.no_grad():
            worst = max(worst, max_abs_diff(m(x), outs[h]))
        del m
    return {"model": name, "status": "pass", "params": n_params, "at": at, "heads": heads,
            "input": list(size), "max_diff": worst, "seconds": round(time.time() - t0, 1),
            "mode": "2 heads, 1 split, copy" if large else "4 heads, 2 splits"}


def worker(big: float) -> None:
    """Read model names on stdin, answer one JSON line each (keeps timm imported between models)."""
    import torch
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("COVERAGE_THREADS", "1")))
    for line in sys.stdin:
        name = line.strip()
        try:
            res = run_one(name, big)
        except Exception as e:  # the sweep records every failure reason
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            res = {"model": name, "status": "fail", "reason": f"{type(e).__name__}: {msg}"}
        print(json.dumps(res), flush=True)
        import gc

        gc.collect()


def _done() -> dict[str, dict]:
    out = {}
    if RESULTS.exists():
        for line in RESULTS.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["model"]] = r
    return out


def _meta_params(name: str) -> float:
    import timm

    try:
        return sum(p.numel() for p in timm.create_model(name, num_classes=10, device="meta").parameters())
    except Exception:
        return float("inf")


def sweep(names: list[str], timeout: float, big: float, max_params: float, retry_failed: bool = False) -> None:
    import timm

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    done = _done()
    if retry_failed:
        done = {k: v for k, v in done.items() if v["status"] != "fail"}
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
    with RESULTS.open("a") as log:
        for i, name in enumerate(todo):
            try:
                meta = timm.create_model(name, num_classes=10, device="meta")
                n_params = sum(p.numel() for p in meta.parameters())
                del meta
            except Exception as e:
                res = {"model": name, "status": "fail", "reason": f"create: {type(e).__name__}: {str(e)[:200]}"}
                log.write(json.dumps(res) + "\n")
                log.flush()
                continue
            if n_params > max_params:
                res = {"model": name, "status": "skip", "params": n_params,
                       "reason": f"{n_params / 1e6:.0f} M parameters > {max_params / 1e6:.0f} M (tree + gradients exceed 24 GiB)"}
                log.write(json.dumps(res) + "\n")
                log.flush()
                continue
            if proc is None or proc.poll() is not None:
                proc = subprocess.Popen([sys.executable, __file__, "--worker", "--big", str(big)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
            proc.stdin.write(name + "\n")
            proc.stdin.flush()
            t0 = time.time()
            line = _readline(proc, timeout)
            if line is None:
                proc.kill()
                proc.wait()
                proc = None
                why = "timeout" if time.time() - t0 >= timeout else "worker died (out of memory?)"
                res = {"model": name, "status": "fail", "reason": f"{why} after {time.time() - t0:.0f} s", "params": n_params}
            else:
                res = json.loads(line)
            log.write(json.dumps(res) + "\n")
            log.flush()
            print(f"[{i + 1}/{len(todo)}] {res['status']:4} {name} {res.get('reason', '')} {res.get('seconds', '')}", flush=True)
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


def report(names: list[str]) -> str:
    import timm
    import torch

    done = _done()
    rows = [done[n] for n in names if n in done]
    excluded = [r for r in rows if any(fnmatch.fnmatch(r["model"], p) for p in TIMM_FX_EXCLUDED)]
    counted = [r for r in rows if r not in excluded]
    passed = [r for r in counted if r["status"] == "pass"]
    failed = [r for r in counted if r["status"] == "fail"]
    skipped = [r for r in counted if r["status"] == "skip"]
    ran = len(passed) + len(failed)
    pct = 100 * len(passed) / ran if ran else 0.0
    lines = [
        "# Coverage of the timm zoo",
        "",
        "Every architecture in `timm.list_models()` is split at its last two `feature_info` modules into",
        "4 heads (fan-out 2,2, independent branches), trained one SGD step, and every head is collapsed",
        "back into the timm class with a strict `load_state_dict` and its eval logits compared with the",
        "tree's (max abs difference <= 1e-5). Split itself verifies the traced and cut graphs against",
        "the eager model in train and eval mode. Models above 300 M parameters run with 2 heads at one",
        "split point and copied branches so that everything fits in 24 GiB.",
        "",
        f"Produced by `python benchmarks/coverage.py` with timm {timm.__version__}, torch {torch.__version__}, "
        f"on {platform.machine()} CPU ({os.cpu_count()} cores).",
        "",
        f"**{len(passed)} of {ran} architectures pass ({pct:.1f}%)**, not counting {len(excluded)} that timm's own fx "
        f"test excludes ({', '.join(TIMM_FX_EXCLUDED)}: {sum(r['status'] == 'pass' for r in excluded)} of them pass anyway) "
        f"and {len(skipped)} skipped for size. {len(names) - len(rows)} of {len(names)} architectures have not been run yet.",
        "",
    ]
    if failed:
        lines += ["## Failures", "", "| model | reason |", "|---|---|"]
        lines += [f"| `{r['model']}` | {r.get('reason', '').replace('|', '/')} |" for r in failed]
        lines.append("")
    if skipped:
        lines += ["## Skipped", "", "| model | reason |", "|---|---|"]
        lines += [f"| `{r['model']}` | {r['reason']} |" for r in skipped]
        lines.append("")
    lines += ["## Passing", "", "| model | params (M) | split at | heads | input | seconds |", "|---|---|---|---|---|---|"]
    for r in sorted(passed + [e for e in excluded if e["status"] == "pass"], key=lambda r: r["model"]):
        lines.append(f"| `{r['model']}` | {r['params'] / 1e6:.1f} | {', '.join(r['at'])} | {r['heads']} | "
                     f"{'x'.join(map(str, r['input']))} | {r['seconds']} |")
    text = "\n".join(lines) + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"{len(passed)}/{ran} pass ({pct:.1f}%); wrote {DOC}")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filter", default="*", help="fnmatch pattern over timm.list_models()")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per model")
    ap.add_argument("--big", type=float, default=300e6, help="parameters above which 2 heads / 1 split are used")
    ap.add_argument("--max-params", type=float, default=1.2e9, help="parameters above which a model is skipped")
    ap.add_argument("--report", action="store_true", help="only rewrite docs/coverage.md")
    ap.add_argument("--retry-failed", action="store_true", help="run recorded failures again")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.big)
        return
    import timm

    names = timm.list_models(args.filter)
    if not args.report:
        sweep(names, args.timeout, args.big, args.max_params, args.retry_failed)
    report(timm.list_models())


if __name__ == "__main__":
    main()
