"""gated-attention-lab: small-scale ablations of gated attention (arXiv 2505.06708)."""

import os

__version__ = "0.1.0"

# Whether Inductor's cache folder was named before the lab was imported. Importing
# torch._dynamo sets TORCHINDUCTOR_CACHE_DIR to torch's temporary default when it is unset
# (torch/_dynamo/package.py, torch 2.11), so by the time the lab compiles, the variable no
# longer says who chose it (lab/training/step.py use_compile_cache).
INDUCTOR_CACHE_GIVEN = "TORCHINDUCTOR_CACHE_DIR" in os.environ
