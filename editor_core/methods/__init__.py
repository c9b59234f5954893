"""Editing methods beside MEND: the locate-then-edit family (ROME, MEMIT, AlphaEdit).

MEND lives in :mod:`editor_core.editor` and the fine-tuning baselines in :mod:`editor_core.baselines`;
every method implements :class:`editor_core.protocol.Editor` and returns an
:class:`editor_core.delta.EditDelta`.
"""
