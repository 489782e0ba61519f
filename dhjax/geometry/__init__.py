"""Geometry floor: rotations, rigid/similarity alignment, mesh operations, linear blend skinning.

Submodules: `rotations`, `alignment`, `mesh`, `lbs` (pure functions, metres, jit/vmap/grad).
"""
