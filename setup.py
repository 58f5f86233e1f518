"""Build the Cython hot paths: every ``edge/*.pyx`` becomes an extension.

``EDGE_DEBUG=1`` turns on line tracing and the annotate HTML (asyncpg, uvloop ``make debug``).
"""
import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("EDGE_DEBUG") == "1"
HERE = Path(__file__).parent

macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
cflags = ["-O2", "-Wall", "-Wsign-compare"]
if DEBUG:
    cflags = ["-O0", "-g", "-Wall"]


def extensions() -> list[Extension]:
    exts = []
    for pyx in sorted((HERE / "edge").rglob("*.pyx")):
        rel = pyx.relative_to(HERE)
        module = ".".join(rel.with_suffix("").parts)
        exts.append(
            Extension(
                module,
                [str(rel)],
                define_macros=macros,
                extra_compile_args=cflags,
                # the relay protects/unprotects SRTP with libsrtp2 (Debian libsrtp2-dev)
                libraries=["pthread", "srtp2"] if module == "edge._rtp" else ["pthread"],
            )
        )
    return exts


setup(
    ext_modules=cythonize(
        extensions(),
        language_level=3,
        annotate=DEBUG,
        compiler_directives={
            "embedsignature": True,
            "linetrace": DEBUG,
        },
    ),
)
