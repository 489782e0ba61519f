"""Metric benchmark of a trained MICA on held-out synthetic identities (the run's test split).

    python -m experiments.mica_eval --workdir=runs/mica [--out=runs/mica/eval]

Scans: the ground-truth neutral meshes of the test identities cropped to the face region (as
NoW crops its scans), sampled with Gaussian noise (config eval.scan_noise_mm) and moved by a
random rigid transform, with the 7 NoW landmarks. Predictions: MICA's neutral meshes (one per
test image) and the mean face (zero shape). Each is aligned to its scan rigidly ("metric", the
protocol of the thesis) and with a scale ("scaled", the original NoW protocol), through
`dhjax.capture.metric.evaluate`. Writes into --out (default <workdir>/eval): results.md (median /
mean / std mm table, and the per-identity comparison), results.json (the same plus per-scan and
per-identity numbers) and cumulative_errors.png.

"MICA beats the mean face" is judged per identity (`mica.compare_per_identity`): a difference of
the summary medians over a few dozen identities is mostly noise, because most of the error's
spread is between identities, which both rows share. The report gives how many identities MICA
wins, the mean difference with a bootstrap 95% interval, and a one-sided Wilcoxon signed-rank
p-value; the check requires p < 0.05.
"""

import json
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from dhjax.capture import metric
from dhjax.capture import mica
from dhjax.train import loop
from experiments.mica_predict import load_run_or_exit

_WORKDIR = flags.DEFINE_string("workdir", None, "a MICA training run (experiments.mica_train)", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder (default <workdir>/eval)")

ROW_ORDER = ("MICA metric", "MICA scaled", "mean face metric", "mean face scaled")
ALPHA = 0.05
"""Significance level of the per-identity check."""


def paired_line(protocol: str, c: dict) -> str:
    """One line summarising `mica.compare_per_identity`'s result."""
    lo, hi = c["ci95_mean_diff"]
    return (f"{protocol}: MICA better on {c['wins']} of {c['n']} identities, mean difference "
            f"{c['mean_diff']:+.3f} mm (95% CI {lo:+.3f} .. {hi:+.3f}), one-sided Wilcoxon p = "
            f"{c['p_a_better']:.3g}")


def main(argv):
    del argv
    t0 = time.time()
    loop.quiet_library_logs()
    cfg, variables, rec, step, model = load_run_or_exit(_WORKDIR.value)
    out = Path(_OUT.value or Path(_WORKDIR.value) / "eval")
    test = mica.cached_split(cfg.data, "test")
    ids = np.unique(test["identity"])
    print(f"MICA run {_WORKDIR.value} (checkpoint {step}): test split of {len(test['image'])} images of "
          f"{len(ids)} identities (numbers {ids.min()}..{ids.max()})", flush=True)
    pred = mica.predict(variables, mica.crop_batch(test["image"], test["five"], mica.variables_kind(variables)))
    rows = mica.benchmark(model, pred, test["shape"], test["identity"], seed=int(cfg.eval.seed),
                          noise_mm=float(cfg.eval.scan_noise_mm), n_points=int(cfg.eval.scan_points),
                          log=print)
    rows = {k: rows[k] for k in ROW_ORDER}
    summaries = {k: v["summary"] for k, v in rows.items()}
    table = metric.results_table({f"{k.rsplit(' ', 1)[0]} ({k.rsplit(' ', 1)[1]})": s for k, s in summaries.items()})
    paired = {proto: mica.compare_per_identity(rows, test["identity"], proto) for proto in ("metric", "scaled")}
    checks = {
        "MICA metric median < mean face metric median":
            summaries["MICA metric"]["median_mm"] < summaries["mean face metric"]["median_mm"],
        f"MICA better than the mean face per identity (metric; one-sided Wilcoxon p < {ALPHA})":
            paired["metric"]["p_a_better"] < ALPHA,
        "mean face metric median > mean face scaled median":
            summaries["mean face metric"]["median_mm"] > summaries["mean face scaled"]["median_mm"],
    }
    out.mkdir(parents=True, exist_ok=True)
    notes = (f"Held-out synthetic identities: {len(ids)} ({len(test['image'])} images, one MICA prediction per "
             f"image; the mean face once per identity). Scans: face region of the true neutral mesh, "
             f"{cfg.eval.scan_points} points, {cfg.eval.scan_noise_mm} mm noise, random rigid motion; "
             f"errors are scan-to-mesh distances after rigid (metric) or similarity (scaled) alignment.\n")
    paired_md = "".join(f"- {paired_line(proto, c)}\n" for proto, c in paired.items())
    (out / "results.md").write_text(
        f"# MICA metric benchmark ({_WORKDIR.value}, checkpoint {step})\n\n{table}\n{notes}\n"
        f"Per identity (MICA's mean error over the identity's images against the mean face's; "
        f"negative = MICA better):\n\n{paired_md}\n"
        + "".join(f"- {k}: {'yes' if v else 'NO'}\n" for k, v in checks.items()))
    (out / "results.json").write_text(json.dumps({
        "workdir": str(_WORKDIR.value), "checkpoint_step": int(step), "encoder": rec["encoder"]["source"],
        "n_images": int(len(test["image"])), "n_identities": int(len(ids)),
        "summary": summaries, "per_scan": {k: v["per_scan"] for k, v in rows.items()}, "per_identity": paired,
        "checks": checks}, indent=2))
    metric.plot_cumulative_errors(out / "cumulative_errors.png",
                                  {k: v["errors"] for k, v in rows.items()}, max_mm=6.0,
                                  title="MICA vs mean face, held-out synthetic identities")
    print(table, flush=True)
    for proto, c in paired.items():
        print(paired_line(proto, c), flush=True)
    for k, v in checks.items():
        print(f"{k}: {'yes' if v else 'NO'}", flush=True)
    print(f"done in {time.time() - t0:.0f}s: {out}/results.md, results.json, cumulative_errors.png", flush=True)


if __name__ == "__main__":
    app.run(main)
