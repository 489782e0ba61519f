"""D3GA: a drivable Gaussian avatar of one clothed body in tetrahedral cages (body, face, upper
and lower garment layers), trained on multi-view video.

    python -m experiments.d3ga --config=configs/d3ga.py:tiny --workdir=runs/d3ga
    python -m experiments.d3ga --config=configs/d3ga.py:paper --config.data.root=<multi-view body dataset> --workdir=runs/d3ga
    python -m experiments.sweep --config=configs/d3ga.py:tiny --workdir=runs/d3ga_ablations
    python -m experiments.d3ga_drive --workdir=runs/d3ga --out=runs/d3ga_drive --motion=arms

Variants:
  tiny              one synthetic subject walking (40 frames, the last 8 held out) x 6 dome
                    cameras (camera 4 held out) at 96 x 128; coarse cages (3 cm body lattice,
                    2.5 cm garment shells on a 2.1 cm lattice), 7.2k Gaussians, MLPs of width
                    64; 1500 steps of one image (CPU).
  tiny_triangles    ablation: Gaussians on the parts' surface triangles with triangle
                    deformation gradients instead of tetrahedra.
  tiny_no_garment   ablation: no garment (layer) loss.
  tiny_single       ablation: one layer (one cage around body and garments; each Gaussian
                    keeps the layer label of the surface it was sampled on).
  tiny_simplex      ablation beyond the thesis: barycentrics projected onto the simplex
                    (model.bary_domain = "simplex"), so every Gaussian stays in its cell.
  tiny_loose        tiny on a subject in loose garments (a jacket and a flared skirt;
                    data.synthetic.jacket_prob = skirt_prob = 1), where the thesis sees
                    tetrahedra beat triangles most clearly.
  tiny_loose_triangles  tiny_loose with Gaussians on surface triangles.
  paper             the thesis: 200 cameras at 667 x 1024 (a 16-subject synthetic dataset, or
                    data.root), 2.5 cm body cage, 2 cm shells, 48k Gaussians, MLPs of width
                    128, 700k steps with decays at 50/75/90%.

sweep() runs the tiny variant and its four ablations (thesis: tets beat triangles, the garment
loss gives clean layers; compare novel_view/psnr and the layer renders; the simplex ablation is
dhjax's); sweep("tiny_loose") runs tetrahedra against triangles on the loose garments.

Data: data.root = "" renders data.synthetic's clothed body video once into the cache
(`dhjax.data.cache.cached_bodies`); otherwise a `dhjax.data.dataset` folder of a multi-view
body video (data.split and data.item select the subject; layer labels required).
"""

import ml_collections

from dhjax.data import body_synthetic
from dhjax.synthesis import d3ga, d3ga_data

VARIANTS = ("", "tiny", "tiny_triangles", "tiny_no_garment", "tiny_single", "tiny_simplex", "tiny_loose",
            "tiny_loose_triangles", "paper")


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "d3ga"
    c.seed = 0
    c.data = ml_collections.ConfigDict()
    c.data.root = ""                     # "" = render data.synthetic into the cache
    c.data.split = "train"
    c.data.item = -1                     # the subject's item number (-1: the first)
    c.data.cache_dir = ""
    c.data.max_frames = 0                # 0: every frame
    c.data.test_views = (4,)             # held-out camera numbers (novel view)
    c.data.test_frames = 0.2             # held-out last frames (novel pose): a count or a fraction < 1
    c.data.synthetic = body_synthetic.default_config()
    c.data.synthetic.update(n_subjects=1, n_frames=300)
    c.parts = d3ga_data.default_parts_config()
    c.model = d3ga.default_model_config()
    c.loss = d3ga.default_loss_config()
    c.optim = d3ga.default_optim_config()
    c.batch = ml_collections.ConfigDict(dict(size=1))
    c.train = ml_collections.ConfigDict(dict(steps=700_000, log_every=500, checkpoint_every=5000,
                                             keep_checkpoints=3, eval_every=10_000, on_nonfinite="skip",
                                             max_skipped_fraction=0.1))
    c.eval = ml_collections.ConfigDict(dict(
        novel_view_frames=16,            # training frames evaluated from the held-out cameras
        video_fps=15.0,
        lpips_path=""))                  # LPIPS weights (dhjax.nn.lpips npz): adds LPIPS to the metrics

    if arg in ("tiny", "tiny_triangles", "tiny_no_garment", "tiny_single", "tiny_simplex", "tiny_loose",
               "tiny_loose_triangles"):
        s = c.data.synthetic
        s.update(n_frames=40)
        s.dome.update(n_cameras=6, width=96, height=128, elevations_deg=(0.0, 30.0))
        c.data.test_frames = 8
        c.parts.update(body_spacing=0.03, shell_radius=0.025, shell_spacing=0.021,
                       n_gaussians=dict(body=3000, face=600, upper=1800, lower=1800))
        c.model.update(hidden=64)
        c.train.update(steps=1500, log_every=50, checkpoint_every=500, keep_checkpoints=2, eval_every=500)
        c.eval.update(novel_view_frames=8)
        if arg in ("tiny_loose", "tiny_loose_triangles"):
            s.update(jacket_prob=1.0, skirt_prob=1.0)
        if arg in ("tiny_triangles", "tiny_loose_triangles"):
            c.model.geometry = "triangles"
        elif arg == "tiny_no_garment":
            c.loss.garment_weight = 0.0
        elif arg == "tiny_single":
            c.parts.layers = "single"
        elif arg == "tiny_simplex":
            c.model.bary_domain = "simplex"
    elif arg == "paper":
        c.data.synthetic.update(n_subjects=16)
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; use one of {VARIANTS}")
    return c


def sweep(arg=None):
    """The ablations of the tiny variant (thesis A.3): tets vs triangles, no garment loss, one layer,
    and (beyond the thesis) barycentrics kept in the simplex; for "tiny_loose", tets vs triangles
    on loose garments."""
    if arg in ("tiny_loose", "tiny_loose_triangles"):
        return [{"model.geometry": "tets"}, {"model.geometry": "triangles"}]
    return [{}, {"model.geometry": "triangles"}, {"loss.garment_weight": 0.0}, {"parts.layers": "single"},
            {"model.bary_domain": "simplex"}]
