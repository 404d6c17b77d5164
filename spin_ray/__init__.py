"""spin_ray: Ray-native self-play fine-tuning (SPIN, SPPO, T-SPIN) of language models."""

__version__ = "0.1.0"
