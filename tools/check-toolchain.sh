#!/bin/sh
# What `make run` needs to build sipedge: a Python 3.11 with venv/ensurepip and its headers, a C
# compiler, libsrtp2's and OpenSSL's headers (the relay links libsrtp2 for SRTP). On Debian they come
# from python3-venv, python3-dev (python3.11-*), gcc, libsrtp2-dev and libssl-dev: installed here when running as
# root, otherwise one line says what to install. Nothing else is installed.
PY=${1:-python3.11}
missing=""
if ! command -v "$PY" >/dev/null 2>&1; then
  missing="python3.11"
else
  "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1 || missing="$missing python3-venv"
  inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null)
  [ -n "$inc" ] && [ -f "$inc/Python.h" ] || missing="$missing python3-dev"
fi
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || missing="$missing gcc"
[ -f /usr/include/srtp2/srtp.h ] || [ -f /usr/local/include/srtp2/srtp.h ] || missing="$missing libsrtp2-dev"
# OpenSSL's headers: tools/build-libsrtp.sh builds libsrtp2 on OpenSSL (without them, Debian's is linked)
[ -f /usr/include/openssl/evp.h ] || missing="$missing libssl-dev"
missing=$(echo $missing)
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: $missing"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null \
    && exit 0
  echo "sipedge: could not install: $missing" >&2
  exit 1
fi
echo "sipedge: building needs $missing: run 'sudo apt-get install $missing' (Debian/Ubuntu), then 'make run' again" >&2
exit 1
