"""The package is pure Python and runs as it is. Optionally, the modules of the engine loop can be
compiled from the same source with mypyc (the way black and mypy ship): about 0.6x the wall time
of the interpreted package (benchmarks/README.md). Nothing else changes: the same code, results
and tests.

    pip install mypy wheel 'setuptools>=68'
    SERVESIM_COMPILE=1 pip install --no-build-isolation -e .   # beside the sources (editable)
    SERVESIM_COMPILE=1 pip install --no-build-isolation .      # an installed copy

Built beside the sources, the compiled modules are imported instead of the .py files until
removed (`rm -f *.so; find sim -name '*.so' -delete`): build again after editing those files.
Without SERVESIM_COMPILE=1 nothing is compiled.
"""

import os

from setuptools import setup

# the engine loop: what every simulated step goes through
COMPILED = [
    "sim/engine.py", "sim/decode_group.py", "sim/kv_cache.py", "sim/prefix_cache.py", "sim/tokens.py",
    "sim/step_time.py", "sim/perf_model.py", "sim/request.py", "sim/client.py", "sim/deployment.py",
    "sim/schedulers/base.py", "sim/schedulers/vllm_v0.py", "sim/schedulers/vllm_v1.py",
]

ext_modules = []
if os.environ.get("SERVESIM_COMPILE") == "1":
    from mypyc.build import mypycify

    # type-check only these modules (the rest of the package is imported as it is)
    ext_modules = mypycify(["--follow-imports=silent", "--ignore-missing-imports", *COMPILED], opt_level="3")

setup(ext_modules=ext_modules)
