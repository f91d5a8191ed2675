"""Prompt templates: each dataset's CoOp template (docs/methods/shared.md#prompt-templates) is the default; ImageNet
ensembles are selectable.

``data.templates`` is ``null`` (the dataset's own), ``tip7`` (Tip-Adapter's 7 ImageNet templates), ``clip80`` (CLIP
paper's 80-template ensemble) or an explicit list of strings with one ``{}`` each.
"""

from __future__ import annotations

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from xmx.errors import XmxError

ENSEMBLES = {
    "tip7": [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES],
    "clip80": [t("{}") for t in OPENAI_IMAGENET_TEMPLATES],
}


def resolve_templates(choice, default: list[str]) -> list[str]:
    if choice is None:
        return list(default)
    if isinstance(choice, str):
        if choice in ENSEMBLES:
            return list(ENSEMBLES[choice])
        if "{}" in choice:
            return [choice]
        raise XmxError(f"data.templates={choice!r} is unknown; valid choices: null (dataset default), "
                       f"{', '.join(ENSEMBLES)}, or a list of strings containing '{{}}'")
    templates = [str(t) for t in choice]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise XmxError(f"data.templates: every template needs one '{{}}' for the class name; got {bad or templates}")
    return templates
