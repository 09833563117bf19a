"""Build the Cython twins.

Convention: ``cython/<subpackage>/<name>_c.pyx`` compiles to ``qmpshadow.<subpackage>.<name>_c``;
its pure-Python spec lives at ``qmpshadow/<subpackage>/<name>_py.py`` and the selector at
``qmpshadow/<subpackage>/<name>.py``. ``QMPSHADOW_NO_EXTENSIONS=1`` at build time skips the
compile (the package then runs on the Python twins).
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent


def _extensions() -> list[Extension]:
    if os.environ.get("QMPSHADOW_NO_EXTENSIONS") == "1":
        return []
    from Cython.Build import cythonize

    exts = []
    for pyx in sorted((HERE / "cython").rglob("*_c.pyx")):
        rel = pyx.relative_to(HERE / "cython").with_suffix("")
        name = "qmpshadow." + ".".join(rel.parts)
        exts.append(
            Extension(
                name,
                [str(pyx.relative_to(HERE))],
                extra_compile_args=["-O3"],
            )
        )
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
        quiet=True,
    )


setup(ext_modules=_extensions())
