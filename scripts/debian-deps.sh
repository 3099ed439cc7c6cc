#!/bin/sh
# Install the Debian packages a target needs. As root it installs them with apt-get;
# otherwise it only says what is missing and how to get it.
set -eu
case "${1:-test}" in
  # chromium: the status page's test drives it with Playwright (never a downloaded browser).
  # etcd-server, etcd-client: the cluster tests run real etcd members (tests/etcd.py).
  test)  pkgs="chromium etcd-server etcd-client" ; cmds="chromium etcd etcdctl" ;;
  bench) pkgs="haproxy nginx wrk util-linux" ; cmds="haproxy nginx wrk taskset" ;;
  *) echo "usage: $0 test|bench" >&2; exit 2 ;;
esac
missing=""
for c in $cmds; do
  command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || missing="$missing $c"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: $pkgs"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
else
  echo "missing commands:$missing" >&2
  echo "install them with: sudo apt-get install $pkgs" >&2
  exit 1
fi
