"""Writes docs/configuration.md, the config reference, from the config schema (--check: exit 1 if it is stale)."""

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from spin_ray.config import Config

TARGET = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

INTRO = """# Configuration reference

One typed config (`spin_ray/config.py`, pydantic) is read from a YAML file, then `key=value` overrides
on the command line (values parsed as YAML: `data.eval=null`, `training.beta=0.2`,
`generation.replicas=[1,4]`). Unknown keys and bad values stop with the key's dotted name and a
suggestion. Keys marked operational in `spin_ray/config.py` (worker and replica counts, CPUs,
accelerator labels, the lease) may change when a run is resumed; any other change under the same run
name is refused unless `spin-ray run --force`. A resubmitted config that leaves a key out keeps the
run's stored value for it.

This file is generated: `python scripts/config_reference.py` (a test fails when it is stale).

"""


def rows(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from rows(annotation, f"{prefix}{name}.")
        else:
            default = json.dumps(field.get_default(call_default_factory=True))
            yield f"| `{prefix}{name}` | `{default}` | {field.description or ''} |"


def reference() -> str:
    return INTRO + "| key | default | meaning |\n|---|---|---|\n" + "\n".join(rows(Config)) + "\n"


if __name__ == "__main__":
    if "--check" in sys.argv:
        sys.exit(0 if TARGET.read_text() == reference() else 1)
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(reference())
    print(f"wrote {TARGET}")
