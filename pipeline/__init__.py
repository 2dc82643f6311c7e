"""nla-pipeline: verbalize a language model's activations at dataset scale (see README.md)."""

__version__ = "0.1.0"
