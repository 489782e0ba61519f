"""dhjax: capturing and synthesising digital humans in JAX.

The package is built in floors, lowest first:

    geometry, losses, io  <-  ops  <-  models, render  <-  nn  <-  data  <-  train  <-  capture
      <-  synthesis  <-  bench, doctor  <-  experiments

A module imports its own package and the floors to its left, never a floor to its right (also
not inside a function); the packages that share a floor do not import each other, and this file
imports none of them. `experiments/` and `configs/` are outside the package, above it: an
experiment never imports another experiment, a config never imports an experiment.
`tests/test_floors.py` reads the order from this docstring and checks every import against it.

Units are metres throughout.
"""

__version__ = "0.1.0"
