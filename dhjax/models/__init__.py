"""Parametric models: `flame` (FLAME as pure functions + file loading) and `head_default` (the
embedded procedural head with FLAME's layout; not a statistical model of real people)."""
