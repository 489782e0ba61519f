"""dhjax: capturing and synthesising digital humans in JAX.

Floors (lower never imports higher): geometry <- io/models/render/ops <- nn <- capture/synthesis
<- train <- experiments. Units are metres throughout.
"""

__version__ = "0.1.0"
