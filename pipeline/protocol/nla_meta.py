"""``nla_meta.yaml``: the protocol an NLA checkpoint ships beside its weights, read for either role.

    from pipeline.protocol.nla_meta import checkpoint_files, read_sidecar
    local = checkpoint_files("kitft/nla-qwen2.5-7b-L20-av", "model.verbalizer", ["config.json"])
    meta = read_sidecar(local, role="verbalizer", key="model.verbalizer")
    meta.get("tokens.injection_token_id")                      # 149705, or None when absent
    meta.first(("prompt_templates.av", "prompt_templates.actor"))  # (name, value) of the first one set
    meta.where("extraction.injection_scale")                   # ".../nla_meta.yaml extraction.injection_scale"

The release (kitft/natural_language_autoencoders) writes schema_version 2: ``kind``, ``role``
(av/actor for a verbalizer, ar/critic for a reconstructor), ``d_model``, ``extraction.*``,
``tokens.*``, ``prompt_templates.*`` and the layer in ``extraction_layer_index`` or
``critic.extraction_layer_index``. Readers tolerate unknown keys, as the release's own do. A
checkpoint without the file reads as an empty sidecar: every value then comes from the config.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import PipelineError

META = "nla_meta.yaml"
ROLES = {"verbalizer": ("av", "actor"), "reconstructor": ("ar", "critic", "reconstructor")}
# Where a sidecar may keep the extraction layer, first found wins (schema_version 2 and its variants).
LAYER_KEYS = ("extraction_layer_index", "critic.extraction_layer_index", "extraction.layer_index")


@dataclass(frozen=True)
class Sidecar:
    """A parsed ``nla_meta.yaml``; ``path`` is None when the checkpoint has none."""

    path: Path | None
    data: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.path is not None

    def get(self, dotted: str):
        node = self.data
        for k in dotted.split("."):
            node = node.get(k) if isinstance(node, dict) else None
        return node

    def first(self, names: tuple[str, ...]):
        """(name, value) of the first of ``names`` the sidecar sets, else (None, None)."""
        return next(((n, self.get(n)) for n in names if self.get(n) is not None), (None, None))

    def where(self, name: str) -> str:
        """How an error or a log line names one of its values."""
        return f"{self.path} {name}"


def checkpoint_files(source: str, key: str, patterns: list[str]) -> Path:
    """A local directory as is; for a Hub id, a snapshot of just its small files (``patterns`` and
    the sidecar): the weights are fetched only when the model is loaded."""
    if os.path.isdir(source):
        return Path(source)
    from huggingface_hub import snapshot_download

    from pipeline.models.modeling import load_errors

    with load_errors("the checkpoint's metadata files", key, source):
        return Path(snapshot_download(source, allow_patterns=sorted(set(patterns) | {META})))


def read_sidecar(local: Path, role: str, key: str) -> Sidecar:
    """The checkpoint's sidecar, refused when it is not YAML or names the other role."""
    path = Path(local) / META
    if not path.exists():
        return Sidecar(None)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PipelineError(f"{path}: cannot read it as YAML ({type(e).__name__}); fix or delete it") from e
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping at the top level")
    found = data.get("role")
    if found is not None and found not in ROLES[role]:
        other = next((r for r, names in ROLES.items() if found in names), None)
        what = f"a {other}" if other else "an unknown role"
        raise PipelineError(f"{path}: role is {found!r} ({what}), but {key} must name a {role} "
                            f"({'|'.join(ROLES[role])})")
    return Sidecar(path, data)
