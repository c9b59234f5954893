"""Write inference settings into a saved MEND editor's config (its nets are untouched).

How a shipped editor's way of applying its nets is chosen after training: measure the settings with
``tools.mend_variant --editor DIR --set ...``, then write the ones that win, and record this command
in the editor's card:

    python -m tools.editor_settings runs/mend/l48-id --set preserve_lambda=15 preserve_keys=last \\
        preserve_keep=2 refine_passes=20 refine_seconds=6 pass_scale=0.25

``edit_targets`` takes module names here (comma-separated), or ``all`` for every trained target.
"""

from __future__ import annotations

import argparse
import logging

from editor_core import checkpoint
from editor_core.config import INFERENCE_FIELDS, parse_setting

log = logging.getLogger("editor_settings")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("editor", help="editor checkpoint directory (editor_config.json)")
    p.add_argument("--set", nargs="+", required=True, metavar="FIELD=VALUE", help=f"any of {', '.join(INFERENCE_FIELDS)}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    changes: dict[str, object] = {}
    for item in args.set:
        name, sep, text = item.partition("=")
        try:
            if name == "edit_targets" and sep:  # names, not the variant tool's "out_proj", which needs the model
                changes[name] = [] if text == "all" else [x for x in text.split(",") if x]
                continue
            field, value = parse_setting(item)
        except ValueError as err:
            p.error(f"--set {item!r}: {err}")
        changes[field] = value
    try:
        config = checkpoint.write_settings(args.editor, changes)
    except (ValueError, checkpoint.EditorCheckpointError) as err:
        p.error(str(err))
    log.info("%s: %s", args.editor, {k: getattr(config, k) for k in INFERENCE_FIELDS})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
