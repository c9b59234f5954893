"""Edits as exact low-rank factors, and their byte form (safetensors + JSON metadata).

An edit to one target is ``dW = u^T @ v`` with ``u: (r, d_out)``, ``v: (r, d_in)``; the sign and the
learned step size are already folded into ``u``. Factors are all that is ever stored or sent: for a
single fact ``r`` is the number of target tokens, so a delta is a few KB instead of a dense matrix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

SCHEMA_VERSION = "1"


class DeltaFormatError(ValueError):
    """A delta's bytes do not fit this model (fingerprint, target or shape)."""


@dataclass
class LowRankUpdate:
    """dW = u^T @ v for one target, in (d_out, d_in) orientation."""

    u: torch.Tensor  # (r, d_out)
    v: torch.Tensor  # (r, d_in)

    def __post_init__(self) -> None:
        if self.u.dim() != 2 or self.v.dim() != 2 or self.u.shape[0] != self.v.shape[0]:
            raise DeltaFormatError(f"factors must be (r, d_out) and (r, d_in), got {tuple(self.u.shape)} "
                                   f"and {tuple(self.v.shape)}")

    @property
    def rank(self) -> int:
        return int(self.u.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the dense update."""
        return (int(self.u.shape[1]), int(self.v.shape[1]))

    def dense(self) -> torch.Tensor:
        """(d_out, d_in) dense update in fp32."""
        return self.u.float().t() @ self.v.float()


def join_updates(parts: dict[str, list[LowRankUpdate]]) -> dict[str, LowRankUpdate]:
    """Each target's updates as one: their factors stacked (the sum of the dense updates)."""
    return {name: LowRankUpdate(torch.cat([p.u for p in ps]), torch.cat([p.v for p in ps]))
            for name, ps in parts.items() if ps}


@dataclass
class EditDelta:
    """The factors of one edit (one or a batch of requests) for every target it touches."""

    updates: dict[str, LowRankUpdate]  # target name -> factors
    model_fingerprint: str
    meta: dict[str, str] = field(default_factory=dict)  # e.g. method, editor id
    # target name -> (n, d_in) keys the update was solved for (locate-then-edit methods). They are
    # journaled with the factors, so state derived from earlier edits (AlphaEdit's protected keys) is a
    # function of the active deltas and survives rollback, replay and restart without a cache.
    keys: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """Serialize as safetensors: fp32 factors, metadata carries schema and fingerprint."""
        tensors = {}
        for name, upd in self.updates.items():
            tensors[f"{name}::u"] = upd.u.detach().float().contiguous().cpu()
            tensors[f"{name}::v"] = upd.v.detach().float().contiguous().cpu()
        for name, k in self.keys.items():
            tensors[f"{name}::k"] = k.detach().float().contiguous().cpu()
        metadata = {
            "schema": SCHEMA_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "targets": json.dumps(sorted(self.updates)),
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        return st_save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        expected_fingerprint: str | None = None,
        expected_shapes: dict[str, tuple[int, int]] | None = None,
    ) -> EditDelta:
        """Parse bytes from :meth:`to_bytes`; reject a different model or mismatched shapes."""
        try:
            tensors = st_load(data)
            metadata = _read_metadata(data)
        except Exception as err:  # safetensors raises several error types for corrupt input
            raise DeltaFormatError(f"not a delta blob: {err}") from err
        if metadata.get("schema") != SCHEMA_VERSION:
            raise DeltaFormatError(f"unsupported delta schema {metadata.get('schema')!r}")
        fingerprint = metadata.get("model_fingerprint", "")
        if expected_fingerprint is not None and fingerprint != expected_fingerprint:
            raise DeltaFormatError(
                f"delta was made for model {fingerprint[:12]}..., this model is {expected_fingerprint[:12]}..."
            )
        names = json.loads(metadata["targets"])
        updates = {name: LowRankUpdate(tensors[f"{name}::u"], tensors[f"{name}::v"]) for name in names}
        if expected_shapes is not None:
            for name, upd in updates.items():
                if name not in expected_shapes:
                    raise DeltaFormatError(f"delta edits {name!r}, which is not a target of this model")
                if upd.shape != tuple(expected_shapes[name]):
                    raise DeltaFormatError(
                        f"delta for {name!r} has shape {upd.shape}, the target is {tuple(expected_shapes[name])}"
                    )
        keys = {name: tensors[f"{name}::k"] for name in names if f"{name}::k" in tensors}
        return cls(updates, fingerprint, json.loads(metadata.get("meta", "{}")), keys)

    def nbytes(self) -> int:
        """Bytes held by the factors (what the journal stores, before safetensors headers)."""
        return sum(u.u.numel() * 4 + u.v.numel() * 4 for u in self.updates.values())


def _read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` dict of a safetensors blob."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__", {}) or {}

