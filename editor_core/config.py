"""Editor configuration, saved as JSON beside the editor's safetensors checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

# the fields that decide how an edit is made from the nets' output, not the nets themselves
INFERENCE_FIELDS = ("edit_targets", "preserve_lambda", "preserve_keys", "preserve_keep", "refine_passes",
                    "refine_seconds", "pass_scale", "edit_prefixes", "gradient_scale", "key_prefixes",
                    "extra_passes", "key_reads", "first_pass_times", "take_nll", "edit_prefixes_from",
                    "check_prefixed", "edit_prefix_cache", "pass_momentum")


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def parse_setting(item: str) -> tuple[str, object]:
    """``FIELD=VALUE`` of one inference field, typed (``--set`` of the tools that change them).

    ``edit_prefixes``/``key_prefixes`` take "|"-separated prefixes; ``edit_targets`` is returned as its
    text ("all" or "out_proj"), which only a caller holding the model can turn into names. Raises
    ValueError naming the problem, including a value MendConfig refuses.
    """
    name, sep, text = item.partition("=")
    if not sep or name not in INFERENCE_FIELDS:
        raise ValueError(f"expected FIELD=VALUE with FIELD one of {', '.join(INFERENCE_FIELDS)}")
    if name == "edit_targets":
        if text not in ("all", "out_proj"):
            raise ValueError("edit_targets is 'all' (every trained target) or 'out_proj' (the down_proj)")
        return name, text
    if name in ("edit_prefixes", "key_prefixes"):  # e.g. "The following is true. |I read that "
        value: object = [x for x in text.split("|") if x]
    else:
        value = {"refine_passes": int, "extra_passes": int, "preserve_keys": str, "key_reads": str,
                 "edit_prefixes_from": str, "check_prefixed": _boolean,
                 "edit_prefix_cache": _boolean}.get(name, float)(text)
    # MendConfig's own checks, on a config that re-solves at the last key
    MendConfig(**{"preserve_lambda": 1.0, "preserve_keys": "last", name: value})
    return name, value


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
    # How an edit is made from the editor's output (inference only; training ignores these):
    # preserve_lambda > 0 re-solves each target's update by least squares against the key statistics of
    # its inputs (editor_core.preserved_solve: the same output change at the edit's keys, least change at
    # ordinary ones); 0 applies MEND's sum of rank-one terms as published. Targets without statistics
    # keep MEND's sum.
    preserve_lambda: float = 0.0
    # the targets an edit writes, a subset of ``targets`` (empty: all of them); the nets stay trained for
    # every target. Measured (docs/MEND.md, "MEND that takes"): with the re-solve and refinement passes, writing
    # only the output projections (which the statistics cover) keeps neighbours far better
    edit_targets: list[str] = field(default_factory=list)
    # the keys that re-solve must keep the editor's change at: "all" factor tokens, or "last", the last
    # factor token of each edit prompt (the subject's last token: where ROME and MEMIT write a fact)
    preserve_keys: str = "all"
    # weight of the keys of earlier active edits (journaled in their deltas) in the preserved term,
    # beside preserve_lambda * C, as MEMIT's memit_keep: later edits leave their outputs where they were
    preserve_keep: float = 0.0
    # when the target is not yet the greedy answer after an edit pass, up to this many more passes (each
    # one forward/backward on the edited model plus the editor nets), within refine_seconds per fact of
    # the request (a batch of n facts gets n times that: each of its passes costs about n times one's)
    refine_passes: int = 0
    refine_seconds: float = 2.0
    # once the prompt takes (every target token greedy), this many more passes (within refine_passes and
    # refine_seconds): the passes otherwise stop at the bare prompt's threshold, which rephrasings, whose
    # keys differ a little, do not all reach
    extra_passes: int = 0
    # above 0, a request has taken only once its mean target NLL is also at most this (0.69: the new target
    # at p >= 1/2 per token on average), as the locate methods optimise their values to a small NLL rather
    # than to the greedy threshold: a margin that each edit reaches as it needs, where extra_passes adds
    # the same number of passes to every edit
    take_nll: float = 0.0
    # each pass's update is written times this: below 1, smaller steps that re-read the model more often
    # (one pass scaled up saturates: docs/MEND.md, "MEND that takes"), with more passes to reach the target
    pass_scale: float = 1.0
    # the first pass, on the unedited model, is written at pass_scale times this: a larger first step
    # where the gradient is the edit's own, then the smaller refinement passes (fewer passes to the target)
    first_pass_times: float = 1.0
    # heavy-ball momentum m over the passes before a request takes: after pass t, each earlier pass p's
    # update is written again at m^(t-p) of its own size (its weight is then 1 + m + ... + m^(t-p)), so a
    # direction the passes agree on grows and one they disagree on does not. The weights freeze once the
    # request takes (its extra passes are plain). 0: plain passes. Only for one request per edit call; a
    # batch runs plain passes (its facts take at different passes)
    pass_momentum: float = 0.0
    # the edit is also made, and checked, behind each of these prefixes (one more batch row each), as
    # MEMIT reads its value behind several prefixes, so that the edit is not made for its one wording
    # only. The rows behind them give gradient; the re-solve keeps the change at the bare prompt's key
    # (averaged over key_prefixes when set), one per request. Needs preserve_keys "last" when re-solving
    edit_prefixes: list[str] = field(default_factory=list)
    # when the rows behind edit_prefixes join a request's passes: "first_pass" (all of them); "take" once
    # its bare prompt has taken (the passes before run its bare prompt alone, one row instead of
    # 1 + len(edit_prefixes)), so the extra passes and the checks after them cover every wording
    edit_prefixes_from: str = "first_pass"
    # whether a request's take is read behind the edit prefixes too (True: it has taken once every wording
    # gives its target), or on its bare prompt alone (False: the rows behind them give gradient only, and
    # a request runs as many passes as it would without them)
    check_prefixed: bool = True
    # whether the edit prefixes' keys and values in the edited blocks are computed once per edit, before its
    # first pass, so that every pass runs a row behind a prefix on the prompt's tokens only (a prefixed row
    # then costs about a bare row). The first pass is exact; later passes read the prefix as the model
    # was before the edit, where the exact run (False) reads it as the passes so far leave it: the prefix
    # is ordinary text, which the re-solve keeps the edit off
    edit_prefix_cache: bool = True
    # each request's edit loss (its mean target NLL) is multiplied by this before the nets read its
    # gradient. `mend train` makes one batched edit of `edits_per_step` facts per step from the batch's
    # mean NLL, so the nets were trained on one fact's gradient at about 1/edits_per_step of its size
    # alone; 1/edits_per_step gives them inputs of the size they learned on (the nets are not linear in
    # them, unlike pass_scale, which scales their output)
    gradient_scale: float = 1.0
    # the re-solve's key of each request (preserve_keys "last") is its subject's last-token key averaged
    # over the bare prompt and the prompt behind each of these prefixes, as MEMIT reads its keys, instead
    # of the bare prompt's alone (requests without a subject in their prompt keep the bare key)
    key_prefixes: list[str] = field(default_factory=list)
    # with key_prefixes: "every_pass" reads the averaged keys again on the model as each pass leaves it;
    # "first_pass" reads them once, and later passes add that first read's offset from the bare prompt's
    # key to the bare key their own forward holds (the edit moves every wording's key about alike)
    key_reads: str = "every_pass"

    def __post_init__(self) -> None:
        if self.factor_tokens not in ("all", "subject"):
            raise ValueError(f"factor_tokens must be 'all' or 'subject', got {self.factor_tokens!r}")
        if self.preserve_keys not in ("all", "last"):
            raise ValueError(f"preserve_keys must be 'all' or 'last', got {self.preserve_keys!r}")
        for name in ("refine_passes", "extra_passes"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
        if not 0 <= self.pass_momentum < 1:
            raise ValueError(f"pass_momentum must be in [0, 1), not {self.pass_momentum!r}")
        for name in ("preserve_lambda", "preserve_keep", "refine_seconds", "take_nll"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)!r}")
        if self.key_reads not in ("every_pass", "first_pass"):
            raise ValueError(f"key_reads must be 'every_pass' or 'first_pass', got {self.key_reads!r}")
        for name in ("pass_scale", "gradient_scale", "first_pass_times"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)!r}")
        if self.edit_prefixes_from not in ("first_pass", "take"):
            raise ValueError(f"edit_prefixes_from must be 'first_pass' or 'take', got {self.edit_prefixes_from!r}")
        if self.edit_prefixes and self.preserve_lambda > 0 and self.preserve_keys != "last":
            raise ValueError("edit_prefixes with a re-solve needs preserve_keys 'last' (one key per request)")
        if self.key_prefixes and self.preserve_keys != "last":
            raise ValueError("key_prefixes needs preserve_keys 'last' (one key per request)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MendConfig:
        """Build from JSON, rejecting unknown keys with a clear message."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MendConfig keys: {sorted(unknown)}")
        return cls(**data)
