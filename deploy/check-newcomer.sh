#!/bin/sh
# The newcomer path on a clean Debian 12 (issue 11, item 6): debootstrap a minimal bookworm into a
# folder, put this checkout there, install only what the README says (python3, gcc, make, sip-tester
# for the test call), and try `make run`: it must install python3-venv/-dev itself (root), serve,
# print the demo, and the printed SIPp line must place a call. Not part of `make test` (minutes, and
# a Debian mirror). Usage, as root: deploy/check-newcomer.sh [DIR] [MIRROR]
set -eu
DIR=${1:-/tmp/sipedge-newcomer}
MIRROR=${2:-http://deb.debian.org/debian}
HERE=$(cd "$(dirname "$0")/.." && pwd)
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
if [ ! -x "$DIR/usr/bin/apt-get" ]; then
  debootstrap --variant=minbase bookworm "$DIR" "$MIRROR"
fi
rm -rf "$DIR/root/sipedge" && mkdir -p "$DIR/root/sipedge"
git -C "$HERE" archive HEAD | tar -x -C "$DIR/root/sipedge"
cp /etc/resolv.conf "$DIR/etc/resolv.conf"
# a host behind a TLS-inspecting proxy: its CA bundle, for pip inside (PIP_CERT / SSL_CERT_FILE below)
HOST_CA=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$HOST_CA" ] && mkdir -p "$DIR/etc/ssl/host" && cp "$HOST_CA" "$DIR/etc/ssl/host/ca.pem"
mount -t proc proc "$DIR/proc"
trap 'umount "$DIR/proc" 2>/dev/null || true' EXIT
CA_ENV=""
[ -f "$DIR/etc/ssl/host/ca.pem" ] && CA_ENV="PIP_CERT=/etc/ssl/host/ca.pem SSL_CERT_FILE=/etc/ssl/host/ca.pem"
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root $CA_ENV chroot "$DIR" /bin/sh -eu -c '
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 gcc make libc6-dev sip-tester >/dev/null
  cd /root/sipedge
  (timeout 900 make run > /root/run.log 2>&1 &)
  for i in $(seq 1 900); do grep -q "test call" /root/run.log 2>/dev/null && break; sleep 1; done
  cat /root/run.log | grep -v "^WARNING" | tail -20
  line=$(sed -n "s/^  test call *\(sipp .*\)   (the echo number.*/\1/p" /root/run.log)
  [ -n "$line" ] || { echo "newcomer: make run printed no test call line"; exit 1; }
  sh -c "$line -timeout 20s -timeout_error -nostdin" && echo "newcomer: the printed SIPp call passed"
  .venv/bin/sipedge drain --config sipedge.toml --wait 30
'
