"""Model cards: the README.md of every model directory obert writes, so that a published model
says what was done to it and how to do it again (the command or recipe, sparsity, metrics, and
speed where it was measured)."""

from __future__ import annotations

import json


def _number(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(title: str, *, what: list[str], source: str | None = None,
               recipe_text: str | None = None, sparsity: dict | None = None,
               metrics: dict | None = None, speed: dict | None = None) -> str:
    """Markdown: a title, what was done (one bullet per step), the source model, the global and
    per-layer sparsity, the headline metrics, measured speed and the recipe that made it."""
    lines = [f"# {title}", "", "Made with obert (second-order pruning of transformers).", ""]
    lines += ["## What was done", ""] + [f"- {w}" for w in what] + [""]
    if source:
        lines += [f"Starting model: `{source}`", ""]
    if sparsity:
        lines += ["## Sparsity", "",
                  f"Global sparsity of the prunable layers: {sparsity.get('global_sparsity', 0):.2%} "
                  f"({sparsity.get('num_pruned', 0):,} of {sparsity.get('num_params', 0):,} weights "
                  f"are zero); method: {sparsity.get('method')}, structure: "
                  f"{sparsity.get('structure')}.", ""]
        layers = sparsity.get("layers") or {}
        if layers:
            lines += ["| layer | weights | sparsity |", "|---|---:|---:|"]
            lines += [f"| `{n}` | {v['numel']:,} | {v['sparsity']:.2%} |" for n, v in layers.items()]
            lines += [""]
    if metrics:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))
                 and not isinstance(v, bool)}
        lines += ["## Metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {_number(v)} |" for k, v in shown.items()] + [""]
    if speed:
        lines += ["## Speed", "", "```json", json.dumps(speed, indent=2), "```", ""]
    if recipe_text:
        lines += ["## Recipe", "", "```yaml", recipe_text.rstrip("\n"), "```", ""]
    return "\n".join(lines)
