"""Python side of dhjax's XLA FFI custom calls: pure-JAX references, kernel dispatch, custom VJPs."""

from dhjax.ops.hashgrid import HashGridConfig, hash_encode
# Modules: bvh (closest points on meshes), hashgrid (multi-resolution hash encoding),
# splat (tile compositing of projected Gaussians; its front end is dhjax.render.splat).
from dhjax.ops.bvh import ClosestPoint, closest_point
from dhjax.ops.raymarch import Composite, Samples, composite, march
