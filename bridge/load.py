"""Loading a bridge file: every bridge kind, registered, and the one `load_bridge`.

Importing this module imports each architecture module, and so registers it in `BRIDGES`
(bridge/base.py); a new kind is one module plus its import here. The manifest's `arch` picks the
class; the architecture's own `load` verifies and reads the weights.
"""

from __future__ import annotations

from pathlib import Path

from bridge import aligned, perceiver  # noqa: F401  (registers the kinds)
from bridge import token_index as ti
from bridge.base import BRIDGES, BridgeBase, manifest_arch


def default_weights_path() -> Path:
    """The bridge shipped with the package for the embedded pair."""
    return Path(__file__).resolve().parent / "weights" / "smollm2-135m__gemma3-270m.safetensors"


def load_bridge(path: str | Path, device: str = "cpu", target_path: str | None = None,
                search_dtype: str = "float32", token_index: str = "none", sha256: str | None = None) -> BridgeBase:
    """The bridge at `path`, of the kind its manifest names.

    `target_path` and `search_dtype` go to the kind's `load` (the aligned bridge reads its vocabulary
    rows from the target's weights and scores them in that dtype, `AlignedBridge.use_search_dtype`).
    `token_index`: "auto" = the index beside the weights if there is one, a path, or "none"
    (bridge/token_index.py); a path for a bridge without `supports_token_index` is an error, "auto"
    leaves such a bridge as it is. `sha256`: the digest the deployment pins; the weights' bytes must
    match it as well as their manifest."""
    bridge = BRIDGES.get(manifest_arch(path)).load(path, device=device, target_path=target_path,
                                                   search_dtype=search_dtype, sha256=sha256)
    if token_index == "none":
        return bridge
    if not bridge.supports_token_index():
        if token_index == "auto":
            return bridge
        raise ValueError(f"token index {token_index}: bridge {bridge.bridge_id} ({bridge.arch}) does not take one")
    index = ti.default_path(path) if token_index == "auto" else Path(token_index)
    if index.exists() or token_index != "auto":
        bridge.use_token_index(*ti.load(index, bridge))
    return bridge
