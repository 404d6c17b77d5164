"""Models: resolving a spec to a loadable checkpoint staged per node, and LoRA adapters through PEFT."""
