"""Command line: a thin click shell over the public Python API."""
from __future__ import annotations

import functools
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import click

from .compare import BUILTIN
from .errors import HeadsurgeonError, first_line
from .storage import human


def _one_line_errors(fn: Callable) -> Callable:
    """Bad input becomes ``Error: <one line>`` and exit code 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def show(message, category, filename, lineno, file=None, line=None):
            click.secho(f"warning: {message}", fg="yellow", err=True)

        old = warnings.showwarning
        warnings.showwarning = show
        try:
            return fn(*args, **kwargs)
        except HeadsurgeonError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.Abort() from None
        finally:
            warnings.showwarning = old

    return wrapper


def _parse_kwargs(pairs: tuple[str, ...], peers: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """``--model-kwargs K=V`` for every model, and ``I:K=V`` for peer ``I`` of a list of ``peers`` models."""
    import yaml

    out: dict[str, Any] = {}
    per: list[dict[str, Any]] = [{} for _ in range(peers)]
    for pair in (p for item in pairs for p in item.split()):
        key, eq, value = pair.partition("=")
        index, colon, key = key.rpartition(":")
        if not eq or not key.isidentifier() or (colon and not index.isdigit()):
            raise HeadsurgeonError(f"--model-kwargs expects key=value pairs, got '{pair}' (e.g. --model-kwargs "
                                   f"drop_path_rate=0.1, or 1:drop_rate=0.2 for the second of a list of models)")
        if colon and int(index) >= peers:
            raise HeadsurgeonError(f"--model-kwargs {pair}: " + (f"there are peers 0..{peers - 1}" if peers else
                                   "I:key=value is for one of a list of models (MODEL1,MODEL2); give key=value"))
        try:
            (per[int(index)] if colon else out)[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise HeadsurgeonError(f"--model-kwargs {pair}: '{value}' is not valid YAML ({first_line(e)}); write each "
                                   f"value without spaces (pairs are split at spaces), e.g. channels=[8,16,32,64]") from None
    return out, (per if peers else None)


def _models(model: str) -> str | list[str]:
    """``a,b`` is a list of models (heterogeneous peers), anything else one model name."""
    if "," not in model:
        return model
    names = [m.strip() for m in model.split(",")]
    if any(not m for m in names):
        raise HeadsurgeonError(f"'{model}' has an empty model name; list the models as MODEL1,MODEL2")
    return names


def _int_list(value: str | None, what: str, example: str = "2,2") -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise HeadsurgeonError(f"{what} must be comma-separated integers, e.g. {example}; got '{value}'") from None


def _input_size(value: str | None) -> list[int] | None:
    """``--input-size C,H,W``: three positive integers (a zero or negative size fails deep inside torch)."""
    size = _int_list(value, "--input-size", "3,224,224")
    if size is not None and (len(size) != 3 or min(size) < 1):
        raise HeadsurgeonError(f"--input-size must be three positive integers C,H,W, e.g. 3,224,224; got '{value}'")
    return size


def _num_classes(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise HeadsurgeonError(f"--num-classes must be at least 1, got {value} (0 would leave the model without "
                               f"a classifier)")
    return value


def _safe_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model.split(":", 1)[-1]).strip("_") or "model"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="headsurgeon")
def main() -> None:
    """Collaborative learning for timm models: split a model into a tree of heads, train it,
    collapse one head back into the original architecture."""


@main.command()
@click.argument("model")
@click.option("--all", "all_paths", is_flag=True, help="List every module path, not only the top two levels.")
@click.option("--num-classes", type=int, default=None, help="Classifier size (changes the head's parameters).")
@click.option("--model-kwargs", multiple=True, metavar="K=V", help="Extra timm.create_model kwargs, e.g. img_size=64 "
              "(I:K=V: only for model I of a list).")
@click.option("--input-size", default=None, metavar="C,H,W", help="Input size for shapes and FLOPs (default: the model's).")
@click.option("--leaf-module", "leaf_modules", multiple=True, metavar="MODULE:CLASS",
              help="Keep this module class whole when tracing (a part torch.fx cannot trace, e.g. "
                   "timm.models.gemma4_vit:Gemma4VitEncoder); repeat for several.")
@_one_line_errors
def nodes(model: str, all_paths: bool, num_classes: int | None, model_kwargs: tuple[str, ...], input_size: str | None,
          leaf_modules: tuple[str, ...]) -> None:
    """List the candidate split points of MODEL (timm feature_info modules first) with the output
    shape there and the parameters and FLOPs a branch forked there would own. For a list of models
    (MODEL1,MODEL2: heterogeneous peers, which split only at the input), compare them instead: size,
    classes, input and the preprocessing each was made for."""
    from .models import create, default_input_size
    from .points import split_points
    from .trace import import_classes

    names = _models(model)
    kwargs, per = _parse_kwargs(model_kwargs, len(names) if isinstance(names, list) else 0)
    if _num_classes(num_classes) is not None:
        kwargs["num_classes"] = num_classes
    given = _input_size(input_size)
    if isinstance(names, list):
        _peers_table(names, kwargs, per or [], given)
        return
    leaf = import_classes(leaf_modules)
    m = create(model, kwargs)
    size = given or list(default_input_size(m))
    points, params, flops = split_points(m, size, all_paths=all_paths, leaf_modules=leaf)
    click.echo(f"{model}: {human(params)} parameters, {human(flops)} FLOPs per image at {'x'.join(map(str, size))}")
    click.echo(f"{'split point':<34} {'output shape':<22} {'branch params':>14} {'branch FLOPs':>13}")
    feats = sum(p.feature for p in points)
    for i, p in enumerate(points):
        if i == 1 and feats:
            click.echo("-- timm feature_info modules")
        if i == 1 + feats:
            click.echo("-- other module paths" + ("" if all_paths else " (--all for every one)"))
        frac = f"{100 * p.branch_params / params:.0f}%" if params else "-"
        click.echo(f"{p.name:<34} {p.shape:<22} {human(p.branch_params):>8} {frac:>5} {human(p.branch_flops):>13}")


def _peers_table(names: list[str], kwargs: dict[str, Any], per: list[dict[str, Any]], size: list[int] | None) -> None:
    """``headsurgeon nodes A,B``: what each peer is and whether they fit in one tree."""
    import torch

    from .models import create, default_input_size, num_classes
    from .points import count_flops

    ms = [create(n, {**kwargs, **k}) for n, k in zip(names, per)]
    shape = size or list(default_input_size(ms[0]))
    click.echo(f"{len(names)} peers (split them only at the input: headsurgeon split {','.join(names)} --at input); "
               f"FLOPs per image at {'x'.join(map(str, shape))}, the first peer's input size unless --input-size")
    click.echo(f"{'head':<5}{'model':<30} {'params':>8} {'FLOPs':>8} {'classes':>8}  {'own input':<12} preprocessing")
    problems = []
    for h, (n, m) in enumerate(zip(names, ms)):
        cfg = m.pretrained_cfg
        try:
            flops = human(count_flops(m.eval(), torch.zeros(1, *shape)))
        except Exception as e:  # a peer that cannot take the shared input: split would refuse it
            flops = "fails"
            problems.append(f"{n} fails on {'x'.join(map(str, shape))} ({type(e).__name__}: "
                            f"{first_line(e, 120)})")
        prep = f"mean {cfg.get('mean')}, std {cfg.get('std')}, {cfg.get('interpolation')}"
        click.echo(f"{h:<5}{n:<30} {human(sum(p.numel() for p in m.parameters())):>8} {flops:>8} "
                   f"{num_classes(m)!s:>8}  {'x'.join(map(str, default_input_size(m))):<12} {prep}")
    problems += [f"different {what} ({', '.join(map(str, vals))})" for what, vals in (
        ("classifier sizes", [num_classes(m) for m in ms]), ("input channels", [default_input_size(m)[0] for m in ms]))
        if len(set(vals)) > 1]
    click.echo("a tree of these peers is trained on the first peer's preprocessing (recipe data.mean/std override it)"
               + (f"; split would refuse them: {'; '.join(problems)}" if problems else ""))


@main.command("split")
@click.argument("model")
@click.option("--at", "at", required=True, help="Split points in forward order, comma-separated (e.g. layer3,layer4; 'input' = independent instances).")
@click.option("--heads", type=int, default=None, help="Number of heads (leaves of the tree); with a list of models, its length.")
@click.option("--fanout", default=None, metavar="F1,F2", help="Children per fork at each split point; product = heads. Default: balanced.")
@click.option("--num-classes", type=int, default=None, help="Classifier size passed to timm.create_model.")
@click.option("--no-rescale", is_flag=True, help="Leave out the gradient-rescaling op at the forks (the paper's ablation).")
@click.option("--branch-init", type=click.Choice(["independent", "copy", "pretrained"]), default=None,
              help="independent: each cloned copy gets its own timm init (default for random init); copy: exact copies; "
                   "pretrained: copy the pretrained weights, draw the rest (default with --pretrained/--weights).")
@click.option("--pretrained", is_flag=True, help="Start from timm's pretrained weights (needs them downloadable or cached).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Start from a local safetensors or timm checkpoint.")
@click.option("--model-kwargs", multiple=True, metavar="K=V", help="Extra timm.create_model kwargs, e.g. drop_path_rate=0.1 "
              "(I:K=V: only for model I of a list, e.g. 0:stem_width=16).")
@click.option("--seed", type=int, default=None, help="Seed of the independent branch initialisation.")
@click.option("--input-size", default=None, metavar="C,H,W", help="Probe input size for verification (default: the model's).")
@click.option("--leaf-module", "leaf_modules", multiple=True, metavar="MODULE:CLASS",
              help="Keep this module class whole when tracing (a part torch.fx cannot trace, e.g. "
                   "timm.models.gemma4_vit:Gemma4VitEncoder); repeat for several.")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False), help="Output directory (default ./<model>-tree).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@_one_line_errors
def split_cmd(model: str, at: str, heads: int | None, fanout: str | None, num_classes: int | None, no_rescale: bool,
              branch_init: str | None, pretrained: bool, weights: str | None, model_kwargs: tuple[str, ...],
              seed: int | None, input_size: str | None, leaf_modules: tuple[str, ...], output: str | None,
              overwrite: bool) -> None:
    """Split MODEL into a tree of heads and write it to a directory (spec.json + tree.safetensors).
    MODEL1,MODEL2,... (with --at input) makes heterogeneous peers: head i is the whole of model i."""
    from .storage import check_output, check_space
    from .surgery import split

    if pretrained and weights:
        raise HeadsurgeonError("--pretrained and --weights both give starting weights; use one of them")
    names = _models(model)
    if heads is None and not isinstance(names, list):
        raise HeadsurgeonError("--heads is required for one model: the number of heads, e.g. --heads 4 "
                               "(a list of models MODEL1,MODEL2 gives one head each)")
    kwargs, per = _parse_kwargs(model_kwargs, len(names) if isinstance(names, list) else 0)
    if _num_classes(num_classes) is not None:
        kwargs["num_classes"] = num_classes
    if pretrained:
        kwargs["pretrained"] = True
    size = _input_size(input_size)
    out = Path(output or f"{_safe_name(model)}-tree")
    if weights and out.resolve() in Path(weights).resolve().parents:
        raise HeadsurgeonError(f"-o '{out}' holds the --weights file '{weights}': writing the tree there would delete "
                               f"it; choose another -o")
    check_output(out, overwrite)
    tree = split(names, at=at, heads=heads, fanout=_int_list(fanout, "--fanout"), rescale=not no_rescale,
                 branch_init=branch_init, weights=weights, seed=seed, input_size=size, peer_kwargs=per,
                 leaf_modules=leaf_modules, **kwargs)
    cost = tree.cost()
    check_space(out, tree.nbytes())  # say the size first; refuse what the disk cannot hold
    click.echo(f"writing {out}: {human(tree.nbytes(), 'B')} of weights ({tree.num_heads} heads)")
    tree.save(out, overwrite=overwrite)
    click.echo(f"{model} split at {','.join(tree.spec.at)} into {tree.num_heads} heads "
               f"(fan-out {','.join(map(str, tree.fanout))}, rescale {'on' if tree.rescale else 'off'}, "
               f"branch init {tree.spec.branch_init}); cut verified against the eager model")
    click.echo(tree.describe())
    if tree.spec.peers:
        heads_cost = [tree.cost(head=h) for h in range(tree.num_heads)]
        click.echo(f"parameters: tree {human(cost['tree_params'])}, FLOPs per image: tree {human(cost['tree_flops'])}; "
                   "per head: " + ", ".join(f"{h} {p.architecture} {human(c['base_params'])} / {human(c['base_flops'])}"
                                             for h, (p, c) in enumerate(zip(tree.spec.peers, heads_cost))))
        click.echo(f"preprocessing (mean/std/interpolation) is the first peer's, {tree.spec.architecture}'s")
    else:
        click.echo(f"parameters: tree {human(cost['tree_params'])} vs model {human(cost['base_params'])} "
                   f"({cost['tree_params'] / max(cost['base_params'], 1):.2f}x); FLOPs per image: tree "
                   f"{human(cost['tree_flops'])} vs model {human(cost['base_flops'])} "
                   f"({cost['tree_flops'] / max(cost['base_flops'], 1):.2f}x)")
    click.echo(f"wrote {out}")


@main.command("collapse")
@click.argument("source", type=click.Path(), required=False)
@click.option("--head", type=int, default=None, help="Which head to keep (default: a run's best head, or 0 for a tree directory).")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False), help="Output directory (default <name of SOURCE>-head<N> in the current directory).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--leaf-module", "leaf_modules", multiple=True, metavar="MODULE:CLASS",
              help="A leaf module the tree's spec.json names that may be imported (a spec may otherwise import "
                   "only modules already loaded, such as timm's); repeat for several.")
@click.option("--trust-leaf-modules", is_flag=True, help="Import every leaf module the tree's spec.json names "
              "(importing a module runs its code: only for a tree you trust).")
@_one_line_errors
def collapse_cmd(source: str | None, head: int | None, output: str | None, overwrite: bool,
                 leaf_modules: tuple[str, ...], trust_leaf_modules: bool) -> None:
    """Collapse one head of SOURCE into the original timm architecture, verify its logits against
    the tree and write it in timm/Hub format. SOURCE is a tree directory or a training run directory
    (its best checkpoint and best head); without SOURCE, the most recent run under runs/."""
    from .pipeline import collapse_dir
    from .trace import allow_leaf_modules

    with allow_leaf_modules(leaf_modules, trust=trust_leaf_modules):
        out, head = collapse_dir(source, head, output, overwrite=overwrite, log=click.echo)
    click.echo(f"wrote {out} (config.json, model.safetensors, README.md model card); load it with:")
    click.echo(f"  timm.create_model('local-dir:{out.resolve()}', pretrained=True)")


@main.command("push")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--repo", "repo_id", required=True, metavar="NAMESPACE/NAME", help="Hub model repo to create or update, e.g. your-user/resnet18-cl.")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to commit to (created from main if missing; default main), or refs/pr/N to add to an open pull request.")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--commit-message", default=None, help="Commit message (default: 'Upload model collapsed by headsurgeon').")
@click.option("--validate", is_flag=True, help="Ask the Hub to validate the card's metadata first (POST /api/validate-yaml; "
              "skipped, with a line saying so, when offline). With --dry-run it is the only call made.")
@click.option("--dry-run", is_flag=True, help="Make every check the push makes, list what would be uploaded and show "
              "the card; contact nothing (except the card check of --validate).")
@click.option("--force", is_flag=True, help="Push a folder that is not a verified `headsurgeon collapse` output.")
@_one_line_errors
def push_cmd(folder: str, repo_id: str, private: bool, revision: str | None, create_pr: bool,
             commit_message: str | None, validate: bool, dry_run: bool, force: bool) -> None:
    """Upload FOLDER (written by `headsurgeon collapse`: config.json, model.safetensors, README.md)
    to the Hugging Face Hub as model repo --repo, in one commit. The token comes from HF_TOKEN or
    `hf auth login` and is never printed; the card's usage code and model-index name the repo."""
    from .hub import DEFAULT_MESSAGE, describe, plan, push, validate_card

    p = plan(folder, repo_id, force=force, revision=revision, create_pr=create_pr)
    if not p.verified:
        click.secho(f"warning: pushing an unverified folder because of --force ({p.problem})", fg="yellow", err=True)
    if validate:
        validate_card(p, log=click.echo)
    if dry_run:
        click.echo(f"dry run: nothing is uploaded. `headsurgeon push` would send to {repo_id}"
                   f" ({'private' if private else 'public'} if created; {p.target}):")
        click.echo(describe(p))
        click.echo(f"commit message: {commit_message or DEFAULT_MESSAGE}")
        from huggingface_hub import get_token

        click.echo("token: " + ("found (not shown)" if get_token() else "none found; set HF_TOKEN or run `hf auth login`"))
        click.echo(f"--- {p.folder / 'README.md'} as it would read on the Hub ---" if p.card else "--- no model card ---")
        if p.card:
            click.echo(p.card, nl=False)
        return
    done = push(p, private=private, commit_message=commit_message, log=click.echo)
    click.echo(f"pushed to {done.repo_url}" + (f": pull request {done.pr_url}" if done.pr_url else "")
               + f" (commit {done.commit_url})")
    click.echo(f'load it with: timm.create_model("hf-hub:{repo_id}", pretrained=True)')


@main.command("train")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. --set data.batch_size=32 (repeatable).")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False), help="Run directory (default: the recipe's output, else runs/<recipe>-<time>).")
@click.option("--resume", is_flag=True, help="Continue the run in --output (default: the latest run of this recipe) from its last checkpoint.")
@click.option("--stop-after", type=int, default=None, metavar="N", help="Stop cleanly after N epochs of this call (continue later with --resume).")
@_one_line_errors
def train_cmd(recipe: str | None, sets: tuple[str, ...], output: str | None, resume: bool, stop_after: int | None) -> None:
    """Train a head tree with collaborative learning as RECIPE (YAML; default: the embedded digits
    recipe) says. Under `torchrun --nproc_per_node N -m headsurgeon train ...` it trains with DDP."""
    from . import recipe as R
    from .trace import allow_leaf_modules
    from .train import train

    flat, _ = R.load(recipe, sets)
    name = Path(recipe).stem if recipe else "digits"
    with allow_leaf_modules(flat.split.leaf_modules):  # the recipe names them: its tree: and --resume may import them
        try:
            s = train(flat, name=name, output=output, resume=resume, stop_after=stop_after, log=click.echo)
        except HeadsurgeonError as e:  # --resume of a finished run: done, not an error (a job script's rerun)
            if not (resume and " already finished its " in str(e)):
                raise
            if int(os.environ.get("RANK", "0")) == 0:
                click.echo(f"{e}: nothing to train; to train it longer, resume it with a larger epochs "
                           f"(e.g. --set epochs={2 * flat.epochs})")
            return
    if int(os.environ.get("RANK", "0")) == 0:
        b = s["heads"][s["best_head"]]
        state = "finished" if s["finished"] else f"stopped after epoch {s['epochs_done']}/{s['epochs']} (continue with --resume)"
        click.echo(f"{state}: best head {s['best_head']} (epoch {s['best_epoch']}) val top-1 {b['val_top1']:.2f}%, "
                   f"test top-1 {b['test_top1']:.2f}%; ensemble test top-1 {s['ensemble']['test_top1']:.2f}%; "
                   f"{s['wall_time_s']:.0f}s")
        click.echo(f"wrote {s['run']} (summary.json, metrics.jsonl, curves.png, best/, last/); "
                   f"collapse the best head with: headsurgeon collapse {s['run']}")


@main.command("recipe")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
@click.option("--schema", is_flag=True, help="Print the JSON Schema of recipe files instead (for editors).")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
@click.option("--check", "check_tree", is_flag=True, help="Also build the recipe's model and tree (no data): refuses an "
              "unknown model, split point, fan-out or leaf module in seconds, before a long job.")
@_one_line_errors
def recipe_cmd(recipe: str | None, sets: tuple[str, ...], schema: bool, output: str | None, check_tree: bool) -> None:
    """Check RECIPE (with --set overrides) and print it resolved, every key with its value, as
    `headsurgeon train` would run it; or, with --schema, the JSON Schema that editors use to complete
    and check recipe files (`# yaml-language-server: $schema=...`)."""
    import yaml

    from . import recipe as R

    if schema and (check_tree or recipe or sets):
        raise HeadsurgeonError("--schema prints the schema of every recipe; leave out RECIPE, --set and --check")
    if output:
        from .storage import check_file_output

        check_file_output(output)  # a FIFO, device or folder: one line, before the work (write_text checks again)
    if schema:
        text = R.schema_text()
    else:
        flat = R.load(recipe, sets)[0]
        if check_tree:
            from .trace import allow_leaf_modules
            from .train import check

            with allow_leaf_modules(flat.split.leaf_modules):  # a recipe's tree: may use the leaf modules it names
                tree = check(flat)
            click.echo(f"checked: {tree.spec.label} split at {','.join(tree.spec.at) or 'nothing'} into "
                       f"{tree.num_heads} heads, cut verified against the eager model", err=True)
        text = yaml.safe_dump(flat.nested(), sort_keys=False)
    if output:
        from .storage import check_writable, os_error, write_text

        parent = Path(output).absolute().parent
        check_writable(parent)  # -o some_file/x.yaml, a read-only folder: one line
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(e, output) from None
        write_text(output, text)  # atomic: a full disk leaves no half-written recipe
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=False)


@main.command("compare")
@click.argument("recipe", required=False, type=click.Path())
@click.option("--variant", "variants", multiple=True, metavar="NAME", help="A variant to compare with the single model "
              f"(repeatable or comma-separated): {', '.join(BUILTIN)}, or a name from --variants.")
@click.option("--variants", "variants_file", default=None, type=click.Path(dir_okay=False),
              help="YAML file of your own variants: name -> recipe overrides (a mapping of keys, or KEY=VALUE strings).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds, comma-separated; each seed is one paired "
              "replicate (its data order, init and noise draw are shared by every variant).")
@click.option("--noise", default="0", show_default=True, help="Label-noise fractions of the training labels, comma-separated.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe key for every cell (repeatable).")
@click.option("--jobs", type=int, default=1, show_default=True, help="Cells at a time (local workers: cores/jobs threads "
              "each, one GPU each where there are several; with slurm: jobs in the queue at once).")
@click.option("--executor", type=click.Choice(["process", "submitit-local", "slurm"]), default="process", show_default=True,
              help="process: local worker processes; slurm: each cell a Slurm job through submitit; submitit-local: "
                   "the same job path on this machine.")
@click.option("--slurm-partition", default=None, help="Slurm partition of the cells' jobs.")
@click.option("--slurm-gpus", type=int, default=None, help="GPUs per cell's Slurm job (default 0).")
@click.option("--slurm-cpus", type=int, default=None, help="CPUs per cell's job (default 4).")
@click.option("--slurm-time", type=int, default=None, metavar="MINUTES", help="Time limit per cell's job (default 1440).")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False),
              help="Study folder (default runs/compare-<time>); rerun into it to add seeds or variants.")
@click.option("--report", "report_only", is_flag=True, help="Re-print the report of the study folder given as the argument.")
@_one_line_errors
def compare_cmd(recipe: str | None, variants: tuple[str, ...], variants_file: str | None, seeds: str, noise: str,
                sets: tuple[str, ...], jobs: int, executor: str, slurm_partition: str | None, slurm_gpus: int | None,
                slurm_cpus: int | None, slurm_time: int | None, output: str | None, report_only: bool) -> None:
    """Does collaborative training help on RECIPE's data, by how much, ± what? Train the single model and
    every --variant with the same data order, noise draw and budget, one cell per (variant, noise, seed);
    report the paired gain ± SE of the deployed head, the final epoch and the ensemble, McNemar on the test
    predictions, the regime the single model's fit implies, and the collapse command for the winner.
    Resumable: a rerun runs only missing (or failed) cells. `headsurgeon compare DIR --report` re-prints."""
    import time

    from .compare import compare, write_report

    if report_only:
        if not recipe or output or variants or variants_file or sets:
            raise HeadsurgeonError("--report re-prints a finished study: give only its folder, `headsurgeon compare DIR --report`")
        write_report(recipe, log=click.echo)
        return
    names = [v.strip() for item in variants for v in item.split(",") if v.strip()]
    if not names:
        raise HeadsurgeonError("name at least one --variant to compare with the single model, e.g. --variant hier4 "
                               f"(built-in: {', '.join(BUILTIN)})")
    slurm = {"partition": slurm_partition, "gpus": slurm_gpus, "cpus": slurm_cpus, "timeout_min": slurm_time}
    if executor != "slurm" and any(v is not None for v in slurm.values()):
        raise HeadsurgeonError("--slurm-* options are for --executor slurm")
    res = compare(recipe, names, output or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}", seeds=seeds, noise=noise,
                  sets=sets, variants_file=variants_file, jobs=jobs, executor=executor, slurm=slurm, log=click.echo)
    click.echo(res["text"], nl=False)


@main.command("demo")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False),
              help="Where the study, the collapsed model and the plot go (default runs/demo-<time>; must be empty or absent).")
@click.option("--epochs", type=int, default=None, help="Epochs of every cell (default 40, as in the study behind the demo).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Paired seeds (each trains the single model and the 4 instances).")
@_one_line_errors
def demo_cmd(output: str, epochs: int | None, seeds: str) -> None:
    """The main job on the embedded digits data, in the setup the evidence in docs/paper.md favours:
    `headsurgeon compare` of 4 independent instances of a small timm ResNet trained collaboratively
    against the single model, 20 % label noise, over paired seeds; the paired gain ± SE, McNemar and a
    plot; the winner's validation-chosen head collapsed, reloaded with timm in a fresh process, and the
    command to push it."""
    import time

    from .compare import parse_seeds
    from .demo import demo

    demo(output or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}", epochs=epochs, seeds=parse_seeds(seeds), log=click.echo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
