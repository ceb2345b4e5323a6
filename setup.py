"""Builds the Cython fast path (ext/_fastpath.pyx and its .pxi includes) as overlay.fastpath._fastpath.

Everything else about the package is in pyproject.toml; setuptools still needs this file to
declare a compiled extension.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extension = Extension(
    "overlay.fastpath._fastpath",
    sources=["ext/_fastpath.pyx"],
    depends=["ext/hashmap.pxi", "ext/codec.pxi", "ext/table.pxi", "ext/syscalls.pxi", "ext/batch.pxi", "ext/io.pxi", "ext/crypto.pxi"],
    extra_compile_args=["-O3"],
    libraries=["crypto"],  # OpenSSL's libcrypto: the AEAD of encrypted networks (Debian: libssl-dev)
)

setup(ext_modules=cythonize([extension], language_level=3, compiler_directives={"embedsignature": True}))
