"""DDIM samplers: the reference-semantics loop (ground truth) and noise sources."""
