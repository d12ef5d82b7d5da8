"""moe_runtime: a PyTorch inference runtime for Mixture-of-Experts language models.

Owns the model, gating, expert paths, generation, serving and placement. This package's top level
stays torch-free: the operator imports `moe_runtime.placement` and `moe_runtime.api` from it.
"""

__version__ = "0.1.0"
