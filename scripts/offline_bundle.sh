#!/usr/bin/env bash
# Every wheel the project needs beyond PyTorch, for an offline GPU machine (Python 3.12,
# manylinux x86_64, CUDA 13: DALI's cuda130 build), in parts of at most 56 MB.
#
#     bash scripts/offline_bundle.sh DIR        # where PyPI is reachable; about 255 MB
#
# Resolves pyproject.toml's dependencies plus the [cu13] extra with pip's own resolver for that
# platform, leaves out torch and what torch itself brings (any PyTorch install has those), and
# downloads the rest with `pip download`. DIR then holds part-00, part-01, ... (one tar split
# into 56,000,000-byte pieces), SHA256SUMS (each part and the joined tar) and wheels.txt (what is
# inside). On the GPU machine: bash scripts/offline_install.sh DIR. Environment: PYTHON (the
# interpreter whose pip resolves, default python3), PY_VERSION (default 3.12), EXTRA (default
# cu13), PART_BYTES (default 56000000).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: bash scripts/offline_bundle.sh DIR" >&2; exit 2; }
out=$1
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
pyver=${PY_VERSION:-3.12}
extra=${EXTRA:-cu13}
part_bytes=${PART_BYTES:-56000000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--only-binary=:all: --python-version "$pyver" --implementation cp --abi "cp${pyver/./}")
for tag in manylinux1 manylinux2010 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 \
           manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux_2_38 manylinux_2_39; do
  plat+=(--platform "${tag}_x86_64")
done

# The project's requirements (all but torch, which the GPU machine brings) and the extra's.
"$py" - "$root/pyproject.toml" "$extra" > "$work/requirements.txt" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"][sys.argv[2]]:
    if re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0].lower() != "torch":
        print(req)
EOF
resolve() {  # resolve() REPORT REQUIREMENT...: pip's resolver for the target platform, nothing installed
  local report=$1; shift
  "$py" -m pip install -q --dry-run --ignore-installed --report "$report" "${plat[@]}" --target "$work/none" "$@"
}
names() {  # names REPORT: "name==version" per line, names normalised
  "$py" -c 'import json, re, sys
for p in json.load(open(sys.argv[1]))["install"]:
    print(re.sub(r"[-_.]+", "-", p["metadata"]["name"]).lower() + "==" + p["metadata"]["version"])' "$1"
}
echo "resolving $(wc -l < "$work/requirements.txt") requirements (+ torch, to leave out what it brings) for Python $pyver ..."
resolve "$work/all.json" -r "$work/requirements.txt" torch
torch_pin=$(names "$work/all.json" | grep '^torch==')
resolve "$work/torch.json" "$torch_pin"
names "$work/all.json" > "$work/all.txt"
names "$work/torch.json" > "$work/torch.txt"
# Keep what torch's own closure does not hold (by name: the GPU machine's versions serve).
"$py" -c 'import sys
torch = {line.split("==")[0] for line in open(sys.argv[1])}
print("".join(line for line in open(sys.argv[2]) if line.split("==")[0] not in torch), end="")' \
  "$work/torch.txt" "$work/all.txt" > "$work/keep.txt"
echo "downloading $(wc -l < "$work/keep.txt") wheels (left out: $torch_pin and the $(wc -l < "$work/torch.txt") packages it brings) ..."
mkdir -p "$work/bundle/wheels"
"$py" -m pip download -q --no-deps "${plat[@]}" -d "$work/bundle/wheels" -r "$work/keep.txt"
cp "$work/requirements.txt" "$work/bundle/requirements.txt"
(cd "$work/bundle/wheels" && ls) > "$work/bundle/wheels.txt"

rm -rf "$out" && mkdir -p "$out"
tar -C "$work/bundle" -cf "$work/bundle.tar" requirements.txt wheels.txt wheels
split -b "$part_bytes" -d -a 2 "$work/bundle.tar" "$out/part-"
cp "$work/bundle/wheels.txt" "$work/bundle/requirements.txt" "$out/"
(cd "$out" && sha256sum part-* > SHA256SUMS && (cd "$work" && sha256sum bundle.tar) >> SHA256SUMS)
n=$(ls "$out"/part-* | wc -l)
echo "bundled $(wc -l < "$out/wheels.txt") wheels, $(du -sb "$work/bundle.tar" | cut -f1) bytes, in $n part(s) of at most $part_bytes bytes in $out"
