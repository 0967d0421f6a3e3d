"""Weights on disk: `NAME.safetensors` + `NAME.json` manifest (config, data, metrics, sha256).

Loading reads the file once, hashes those bytes and parses the same bytes, so what is verified is
what is loaded (a file swapped between a hash pass and a load pass cannot slip through). The digest
must match the manifest beside the weights and, when the caller pins one (`sha256=`, from the Serve
config), that pin too: a manifest on the same volume as the weights can be rewritten with them, a
digest in the deployment's config cannot. Nothing is ever unpickled. Writes are atomic (temp file + rename) so a crash never leaves a torn checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file


class WeightsError(ValueError):
    pass


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; weights are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(path: str | Path, tensors: dict[str, torch.Tensor], *, kind: str, config: dict[str, Any],
         data: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `path` (.safetensors) and its manifest beside it; return the manifest."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp))
    manifest = {
        "kind": kind, "file": path.name, "sha256": sha256_file(path), "created": time.time(),
        "config": config, "data": data or {}, "metrics": metrics or {},
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    man_path = path.with_suffix(".json")
    _atomic_write(man_path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2, sort_keys=True)))
    return manifest


def load(path: str | Path, *, kind: str | None = None, sha256: str | None = None
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load safetensors whose sha256 matches the manifest (and `sha256`, when pinned); raise
    WeightsError otherwise. The bytes hashed are the bytes parsed."""
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: only .safetensors weights (with a .json manifest) are accepted")
    man_path = path.with_suffix(".json")
    if not path.exists() or not man_path.exists():
        raise WeightsError(f"{path}: weights or manifest {man_path.name} missing")
    manifest = json.loads(man_path.read_text())
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if manifest.get("sha256") != digest:
        raise WeightsError(f"{path}: sha256 {digest[:12]}… does not match the manifest "
                           f"({str(manifest.get('sha256'))[:12]}…); refusing to load")
    if sha256 is not None and sha256.lower() != digest:
        raise WeightsError(f"{path}: sha256 {digest[:12]}… does not match the digest pinned in the "
                           f"configuration ({sha256[:12]}…); refusing to load")
    if kind is not None and manifest.get("kind") != kind:
        raise WeightsError(f"{path}: manifest kind {manifest.get('kind')!r}, expected {kind!r}")
    return load_bytes(data), manifest
