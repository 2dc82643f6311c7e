"""The pipeline's stages: each is a per-chunk function plus a Stage the driver runs."""
