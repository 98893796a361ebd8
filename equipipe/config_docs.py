"""The key tables of ``config/README.md``, generated from the config schema.

``equipipe config-docs --write`` rewrites everything below :data:`MARKER` in the README from
``workflow/schemas/config.schema.yaml`` (keys, types, defaults, descriptions); the text above the
marker is kept. A test checks that the committed README equals the generated one, so a key is
documented exactly when the schema (and therefore the code, which reads its defaults there)
knows it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from equipipe import config as eqcfg

README = eqcfg.ROOT / "config" / "README.md"
MARKER = (
    "<!-- Generated from workflow/schemas/config.schema.yaml by `equipipe config-docs --write`; "
    "edit the schema, not the tables below. -->"
)


def _type(p: dict) -> str:
    if "enum" in p:
        return " | ".join(f"`{v}`" for v in p["enum"])
    t = p.get("type", "any")
    t = " or ".join(t) if isinstance(t, list) else t
    if "items" in p and isinstance(p["items"], dict):
        inner = p["items"]
        t += " of " + (
            " | ".join(f"`{v}`" for v in inner["enum"])
            if "enum" in inner
            else _type({"type": inner.get("type", "any")})
        )
    return t


def _default(p: dict) -> str:
    if "default" not in p:
        return ""
    return f"`{json.dumps(p['default'], ensure_ascii=False)}`"


def _cell(text: Any) -> str:
    return str(text or "").replace("|", "\\|").replace("\n", " ").strip()


def _table(props: dict[str, dict], prefix: str = "", with_default: bool = True) -> list[str]:
    head = "| key | type | default | meaning |" if with_default else "| key | type | meaning |"
    rows = [head, "|---|---|---|---|" if with_default else "|---|---|---|"]
    for key, p in props.items():
        if p.get("x-internal"):
            continue
        p = _resolve(p)
        meaning = _cell(p.get("description"))
        if p.get("x-sources"):
            meaning = f"{meaning} (sources: {', '.join(p['x-sources'])})".strip()
        cells = [f"`{prefix}{key}`", _cell(_type(p))]
        if with_default:
            cells.append(_default(p))
        rows.append("| " + " | ".join([*cells, meaning]) + " |")
    return rows


def _resolve(p: dict) -> dict:
    ref = p.get("$ref")
    if not ref:
        return p
    target = eqcfg.schema()["$defs"][ref.split("/")[-1]]
    return {**target, **{k: v for k, v in p.items() if k != "$ref"}}


def render_tables() -> str:
    """The generated part of the README (Markdown)."""
    s = eqcfg.schema()
    top, defs = s["properties"], s["$defs"]
    out: list[str] = [MARKER, "", "## Key reference", ""]
    add = out.extend

    add(["### `datasets.<name>` (spice | pdb | geom)", ""])
    common = defs["dataset:spice"]["properties"]
    add(_table({k: v for k, v in common.items() if k in ("source", "download_dir")}))
    split = defs["split"]["properties"]
    add(_table({k: v for k, v in split.items() if k != "predefined"}, "split.")[2:])
    add(_table(split["predefined"]["properties"], "split.predefined.")[2:])
    sub = defs["subsets"]["additionalProperties"]["properties"]
    add(_table(sub, "subsets.<name>.")[2:])
    out.append("")
    for ds in eqcfg.block_names("dataset"):
        src = _type(defs[f"dataset:{ds}"]["properties"]["source"])
        add([f"`datasets.{ds}.source`: {src}.", ""])
        for kind in ("download", "embedded", "preprocess"):
            props = defs[f"{kind}:{ds}"]["properties"]
            add([f"#### `datasets.{ds}.{kind}`", ""])
            add(_table(props) if props else ["(no keys)"])
            out.append("")

    add(["### `tasks.<name>` (forcefield | flowmatching | denoising)", ""])
    task = top["tasks"]["additionalProperties"]["properties"]
    add(_table({k: v for k, v in task.items() if k not in ("train", "eval")}))
    out.append("")
    for kind in eqcfg.block_names("task_cfg"):
        add([f"#### `task_cfg` of a {kind} task", ""])
        add(_table(defs[f"task_cfg:{kind}"]["properties"]))
        out.append("")
    for model in eqcfg.block_names("model_overrides"):
        add([f"#### `task_cfg.model_overrides` of model `{model}` (default: the size preset)", ""])
        add(_table(defs[f"model_overrides:{model}"]["properties"], with_default=False))
        out.append("")
    for block in ("train", "eval"):
        add([f"#### `{block}` (defaults: `{block.capitalize()}Config` in `equipipe/train.py`)", ""])
        add(_table(defs[block]["properties"], with_default=False))
        out.append("")

    add(["### `experiments.<name>`", ""])
    add(_table(top["experiments"]["additionalProperties"]["properties"]))
    add(_table(defs["resources"]["properties"], "resources.")[2:])
    out.append("")

    add(["### `analyses.<name>`", ""])
    add(_table(top["analyses"]["additionalProperties"]["properties"]))
    out.append("")
    for kind in eqcfg.block_names("analysis"):
        add([f"#### `spec` of a {kind} analysis", ""])
        add(_table(defs[f"analysis:{kind}"]["properties"]))
        out.append("")

    add(["### `figures.<name>`", ""])
    add(_table(top["figures"]["additionalProperties"]["properties"]))
    out.append("")
    add(["#### `style` keys each figure kind reads", ""])
    add(["| kind | style keys |", "|---|---|"])
    for kind, keys in defs["figure_style_kinds"].items():
        add([f"| `{kind}` | {', '.join(f'`{k}`' for k in keys)} |"])
    out.append("")
    add(["#### types of the `style` keys (defaults: where each kind reads them)", ""])
    add(_table(defs["figure_style_keys"]["properties"], with_default=False))
    out.append("")
    return "\n".join(out)


def render_readme(current: str) -> str:
    """``current`` with everything from the marker on replaced by :func:`render_tables`."""
    head = current.split(MARKER)[0].rstrip("\n")
    return head + "\n\n" + render_tables()


def write_readme(path: Path = README) -> bool:
    """Regenerate the README's tables; returns whether the file changed."""
    old = path.read_text()
    new = render_readme(old)
    if new != old:
        path.write_text(new)
    return new != old
