"""The bridge: source hidden states -> K soft tokens in the target's input-embedding space."""
