"""Geometry floor: rotations, rigid/similarity alignment, mesh operations, linear blend skinning.

Submodules: `rotations`, `alignment`, `mesh`, `lbs` (pure functions, metres, jit/vmap/grad),
`deformation` (deformation gradients), `vectors` (normalisation, nearest neighbours), `pca`
(principal component analysis, GEM's eigenbases), `isosurface` (tetrahedral lattices, marching
tetrahedra) and `tetra` (tetrahedral cages, point location, tet deformation gradients; D3GA).
"""
