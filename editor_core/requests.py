"""The unit of editing: one fact to write into the model."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EditRequest:
    """Make ``target`` the continuation of ``prompt``.

    ``rephrases`` are other prompts for the same fact; editors may use them (MEND's training does,
    FT does not). ``subject`` is the entity the fact is about, when known.
    """

    prompt: str
    target: str
    subject: str | None = None
    rephrases: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        if not self.target.strip():
            raise ValueError("target must not be empty")
