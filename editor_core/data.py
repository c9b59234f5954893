"""Knowledge-editing data sets -> one record type, :class:`EditRecord`.

Supported formats (``format="auto"`` picks by the keys of the first record):

- ``counterfact``: EasyEdit CounterFact ``{case_id, prompt, target_new, subject, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth}``.
- ``zsre``: MEND zsRE ``{subject, src, pred, rephrase, alt, answers[], loc, loc_ans, cond}``. The edit
  is ``src -> alt``; the ground truth is ``answers[0]`` (not ``pred``, which is a model's prediction);
  locality is the Natural Questions pair ``loc -> loc_ans``. The ``"nq question: "`` prefix of ``loc``
  is kept by default, exactly as MEND and EasyEdit score it, so numbers stay comparable with the
  papers; pass ``strip_nq_prefix=True`` to drop it.
- ``knowedit``: ``{subject, prompt, target_new, ground_truth?, rephrase_prompt?, locality: {name:
  [{prompt, ground_truth}]}, portability}``. Every locality group is flattened in order; portability
  is not an edit-time input and is not loaded. A record without ground truth (KnowEdit's insertion
  sets) gets ``ground_truth=None``; metrics that need it skip such records.

In the wild, answers/ground truths are strings, lists of strings, or lists of lists: the first string
is used. Files are a JSON list or JSON Lines (one object per line).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from editor_core.requests import EditRequest

log = logging.getLogger(__name__)

NQ_PREFIX = "nq question: "


@dataclass(frozen=True)
class LocalityPair:
    """A prompt unrelated to the edit and the answer the model should keep giving."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRecord:
    """One fact to edit, with the prompts used to judge the edit."""

    case_id: str
    prompt: str
    subject: str | None
    target_new: str
    ground_truth: str | None  # None when the data set has no true answer (pure insertion)
    rephrases: tuple[str, ...] = field(default_factory=tuple)
    locality: tuple[LocalityPair, ...] = field(default_factory=tuple)

    def to_request(self) -> EditRequest:
        """The edit request an editor sees: prompt -> target_new, with subject and rephrases."""
        return EditRequest(self.prompt, self.target_new, self.subject, self.rephrases)


# ---- field helpers --------------------------------------------------------------------------------
def first_text(value) -> str | None:
    """The first non-empty string in a string / (nested) list, or None."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, (list, tuple)):
        for item in value:
            text = first_text(item)
            if text is not None:
                return text
    return None


def _texts(value) -> tuple[str, ...]:
    """A string or list of strings as a tuple of non-empty strings."""
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, (list, tuple)):
        return tuple(t for t in (first_text(v) for v in value) if t is not None)
    return ()


def _pairs(prompts, answers) -> tuple[LocalityPair, ...]:
    """Locality pairs from parallel prompt/answer fields (strings or lists)."""
    ps = _texts(prompts)
    if isinstance(answers, (list, tuple)) and len(ps) > 1 and len(answers) == len(ps):
        ans = [first_text(a) for a in answers]
    else:
        ans = [first_text(answers)] * len(ps)
    return tuple(LocalityPair(p, a) for p, a in zip(ps, ans, strict=True) if a is not None)


# ---- per-format parsers -------------------------------------------------------------------------
def _counterfact(r: dict, i: int, **_) -> EditRecord:
    return EditRecord(
        case_id=str(r.get("case_id", i)),
        prompt=r["prompt"],
        subject=r.get("subject"),
        target_new=first_text(r["target_new"]) or "",
        ground_truth=first_text(r["ground_truth"]),
        rephrases=_texts(r.get("rephrase_prompt")),
        locality=_pairs(r.get("locality_prompt"), r.get("locality_ground_truth")),
    )


def _zsre(r: dict, i: int, strip_nq_prefix: bool = False, **_) -> EditRecord:
    loc = r.get("loc")
    if strip_nq_prefix and isinstance(loc, str) and loc.startswith(NQ_PREFIX):
        loc = loc[len(NQ_PREFIX) :]
    return EditRecord(
        case_id=str(r.get("case_id", i)),
        prompt=r["src"],
        subject=r.get("subject"),
        target_new=first_text(r["alt"]) or "",
        ground_truth=first_text(r["answers"]),
        rephrases=_texts(r.get("rephrase")),
        locality=_pairs(loc, r.get("loc_ans")),
    )


def _knowedit(r: dict, i: int, **_) -> EditRecord:
    pairs: list[LocalityPair] = []
    for group in (r.get("locality") or {}).values():
        items = group if isinstance(group, list) else [group]
        for item in items:
            if isinstance(item, dict):
                pairs += _pairs(item.get("prompt"), item.get("ground_truth"))
    rephrase = r.get("rephrase_prompt", r.get("rephrase"))
    return EditRecord(
        case_id=str(r.get("case_id", i)),
        prompt=r["prompt"],
        subject=r.get("subject"),
        target_new=first_text(r["target_new"]) or "",
        ground_truth=first_text(r.get("ground_truth")),
        rephrases=_texts(rephrase),
        locality=tuple(pairs),
    )


@dataclass(frozen=True)
class _Format:
    required: tuple[str, ...]
    parse: Callable[..., EditRecord]


FORMATS: dict[str, _Format] = {
    "counterfact": _Format(
        ("prompt", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth"),
        _counterfact,
    ),
    "zsre": _Format(("src", "alt", "answers", "loc", "loc_ans"), _zsre),
    "knowedit": _Format(("prompt", "target_new", "locality"), _knowedit),
}


def detect_format(record: dict) -> str | None:
    """The format a record's keys belong to, or None."""
    if "src" in record and "alt" in record:
        return "zsre"
    if isinstance(record.get("locality"), dict):
        return "knowedit"
    if "locality_prompt" in record or ("rephrase_prompt" in record and "target_new" in record):
        return "counterfact"
    return None


def _read_json_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        try:  # JSON Lines
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise ValueError(f"{path}: not JSON or JSON Lines ({err})") from err
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


class EmptyRecordError(ValueError):
    """A record with an empty prompt or new target: nothing to edit (``load_records(skip_empty=True)``
    leaves such records out instead)."""


def load_records(
    path: str | Path, format: str = "auto", limit: int | None = None, *, strip_nq_prefix: bool = False,
    skip_empty: bool = False,
) -> list[EditRecord]:
    """Read an editing data set into :class:`EditRecord` s.

    ``format``: ``"auto"`` (by keys), ``"counterfact"``, ``"zsre"`` or ``"knowedit"``. ``limit`` keeps
    the first N records. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the
    file, the record and the missing keys for input that does not fit the format. A record with an empty
    prompt or new target is such input too, unless ``skip_empty``: then it is left out and logged (the
    shared zsRE file has two, questions with no alternative answer: there is nothing to edit them to).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; use 'auto' or one of {sorted(FORMATS)}")
    raw = _read_json_records(path)
    if limit is not None:
        raw = raw[: max(0, limit)]
    if not raw:
        raise ValueError(f"{path}: no records")
    if not isinstance(raw[0], dict):
        raise ValueError(f"{path}: records must be JSON objects, got {type(raw[0]).__name__}")
    fmt = format
    if fmt == "auto":
        fmt = detect_format(raw[0])
        if fmt is None:
            raise ValueError(
                f"{path}: cannot tell the format from the keys {sorted(raw[0])}; expected one of "
                + "; ".join(f"{name} {{{', '.join(f.required)}}}" for name, f in FORMATS.items())
            )
    spec = FORMATS[fmt]
    records = []
    skipped: list[int] = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i} is not a JSON object")
        missing = [k for k in spec.required if k not in r]
        if missing:
            raise ValueError(f"{path}: record {i} is missing keys {missing} required by the {fmt} format")
        rec = spec.parse(r, i, strip_nq_prefix=strip_nq_prefix)
        if not rec.prompt.strip() or not rec.target_new.strip():
            if not skip_empty:
                raise EmptyRecordError(f"{path}: record {i} has an empty prompt or target")
            skipped.append(i)
            continue
        records.append(rec)
    if skipped:
        log.warning("%s: left out %d record(s) with an empty prompt or target: %s", path, len(skipped),
                    skipped[:20])
    log.info("loaded %d %s records from %s", len(records), fmt, path)
    return records


def split_records(
    records: list[EditRecord], val_fraction: float, seed: int = 0
) -> tuple[list[EditRecord], list[EditRecord]]:
    """Deterministic (train, val) split: the same records, fraction and seed give the same split.

    Records keep their original order inside each part; at least one record goes to val when
    ``val_fraction > 0`` and there are two or more records.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) > 1:
        n_val = min(max(1, n_val), len(records) - 1)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val
