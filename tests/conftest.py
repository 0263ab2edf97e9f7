"""Suite-wide set-up, read before any test module imports jax.

The CPU suite compiles several hundred small XLA programs (interpret-mode kernels, the
model's prefill and decode loops), and on a 2-core CI machine LLVM's optimisation of
that host code cost more than the code's run time saved: without it the suite takes
about 40% less time (measured on the model and kernel tests). Only the machine code's
optimisation changes (no fast math, the HLO passes are XLA's usual ones), so results are
the ones the default flags give up to the order of float operations LLVM would have
chosen, which every tolerance already allows for. ``INNERQ_TEST_XLA_OPT=full`` keeps
XLA's defaults (the GPU scripts set it: there the kernels' own code is what is tested).
"""

from __future__ import annotations

import os

_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")

if os.environ.get("INNERQ_TEST_XLA_OPT", "") != "full":
    _flags = os.environ.get("XLA_FLAGS", "").split()
    _names = {f.split("=")[0] for f in _flags}
    os.environ["XLA_FLAGS"] = " ".join(
        _flags + [f for f in _FAST_COMPILE if f.split("=")[0] not in _names])
