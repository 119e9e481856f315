"""Push a collapsed model folder to the Hugging Face Hub with huggingface_hub.

``create_repo(exist_ok=True)`` (and ``create_branch`` for a new ``--revision``), then one
``create_commit`` of ``CommitOperationAdd``s: every file from the folder as it is on disk, and the
card from memory, as it reads under the repo (huggingface_hub picks the regular, LFS or Xet
transfer per file). Before any network call the folder is checked to be what ``collapse`` wrote
(its card's sha256 of ``config.json`` and ``model.safetensors`` still match), unless forced, and
the repo id and revision are checked: :func:`plan` does every local check, so ``--dry-run`` refuses
exactly what the real push would refuse before contacting the Hub.
The token comes from ``huggingface_hub.get_token()`` (``HF_TOKEN`` or the saved login) and is only
ever handed to huggingface_hub: it is never printed, logged or written, and it is scrubbed from
any error text. Every failure is a one-line :class:`HeadsurgeonError`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .card import CARD_FILE, MARKER, VERIFIED_FILES, for_repo, read_front_matter
from .errors import HeadsurgeonError, first_line
from .storage import human, sha256_file

DEFAULT_MESSAGE = "Upload model collapsed by headsurgeon"
WRITTEN = (*VERIFIED_FILES, CARD_FILE)  # every file `headsurgeon collapse` (export + its card) writes


@dataclass
class Plan:
    """What a push would upload: files (relative posix paths), their sizes, the card as it will read."""

    folder: Path
    repo_id: str
    files: list[str]
    sizes: dict[str, int]
    card: str | None
    verified: bool
    problem: str | None = None
    notes: list[str] = field(default_factory=list)
    revision: str | None = None  # None: main
    create_pr: bool = False

    @property
    def target(self) -> str:
        """Where the commit goes, in words."""
        if self.create_pr:
            return "a new pull request against main"
        if self.revision and self.revision.startswith("refs/pr/"):
            return f"pull request #{self.revision.rsplit('/', 1)[1]} ({self.revision})"
        return f"branch {self.revision or 'main'}" + (" (created from main if missing)" if self.revision not in
                                                      (None, "main") else "")


def check_repo_id(repo_id: str) -> None:
    """``namespace/name`` with the Hub's characters; the namespace is required so the card and
    ``hf-hub:`` names are complete."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HeadsurgeonError(f"invalid repo id '{repo_id}': {first_line(e)}") from None
    if "/" not in repo_id:
        raise HeadsurgeonError(f"invalid repo id '{repo_id}': give it as NAMESPACE/NAME (e.g. your-user/{repo_id})")


_PR_REF = re.compile(r"refs/pr/[1-9][0-9]*")


def check_revision(revision: str | None, create_pr: bool = False) -> None:
    """``--revision``: a branch name git accepts (``git check-ref-format --branch``) or an open pull
    request (``refs/pr/N``); not a commit sha (a commit needs a branch to go on); with ``--create-pr``
    none but main (the Hub opens pull requests against main)."""
    if revision is None:
        return
    bad = _ref_problem(revision)
    if bad:
        raise HeadsurgeonError(f"invalid --revision '{revision}': {bad}; give a branch name such as dev or v1.0")
    if create_pr and revision != "main":
        raise HeadsurgeonError(f"--create-pr opens a pull request against main; leave out --revision '{revision}' "
                               f"(or push to the branch without --create-pr)")


def _ref_problem(ref: str) -> str | None:
    """Why git would refuse ``ref`` as a branch name (the rules of ``git check-ref-format``), else None."""
    if ref.startswith("refs/"):
        return None if _PR_REF.fullmatch(ref) else "the only refs/ revisions are pull requests, refs/pr/N"
    if re.fullmatch(r"[0-9a-f]{40}", ref):
        return "that is a commit sha; a push needs a branch to commit to"
    if not ref or ref == "@":
        return "it is empty" if not ref else "'@' is not a branch name"
    if any(ord(c) < 32 or ord(c) == 127 or c in " ~^:?*[\\" for c in ref):
        return "git branch names cannot contain spaces, control characters or any of ~ ^ : ? * [ \\"
    if ".." in ref or "@{" in ref or "//" in ref:
        return "git branch names cannot contain '..', '@{' or '//'"
    if ref.startswith(("-", "/")) or ref.endswith(("/", ".")):
        return "git branch names cannot start with '-' or '/' nor end with '/' or '.'"
    if any(part.startswith(".") or part.endswith(".lock") for part in ref.split("/")):
        return "no part of a git branch name may start with '.' or end with '.lock'"
    return None


def _list_files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` except hidden ones (``.git``, ``.cache``, editor files).

    A symbolic link (to a file or a folder) is refused, with or without ``--force``: huggingface_hub
    uploads what a link points to, which can be outside the folder (a link to the Hugging Face token
    file would publish the token). So is anything else that is not a regular file or folder (a FIFO,
    socket or device): ``collapse`` writes none. Folders are walked without following links.
    """
    out = []

    def walk(d: Path) -> None:
        with os.scandir(d) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                if e.name.startswith("."):
                    continue
                path = Path(e.path)
                if e.is_symlink():
                    raise HeadsurgeonError(f"'{path}' is a symbolic link; push uploads only the files `headsurgeon "
                                           f"collapse` wrote, never what a link points to: replace it with the file "
                                           f"itself or remove it")
                if e.is_dir(follow_symlinks=False):
                    walk(path)
                elif e.is_file(follow_symlinks=False):
                    out.append(path.relative_to(folder).as_posix())
                else:
                    raise HeadsurgeonError(f"'{path}' is not a regular file (a FIFO, socket or device), which "
                                           f"`headsurgeon collapse` never writes; remove it")

    try:
        walk(folder)
    except OSError as e:
        raise HeadsurgeonError(f"cannot read '{folder}' ({e.strerror or e}); give the output of `headsurgeon "
                               f"collapse`") from None
    return sorted(out)


def verify(folder: Path) -> str | None:
    """None if ``folder`` is exactly what ``collapse`` wrote, else the reason it is not.
    Raises for a symbolic link or a non-regular file in it (:func:`_list_files`)."""
    extra = [f for f in _list_files(folder) if f not in WRITTEN]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"it holds {extra[0]}{more}, which `headsurgeon collapse` does not write; remove it"
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        return f"it has no {CARD_FILE} model card"
    meta = read_front_matter(card_path.read_text(encoding="utf-8", errors="replace"))
    block = (meta or {}).get(MARKER)
    if not isinstance(block, dict) or not isinstance(block.get("files"), dict):
        return f"its {CARD_FILE} has no '{MARKER}' block in the front matter"
    for name in VERIFIED_FILES:
        want = block["files"].get(name)
        if not (folder / name).is_file():
            return f"{name} is missing"
        if not want or sha256_file(folder / name) != want:
            return f"{name} differs from the file `headsurgeon collapse` wrote (sha256 mismatch)"
    try:
        arch = json.loads((folder / "config.json").read_text()).get("architecture")
    except (json.JSONDecodeError, AttributeError):
        return "config.json is not a timm config"
    if arch != block.get("architecture"):
        return f"config.json names '{arch}' but the card '{block.get('architecture')}'"
    return None


def plan(folder: str | os.PathLike, repo_id: str, force: bool = False, revision: str | None = None,
         create_pr: bool = False) -> Plan:
    """Every check a push makes before it contacts the Hub (the repo id, the revision, the folder);
    raises unless the folder is verified or ``force``. ``--dry-run`` stops after this."""
    check_repo_id(repo_id)
    check_revision(revision, create_pr)
    folder = Path(folder)
    if not folder.is_dir():
        raise HeadsurgeonError(f"'{folder}' is not a directory; give the output of `headsurgeon collapse`")
    files = _list_files(folder)
    if not files:
        raise HeadsurgeonError(f"'{folder}' is empty; nothing to push")
    problem = verify(folder)
    if problem and not force:
        raise HeadsurgeonError(f"'{folder}' is not a verified `headsurgeon collapse` output ({problem}); "
                               f"collapse again, or pass --force to push it anyway")
    card = None
    if (folder / CARD_FILE).is_file():
        card = for_repo((folder / CARD_FILE).read_text(encoding="utf-8"), repo_id)
    sizes = {f: (folder / f).stat().st_size for f in files}
    return Plan(folder, repo_id, files, sizes, card, verified=problem is None, problem=problem,
                revision=None if revision in (None, "main") else revision, create_pr=create_pr)


def operations(p: Plan) -> list:
    """One ``CommitOperationAdd`` per file: the folder's files as they are on disk (byte-identical),
    the card from memory as it reads under the repo."""
    from huggingface_hub import CommitOperationAdd

    if _list_files(p.folder) != p.files:  # once more just before the upload: a link swapped in since plan()
        raise HeadsurgeonError(f"'{p.folder}' changed since it was checked; run push again")
    return [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=p.card.encode("utf-8"))
            if rel == CARD_FILE and p.card is not None else
            CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p.folder / rel)) for rel in p.files]


def validate_card(p: Plan, log: Callable[[str], None] = print) -> bool:
    """Ask the Hub to validate the card's metadata (``POST /api/validate-yaml``, the check behind
    ``ModelCard.validate``, which would send the card re-serialised from its parsed data; this sends
    the exact text that will be pushed). True if the Hub passed it, printing its warnings; False, with
    one line saying why, where it was not asked (no card, ``HF_HUB_OFFLINE``, the Hub unreachable);
    a card the Hub rejects raises, with the Hub's reasons."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if p.card is None:
        log("card metadata not validated: the folder has no README.md")
        return False
    if constants.HF_HUB_OFFLINE:
        log("card metadata not validated: offline (HF_HUB_OFFLINE is set); unset it to let the Hub check the card")
        return False
    endpoint = constants.ENDPOINT
    token = None
    try:
        from huggingface_hub import get_token

        token = get_token()
        response = get_session().post(f"{endpoint}/api/validate-yaml", json={"content": p.card, "repoType": "model"},
                                      headers=build_hf_headers(token=token or False))
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code == 400:
            reasons = "; ".join(str(e.get("message", e)) for e in body.get("errors", [])) or response.text[:200]
            raise HeadsurgeonError(f"the Hub rejected the card's metadata: {' '.join(reasons.split())}")
        hf_raise_for_status(response)
    except HeadsurgeonError:
        raise
    except Exception as e:
        if isinstance(e, _transport_errors()):
            log(f"card metadata not validated: cannot reach the Hub at {endpoint} ({type(e).__name__}: {first_line(e)})")
            return False
        message = _explain(e, endpoint, p.repo_id, p.revision) or f"{type(e).__name__}: {first_line(e)}"
        raise HeadsurgeonError(f"card validation failed: {message}".replace(token, "***") if token else
                               f"card validation failed: {message}") from None
    for w in (body.get("warnings") or []) if isinstance(body, dict) else []:
        log(f"card metadata warning from the Hub: {w.get('message', w) if isinstance(w, dict) else w}")
    log(f"card metadata: valid (checked by the Hub at {endpoint})")
    return True


@dataclass
class Pushed:
    repo_url: str
    commit_url: str
    pr_url: str | None


def push(p: Plan, *, private: bool = False, commit_message: str | None = None,
         log: Callable[[str], None] = print) -> Pushed:
    """Create the repo if needed (and the branch of ``p.revision``) and commit the planned files in one commit."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise HeadsurgeonError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    api = HfApi()
    with _scrubbed(token, api.endpoint, p.repo_id, p.revision):
        url = api.create_repo(p.repo_id, token=token, private=private, exist_ok=True)
        repo_id = getattr(url, "repo_id", None) or p.repo_id
        if p.revision and not p.revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=p.revision, token=token, exist_ok=True)
        log(f"uploading {len(p.files)} files ({human(sum(p.sizes.values()), 'B')}) to {repo_id}, {p.target}")
        info = api.create_commit(repo_id=repo_id, operations=operations(p), token=token, revision=p.revision,
                                 create_pr=p.create_pr, commit_message=commit_message or DEFAULT_MESSAGE)
    return Pushed(str(url), str(info.commit_url), getattr(info, "pr_url", None))


class _scrubbed:
    """Turn huggingface_hub / transport failures into one line without the token."""

    def __init__(self, token: str, endpoint: str, repo_id: str, revision: str | None):
        self.token, self.endpoint, self.repo_id, self.revision = token, endpoint, repo_id, revision

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, (HeadsurgeonError, KeyboardInterrupt)):
            return False
        message = _explain(exc, self.endpoint, self.repo_id, self.revision)
        if message is None:  # not foreseen: still one line, still without the token
            message = f"push to '{self.repo_id}' failed: {type(exc).__name__}: {first_line(exc)}"
        raise HeadsurgeonError(message.replace(self.token, "***")) from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    out: list[type[BaseException]] = [OSError]
    for mod in ("httpx2", "httpx"):
        try:
            out.append(__import__(mod).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def _explain(exc: BaseException, endpoint: str, repo_id: str, revision: str | None) -> str | None:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import HFValidationError

    if isinstance(exc, HFValidationError):
        return f"invalid repo id '{repo_id}': {first_line(exc)}"
    if isinstance(exc, ValueError) and str(exc).startswith("Invalid metadata in README.md"):  # create_commit's check
        reasons = "; ".join(ln.strip("- ").strip() for ln in str(exc).splitlines()[1:] if ln.strip())
        return f"the Hub rejected the card's metadata: {reasons or first_line(exc)}"
    if isinstance(exc, HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        server = getattr(exc, "server_message", None) or ""
        server = f" ({' '.join(server.split())[:160]})" if server else ""
        if status == 401:
            return (f"the Hub at {endpoint} rejected the token (401 Unauthorized){server}; "
                    f"set HF_TOKEN to a valid token or run `hf auth login`")
        if status == 403:
            return (f"the token may not write to '{repo_id}' (403 Forbidden){server}; it needs write access to the "
                    f"'{repo_id.split('/')[0]}' namespace")
        if isinstance(exc, RevisionNotFoundError):
            return f"revision '{revision}' does not exist in '{repo_id}'{server}"
        if isinstance(exc, RepositoryNotFoundError):
            return f"repository '{repo_id}' was not found on {endpoint} and could not be created{server}"
        return f"the Hub at {endpoint} answered {status or 'an error'}: {first_line(exc)}"
    if isinstance(exc, _transport_errors()):
        return f"cannot reach the Hub at {endpoint}: {first_line(exc)} ({type(exc).__name__})"
    return None


def describe(p: Plan) -> str:
    """The dry-run listing (no card)."""
    width = max(len(f) for f in p.files)
    rows = [f"  {f:<{width}}  {human(p.sizes[f], 'B'):>9}" for f in p.files]
    state = "verified collapse output" if p.verified else f"NOT verified ({p.problem}); pushed because of --force"
    return "\n".join([f"{len(p.files)} files ({human(sum(p.sizes.values()), 'B')}) from {p.folder} [{state}]:", *rows])
