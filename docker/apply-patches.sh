#!/usr/bin/env bash
# Apply every docker/patches/*.patch to the installed package it names, or fail the image build.
#   docker/apply-patches.sh PATCH_DIR
# Each patch starts with a header line naming its target, a pinned distribution:
#   # target: sglang==0.5.5
# The patch applies with `patch -p1` inside that distribution's installed top-level package dir. The script
# checks the installed version equals the pin, dry-runs the patch (refusing one that does not apply cleanly or
# is already applied), applies it, and records it in <package>/.agentbench-npu-patches.
set -euo pipefail
dir="${1:?usage: apply-patches.sh PATCH_DIR}"
shopt -s nullglob
patches=("$dir"/*.patch)
if [ "${#patches[@]}" -eq 0 ]; then
    echo "apply-patches: no patches in $dir"
    exit 0
fi
for patch_file in "${patches[@]}"; do
    target=$(sed -n 's/^# target: *//p' "$patch_file" | head -n 1)
    if [[ ! "$target" =~ ^([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)$ ]]; then
        echo "apply-patches: $patch_file: first line must be '# target: DIST==VERSION', got '${target}'" >&2
        exit 1
    fi
    dist="${BASH_REMATCH[1]}" pinned="${BASH_REMATCH[2]}"
    # the version from the distribution's metadata; the dir from importing its top-level package, which also
    # finds editable installs (their files are not under site-packages)
    found=$(python3 - "$dist" <<'PY'
import importlib, importlib.metadata as md, pathlib, sys
try:
    d = md.distribution(sys.argv[1])
except md.PackageNotFoundError:
    sys.exit(0)
top = (d.read_text("top_level.txt") or "").split() or [d.metadata["Name"].replace("-", "_")]
package = importlib.import_module(top[0])
print(d.version, pathlib.Path(list(package.__path__)[0]).resolve())
PY
)
    if [ -z "$found" ]; then
        echo "apply-patches: $patch_file targets $dist, which is not installed" >&2
        exit 1
    fi
    version="${found%% *}" package_dir="${found#* }"
    if [ "$version" != "$pinned" ]; then
        echo "apply-patches: $patch_file is for $dist==$pinned but $dist $version is installed" >&2
        exit 1
    fi
    if ! patch -p1 --dry-run --forward --silent -d "$package_dir" < "$patch_file" >/dev/null; then
        echo "apply-patches: $patch_file does not apply cleanly to $dist $version at $package_dir" >&2
        exit 1
    fi
    patch -p1 --forward --silent -d "$package_dir" < "$patch_file"
    echo "$(basename "$patch_file")" >> "$package_dir/.agentbench-npu-patches"
    echo "apply-patches: applied $(basename "$patch_file") to $dist $version"
done
