"""Prints the README's config reference table from the config schema; --write replaces it in README.md."""

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from spin_ray.config import Config


def rows(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from rows(annotation, f"{prefix}{name}.")
        else:
            default = json.dumps(field.get_default(call_default_factory=True))
            yield f"| `{prefix}{name}` | `{default}` | {field.description or ''} |"


HEADER = "| key | default | meaning |\n|---|---|---|"


def table() -> str:
    return HEADER + "\n" + "\n".join(rows(Config))


def write_readme(readme: Path) -> None:
    """Swap the table that starts at HEADER (up to the next blank line) for a fresh one."""
    text = readme.read_text()
    start = text.index(HEADER)
    end = text.index("\n\n", start)
    readme.write_text(text[:start] + table() + text[end:])


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_readme(Path(__file__).resolve().parents[1] / "README.md")
    else:
        print(table())
