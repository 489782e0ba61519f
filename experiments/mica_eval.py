"""Metric benchmark of a trained MICA on held-out synthetic identities (the run's test split).

    python -m experiments.mica_eval --workdir=runs/mica [--out=runs/mica/eval]

Scans: the ground-truth neutral meshes of the test identities cropped to the face region (as
NoW crops its scans), sampled with Gaussian noise (config eval.scan_noise_mm) and moved by a
random rigid transform, with the 7 NoW landmarks. Predictions: MICA's neutral meshes (one per
test image) and the mean face (zero shape). Each is aligned to its scan rigidly ("metric", the
protocol of the thesis) and with a scale ("scaled", the original NoW protocol), through
`dhjax.capture.metric.evaluate`. "MICA beats the mean face" is judged per identity (a
one-sided Wilcoxon signed-rank test, p < 0.05). Writes into --out (default <workdir>/eval):
results.md (median / mean / std mm table, and the per-identity comparison), results.json (the
same plus per-scan and per-identity numbers) and cumulative_errors.png.
"""

from absl import app, flags

from dhjax.capture import mica

_WORKDIR = flags.DEFINE_string("workdir", None, "a MICA training run (experiments.mica_train)", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder (default <workdir>/eval)")


def main(argv):
    del argv
    mica.run.evaluate(_WORKDIR.value, _OUT.value)


if __name__ == "__main__":
    app.run(main)
