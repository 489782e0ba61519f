"""Benchmarks of dhjax against its references and peers (timings are reported, never asserted).

`timing` (the median-of-calls timer), `flame` (FLAME forward vs smplx, rasterizer), `synthetic`
(synthetic-data samples/s), `splat` (Gaussian splatting kernels vs reference and gsplat),
`geometry` (closest-point BVH and hash-grid kernels vs references, libigl, open3d), `suite` (one
suite per run, written to bench.json). Floor: above `synthesis`, below `experiments`.
"""
