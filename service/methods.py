"""Which editing methods the service offers on the loaded model, and the weights they need covered.

MEND needs a trained editor for the model (``editors/<model>/`` or ``MEND_EDITOR_DIR``); ROME, MEMIT
and AlphaEdit need only key statistics (``keystats.safetensors`` from ``mend stats``, shipped beside
the default model's editor or pointed at by ``MEND_STATS_DIR``); FT needs nothing. The EditStack must
cover every weight any available method writes, and its target list fixes the model fingerprint and
so the journal's key namespace: :func:`service_stack_targets` is the one place that decides it
(the service, ``mend export`` and the benchmarks all call it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from editor_core.checkpoint import all_stack_targets, default_editor_dir
from editor_core.stats import STATS_FILE, KeyStats, StatsError, find_stats_dir
from editor_core.targets import Target
from service.settings import Settings

log = logging.getLogger(__name__)

LOCATE_METHODS = ("rome", "memit", "alphaedit")


def mend_editor_dir(settings: Settings) -> Path | None:
    """The MEND checkpoint to serve: MEND_EDITOR_DIR, else the editor shipped for the model, if any."""
    editor_dir = settings.editor_dir or default_editor_dir(settings.model)
    return Path(editor_dir) if editor_dir is not None and Path(editor_dir).exists() else None


def stats_dir(settings: Settings) -> Path | None:
    """Directory holding the key statistics for the model: MEND_STATS_DIR, else the shipped one, if any."""
    return find_stats_dir(settings.model, settings.stats_dir)


def service_stack_targets(model, settings: Settings) -> list[Target]:
    """MEND's targets, plus the output projections the locate-then-edit methods edit (when they can)."""
    return all_stack_targets(model, mend_editor_dir(settings), stats_dir(settings))


def locate_editors(stack, settings: Settings) -> dict[str, Any]:
    """{method: LocateEditor, or why it is unavailable} for rome, memit and alphaedit."""
    from editor_core.methods.locate import LocateConfig, LocateEditor

    d = stats_dir(settings)
    if d is None:
        why = (f"no key statistics for model {settings.model!r}: run `mend stats --model {settings.model} "
               "--out DIR` and set MEND_STATS_DIR=DIR")
        return {m: why for m in LOCATE_METHODS}
    config = LocateConfig.load(d)
    try:
        stats = KeyStats.load(d / STATS_FILE)
        if not stats.fits(stack.model):
            raise StatsError(f"the key statistics at {d} were computed for another model; run `mend stats` "
                             "for this one")
    except (StatsError, ValueError) as err:
        return {m: str(err) for m in LOCATE_METHODS}
    out: dict[str, Any] = {}
    for m in LOCATE_METHODS:
        try:
            out[m] = LocateEditor(m, stack, stats, config)
        except ValueError as err:
            out[m] = f"{m} cannot be used with the statistics at {d}: {err}"
    log.info("key statistics loaded", extra={"stats_dir": str(d), "tokens": stats.tokens,
                                            "layers": stats.layers})
    return out


PREFERENCE = ("memit", "alphaedit", "rome", "mend", "ft")


def effective_default_method(settings: Settings, available: list[str]) -> str | None:
    """MEND_DEFAULT_METHOD when the model offers it, else the first available in :data:`PREFERENCE`."""
    if settings.default_method in available:
        return settings.default_method
    fallback = next((m for m in PREFERENCE if m in available), None)
    log.warning("default method %s is not available on this model; edits without a method use %s",
                settings.default_method, fallback)
    return fallback


def default_method_reason(configured: str, chosen: str | None, unavailable: dict[str, str]) -> str:
    """Why an /edit without ``method`` uses ``chosen`` (``/health/ready`` shows it)."""
    if chosen is None:
        return "no editing method is available on this model"
    if chosen == configured:
        return f"MEND_DEFAULT_METHOD is {configured}"
    why = unavailable.get(configured, "not offered")
    return (f"MEND_DEFAULT_METHOD {configured} is not available on this model ({why}); {chosen} is the first "
            f"available in the order {' > '.join(PREFERENCE)}")
