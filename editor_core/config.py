"""Editor configuration, saved as JSON beside the editor's safetensors checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class MendConfig:
    """Shape of a MEND editor and which weights it edits."""

    targets: list[str] = field(default_factory=list)  # module names; empty = last `last_blocks` MLPs
    last_blocks: int = 3
    blocks: list[int] = field(default_factory=list)  # explicit block indices (overrides last_blocks)
    rank: int = 384  # hidden width of each editor net's low-rank MLP
    n_blocks: int = 1  # residual blocks per editor net
    init_lr: float = 1e-4  # initial per-target edit step size
    max_len: int = 64
    # "all": every token of the edit sequence feeds the factors (MEND as published); "subject": only the
    # subject's tokens when the request names a subject found in the prompt (ROME-style keying),
    # falling back to all tokens otherwise.
    factor_tokens: str = "all"  # tokens per edit sequence (prompt truncated from the left)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MendConfig:
        """Build from JSON, rejecting unknown keys with a clear message."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MendConfig keys: {sorted(unknown)}")
        cfg = cls(**data)
        if cfg.factor_tokens not in ("all", "subject"):
            raise ValueError(f"factor_tokens must be 'all' or 'subject', got {cfg.factor_tokens!r}")
        return cfg
