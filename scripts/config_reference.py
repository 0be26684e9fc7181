"""Write docs/config-reference.md from the config schema's field docstrings (so it cannot drift).

    python scripts/config_reference.py            # rewrite the page
    python scripts/config_reference.py --check    # exit 1 when the page is out of date
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from pathlib import Path

from essence.config.schema import Config

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the string right after it)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def rows(cls: type, prefix: str = "") -> list[str]:
    out = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name)
        if dataclasses.is_dataclass(kind):
            out += rows(kind, f"{prefix}{f.name}.")
            continue
        doc = docs.get(f.name, "").replace("|", "\\|")
        kind_text = getattr(kind, "__name__", None) if isinstance(kind, type) else str(kind)
        kind_text = kind_text.replace("typing.", "").replace("|", "\\|")
        out.append(f"| `{prefix}{f.name}` | `{kind_text}` | `{_default(f)}` | {doc} |")
    return out


def render() -> str:
    head = ("# Configuration reference\n\n"
            "Every field of an experiment file, with its type, default and meaning. Generated from "
            "the field docstrings in `src/essence/config/schema.py` (and the sections it composes) "
            "by `python scripts/config_reference.py`; a test fails when this page is out of date.\n\n"
            "| key | type | default | meaning |\n|---|---|---|---|\n")
    return head + "\n".join(rows(Config)) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != text:
            print(f"{PAGE} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
