#!/usr/bin/env bash
# Every wheel the project needs beyond PyTorch, for an offline GPU machine (Python 3.12,
# manylinux x86_64, CUDA 13: DALI's cuda130 build), in parts of at most 56 MB.
#
#     bash scripts/offline_bundle.sh DIR        # where PyPI is reachable; about 255 MB
#
# Resolves pyproject.toml's dependencies plus the [cu13] extra and pytest, pytest-timeout, pytorch-msssim and
# webdataset (from the [dev] extra:
# `gpu_check.sh --stage tests` runs the suite there; moto is left out, its tests skip without it)
# with pip's own resolver for that platform, leaves out torch and what the target's torch itself
# brings (any PyTorch install has those), and downloads the rest with `pip download`. DIR then
# holds part-00, part-01, ... (one tar split into 56,000,000-byte pieces), SHA256SUMS (each part
# and the joined tar) and wheels.txt (what is inside). On the GPU machine:
# bash scripts/offline_install.sh DIR. Environment: PYTHON (the interpreter whose pip resolves,
# default python3), PY_VERSION (default 3.12), EXTRA (default cu13), TORCH_PIN (the target
# machine's torch, default torch==2.11.*: what it brings is left out, and the rest resolved
# beside it), PART_BYTES (default 56000000).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: bash scripts/offline_bundle.sh DIR" >&2; exit 2; }
out=$1
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
pyver=${PY_VERSION:-3.12}
extra=${EXTRA:-cu13}
torch_pin=${TORCH_PIN:-torch==2.11.*}
part_bytes=${PART_BYTES:-56000000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--only-binary=:all: --python-version "$pyver" --implementation cp --abi "cp${pyver/./}")
for tag in manylinux1 manylinux2010 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 \
           manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux_2_38 manylinux_2_39; do
  plat+=(--platform "${tag}_x86_64")
done

# The project's requirements (all but torch, which the GPU machine brings), the extra's, and the
# test runner of the dev extra.
"$py" - "$root/pyproject.toml" "$extra" > "$work/requirements.txt" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project["optional-dependencies"]
name = lambda req: re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0].lower()
for req in project["dependencies"] + extras[sys.argv[2]] + [r for r in extras["dev"] if name(r) in ("pytest", "pytest-timeout", "pytorch-msssim", "webdataset")]:
    if name(req) != "torch":
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
echo "resolving $(wc -l < "$work/requirements.txt") requirements (+ $torch_pin, to leave out what it brings) for Python $pyver ..."
# With the target's torch, not the newest one allowed: what torch brings changes between releases.
resolve "$work/all.json" -r "$work/requirements.txt" "$torch_pin"
resolve "$work/torch.json" "$torch_pin"
names "$work/all.json" > "$work/all.txt"
names "$work/torch.json" > "$work/torch.txt"
# Keep what torch's own closure does not hold (by name: the GPU machine's versions serve).
"$py" -c 'import sys
torch = {line.split("==")[0] for line in open(sys.argv[1])}
print("".join(line for line in open(sys.argv[2]) if line.split("==")[0] not in torch), end="")' \
  "$work/torch.txt" "$work/all.txt" > "$work/keep.txt"
echo "downloading $(wc -l < "$work/keep.txt") wheels (left out: $(grep '^torch==' "$work/torch.txt") and the" \
     "$(($(wc -l < "$work/torch.txt") - 1)) packages it brings) ..."
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
