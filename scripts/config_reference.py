"""Prints the README's config reference table from the config schema (so the two cannot drift)."""

import json

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


if __name__ == "__main__":
    print("| key | default | meaning |\n|---|---|---|")
    print("\n".join(rows(Config)))
