#!/usr/bin/env bash
# The machine prerequisites of sidelane's tests, demo and code generation,
# in one place: Debian packages and a bpffs mount. Idempotent: with
# everything in place it only checks (well under a second) and changes
# nothing. As root on Debian it installs what is missing (apt-get update
# once, then apt-get install); otherwise it prints the one command that
# does and fails.
#
#   hack/install-deps.sh [--check] [--list] [GROUP...]
#
# GROUP is demo (`make demo`), test (`make test`, a superset of demo),
# generate (`make generate` / `make verify`: clang for bpf2go), image
# (`make image`: the image without a Docker daemon), node (`make node-e2e`:
# a real node: also image, and test for etcd, haproxy and the tools its
# apiserver and pods run) or all (the default: what .ci/run needs). --check never installs or mounts.
# --list prints each package, why it is needed, the version Debian 12
# ships (the one tested) and the installed version.
# (INSTALL_DEPS_MOUNTS replaces /proc/mounts for hack/scripts_test.go.)
set -euo pipefail

# package | Debian 12 version (tested) | groups | what needs it
# (Found by grepping every binary the tests, the demo and the bench exec;
# the iptables backend needs no nft or conntrack binary: iptables 1.8.9's
# nf_tables backend and pilot-agent istio-iptables use neither.)
table='
iproute2     6.1.0-3             demo,test  ip netns/link/addr (every privileged test, the simulated nodes), ss, tc
iptables     1.8.9-2             demo,test  iptables backend, pilot-agent istio-iptables (reference rules), iptables-save checks
util-linux   2.38.1-5+deb12u3    demo,test  setpriv (run as the proxy uid 1337), nsenter, mount (bpffs), flock (kube build lock)
procps       2:4.0.2-3           demo,test  sysctl in the simulated nodes and pod netns
socat        1.7.4.4-2           demo,test  the pods echo servers and clients
haproxy      2.6.12-1+deb12u4    demo,test  stand-in Envoy sidecar and node proxy (SO_ORIGINAL_DST)
etcd-server  3.4.23-4+b4         demo,test  etcd under the real kube-apiserver (demo, e2e, controllers)
clang        1:14.0-55.7~deb12u1 generate   bpf2go compiles bpf/*.c
llvm         1:14.0-55.7~deb12u1 generate   llvm-strip for bpf2go
libbpf-dev   1:1.1.2-0+deb12u1   generate   bpf_helpers.h and friends
bpftool      7.1.0+6.1.192-3     generate   not run by a target: inspecting loaded programs and maps while working on bpf/
mmdebstrap   1.3.5-7             image,node the debian:bookworm-slim image base, from the Debian archive (make image)
podman       4.3.1+ds1-8+deb12u1+b3 image,node podman import/build/save of the Dockerfile, no daemon (make image)
containerd   1.6.20~ds1-1+deb12u3 node      the real node runtime (CRI) and ctr (image import)
runc         1.1.5+ds1-1+deb12u1 node       the OCI runtime under containerd
busybox-static 1:1.35.0-4+deb12u1+b1 node   the pause image of the node and the test pod tools
'

check_only=0 list=0 groups=()
for a in "$@"; do
  case "$a" in
    --check) check_only=1 ;;
    --list) list=1 ;;
    demo|test|generate|image) groups+=("$a") ;;
    node) groups+=(node image test) ;;
    all) groups+=(demo test generate image node) ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-deps: unknown argument $a (groups: demo test generate image node all)" >&2; exit 2 ;;
  esac
done
((${#groups[@]})) || groups=(demo test generate)

installed_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
is_installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]; }

wanted=()
((list)) && printf '%-12s %-20s %-20s %s\n' package "Debian 12 (tested)" installed "needed for"
while read -r pkg ver grp why; do
  [[ -n "$pkg" ]] || continue
  for g in "${groups[@]}"; do
    if [[ ",$grp," == *",$g,"* ]]; then
      wanted+=("$pkg")
      if ((list)); then
        printf '%-12s %-20s %-20s %s\n' "$pkg" "$ver" "$(installed_version "$pkg" | grep . || echo -)" "$why"
      fi
      break
    fi
  done
done <<<"$table"
if ((list)); then exit 0; fi

root=0; [[ $(id -u) -eq 0 ]] && root=1
debian=0; [[ -f /etc/debian_version ]] && command -v apt-get >/dev/null && debian=1
fix="sudo $0 ${groups[*]}"
rc=0

if ((debian)); then
  missing=()
  for p in "${wanted[@]}"; do is_installed "$p" || missing+=("$p"); done
  if ((${#missing[@]})); then
    if ((root && !check_only)); then
      echo "install-deps: installing ${missing[*]} (apt-get, once)"
      start=$(date +%s)
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
      echo "install-deps: apt-get took $(( $(date +%s) - start ))s"
    else
      echo "install-deps: missing packages: ${missing[*]}" >&2
      echo "install-deps: install them with: $fix" >&2
      rc=1
    fi
  fi
else
  # Not Debian: name the commands instead of the packages.
  for c in ip iptables setpriv socat haproxy etcd; do
    command -v "$c" >/dev/null || { echo "install-deps: $c not found; this script installs it on Debian 12 only (packages: ${wanted[*]})" >&2; rc=1; }
  done
fi

# bpffs: the agent and the tests pin maps under /sys/fs/bpf.
if [[ " ${groups[*]} " == *" demo "* || " ${groups[*]} " == *" test "* ]]; then
  if ! grep -qs '^[^ ]* /sys/fs/bpf bpf ' "${INSTALL_DEPS_MOUNTS:-/proc/mounts}"; then
    if ((root && !check_only)); then
      mount -t bpf bpf /sys/fs/bpf
      echo "install-deps: mounted bpffs at /sys/fs/bpf"
    else
      echo "install-deps: bpffs is not mounted at /sys/fs/bpf; mount it with: $fix (or: sudo mount -t bpf bpf /sys/fs/bpf)" >&2
      rc=1
    fi
  fi
fi
exit "$rc"
