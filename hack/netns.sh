#!/usr/bin/env bash
# Runs a command inside a private network namespace (and PID namespace) where
# lo is up and all of 198.18.0.0/16 is local, so a process can bind any pod IP
# the local cluster hands out. Nothing inside can reach or be reached from
# outside, and every process left behind dies with the command.
#
# usage: hack/netns.sh COMMAND [ARGS...]
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi
if [[ "$(id -u)" != 0 ]]; then
  echo "error: the local cluster runs in a private network namespace, and creating one needs root (unshare --net); run this as root" >&2
  exit 1
fi
for tool in unshare ip; do
  if ! command -v "${tool}" >/dev/null; then
    echo "error: '${tool}' is not installed; it is needed to create the private network namespace (Debian: apt-get install util-linux iproute2)" >&2
    exit 1
  fi
done

# Temporary files of everything inside live here and go with the namespace,
# even when the command is killed before it can clean up.
scratch="$(mktemp -d "${TMPDIR:-/tmp}/capstan-netns.XXXXXX")"
trap 'rm -rf "${scratch}"' EXIT

# --pid --fork: the command's shell is PID 1 of a new PID namespace, so when it
# ends the kernel kills whatever it left running; --kill-child ties it to us.
set +e
# The inner script is single-quoted on purpose: "$0" and "$@" expand inside.
# shellcheck disable=SC2016
unshare --net --pid --fork --kill-child -- bash -c '
  set -e
  ip link set lo up
  ip addr add 198.18.255.1/32 dev lo
  ip route add local 198.18.0.0/16 dev lo
  export CAPSTAN_NETNS=1 TMPDIR="$0"
  "$@"
' "${scratch}" "$@"
rc=$?
set -e
exit "${rc}"
