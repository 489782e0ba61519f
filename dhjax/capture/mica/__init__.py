"""MICA: a metric neutral head shape from one image (Zielonka et al., ECCV 2022; thesis A.1).

    crop = arcface_crop(image, five points)                     [112, 112, 3] in [0, 1]
    e    = E(crop) / |E(crop)|                                   [512]   identity encoder (iresnet)
    z    = 0.25 * M(e)                                           [300]   shape coefficients
    mesh = template + shapedirs . z                              [V, 3]  metres, neutral pose

E is insightface's ArcFace iresnet (`dhjax.nn.iresnet`; with the weights of an ONNX file,
config `encoder.onnx_path`, only its last `encoder.last_blocks` blocks and head train; without,
it is trained from scratch with every parameter trainable). M is the mapping network. The
landmark encoder (`encoder.kind = "landmarks"`, `landmark_net`) replaces E by a heatmap network
that finds the 68 iBUG landmarks in a 96 x 96 crop placed by the same five points and feeds M
their similarity-normalised positions; its landmark loss trains the heatmap network, the shape
loss (through a stop-gradient) only the mapping network, and after training the mapping can be
refitted on held-out identities (`calibration`).

One module per job; every public name is also importable from this package:

    config        default_config, default_data_config
    landmark_net  the landmark encoder's crop, heatmap network and descriptor
    model         MappingNetwork, MicaNet, LandmarkMicaNet; architectures from configs / variables
    loss          neutral meshes, region weights, the shape loss
    crops         aligned crops and prediction from them
    train         training state, optimiser, step, model selection (for `dhjax.train.loop`)
    data          synthetic image / shape pairs, generated once and cached
    calibration   the landmark encoder's mapping refitted on held-out identities
    evaluation    the NoW-style metric benchmark on synthetic scans
    run           train / predict / evaluate a run folder (the experiments' entry points)
"""

from dhjax.capture.mica import landmark_net
from dhjax.capture.mica.calibration import (CALIBRATION_FILE, aligned_face_errors_mm, calibrate_mapping,
                                            calibrated_variables, calibration_enabled, fit_linear_mapping,
                                            landmark_descriptors, save_calibration, with_linear_mapping)
from dhjax.capture.mica.config import N_SHAPE, default_config, default_data_config
from dhjax.capture.mica.crops import (check_crops, crop_batch, crop_from_landmarks, crop_images, predict,
                                      predict_image)
from dhjax.capture.mica.data import (DATA_FORMAT, STREAM_CAMERA, cache_path, cached_split, cached_splits,
                                     eval_batch, generate_split, sample_cameras, split_dataset, split_spec)
from dhjax.capture.mica.evaluation import (NOW_LANDMARKS, STREAM_SCAN, benchmark, compare_per_identity,
                                           mesh_prediction, synthetic_scans)
from dhjax.capture.mica.loss import loss_fn, neutral_landmarks, neutral_vertices, region_weights, vertex_errors_mm
from dhjax.capture.mica.model import (CROP_SIZE, ENCODER_KINDS, LEAKY_SLOPE, OUTPUT_SCALE, LandmarkMicaNet,
                                      MappingNetwork, MicaNet, arch_kind, check_kind, crop_size, encoder_arch,
                                      load_encoder_weights, make_net, net_from_variables, variables_kind)
from dhjax.capture.mica.train import (best_variables, bn_mode, init_state, labels, make_optimizer,
                                      method_functions, state_template, train_step, validation_error)
from dhjax.capture.mica import run
from dhjax.capture.mica.run import RUN_MODEL_FILE, load_run, read_run, write_run_model

__all__ = [
    "landmark_net", "run",
    "N_SHAPE", "OUTPUT_SCALE", "LEAKY_SLOPE", "CROP_SIZE", "NOW_LANDMARKS", "DATA_FORMAT", "STREAM_CAMERA",
    "STREAM_SCAN", "ENCODER_KINDS", "RUN_MODEL_FILE", "CALIBRATION_FILE",
    "default_config", "default_data_config",
    "MappingNetwork", "MicaNet", "LandmarkMicaNet", "check_kind", "crop_size", "arch_kind", "encoder_arch",
    "make_net", "variables_kind", "net_from_variables", "load_encoder_weights",
    "region_weights", "neutral_vertices", "neutral_landmarks", "vertex_errors_mm", "loss_fn",
    "check_crops", "crop_from_landmarks", "crop_images", "crop_batch", "predict", "predict_image",
    "bn_mode", "labels", "make_optimizer", "init_state", "state_template", "best_variables",
    "validation_error", "train_step", "method_functions",
    "sample_cameras", "split_spec", "generate_split", "cache_path", "cached_split", "cached_splits",
    "split_dataset", "eval_batch",
    "landmark_descriptors", "aligned_face_errors_mm", "fit_linear_mapping", "calibration_enabled",
    "calibrate_mapping", "with_linear_mapping", "save_calibration", "calibrated_variables",
    "synthetic_scans", "mesh_prediction", "benchmark", "compare_per_identity",
    "write_run_model", "read_run", "load_run",
]
