#!/usr/bin/env bash
# Build the docker sandbox's default image, agentbench-npu/python-exec:1, offline from Debian packages.
#
# No registry is needed: the Debian default python3.X interpreter, its standard library and their runtime
# dependencies are fetched with `apt-get download` (from the apt sources this machine already has; run
# `apt-get update` first on a fresh machine), unpacked with `dpkg -x` into a root file system and imported
# with `docker import`. A static busybox gives `sh -c` and the usual small tools. About 15 MB of packages,
# a few seconds, a ~50 MB image.
#
#   sandboxes/python-exec/build.sh            # build unless the image is already there
#   sandboxes/python-exec/build.sh --force    # rebuild
#   sandboxes/python-exec/build.sh --no-shell # python only, no /bin/sh
#   IMAGE=my/name:tag sandboxes/python-exec/build.sh
set -euo pipefail

IMAGE="${IMAGE:-agentbench-npu/python-exec:1}"
force=0
shell=1
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --no-shell) shell=0 ;;
        --image=*) IMAGE="${arg#--image=}" ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument '$arg' (use --force, --no-shell, --image=NAME)" >&2; exit 2 ;;
    esac
done

say() { echo "build.sh: $*" >&2; }
die() { say "$*"; exit 1; }

command -v docker >/dev/null || die "no docker command here: apt-get install -y docker.io"
command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "needs a Debian-based machine (apt-get, dpkg)"
docker info >/dev/null 2>&1 || die "the Docker daemon does not answer: start it (systemctl start docker, or dockerd &)"

if [ "$force" = 0 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    say "$IMAGE is already there (--force rebuilds it)"
    exit 0
fi

started=$(date +%s%N)
work="$(mktemp -d "${TMPDIR:-/tmp}/python-exec-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt-get download drops privileges to _apt where it can
root="$work/root"
debs="$work/debs"
mkdir -p "$root" "$debs"

# The Debian default python3.X (python3-minimal depends on exactly one python3.X-minimal).
pyver="$(apt-cache depends python3-minimal 2>/dev/null | grep -o 'python3\.[0-9]*-minimal' | head -n1 | sed 's/-minimal$//')"
[ -n "$pyver" ] || die "apt knows no python3-minimal: run apt-get update first"

# Package management, documentation and perl are of no use in the image; a dependency on them is dropped
# (and so are the dependencies only they would bring).
skip_re='^(dpkg|install-info|tar|debconf|perl|perl-base|perl-modules-.*|libperl.*|mailcap|mime-support|base-files|tzdata|lsb-base|sensible-utils)$'

# The runtime dependency closure. `apt-cache depends --recurse` (one call: each call costs a second) gives the
# graph; the walk is ours, so that a dropped package drops its own dependencies too. Of each `a | b` group the
# first real, not dropped package is taken; a virtual package becomes its first provider.
roots="${pyver}-minimal lib${pyver}-stdlib"
[ "$shell" = 1 ] && roots="$roots busybox-static"
# shellcheck disable=SC2086
read -r -a packages < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances $roots 2>/dev/null | awk -v skip="$skip_re" -v roots="$roots" '
    function flush() { if (pick != "" && pkg != "") deps[pkg] = deps[pkg] " " pick; pick = "" }
    /^[^ ]/ { flush(); closed = 0; pkg = $1; sub(/:.*$/, "", pkg); next }
    /^ [ |](Pre)?Depends: / {
        if (closed) flush()
        name = $2; sub(/:any$/, "", name)
        closed = substr($0, 2, 1) != "|"
        virtual = name ~ /^</
        if (!virtual && pick == "" && name !~ skip) pick = name
        next
    }
    /^    [^ ]/ {  # a provider of the virtual package just named
        if (virtual && pick == "") { name = $1; sub(/:.*$/, "", name); if (name !~ skip) pick = name }
        next
    }
    END {
        flush()
        n = split(roots, queue, " ")
        for (i = 1; i <= n; i++) {
            if (queue[i] in seen) continue
            seen[queue[i]] = 1; out = out " " queue[i]
            m = split(deps[queue[i]], more, " ")
            for (j = 1; j <= m; j++) if (!(more[j] in seen)) queue[++n] = more[j]
        }
        print out
    }')
[ "${#packages[@]}" -gt 2 ] || die "could not work out the packages python needs (apt-cache depends failed)"
say "python $pyver from ${#packages[@]} Debian packages: ${packages[*]}"

( cd "$debs" && apt-get download -q "${packages[@]}" >/dev/null 2>"$work/download.log" ) || {
    cat "$work/download.log" >&2
    die "apt-get download failed (no apt sources reachable? run apt-get update first)"
}
for deb in "$debs"/*.deb; do
    dpkg -x "$deb" "$root"
done

# Merged-/usr packages (Debian 13 and later) put everything under usr/: give the classic paths too.
for dir in bin sbin lib lib64; do
    if [ ! -e "$root/$dir" ] && [ -d "$root/usr/$dir" ]; then ln -s "usr/$dir" "$root/$dir"; fi
done
ln -sf "$pyver" "$root/usr/bin/python3"
ln -sf python3 "$root/usr/bin/python"
if [ "$shell" = 1 ]; then
    mkdir -p "$root/usr/local/bin"
    # One link per applet (sh, ls, cat, sleep, ...), without shadowing anything a package installed.
    for applet in $("$root/bin/busybox" --list); do
        [ -e "$root/bin/$applet" ] || [ -e "$root/usr/bin/$applet" ] || ln -s /bin/busybox "$root/usr/local/bin/$applet"
    done
    [ -e "$root/bin/sh" ] || ln -s busybox "$root/bin/sh"
fi
mkdir -p "$root/etc" "$root/dev" "$root/proc" "$root/sys"
mkdir -m 1777 "$root/tmp" "$root/work"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:sandbox:/work:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
# Never used by Python (gconv is glibc's iconv), or documentation and tests.
rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/info" "$root/usr/share/lintian" \
    "$root/usr/lib/x86_64-linux-gnu/gconv" "$root/usr/lib/$pyver/test"

# Debian compiles the standard library at install time (py3compile); `dpkg -x` does not, and the image's
# read-only /usr could not keep what Python compiles, so every exec would compile each module it imports.
# Compile now, with the image's own interpreter run here (same architecture), recording the image's paths.
if "$root/usr/bin/$pyver" -c 'pass' 2>/dev/null; then
    "$root/usr/bin/$pyver" -E -s -m compileall -q -j 0 --invalidation-mode unchecked-hash -s "$root" -p / \
        -x '/(idlelib|tkinter|turtledemo|lib2to3)/' "$root/usr/lib/$pyver" >/dev/null \
        || say "note: compiling the standard library failed; the image works, its python starts slower"
else
    say "note: the image's python does not run on this host (another architecture?); its stdlib stays uncompiled"
fi

tar -C "$root" --numeric-owner --owner=0 --group=0 -c . | docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 HOME=/work' \
    --change 'WORKDIR /work' \
    --change 'CMD ["python3"]' \
    --message "agentbench-npu python-exec sandbox image ($pyver, offline from Debian packages)" \
    - "$IMAGE" >/dev/null
docker run --rm --network none "$IMAGE" python3 -c 'import json, ssl, sqlite3, ctypes, multiprocessing' \
    || die "the new image $IMAGE does not run python3 with its standard library"
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
say "built $IMAGE ($((size / 1000000)) MB) in $(( ($(date +%s%N) - started) / 1000000 )) ms"
