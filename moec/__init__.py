"""moec: a compiler for Mixture-of-Experts layers.

A YAML spec goes in; a validated ``Spec``, a ``Plan`` and a standalone PyTorch/Triton package come out.
The compiler never imports torch: only the code it emits does.
"""

__version__ = "0.1.0"
