"""Which weights are edited, per architecture family, as data.

Every target is addressed by the name of its ``nn.Module`` (e.g. ``model.layers.29.mlp.down_proj``).
Editor code always sees a target's weight in (d_out, d_in) orientation; GPT-2's ``Conv1D`` stores
(d_in, d_out), and the one place that knows is :attr:`Target.transposed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps its blocks and which MLP matrices MEND edits in each."""

    blocks: str  # dotted path of the ModuleList of transformer blocks
    mlp: tuple[str, ...]  # module names inside one block
    transposed: bool  # weights stored as (d_in, d_out) (GPT-2 Conv1D)
    out_proj: str  # the MLP's output projection: its input is the "key" of locate-then-edit methods


# model_type (transformers config) -> family spec. Adding an architecture is one row here (and one tiny
# config in tests/core/test_any_model.py, which builds every row from config and edits it).
_GATED = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # llama-style gated MLP
FAMILIES: dict[str, FamilySpec] = {
    "gpt2": FamilySpec("transformer.h", ("mlp.c_fc", "mlp.c_proj"), True, "mlp.c_proj"),
    "llama": FamilySpec("model.layers", _GATED, False, "mlp.down_proj"),
    "mistral": FamilySpec("model.layers", _GATED, False, "mlp.down_proj"),
    "qwen2": FamilySpec("model.layers", _GATED, False, "mlp.down_proj"),
    "qwen3": FamilySpec("model.layers", _GATED, False, "mlp.down_proj"),
    "smollm3": FamilySpec("model.layers", _GATED, False, "mlp.down_proj"),
    "gemma": FamilySpec("model.layers", _GATED, False, "mlp.down_proj"),
    "gemma2": FamilySpec("model.layers", _GATED, False, "mlp.down_proj"),
    "gemma3_text": FamilySpec("model.layers", _GATED, False, "mlp.down_proj"),
    "olmo2": FamilySpec("model.layers", _GATED, False, "mlp.down_proj"),
    "phi3": FamilySpec("model.layers", ("mlp.gate_up_proj", "mlp.down_proj"), False, "mlp.down_proj"),  # fused
    "phi": FamilySpec("model.layers", ("mlp.fc1", "mlp.fc2"), False, "mlp.fc2"),
    "starcoder2": FamilySpec("model.layers", ("mlp.c_fc", "mlp.c_proj"), False, "mlp.c_proj"),
    "gptj": FamilySpec("transformer.h", ("mlp.fc_in", "mlp.fc_out"), False, "mlp.fc_out"),
    "gpt_neo": FamilySpec("transformer.h", ("mlp.c_fc", "mlp.c_proj"), False, "mlp.c_proj"),
    "falcon": FamilySpec("transformer.h", ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), False, "mlp.dense_4h_to_h"),
}

DEFAULT_LAST_BLOCKS = 3


@dataclass(frozen=True)
class Target:
    """One edited weight matrix."""

    name: str  # module name, e.g. "model.layers.29.mlp.down_proj"
    block: int  # index of its transformer block
    transposed: bool  # stored as (d_in, d_out)
    d_in: int
    d_out: int

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in): the orientation every editor computation uses."""
        return (self.d_out, self.d_in)


def family_of(model: nn.Module) -> FamilySpec:
    """The family spec for ``model``, or a clear error naming the supported types."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)} "
            "(add a row to editor_core.targets.FAMILIES)"
        )
    return FAMILIES[model_type]


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks."""
    return model.get_submodule(family_of(model).blocks)


def resolve_targets(
    model: nn.Module,
    names: list[str] | None = None,
    last_blocks: int = DEFAULT_LAST_BLOCKS,
    blocks: list[int] | None = None,
) -> list[Target]:
    """Targets by explicit module names, else the MLP matrices of ``blocks`` or the last ``last_blocks``."""
    spec = family_of(model)
    n_blocks = len(blocks_of(model))
    if not names:
        if blocks:
            bad = [b for b in blocks if not 0 <= b < n_blocks]
            if bad:
                raise ValueError(f"blocks {bad} out of range: the model has {n_blocks} blocks")
            chosen = sorted(set(blocks))
        else:
            chosen = list(range(max(0, n_blocks - last_blocks), n_blocks))
        names = [f"{spec.blocks}.{b}.{m}" for b in chosen for m in spec.mlp]
    targets = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"target {name!r} is not a module of this model") from err
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"target {name!r} has no 2-D weight")
        prefix = spec.blocks + "."
        if not name.startswith(prefix):
            raise ValueError(f"target {name!r} is not inside {spec.blocks}")
        block = int(name[len(prefix) :].split(".")[0])
        rows, cols = weight.shape
        d_out, d_in = (cols, rows) if spec.transposed else (rows, cols)
        targets.append(Target(name, block, spec.transposed, d_in=d_in, d_out=d_out))
    return targets


def out_proj_targets(model: nn.Module, layers: list[int]) -> list[Target]:
    """The MLP output projections of ``layers`` (what ROME/MEMIT/AlphaEdit edit), in layer order."""
    spec = family_of(model)
    return resolve_targets(model, [f"{spec.blocks}.{b}.{spec.out_proj}" for b in sorted(set(layers))])


def weight_param(model: nn.Module, target: Target) -> nn.Parameter:
    """The stored parameter of a target (in its storage orientation)."""
    return model.get_submodule(target.name).weight


def read_weight(model: nn.Module, target: Target) -> torch.Tensor:
    """The target weight as (d_out, d_in); a view, not a copy."""
    w = weight_param(model, target)
    return w.t() if target.transposed else w


def grad_out_in(param_grad: torch.Tensor, target: Target) -> torch.Tensor:
    """A parameter gradient brought into (d_out, d_in) orientation."""
    return param_grad.t() if target.transposed else param_grad
