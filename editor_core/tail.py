"""Run only the edited tail of a model from cached hidden states (the frozen-prefix trick).

MEND edits the last few blocks, so during training the blocks before the first edited one compute
the same thing for a text every time. ``prefix_states`` computes the hidden state entering block
``first`` once; ``tail_logits`` runs blocks ``first..`` plus the head from it. Both work for every
family in :mod:`editor_core.targets` with one mechanism: a forward pre-hook that swaps the input of a
block, and a temporary block list holding only the tail. ``run_until`` and ``run_blocks`` run a span of
blocks only, for hooks that read inside them (the keys of locate-then-edit methods and MEND's re-solve).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from editor_core.batching import IGNORE, TokenBatch
from editor_core.targets import blocks_of, family_of

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook to abandon a forward pass once the needed state is captured."""


@contextmanager
def block_input_hook(
    model: nn.Module, block: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace the hidden state entering ``blocks[block]`` by ``fn(hidden_state)``."""

    def pre_hook(_module, args, kwargs):
        return (fn(args[0]), *args[1:]), kwargs

    handle = blocks_of(model)[block].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def prefix_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int
) -> torch.Tensor:
    """(B, T, d) hidden states entering block ``first``; the blocks after it are never run."""
    captured: list[torch.Tensor] = []

    def grab(h: torch.Tensor) -> torch.Tensor:
        captured.append(h.detach())
        raise _StopForward

    with block_input_hook(model, first, grab):
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return captured[0]


@torch.no_grad()
def run_until(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, until: int) -> None:
    """Run blocks ``0..until-1`` on ``input_ids`` (B, T), for the hooks a caller has on modules inside them;
    the blocks from ``until`` on and the head never run (``until`` may be the number of blocks)."""
    if until < len(blocks_of(model)):
        prefix_states(model, input_ids, attention_mask, until)
    else:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


@torch.no_grad()
def run_blocks(
    model: nn.Module, first: int, states: torch.Tensor, attention_mask: torch.Tensor, until: int
) -> None:
    """Run blocks ``first..until-1`` from ``states`` (B, T, d) entering block ``first``, for the hooks a
    caller has on modules inside them; the blocks from ``until`` on and the head never run."""

    def stop(_h: torch.Tensor) -> torch.Tensor:
        raise _StopForward

    dummy = torch.zeros_like(states)
    with _only_tail(model, first), block_input_hook(model, 0, lambda _h: states):
        stopper = block_input_hook(model, until - first, stop) if until - first < len(blocks_of(model)) else nullcontext()
        with stopper:
            try:
                model.base_model(inputs_embeds=dummy, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass


@contextmanager
def _only_tail(model: nn.Module, first: int) -> Iterator[None]:
    path = family_of(model).blocks
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    full = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(list(full)[first:]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


def tail_logits(
    model: nn.Module,
    first: int,
    states: torch.Tensor,
    attention_mask: torch.Tensor,
    select: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits from hidden states ``states`` (B, T, d) entering block ``first``.

    Returns (B, T, V), or (N, V) for the N positions where ``select`` (B, T) is true: the output
    layer (V x d, the largest matrix of a small LM) then runs only where a loss reads it.
    The embeddings run on zeros and are discarded: the first tail block's input is swapped for
    ``states``, so positional encodings (rotary or learned) are handled by the model itself.
    """
    dummy = torch.zeros_like(states)
    with _only_tail(model, first), block_input_hook(model, 0, lambda _h: states):
        if select is None:
            return model(inputs_embeds=dummy, attention_mask=attention_mask, use_cache=False).logits
        out = model.base_model(inputs_embeds=dummy, attention_mask=attention_mask, use_cache=False)
        return model.get_output_embeddings()(out.last_hidden_state[select])  # (N, V)


def _cache_kwarg(model: nn.Module) -> str:
    """The name the base model's forward takes its KV cache under (``cache`` from transformers 5.x on)."""
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, q, k) additive attention mask from a bool ``keep`` (B, q, k): 0 where kept, the dtype's min elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)[:, None]


class SplitTail:
    """The tail of a batch whose rows change only from a per-row position on: what comes before is cached.

    The value optimisation of locate-then-edit methods adds its ``delta`` at the subject's last token, so
    the states of every earlier position are the same at every step, at every block of the tail. This
    runs the tail once over those positions (``cut[b]`` of row ``b``, left-padded), keeps each tail
    block's keys and values, and then runs only positions ``cut[b]..`` per step, attending to the cache:
    about half the tokens of a CounterFact row. Rows are re-aligned so that position ``cut[b]`` of row
    ``b`` is index 0 of the short rows; rotary position ids carry the true positions.

    A model whose attention does not take a prepared 4D mask and a KV cache this way is caught by
    :meth:`matches`, which callers use to fall back to :func:`tail_logits`.
    """

    def __init__(self, model: nn.Module, first: int, states: torch.Tensor, attention_mask: torch.Tensor,
                 cut: torch.Tensor):
        """``states`` (B, T, d) entering block ``first``, right-padded by ``attention_mask`` (B, T); ``cut`` (B,)."""
        B, T, d = states.shape
        device, dtype = states.device, states.dtype
        self.model, self.first = model, first
        lengths = attention_mask.sum(-1)  # (B,)
        self.cut = cut
        C, T2 = int(cut.max()), int((lengths - cut).max())
        self.C, self.T2 = C, T2
        ar_c, ar_t = torch.arange(C, device=device), torch.arange(T2, device=device)
        # cached part, left-padded: slot j of row b holds position j - (C - cut[b])
        pre_src = ar_c[None] - (C - cut[:, None])  # (B, C)
        pre_real = pre_src >= 0  # (B, C)
        # short rows, right-padded: slot j of row b holds position cut[b] + j
        self.src = cut[:, None] + ar_t[None]  # (B, T2)
        self.real = self.src < lengths[:, None]  # (B, T2)
        self.rows = torch.arange(B, device=device)[:, None]  # (B, 1)
        # (B, T2) true positions: the position ids of the short rows (pads clamped into the table, never read)
        self.pos = self.src.clamp(max=T - 1)
        eye_c = torch.eye(C, dtype=torch.bool, device=device)
        # a query attends to real keys at or before it; pads attend to themselves only, so no row is empty
        keep_pre = (pre_real[:, None, :] & (ar_c[None, :, None] >= ar_c[None, None, :])) | eye_c  # (B, C, C)
        causal_t = ar_t[:, None] >= ar_t[None, :]  # (T2, T2)
        keep_t = (self.real[:, None, :] & causal_t[None]) | torch.eye(T2, dtype=torch.bool, device=device)
        keep_tail = torch.cat([pre_real[:, None, :].expand(B, T2, C), keep_t], dim=-1)  # (B, T2, C + T2)
        self.mask_tail = _additive_mask(keep_tail, dtype)  # (B, 1, T2, C + T2)
        self.kv: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (layer index, keys, values) per tail block
        if C == 0:
            return
        pre_states = states[self.rows, pre_src.clamp(min=0)] * pre_real[..., None]  # (B, C, d)
        pre_pos = pre_src.clamp(min=0)  # (B, C)
        with torch.no_grad():
            cache = self._run(pre_states, _additive_mask(keep_pre, dtype), pre_pos, self._fresh_cache())[1]
        for block in blocks_of(model)[first:]:
            idx = _layer_index(block)
            layer = cache.layers[idx]
            self.kv.append((idx, layer.keys, layer.values))

    def _fresh_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _run(self, states: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache):
        dummy = torch.zeros_like(states)
        kwargs = {_cache_kwarg(self.model): cache}
        with _only_tail(self.model, self.first), block_input_hook(self.model, 0, lambda _h: states):
            out = self.model.base_model(inputs_embeds=dummy, attention_mask=mask, position_ids=position_ids,
                                        use_cache=True, **kwargs)
        return out.last_hidden_state, cache

    def short(self, states: torch.Tensor) -> torch.Tensor:
        """(B, T2, d) the positions from each row's cut on, of full-length ``states`` (B, T, d)."""
        return states[self.rows, self.pos] * self.real[..., None]

    def short_select(self, select: torch.Tensor) -> torch.Tensor:
        """(B, T2) ``select`` (B, T) re-aligned to the short rows; every selected position must be at or after the cut."""
        before = select & (torch.arange(select.shape[1], device=select.device)[None] < self.cut[:, None])
        if bool(before.any()):
            raise ValueError("SplitTail: a selected position lies before its row's cut")
        return select[self.rows, self.pos] & self.real

    def short_batch(self, batch: TokenBatch) -> TokenBatch:
        """``batch`` (input width T) re-aligned to the short rows: ids, mask, labels and key mask from each
        row's cut on, so that :func:`target_positions`, the target labels and the factor tokens of the
        result index the short rows' states and logits, in the same row-major order as ``batch``'s."""
        ids = batch.input_ids[self.rows, self.pos] * self.real  # (B, T2)
        mask = batch.attention_mask[self.rows, self.pos] * self.real  # (B, T2)
        # labels are one column wider than the inputs (labels[t] is predicted at t-1): columns cut..cut+T2
        width = batch.labels.shape[1]
        src = self.cut[:, None] + torch.arange(self.T2 + 1, device=self.cut.device)[None]  # (B, T2 + 1)
        labels = batch.labels[self.rows, src.clamp(max=width - 1)].masked_fill(src >= width, IGNORE)
        labels[:, 1:] = labels[:, 1:].masked_fill(~self.real, IGNORE)  # a pad predicts nothing
        key = batch.key_mask[self.rows, self.pos] & self.real if batch.key_mask is not None else None
        return TokenBatch(ids, mask, labels, key)

    def logits(self, short_states: torch.Tensor, short_select: torch.Tensor,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N, V) logits at ``short_select`` (b, T2) from ``short_states`` (b, T2, d); differentiable in the
        states. ``rows`` (b,): which rows of the split these are (None: all B)."""
        cache = self._fresh_cache()
        for idx, k, v in self.kv:  # (B, heads, C, head_dim) each
            cache.update(k if rows is None else k[rows], v if rows is None else v[rows], idx)
        mask, pos = (self.mask_tail, self.pos) if rows is None else (self.mask_tail[rows], self.pos[rows])
        hidden, _ = self._run(short_states, mask, pos, cache)
        return self.model.get_output_embeddings()(hidden[short_select])  # (N, V)


def checked_split(model: nn.Module, first: int, states: torch.Tensor, attention_mask: torch.Tensor,
                  cut: torch.Tensor, select: torch.Tensor, want: Callable[[], torch.Tensor], what: str,
                  once: bool = False) -> SplitTail | None:
    """A :class:`SplitTail` of ``states`` (B, T, d) cut at ``cut`` (B,), if it gives ``want()`` (N, V), the
    full tail's logits at ``select`` (B, T), to within rounding; else None, and the caller runs every position.

    Checked with one short forward: a model whose attention does not take the cut (a family with another
    mask or cache scheme) falls back to running every position, which is slower, not wrong. A model that
    cannot take it at all is remembered and not tried again; rows longer than a sliding attention window
    are not cut (the prepared mask would attend past the window). With ``once``, a model that took a cut
    before is trusted and ``want`` is not called (for a caller whose reference costs a forward of its
    own). ``what`` names the caller in the log.
    """
    if model in _UNCUTTABLE:
        return None
    window = getattr(model.config, "sliding_window", None)
    if window and states.shape[1] > window:
        return None
    if once and model in _CUTTABLE:
        return SplitTail(model, first, states, attention_mask, cut)
    try:
        split = SplitTail(model, first, states, attention_mask, cut)
        with torch.no_grad():
            got = split.logits(split.short(states), split.short_select(select))  # (N, V)
            reference = want()  # (N, V)
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        _UNCUTTABLE.add(model)
        log.warning("%s runs every position on this model: the cut tail failed (%s: %s)", what, type(e).__name__, e)
        return None
    err = _max_logprob_error(got, reference)
    tol = 1e-3 if reference.dtype == torch.float32 else 5e-2
    if err > tol:
        log.warning("%s runs every position: the cut tail's log-probs differ by %.3g (> %.3g)", what, err, tol)
        return None
    _CUTTABLE.add(model)
    return split


def _max_logprob_error(got: torch.Tensor, want: torch.Tensor, chunk: int = 256) -> float:
    """Largest |log_softmax(got) - log_softmax(want)| over (N, V) logits, a chunk of rows at a time
    (a batch of 100 facts has about a thousand rows of a vocabulary-wide softmax); inf when shapes differ."""
    if got.shape != want.shape:
        return float("inf")
    worst = 0.0
    for i in range(0, got.shape[0], chunk):
        a = torch.log_softmax(got[i:i + chunk].float(), -1)
        b = torch.log_softmax(want[i:i + chunk].float(), -1)
        worst = max(worst, float((a - b).abs().max()))
    return worst


# models whose attention could not take the cut, and those that took one (remembered per model object,
# forgotten with it)
_UNCUTTABLE: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_CUTTABLE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _layer_index(block: nn.Module) -> int:
    """The cache slot a block's attention writes to (its ``layer_idx``, set by transformers at construction)."""
    for module in block.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is not None:
            return int(idx)
    raise ValueError(f"{type(block).__name__} has no attention layer_idx: no KV cache for the split tail")
