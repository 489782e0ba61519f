"""Parametric models: `flame` (FLAME as pure functions + file loading), `head_default` (the
embedded procedural head with FLAME's layout), `albedo` (linear albedo models in a head's UV
layout, and importers of FLAME's albedo files), `body` (an SMPL-X-layout body as pure functions +
file loading) and `body_default` (the embedded procedural body with SMPL-X's layout). The
embedded defaults are not statistical models of real people."""
