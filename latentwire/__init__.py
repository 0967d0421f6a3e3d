"""LatentWire shared core: model profiles, packet codec, settings, weights I/O and the agent runtime.

`bridge/`, `compression/` and `services/` all build on this package; it never imports them.
"""

__version__ = "0.1.0"
