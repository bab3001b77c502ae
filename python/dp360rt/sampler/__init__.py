"""DDIM samplers: the reference-semantics loop (ground truth), the fast engine, windows, the DDIM
tables and noise sources."""
