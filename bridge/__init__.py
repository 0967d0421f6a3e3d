"""The bridge: source hidden states -> soft tokens in the target's input-embedding space.

The contract and the registry of kinds are in `bridge/base.py`; `bridge/load.py` registers every kind
and loads a bridge file by the `arch` its manifest names."""
