"""Data: synthetic generators and dataset readers/writers.

`synthetic`: synthetic heads with full ground truth on the default head model (multi-view rig
and monocular videos); `textures`: UV-space maps and procedural albedo; `hair`: hair and beard
proxy shells; `dataset`: the on-disk format, its reader (real tracked data too), writer and the
deterministic, shardable input pipeline; `head_samples`: random heads of a FLAME-layout model
rendered from a rig (the foundation's demo); `albedo_synthetic`: the tracker's default albedo
model, a PCA of synthetic identities' albedos."""
