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


# libsrtp2 on OpenSSL, when tools/build-libsrtp.sh could build it (else Debian's, on NSS)
LIBSRTP = HERE / "build" / "libsrtp"


def srtp_linkage() -> dict:
    static = LIBSRTP / "lib" / "libsrtp2.a"
    if static.exists():
        return {"include_dirs": [str(LIBSRTP / "include")], "extra_objects": [str(static)],
                "libraries": ["pthread", "crypto"], "depends": [str(static)],
                "define_macros": [("SIPEDGE_SRTP_CRYPTO", '"openssl"')]}
    return {"libraries": ["pthread", "srtp2"], "define_macros": [("SIPEDGE_SRTP_CRYPTO", '"debian"')]}


def extensions() -> list[Extension]:
    exts = []
    for pyx in sorted((HERE / "edge").rglob("*.pyx")):
        rel = pyx.relative_to(HERE)
        module = ".".join(rel.with_suffix("").parts)
        # the relay protects/unprotects SRTP with libsrtp2
        link = srtp_linkage() if module == "edge._rtp" else {"libraries": ["pthread"]}
        link["define_macros"] = macros + link.get("define_macros", [])
        exts.append(Extension(module, [str(rel)], extra_compile_args=cflags, **link))
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
