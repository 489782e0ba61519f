"""Rendering: pinhole cameras and rigs, a pure-JAX triangle rasterizer, SH shading.

Conventions (see `dhjax.render.camera`): metres, world y up, the head faces +z; OpenCV cameras
(x_cam = R x_world + t, +z forward, image x right / y down); pixel (row i, column j) has its
centre at image coordinates (u, v) = (j, i).
"""

from dhjax.render.camera import (
    Camera,
    camera_centre,
    camera_from_fov,
    focal_from_fov,
    intrinsics,
    look_at,
    make_camera,
    orbit_rig,
    rig_from_angles,
    pixel_rays,
    project,
    synshot_rig,
    to_opencv,
    unproject,
    world_to_camera,
)
from dhjax.render.raster import (
    Fragments,
    count_intersections,
    interpolate,
    rasterize,
    rasterize_reference,
    rasterize_uv,
    uv_map,
)
from dhjax.render.shading import (
    SH_BAND_FACTORS,
    render_mesh,
    sample_texture,
    sh_basis,
    sh_irradiance,
)
