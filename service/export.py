"""``mend export``: the model at one journal version, as a Hugging Face directory or a PEFT adapter.

Reads the journal from ``MEND_REDIS_URL``, or from the embedded data dir (``MEND_DATA_DIR``: its
AOF is loaded by a private redis-server, or read through the running service's own one); no HTTP
server is needed and nothing is written to the journal. The model is loaded and its stack built as
the service does it (same loader, same targets, hence the same fingerprint and key namespace); the
active edits at version N are rebuilt by ``EditStack`` and the targets' sha256 must equal the one
the journal recorded at N before anything is written. Output goes to a temporary sibling directory
that is renamed into place at the end, so a refused or failed export leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
import torch
from pydantic import ValidationError

from editor_core.delta import DeltaFormatError, EditDelta
from editor_core.export import error_table, lora_factors, save_adapter, save_model_dir
from editor_core.models import ModelNotFoundError
from editor_core.stack import EditStack
from editor_core.targets import Target
from service import redis_leftover
from service.journal import Head, Journal, utc_now
from service.methods import service_stack_targets
from service.redis_conn import connect
from service.redis_embedded import EmbeddedRedis, EmbeddedRedisError
from service.runtime import Loader, default_loader
from service.settings import Settings

log = logging.getLogger(__name__)

EDITS_JSON = "edits.json"
EXPORT_FORMAT = "mend-export"
FORMAT_VERSION = 1
# Settings that decide which model, which stack and which journal: flags of `mend export` too.
SETTING_FLAGS = ("model", "device", "dtype", "model_cache", "editor_dir", "redis_url", "data_dir", "redis_prefix")


class ExportError(RuntimeError):
    """The export was refused; nothing was written."""


@dataclass
class VersionState:
    """The journal at one version: the active edit ops in order and the sha256 recorded there."""

    version: int
    sha256: str | None  # targets after the op at ``version``; None for version 0 (the base)
    active: list[dict]  # stream fields of each active edit op, oldest first
    blobs: list[bytes]  # their delta bytes, same order
    rolled_back: list[dict]  # {"edit_id", "version"} of the rollbacks at or before ``version``
    head: Head


def service_targets(model, settings: Settings) -> list[Target]:
    """The targets of the service's EditStack, chosen by the same calls ``service.runtime`` makes."""
    return service_stack_targets(model, settings)


# ---- the journal at a version ---------------------------------------------------------------------
def journal_at(journal: Journal, version: int | None) -> VersionState:
    """Active edits, delta bytes and recorded sha256 at ``version`` (None: the head); refuses gaps."""
    head = journal.head()
    if version is None:
        version = head.version
    if not 0 <= version <= head.version:
        raise ExportError(f"unknown version {version}: the journal {journal.ns} is at version {head.version} "
                          f"(exportable: 0..{head.version})")
    ops: list[dict] = []
    for op in journal.ops():
        v = int(op["version"])
        if v > version:
            break
        if v != len(ops) + 1:
            raise ExportError(f"journal entries missing: version {len(ops) + 1} is not in the stream "
                              f"{journal.key('ops')} (it jumps to {v}); version {version} cannot be rebuilt")
        ops.append(op)
    if len(ops) != version:
        raise ExportError(f"journal entries missing: the stream {journal.key('ops')} ends at version {len(ops)}, "
                          f"the head says {head.version}; version {version} cannot be rebuilt")
    edits: dict[str, dict] = {}
    rolled_back = []
    for op in ops:
        if op["op"] == "edit":
            edits[op["edit_id"]] = op
        elif op["op"] == "rollback":
            if edits.pop(op["edit_id"], None) is None:
                raise ExportError(f"journal entries missing: version {op['version']} rolls back edit "
                                  f"{op['edit_id']}, which no earlier op applied")
            rolled_back.append({"edit_id": op["edit_id"], "version": int(op["version"])})
    active = list(edits.values())
    blobs = journal.client.mget([journal.key("delta", op["edit_id"]) for op in active]) if active else []
    missing = [op["edit_id"] for op, b in zip(active, blobs, strict=True) if b is None]
    if missing:
        raise ExportError(f"journal entries missing: no delta blob for active edits {missing} at version {version}")
    for op, blob in zip(active, blobs, strict=True):
        want = op.get("delta_sha256")
        if want and hashlib.sha256(blob).hexdigest() != want:
            raise ExportError(f"journal entry corrupt: the delta blob of edit {op['edit_id']} does not hash to "
                              f"the delta_sha256 its op recorded")
    sha = ops[-1]["sha256"] if ops else None
    return VersionState(version, sha, active, list(blobs), rolled_back, head)


def other_fingerprints(client: redis.Redis, prefix: str, fingerprint: str) -> list[str]:
    """Fingerprints with a journal under ``prefix`` other than ``fingerprint`` (diagnostics)."""
    found = set()
    for key in client.scan_iter(match=f"{prefix}:*:head", count=500):
        fp = key.decode()[len(prefix) + 1 : -len(":head")]
        if fp != fingerprint:
            found.add(fp)
    return sorted(found)


# ---- where the journal is -------------------------------------------------------------------------
def live_embedded_url(data_dir: Path) -> str | None:
    """URL of the running redis-server proven to serve ``data_dir``'s AOF (a ``mend serve``), if any."""
    found = redis_leftover.examine(data_dir / "redis-server.pid", data_dir)
    return f"redis://127.0.0.1:{found.port}/0" if found.kind == "ours" else None


@contextlib.contextmanager
def journal_client(settings: Settings) -> Iterator[redis.Redis]:
    """A client on the journal's Redis: MEND_REDIS_URL, the service's embedded server, or a private one."""
    embedded = None
    if settings.redis_url:
        url = settings.redis_url
    else:
        data_dir = Path(settings.data_dir).resolve()
        url = live_embedded_url(data_dir)
        if url is not None:
            log.info("reading the journal from the running service's redis-server at %s", url)
        else:
            if not (data_dir / redis_leftover.AOF_NAME).exists():
                raise ExportError(f"no journal in {data_dir} (no append-only file): set MEND_DATA_DIR to the "
                                  "service's data dir or MEND_REDIS_URL to its Redis")
            try:
                embedded = EmbeddedRedis(data_dir).start()
            except EmbeddedRedisError as err:
                raise ExportError(f"cannot open the journal in {data_dir}: {err}") from err
            url = embedded.url
    client = connect(url)
    try:
        try:
            client.ping()
        except redis.RedisError as err:
            raise ExportError(f"cannot reach the journal's Redis at {url}: {err}") from err
        yield client
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()


# ---- output directory -----------------------------------------------------------------------------
def check_out_dir(out: Path, force: bool) -> None:
    """Refuse a file, or a non-empty directory unless ``force`` and it holds a previous export."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ExportError(f"--out {out} exists and is not empty: choose another directory, or pass --force "
                          "to replace a previous export")
    if not _is_export(out):
        raise ExportError(f"--out {out} is not empty and holds no {EDITS_JSON} of a previous `mend export`: "
                          "--force only replaces an earlier export; remove the directory yourself if you mean it")


def _is_export(out: Path) -> bool:
    try:
        return json.loads((out / EDITS_JSON).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished export into place (replacing an empty dir or, with --force, an earlier export)."""
    # safetensors writes 0600 files whatever the umask; a server running as another user (a container)
    # must read them. Who may enter the directory is still the umask's decision (mkdir honours it).
    for f in tmp.rglob("*"):
        if f.is_file():
            f.chmod(0o644)
    if out.is_dir():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


# ---- the export ----------------------------------------------------------------------------------
def export(settings: Settings, out: Path, version: int | None = None, fmt: str = "hf",
           max_rank: int | None = None, force: bool = False, loader: Loader | None = None) -> dict:
    """Write the model at journal ``version`` (None: the head) to ``out``; returns the edits.json document."""
    out = Path(out).resolve()
    if max_rank is not None and (fmt != "peft" or max_rank < 1):
        raise ExportError("--max-rank applies to --format peft and must be at least 1")
    check_out_dir(out, force)
    with journal_client(settings) as client:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        loaded = (loader or default_loader)(settings)
        model, tokenizer = loaded.model, loaded.tokenizer
        model.eval()
        targets = service_targets(model, settings)
        stack = EditStack(model, targets)
        journal = Journal(client, stack.fingerprint, settings.redis_prefix)
        if not client.exists(journal.key("head")) and version != 0:
            others = other_fingerprints(client, settings.redis_prefix, stack.fingerprint)
            hint = (f"; journals exist for other fingerprints {[f[:12] + '...' for f in others]}: the model, "
                    "its dtype or the edited targets (MEND_EDITOR_DIR) differ from the service's") if others else ""
            raise ExportError(f"no journal for model {settings.model!r} (fingerprint {stack.fingerprint[:12]}...) "
                              f"under prefix {settings.redis_prefix!r}{hint}")
        state = journal_at(journal, version)
    try:
        deltas = [EditDelta.from_bytes(b, stack.fingerprint, stack.shapes) for b in state.blobs]
    except DeltaFormatError as err:
        raise ExportError(f"a journaled delta does not fit this model's stack: {err}") from err
    stack.rebuild(list(zip([op["edit_id"] for op in state.active], deltas, strict=True)))
    sha = stack.sha256()
    if state.sha256 is not None and sha != state.sha256:
        raise ExportError(f"rebuilding version {state.version} gave targets sha256 {sha[:16]}..., the journal "
                          f"recorded {state.sha256[:16]}...: export with the service's --device and --dtype")
    factors = lora_factors(deltas, targets, max_rank) if fmt == "peft" else None
    if factors is not None and not factors:
        raise ExportError(f"version {state.version} has no active edits: a LoRA adapter would be empty "
                          "(--format hf exports the base model)")
    doc = _document(settings, loaded, stack, state, sha, fmt, factors)
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if factors is None:
            save_model_dir(model, tokenizer, tmp)
        else:
            save_adapter(factors, targets[0].transposed, doc["model_source"], tmp)
        (tmp / EDITS_JSON).write_text(json.dumps(doc, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(doc, factors))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return doc


def _document(settings: Settings, loaded, stack: EditStack, state: VersionState, sha: str, fmt: str,
              factors) -> dict:
    """The edits.json of an export: which journal version, which edits, and the targets' sha256."""
    edits = []
    for op in state.active:
        edits.append({
            "edit_id": op["edit_id"], "version": int(op["version"]), "method": op.get("method"),
            "author": op.get("author"), "created_at": op.get("ts"),
            "requests": json.loads(op.get("requests", "[]")), "results": json.loads(op.get("results", "[]")),
            "delta_sha256": op.get("delta_sha256"),
        })
    doc = {
        "format": EXPORT_FORMAT, "format_version": FORMAT_VERSION, "kind": fmt, "exported_at": utc_now(),
        "model": settings.model, "model_source": str(getattr(loaded, "source", settings.model)),
        "dtype": settings.dtype, "fingerprint": stack.fingerprint, "redis_prefix": settings.redis_prefix,
        "version": state.version, "journal_head_version": state.head.version,
        "sha256": sha, "journal_sha256": state.sha256,
        "targets": list(stack.targets), "edits": edits, "rolled_back": state.rolled_back,
    }
    if factors is not None:
        doc["adapter"] = {n: {"rank": f.rank, "exact_rank": f.exact_rank, "rel_frobenius_error": f.rel_error}
                          for n, f in sorted(factors.items())}
    return doc


def _readme(doc: dict, factors) -> str:
    """A short card: what this is, where it came from, how to load it."""
    lines = [f"# {doc['model']} at mend journal version {doc['version']}", "",
             f"Exported by `mend export` from journal `{doc['redis_prefix']}:{doc['fingerprint']}` "
             f"(head at {doc['journal_head_version']}); {len(doc['edits'])} active edits, listed in `{EDITS_JSON}`. "
             f"sha256 of the edited targets: `{doc['sha256']}`.", ""]
    if factors is None:
        lines += ["A Hugging Face model directory (config, safetensors, tokenizer): "
                  "`AutoModelForCausalLM.from_pretrained(<this dir>)`.", ""]
        return "\n".join(lines)
    lines += [
        "A PEFT LoRA adapter (scale 1: `lora_alpha == r` for every target). Apply it to the exact base "
        f"weights the service edits (`{doc['model_source']}`, fingerprint `{doc['fingerprint'][:16]}...`; "
        "`mend export --version 0` writes them as a model directory):", "",
        "    base = AutoModelForCausalLM.from_pretrained(<base dir>)",
        "    model = PeftModel.from_pretrained(base, <this dir>)", "",
        "Rank per target (exact rank = the sum of the active edits' ranks; a smaller rank was truncated "
        "by SVD, with the relative Frobenius error of the dropped part):", "", error_table(factors), ""]
    return "\n".join(lines)


# ---- CLI -----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mend export``."""
    parser.description = ("Export the model at a journal version as a Hugging Face directory (--format hf) "
                          "or a PEFT LoRA adapter (--format peft). Reads the journal directly; no running "
                          "service is needed.")
    parser.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")
    parser.add_argument("--version", type=int, default=None, help="journal version to export (default: the head)")
    parser.add_argument("--format", dest="fmt", choices=["hf", "peft"], default="hf",
                        help="hf: full model directory; peft: LoRA adapter of the active edits")
    parser.add_argument("--max-rank", type=int, default=None,
                        help="peft only: truncate each target's adapter to this rank by SVD (error reported)")
    parser.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    for name in SETTING_FLAGS:
        info = Settings.model_fields[name]
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
                            help=f"{info.description} [env MEND_{name.upper()}; default: {info.default}]")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mend export``: 0 on success, 2 when refused (nothing written)."""
    try:
        settings = Settings(**{n: getattr(args, n) for n in SETTING_FLAGS if hasattr(args, n)})
        doc = export(settings, args.out, args.version, args.fmt, args.max_rank, args.force)
    except (ExportError, ModelNotFoundError, ValidationError) as err:
        log.error("export refused: %s", err)
        return 2
    checked = "matches the journal" if doc["journal_sha256"] else "(the base: version 0 has no journal sha256)"
    log.info("exported version %d (%d active edits, %s) to %s; targets sha256 %s %s", doc["version"],
             len(doc["edits"]), doc["kind"], args.out, doc["sha256"][:16], checked)
    for name, a in doc.get("adapter", {}).items():
        log.info("  %s: rank %d of %d, relative Frobenius error %.3e", name, a["rank"], a["exact_rank"],
                 a["rel_frobenius_error"])
    return 0
