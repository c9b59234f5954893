"""Editor checkpoints: ``editor.safetensors`` (tensors) + ``editor_config.json`` (everything else).

No pickles: a checkpoint can be inspected with any JSON viewer and loaded without executing code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from editor_core.config import INFERENCE_FIELDS, MendConfig
from editor_core.models import short_name
from editor_core.targets import Target, resolve_targets

WEIGHTS = "editor.safetensors"
CONFIG = "editor_config.json"
FORMAT_VERSION = 1


class EditorCheckpointError(FileNotFoundError):
    """No usable editor checkpoint at a path."""


@dataclass
class Checkpoint:
    config: MendConfig
    state: dict[str, torch.Tensor]
    info: dict  # model spec, fingerprint, target names, training summary


def save(path: str | Path, config: MendConfig, state: dict[str, torch.Tensor], info: dict) -> Path:
    """Write a checkpoint directory (created if needed); returns the directory."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out / (WEIGHTS + ".tmp")))
    os.replace(out / (WEIGHTS + ".tmp"), out / WEIGHTS)
    doc = {"format_version": FORMAT_VERSION, "mend": config.to_dict(), **info}
    (out / (CONFIG + ".tmp")).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(out / (CONFIG + ".tmp"), out / CONFIG)  # a reader never sees half a file
    return out


def read_config(path: str | Path) -> MendConfig:
    """The MendConfig of a checkpoint, without reading its tensors."""
    d = Path(path)
    if not (d / CONFIG).is_file():
        raise EditorCheckpointError(f"no editor checkpoint at {d} (expected {CONFIG})")
    return MendConfig.from_dict(json.loads((d / CONFIG).read_text())["mend"])


def write_settings(path: str | Path, settings: dict) -> MendConfig:
    """Replace inference fields (``INFERENCE_FIELDS``) of a saved editor's config; its nets are untouched.

    How a shipped editor's way of applying its nets is chosen after training (its card records the
    call). Returns the new config; an unknown field or a value MendConfig refuses changes nothing.
    """
    d = Path(path)
    config = read_config(d)
    unknown = sorted(set(settings) - set(INFERENCE_FIELDS))
    if unknown:
        raise ValueError(f"{unknown} are not inference settings of a MEND editor ({', '.join(INFERENCE_FIELDS)})")
    stray = sorted(set(settings.get("edit_targets", [])) - set(config.targets)) if config.targets else []
    if stray:
        raise ValueError(f"edit_targets {stray} are not among the editor's targets {config.targets}")
    config = replace(config, **settings)  # runs MendConfig's checks before anything is written
    doc = json.loads((d / CONFIG).read_text())
    doc["mend"] = config.to_dict()
    (d / (CONFIG + ".tmp")).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(d / (CONFIG + ".tmp"), d / CONFIG)
    return config


def stack_targets(model, editor_dir: str | Path | None) -> list[Target]:
    """The weights an EditStack must cover: the editor's targets, or the family default without one.

    Every caller that builds a stack for an editor goes through here, so the service, ``mend eval``
    and the benchmarks agree on the targets and hence on the model fingerprint.
    """
    if editor_dir is None:
        return resolve_targets(model)
    cfg = read_config(editor_dir)
    return resolve_targets(model, list(cfg.targets) or None, cfg.last_blocks, cfg.blocks)


def all_stack_targets(model, editor_dir: str | Path | None, stats_dir: str | Path | None) -> list[Target]:
    """MEND's targets (:func:`stack_targets`), plus the output projections that ROME/MEMIT/AlphaEdit edit
    when key statistics (``stats_dir``) are available. The service and ``mend eval`` both build their
    EditStack from this, so they agree on the model fingerprint and hence the journal namespace."""
    from editor_core.methods.locate import LocateConfig
    from editor_core.targets import out_proj_targets

    targets = stack_targets(model, editor_dir)
    if stats_dir is None:
        return targets
    have = {t.name for t in targets}
    layers = [b for b in LocateConfig.load(stats_dir).all_layers]
    return targets + [t for t in out_proj_targets(model, layers) if t.name not in have]


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save`."""
    d = Path(path)
    if not (d / WEIGHTS).is_file() or not (d / CONFIG).is_file():
        raise EditorCheckpointError(
            f"no editor checkpoint at {d} (expected {WEIGHTS} and {CONFIG}); train one with `mend train`"
        )
    doc = json.loads((d / CONFIG).read_text())
    if doc.get("format_version") != FORMAT_VERSION:
        raise EditorCheckpointError(f"{d / CONFIG}: unsupported format_version {doc.get('format_version')!r}")
    config = MendConfig.from_dict(doc.pop("mend"))
    doc.pop("format_version")
    return Checkpoint(config=config, state=load_file(str(d / WEIGHTS)), info=doc)


def editors_root() -> Path:
    """Where shipped editors live: ``MEND_EDITORS_DIR`` or the repository's ``editors/``."""
    env = os.environ.get("MEND_EDITORS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "editors"


def default_editor_dir(model_spec: str) -> Path | None:
    """The shipped editor for a model spec, if there is one."""
    d = editors_root() / short_name(model_spec)
    return d if (d / WEIGHTS).is_file() else None
