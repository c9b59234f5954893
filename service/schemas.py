"""Request and response bodies. Types are strict (no silent coercion); size limits come from
settings and are checked by :func:`check_edit_limits` / :func:`check_query_limits`, which report
errors in FastAPI's 422 shape with the offending field's location.
"""

from __future__ import annotations

from typing import Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from service.settings import Settings

METHODS = ("alphaedit", "memit", "rome", "mend", "ft")


def _valid_unicode(value):
    """Text must be encodable as UTF-8: JSON may carry lone surrogates (\\ud800) that no tokenizer takes."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("must be valid unicode text (lone surrogate code points are not allowed)") from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    _unicode = field_validator("*")(_valid_unicode)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


class EditRequestIn(_Strict):
    prompt: StrictStr = Field(description="text the fact follows, e.g. 'The capital of Norway is'")
    target: StrictStr = Field(description="the new continuation, e.g. 'Bergen'")
    subject: StrictStr | None = Field(None, description="the entity the fact is about (optional)")
    rephrases: list[StrictStr] = Field(default_factory=list, description="other prompts for the same fact")

    _blank = field_validator("prompt", "target")(_not_blank)

    @model_validator(mode="after")
    def _subject_in_prompt(self):
        # the locate-then-edit methods and MEND key the edit on the subject's tokens in the prompt:
        # a subject that is not there would silently be ignored
        if self.subject is not None:
            if not self.subject.strip():
                raise ValueError("subject must not be empty or only whitespace (leave it out instead)")
            if self.subject not in self.prompt:
                raise ValueError(f"subject {self.subject!r} does not occur in the prompt {self.prompt!r}")
        return self


class EditIn(_Strict):
    requests: list[EditRequestIn] = Field(min_length=1, description="facts to write in one edit")
    method: Literal["alphaedit", "memit", "rome", "mend", "ft"] | None = Field(
        None, description="alphaedit, memit, rome (key statistics; need `subject`), mend (trained editor) or ft "
                          "(fine-tuning); default: the service's MEND_DEFAULT_METHOD (GET /health/ready lists "
                          "what the loaded model offers)")
    idempotency_key: StrictStr | None = Field(None, min_length=1, max_length=200)


class EditResult(BaseModel):
    prompt: str
    target: str
    p_target_before: float = Field(description="exp(mean token log-prob) of the target before the edit")
    p_target_after: float
    success: bool = Field(description="every target token is the argmax under teacher forcing (greedy output)")


class EditOut(BaseModel):
    edit_id: str
    version: int
    method: str
    results: list[EditResult]
    latency_ms: float
    idempotent_replay: bool = False


class QueryIn(_Strict):
    prompts: list[StrictStr] = Field(min_length=1)
    max_new_tokens: StrictInt | None = Field(None, ge=1)
    candidates: list[StrictStr] | None = Field(None, description="continuations to score")
    min_version: StrictInt | None = Field(
        None, ge=0, description="read-your-writes: answer from journal version >= this one (the version an /edit "
                                "or /rollback returned); an instance behind waits up to MEND_MIN_VERSION_WAIT_S, "
                                "then answers 503 with Retry-After and its version")

    @field_validator("prompts")
    @classmethod
    def _prompts_not_blank(cls, v: list[str]) -> list[str]:
        for p in v:
            _not_blank(p)
        return v

    @field_validator("candidates")
    @classmethod
    def _candidates_not_blank(cls, v: list[str] | None) -> list[str] | None:
        for c in v or []:
            _not_blank(c)
        return v


class QueryResult(BaseModel):
    prompt: str
    completion: str
    candidates: dict[str, float] | None = Field(None, description="candidate -> mean token log-prob")


class QueryOut(BaseModel):
    version: int
    results: list[QueryResult]


class RollbackIn(_Strict):
    edit_id: StrictStr = Field(min_length=1, max_length=100)


class RollbackOut(BaseModel):
    edit_id: str
    version: int
    status: Literal["rolled_back"]
    dependents: list[str] = Field(description="later, still active edits computed on top of this one")
    note: str | None = None


class EditPage(BaseModel):
    version: int
    total: int
    offset: int
    limit: int
    edits: list[dict]


def _error(loc: tuple, msg: str, value) -> dict:
    return {"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": value}


def _check_text(errors: list, loc: tuple, value: str | None, limit: int) -> None:
    if value is not None and len(value) > limit:
        errors.append(_error(loc, f"longer than max_prompt_chars={limit} characters ({len(value)})", len(value)))


def check_edit_limits(body: EditIn, s: Settings) -> None:
    """Raise a 422 naming every field over its configured limit."""
    errors: list[dict] = []
    if len(body.requests) > s.max_requests_per_edit:
        errors.append(_error(("requests",), f"at most max_requests_per_edit={s.max_requests_per_edit} "
                                            f"requests per edit ({len(body.requests)} given)", len(body.requests)))
    for i, r in enumerate(body.requests):
        _check_text(errors, ("requests", i, "prompt"), r.prompt, s.max_prompt_chars)
        _check_text(errors, ("requests", i, "target"), r.target, s.max_prompt_chars)
        _check_text(errors, ("requests", i, "subject"), r.subject, s.max_prompt_chars)
        if len(r.rephrases) > s.max_rephrases:
            errors.append(_error(("requests", i, "rephrases"),
                                 f"at most max_rephrases={s.max_rephrases} rephrases", len(r.rephrases)))
        for j, p in enumerate(r.rephrases):
            _check_text(errors, ("requests", i, "rephrases", j), p, s.max_prompt_chars)
    if errors:
        raise RequestValidationError(errors)


def check_query_limits(body: QueryIn, s: Settings) -> None:
    """Raise a 422 naming every field over its configured limit."""
    errors: list[dict] = []
    if len(body.prompts) > s.max_prompts_per_query:
        errors.append(_error(("prompts",), f"at most max_prompts_per_query={s.max_prompts_per_query} prompts",
                             len(body.prompts)))
    for i, p in enumerate(body.prompts):
        _check_text(errors, ("prompts", i), p, s.max_prompt_chars)
    if body.max_new_tokens is not None and body.max_new_tokens > s.max_new_tokens:
        errors.append(_error(("max_new_tokens",), f"at most max_new_tokens={s.max_new_tokens}",
                             body.max_new_tokens))
    cands = body.candidates or []
    if len(cands) > s.max_candidates:
        errors.append(_error(("candidates",), f"at most max_candidates={s.max_candidates} candidates", len(cands)))
    for i, c in enumerate(cands):
        _check_text(errors, ("candidates", i), c, s.max_prompt_chars)
    if errors:
        raise RequestValidationError(errors)
