#!/bin/sh
# The newcomer path on a clean Debian 12 (issue 11, item 6): debootstrap a minimal bookworm once into
# DIR/base, copy it afresh to DIR/run for every try (so nothing a previous try installed is there),
# put a `git archive` of this checkout in, install only what the README says a newcomer brings
# (python3 and make; sip-tester for the test call), and try `make run`: as root it must install
# python3-venv, python3-dev and gcc itself, serve, print the demo, and the printed SIPp line must
# place a call. Not part of `make test` (minutes, and a Debian mirror).
#
# The chroot runs in a network namespace of its own (loopback up), so a host that already serves
# 5060/8080 does not collide with it; slirp4netns gives that namespace user-mode outbound access
# (apt, pip) without touching the host's forwarding or firewall. Everything is removed on exit.
#
# Usage, as root: deploy/check-newcomer.sh [DIR] [MIRROR]    exit 0 when the printed call passed.
set -eu
DIR=${1:-/var/tmp/sipedge-newcomer}
MIRROR=${2:-http://deb.debian.org/debian}
HERE=$(cd "$(dirname "$0")/.." && pwd)
NS=sipedge-newcomer-$$
ROOT=$DIR/run

need=""
command -v debootstrap >/dev/null || need="debootstrap"
command -v slirp4netns >/dev/null || need="$need slirp4netns"
if [ -n "$need" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
if [ ! -x "$DIR/base/usr/bin/apt-get" ]; then
  rm -rf "$DIR/base"
  debootstrap --variant=minbase bookworm "$DIR/base" "$MIRROR"
fi
rm -rf "$ROOT"
cp -a "$DIR/base" "$ROOT"
mkdir -p "$ROOT/root/sipedge"
git -C "$HERE" archive HEAD | tar -x -C "$ROOT/root/sipedge"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# a host behind a TLS-inspecting proxy: its CA bundle, for pip inside (PIP_CERT / SSL_CERT_FILE below)
HOST_CA=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
CA_ENV=""
if [ -f "$HOST_CA" ]; then
  mkdir -p "$ROOT/etc/ssl/host" && cp "$HOST_CA" "$ROOT/etc/ssl/host/ca.pem"
  CA_ENV="PIP_CERT=/etc/ssl/host/ca.pem SSL_CERT_FILE=/etc/ssl/host/ca.pem"
fi

SLIRP_PID=""
cleanup() {
  for pid in $(ip netns pids "$NS" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
  [ -n "$SLIRP_PID" ] && kill "$SLIRP_PID" 2>/dev/null || true
  umount "$ROOT/dev/shm" 2>/dev/null || true
  umount "$ROOT/dev/pts" 2>/dev/null || true
  umount "$ROOT/proc" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS"
ip -n "$NS" link set lo up
slirp4netns --configure --mtu=65520 --disable-host-loopback --netns-type=path "/run/netns/$NS" tap0 \
  >"$DIR/slirp.log" 2>&1 &
SLIRP_PID=$!
for i in $(seq 1 50); do ip -n "$NS" addr show tap0 2>/dev/null | grep -q "inet " && break; sleep 0.2; done
ip -n "$NS" addr show tap0 | grep -q "inet " || { echo "newcomer: slirp4netns gave no tap0"; exit 1; }

mount -t proc proc "$ROOT/proc"
mkdir -p "$ROOT/dev/pts" "$ROOT/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$ROOT/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$ROOT/dev/shm"

env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root $CA_ENV ip netns exec "$NS" chroot "$ROOT" /bin/sh -eu -c '
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 make sip-tester >/dev/null
  cd /root/sipedge
  (timeout 1800 make run > /root/run.log 2>&1; echo "make run exited $?" >> /root/run.log) &
  for i in $(seq 1 1800); do grep -q -e "test call" -e "make run exited" /root/run.log 2>/dev/null && break; sleep 1; done
  grep -v "^WARNING" /root/run.log | tail -25
  line=$(sed -n "s/^  test call *\(sipp .*\)   (the echo number.*/\1/p" /root/run.log)
  [ -n "$line" ] || { echo "newcomer: make run printed no test call line"; exit 1; }
  echo "newcomer: running the printed line: $line"
  rc=0; sh -c "$line -timeout 30s -timeout_error -nostdin -trace_err" >/root/sipp.log 2>&1 || rc=$?
  tail -30 /root/sipp.log
  .venv/bin/sipedge drain --config sipedge.toml --wait 30 || echo "newcomer: drain failed"
  [ $rc -eq 0 ] || { echo "newcomer: the printed SIPp call failed (sipp exit $rc)"; exit 1; }
  echo "newcomer: the printed SIPp call passed"
'
