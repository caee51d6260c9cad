"""gated-attention-lab: small-scale ablations of gated attention (arXiv 2505.06708)."""

__version__ = "0.1.0"
