#!/usr/bin/env bash
# A stand-in for a fresh Debian 12 machine on this one, to time and check
# what `make test`, `make demo` or `.ci/run` do the first time:
#
#   hack/fresh-machine.sh [--keep] DIR 'COMMAND'
#
# DIR (a new or empty directory on a real disk, e.g. /var/tmp/fresh1)
# holds an overlay over / in which the apt packages of hack/install-deps.sh
# (every group) and whatever only they needed are purged; HOME's caches
# (~/.cache, ~/go, ~/.kube), podman's and containerd's storage, /opt/cni,
# /etc/cni, /tmp and /run start empty. A clone of this repository's HEAD
# is made in the stand-in's /tmp/sidelane and COMMAND runs there as root, in
# a private mount namespace (pivot_root, not chroot: the kernel refuses user
# namespaces to a chrooted process). Without --keep DIR is removed at the end.
#
# It is not a new machine: same kernel, kernel modules already loaded,
# sysctls as left, /sys (bpffs, cgroups) and /dev shared with the host, the
# host's other packages (Go at /usr/local/go, gcc, git, make) kept. Root only.
set -euo pipefail
keep=0
if [[ ${1:-} == --keep ]]; then keep=1; shift; fi
if (($# != 2)); then sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
[[ $(id -u) -eq 0 ]] || { echo "fresh-machine: run as root" >&2; exit 1; }
dir=$(realpath -m "$1") cmd=$2
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
mkdir -p "$dir"
[[ -z "$(ls -A "$dir")" ]] || { echo "fresh-machine: $dir is not empty" >&2; exit 1; }
pkgs=$("$repo/hack/install-deps.sh" --list all | awk 'NR>1 && $3 != "-" {print $1}')
# iproute2, util-linux and procps are part of every Debian base: keep them.
pkgs=$(tr ' ' '\n' <<<"$pkgs" | grep -vx -e iproute2 -e util-linux -e procps || true)
cleanup() { ((keep)) || rm -rf "$dir"; }
trap cleanup EXIT
mkdir -p "$dir"/{upper,work,merged,tmp,cache,go,kube,containers,containerd,kubelet,cni,etccni}
# shellcheck disable=SC2016
unshare -m --propagation private bash -euo pipefail -c '
R=$1 repo=$2 pkgs=$3 cmd=$4
M=$R/merged
mount -t overlay overlay -o "lowerdir=/,upperdir=$R/upper,workdir=$R/work" "$M"
mount -t proc proc "$M/proc"
mount --rbind /sys "$M/sys"
mount --rbind /dev "$M/dev"
mount -t tmpfs tmpfs "$M/run"
chmod 1777 "$R/tmp"
mount --bind "$R/tmp" "$M/tmp"
mkdir -p "$M/root/.cache" "$M/root/go" "$M/root/.kube" "$M/var/lib/containers" "$M/var/lib/containerd" "$M/var/lib/kubelet" "$M/opt/cni" "$M/etc/cni"
for p in .cache:cache go:go .kube:kube; do mount --bind "$R/${p#*:}" "$M/root/${p%%:*}"; done
for p in var/lib/containers:containers var/lib/containerd:containerd var/lib/kubelet:kubelet opt/cni:cni etc/cni:etccni; do mount --bind "$R/${p#*:}" "$M/${p%%:*}"; done
git clone -q "$repo" "$R/tmp/sidelane"
mkdir -p "$M/.oldroot"
cd "$M"
pivot_root . .oldroot
umount -l /.oldroot
mount --make-rshared /
cd /
export HOME=/root PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
# Maintainer scripts must not touch the host'"'"'s services.
printf "#!/bin/sh\nexit 101\n" >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
if [[ -n $pkgs ]]; then
  echo "fresh-machine: purging $pkgs"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq --autoremove $pkgs >/dev/null
fi
rm -f /usr/sbin/policy-rc.d
cd /tmp/sidelane
echo "fresh-machine: $(git log --oneline -1) in a stand-in for a fresh machine"
start=$(date +%s)
rc=0
env -i HOME=/root PATH="$PATH" LANG=C.UTF-8 TERM=dumb ${CI:+CI=$CI} bash -c "$cmd" || rc=$?
echo "fresh-machine: rc=$rc after $(( $(date +%s) - start ))s"
exit $rc
' _ "$dir" "$repo" "$pkgs" "$cmd"
