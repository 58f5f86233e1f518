#!/bin/sh
# libsrtp2 for the relay, built on OpenSSL (docs/media.md "SRTP"). Debian's libsrtp2 is built on
# NSS, whose AES-CM path costs ~1.5 us more per packet (bench/bench_srtp_backend.py); rtpengine's
# SRTP runs on OpenSSL. This fetches the same upstream release Debian ships (its .orig tarball,
# checked against the sha256 of Debian's .dsc), builds the static library with --enable-openssl
# into build/libsrtp, and setup.py links it into edge._rtp. No root needed; a few seconds.
# Offline (or any failure): one line says so and the relay links Debian's libsrtp2 instead.
set -u
VER=2.5.0
SHA256=8a43ef8e9ae2b665292591af62aa1a4ae41e468b6d98d8258f91478735da4e09
URL=${LIBSRTP_URL:-http://deb.debian.org/debian/pool/main/libs/libsrtp2/libsrtp2_${VER}.orig.tar.gz}
PY=${1:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
DEST=$HERE/build/libsrtp
STAMP="$VER openssl"
[ -f "$DEST/lib/libsrtp2.a" ] && [ "$(cat "$DEST/BUILT" 2>/dev/null)" = "$STAMP" ] && exit 0

fallback() {
  echo "sipedge: $1; the relay links Debian's libsrtp2 (NSS) instead" >&2
  rm -rf "$DEST"
  exit 0
}

[ -f /usr/include/openssl/evp.h ] || fallback "libssl-dev is not installed"
SRC=$HERE/build/libsrtp-src
rm -rf "$SRC" "$DEST" && mkdir -p "$SRC" || fallback "cannot write $SRC"
TARBALL=$SRC/libsrtp2_${VER}.orig.tar.gz
"$PY" - "$URL" "$TARBALL" <<'PYEOF' || fallback "could not fetch $URL"
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=30) as r, open(sys.argv[2], "wb") as f:
    f.write(r.read())
PYEOF
echo "$SHA256  $TARBALL" | sha256sum -c --status || fallback "the libsrtp2 $VER tarball does not match its sha256"
tar -xzf "$TARBALL" -C "$SRC" || fallback "could not unpack libsrtp2"
cd "$SRC/libsrtp-$VER" || fallback "unexpected tarball layout"
./configure --enable-openssl --prefix="$DEST" CFLAGS="-O2 -fPIC" >"$SRC/configure.log" 2>&1 \
  || fallback "libsrtp2's configure failed (build/libsrtp-src/configure.log)"
make -j2 libsrtp2.a >"$SRC/make.log" 2>&1 && make install >>"$SRC/make.log" 2>&1 \
  || fallback "libsrtp2's build failed (build/libsrtp-src/make.log)"
rm -f "$DEST"/lib/*.so* 2>/dev/null
echo "$STAMP" >"$DEST/BUILT"
echo "built libsrtp2 $VER on OpenSSL into build/libsrtp"
