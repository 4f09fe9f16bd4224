"""Build hook for the one optional native piece (everything else is in pyproject.toml).

``asymstore._native`` is a streaming host-memory copy for the snapshot copy thread. It is optional: where no
C compiler is available the build goes on without it and asymstore copies with ``memmove``.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("asymstore._native", ["asymstore/_native.c"], optional=True, extra_compile_args=["-O2"])])
