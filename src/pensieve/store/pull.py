"""Pull a model into the store from Hugging Face or a plain HTTP(S) URL.

    hf.co/owner/repo[:QUANT]          a GGUF in the repo, chosen by quantisation (Q4_K_M default)
    hf.co/owner/repo/path/file.gguf   one file in the repo
    https://host/file.gguf[#sha256=H] any URL; the fragment (or `sha256=`) pins the digest

Every request goes through store/fetch.py under the address policy of store/netguard.py: only
public addresses unless the `pull_allow` setting names more, checked at each redirect, and the
connection goes to the checked address. That includes Hugging Face: `HF_ENDPOINT` (default
https://huggingface.co) is checked like any URL, and the two calls a pull makes there, the repo
tree (with each file's LFS sha256) and the file's `resolve` URL (which redirects to a CDN), are
sent by fetch.py. `huggingface_hub` supplies what needs no network: the repo id check,
`hf_hub_url` and `get_token` (HF_TOKEN or the stored login). Its own HTTP client is not used:
it is one process-wide client with redirects on, replaceable only globally, and it makes side
calls of its own. The bytes go to `partial/` and a second pull resumes with an HTTP Range
request. Nothing becomes visible before the GGUF checks and the sha256 pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from pensieve import __version__
from pensieve.errors import InvalidRequest, PensieveError
from pensieve.store.fetch import guarded_get
from pensieve.store.names import parse_digest, parse_name
from pensieve.store.netguard import NetPolicy, PullRefused
from pensieve.store.store import Manifest, ModelDefaults, ModelStore, sha256_file

log = logging.getLogger("pensieve.store")

HF_PREFIXES = ("hf.co/", "huggingface.co/")
DEFAULT_QUANT = "Q4_K_M"
_CHUNK = 1 << 20
_SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
_TIMEOUT = httpx.Timeout(30.0, read=120.0)
_USER_AGENT = f"pensieve/{__version__}"


class PullFailed(PensieveError):
    """The remote end failed (network, HTTP status); what was downloaded so far is kept."""

    status_code = 502
    error_type = "server_error"


@dataclass(frozen=True, slots=True)
class PullProgress:
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


ProgressFn = Callable[[PullProgress], None]


@dataclass(frozen=True, slots=True)
class PullSource:
    url: str
    name: str
    expected_digest: str | None = None
    expected_size: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


def pull(store: ModelStore, spec: str, *, name: str | None = None, sha256: str | None = None,
         progress: ProgressFn | None = None, policy: NetPolicy | None = None) -> Manifest:
    """Download, check and store a model; return its manifest. `policy` says where the pull
    may connect (default: public addresses only)."""
    policy = policy or NetPolicy()
    report = progress or (lambda _p: None)
    report(PullProgress("pulling manifest"))
    source = resolve_source(spec, name=name, sha256=sha256, policy=policy)
    parse_name(source.name)  # refuse a bad name before downloading
    partial = store.partial / f"pull-{hashlib.sha256(source.url.encode()).hexdigest()[:32]}"
    store.partial.mkdir(parents=True, exist_ok=True)
    (store.root / "locks").mkdir(exist_ok=True)
    with _exclusive(store.root / "locks" / f"{partial.name}.lock", spec):
        return _fetch_and_store(store, spec, source, partial, report, policy)


def check_source(spec: str, policy: NetPolicy) -> None:
    """Refuse a pull whose first request the policy refuses (a URL's host, or HF_ENDPOINT)
    without sending anything; later hops are checked as the pull reaches them. For routes that
    answer before the pull runs (a streamed /api/pull)."""
    spec = spec.strip()
    if _is_hf(spec):
        _check_hf_endpoint(_hf_endpoint(), policy)
        return
    try:
        policy.check(_url_source(spec, None, None).url)
    except httpx.HTTPError as exc:
        raise PullFailed(f"Cannot pull {spec}: {exc}") from exc


@contextlib.contextmanager
def _exclusive(lock_path: Path, spec: str) -> Iterator[None]:
    """One pull of a URL at a time (across processes): both would write the same partial."""
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidRequest(f"{spec} is already being pulled; wait for that pull to "
                                 "finish.", code="pull_in_progress") from None
        yield


def _fetch_and_store(store: ModelStore, spec: str, source: PullSource, partial: Path,
                     report: ProgressFn, policy: NetPolicy) -> Manifest:
    model = parse_name(source.name)
    digest_label = f"sha256:{source.expected_digest}" if source.expected_digest else None
    shown = source.expected_digest[:12] if source.expected_digest \
        else Path(unquote(urlsplit(source.url).path)).name
    status = f"pulling {shown}"
    download(source, partial, lambda done, total: report(
        PullProgress(status, digest_label, total, done)), policy)
    report(PullProgress("verifying sha256 digest"))
    digest = sha256_file(partial)
    try:
        store.commit_blob(partial, digest, source.expected_digest)
    except InvalidRequest:
        partial.unlink(missing_ok=True)  # corrupt: the next pull starts over
        raise
    report(PullProgress("writing manifest"))
    manifest = Manifest(model, digest, store.blob_path(digest).stat().st_size, spec,
                        defaults=ModelDefaults())
    store.write_manifest(manifest)
    report(PullProgress("success"))
    log.info("pulled %s as %s (sha256:%s)", spec, model, digest[:12])
    return manifest


def resolve_source(spec: str, *, name: str | None = None, sha256: str | None = None,
                   policy: NetPolicy | None = None) -> PullSource:
    spec = spec.strip()
    expected = parse_digest(f"sha256:{sha256}" if ":" not in sha256 else sha256) \
        if sha256 else None
    if _is_hf(spec):
        return _hf_source(spec.split("/", 1)[1], name, expected, policy or NetPolicy())
    return _url_source(spec, name, expected)


def _is_hf(spec: str) -> bool:
    lowered = spec.lower()
    if lowered.startswith(HF_PREFIXES):
        return True
    if lowered.startswith(("http://", "https://")):
        return False
    raise InvalidRequest(f"Cannot pull {spec!r}: give hf.co/owner/repo[:QUANT], "
                         "hf.co/owner/repo/file.gguf or an http(s) URL.", param="model")


def _url_source(spec: str, name: str | None, expected: str | None) -> PullSource:
    url, _, fragment = spec.partition("#")
    if fragment.startswith("sha256="):
        expected = expected or parse_digest("sha256:" + fragment.removeprefix("sha256="))
    parts = urlsplit(url)
    if not parts.hostname:
        raise InvalidRequest(f"Invalid URL {spec!r}.", param="model")
    stem = Path(unquote(parts.path)).name.removesuffix(".gguf")
    return PullSource(url, name or _sanitize(stem) or "model", expected)


@dataclass(frozen=True, slots=True)
class _HfFile:
    size: int | None
    sha256: str | None  # the LFS oid; None for files kept in git


def _hf_source(rest: str, name: str | None, expected: str | None,
               policy: NetPolicy) -> PullSource:
    from huggingface_hub import get_token, hf_hub_url
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    endpoint = _hf_endpoint()
    repo_part, _, quant = rest.partition(":")
    pieces = repo_part.strip("/").split("/")
    repo_id, path_in_repo = "/".join(pieces[:2]), "/".join(pieces[2:])
    try:
        if len(pieces) < 2 or not all(pieces):
            raise HFValidationError("expected owner/repo")
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InvalidRequest(f"Invalid Hugging Face model {rest!r}: {exc}",
                             param="model") from None
    _check_hf_endpoint(endpoint, policy)
    token = get_token()
    headers = {"User-Agent": _USER_AGENT, **({"Authorization": f"Bearer {token}"}
                                            if token else {})}
    files = _hf_tree(endpoint, repo_id, headers, policy)
    filename = path_in_repo or _pick_quant(repo_id, list(files), quant or DEFAULT_QUANT)
    entry = files.get(filename)
    if entry is None:
        raise InvalidRequest(f"{repo_id} has no file {filename!r}.", param="model")
    expected = expected or (parse_digest("sha256:" + entry.sha256) if entry.sha256 else None)
    tag = quant or (_sanitize(Path(filename).stem) if path_in_repo else "latest")
    default_name = f"hf.co/{repo_id}:{tag}".lower()
    url = hf_hub_url(repo_id, filename, endpoint=endpoint)
    return PullSource(url, name or default_name, expected, entry.size, headers)


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _check_hf_endpoint(endpoint: str, policy: NetPolicy) -> None:
    try:
        policy.check(endpoint)
    except PullRefused as exc:
        raise PullRefused(f"HF_ENDPOINT is {endpoint}. {exc.message}") from None
    except httpx.HTTPError as exc:
        raise PullFailed(f"Could not reach HF_ENDPOINT {endpoint}: {exc}") from exc


def _hf_tree(endpoint: str, repo_id: str, headers: dict[str, str],
             policy: NetPolicy) -> dict[str, _HfFile]:
    """The repo's files (GET /api/models/<repo>/tree/main, pages linked by `Link: rel=next`)."""
    files: dict[str, _HfFile] = {}
    page: str | None = f"{endpoint}/api/models/{repo_id}/tree/main?recursive=true"
    while page is not None:
        try:
            entries, page = _hf_tree_page(page, headers, policy)
        except (httpx.HTTPError, ValueError) as exc:
            raise PullFailed(f"Could not list {repo_id} on {endpoint}: {exc}") from exc
        for entry in entries:
            if isinstance(entry, dict) and entry.get("type") == "file" and entry.get("path"):
                lfs, size = entry.get("lfs"), entry.get("size")
                sha256 = lfs.get("oid") if isinstance(lfs, dict) else None
                files[str(entry["path"])] = _HfFile(size if isinstance(size, int) else None,
                                                    sha256 if isinstance(sha256, str) else None)
    return files


def _hf_tree_page(url: str, headers: dict[str, str],
                  policy: NetPolicy) -> tuple[list[object], str | None]:
    with guarded_get(url, policy, headers=headers, timeout=_TIMEOUT) as response:
        if response.status_code != 200:
            hint = " (a private or gated repo needs HF_TOKEN)" \
                if response.status_code in (401, 403, 404) else ""
            raise ValueError(f"HTTP {response.status_code}{hint}")
        response.read()
        entries = response.json()
        following = response.links.get("next", {}).get("url")
    if not isinstance(entries, list):
        raise ValueError("the tree is not a JSON list")
    return entries, str(httpx.URL(url).join(following)) if following else None


def _pick_quant(repo_id: str, paths: list[str], quant: str) -> str:
    ggufs = [p for p in paths if p.lower().endswith(".gguf") and "mmproj" not in p.lower()]
    wanted = quant.upper()
    matches = [p for p in ggufs
               if wanted in re.split(r"[-_.]", Path(p).name.upper().removesuffix(".GGUF"))
               or Path(p).name.upper().removesuffix(".GGUF").endswith(wanted)]
    if not matches:
        raise InvalidRequest(f"{repo_id} has no {quant} GGUF file; it has: "
                             f"{', '.join(ggufs) or 'no GGUF files'}.", param="model")
    single = [p for p in matches if not _SPLIT_RE.search(p)]
    if not single:
        raise InvalidRequest(f"{repo_id}'s {quant} model is split into several files, "
                             "which Pensieve does not pull yet.", param="model")
    return sorted(single, key=len)[0]


def _sanitize(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:80]


def download(source: PullSource, dest: Path, progress: Callable[[int, int], None],
             policy: NetPolicy) -> None:
    """GET the URL into `dest`, resuming from what `dest` already holds (HTTP Range); every
    hop is checked by `policy` (store/fetch.py)."""
    offset = dest.stat().st_size if dest.exists() else 0
    if source.expected_size is not None and offset > source.expected_size:
        dest.unlink()
        offset = 0
    if source.expected_size is not None and offset == source.expected_size:
        return
    headers = {**source.headers, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        log.info("resuming %s at byte %d", source.url, offset)
    try:
        with guarded_get(source.url, policy, headers=headers, timeout=_TIMEOUT) as response:
            if response.status_code == 416 and offset:  # nothing left past what we hold
                return
            if response.status_code not in (200, 206):
                raise PullFailed(f"{source.url} answered HTTP {response.status_code}")
            if response.status_code == 200:
                offset = 0  # the server ignored the range: start over
            total = offset + int(response.headers.get("Content-Length", 0) or 0)
            _write_body(response, dest, offset, total, progress)
    except httpx.HTTPError as exc:
        raise PullFailed(f"Download of {source.url} was interrupted ({exc}); pull again to "
                         "resume where it stopped.") from exc


def _write_body(response: httpx.Response, dest: Path, offset: int, total: int,
                progress: Callable[[int, int], None]) -> None:
    done = offset
    with open(dest, "ab" if offset else "wb") as out:
        for chunk in response.iter_bytes(_CHUNK):
            out.write(chunk)
            done += len(chunk)
            progress(done, max(total, done))
        out.flush()
        os.fsync(out.fileno())
