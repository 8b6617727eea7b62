"""The checkpoint format, in one place: an HF folder (config.json, tokenizer, safetensors
weights) plus, for a compressed folder, `lowrank.json` (the manifest: method, ratios, per-module
ranks and shapes; ../shared/DESIGN.md has the whole format). Factorised modules store `X.A`,
`X.B` (and `X.score`) under the original module's name, components in importance order. A
quantised matrix `X.leaf` is stored as `X.leaf_q` and `X.leaf_scales` (`converters.quantize`).

`converters.bake` writes what this module reads; `FORMAT_VERSION` changes whenever a folder
written by one version would be misread by another, and the reader refuses other versions.
Safetensors only: never pickles.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .config import ModelFolderError, read_json_object

MANIFEST = "lowrank.json"
FORMAT_VERSION = 2  # 2: quantised matrices (`converters.quantize`); version 1 folders read the same
READABLE_VERSIONS = (1, 2)


def weight_files(path: str | Path) -> list[Path]:
    """The folder's safetensors files (single file or a sharded index), or an error naming what is missing."""
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelFolderError(f"{path}: shard {missing[0]} named in {index.name} is missing")
        return [path / s for s in shards]
    raise ModelFolderError(f"{path} is not a model folder: model.safetensors is missing")


@contextmanager
def open_weights(file: Path) -> Iterator:
    """safe_open, with a damaged file (truncated, not safetensors) as a ModelFolderError naming it."""
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except SafetensorError as exc:
        raise ModelFolderError(f"{file} is not a readable safetensors file ({exc}): re-create or re-download it") \
            from None


def read_manifest(path: str | Path) -> dict | None:
    """The compressed folder's lowrank.json, or None for a dense folder."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    manifest = read_json_object(file)
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        known = " and ".join(map(str, READABLE_VERSIONS))
        raise ModelFolderError(f"{file} has format_version {version!r}; this lowrank-engine reads versions "
                               f"{known}: re-create the folder with this version's `lowrank compress`")
    return manifest
