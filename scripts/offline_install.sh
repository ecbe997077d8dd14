#!/usr/bin/env bash
# Install the bundle of scripts/offline_bundle.sh on a machine with no package registry, then
# check that everything the project imports imports (and pytest, for gpu_check's tests stage).
#
#     bash scripts/offline_install.sh DIR                 # into the running python's environment
#     bash scripts/offline_install.sh DIR --target /tmp/site && export PYTHONPATH=/tmp/site
#
# DIR holds part-00, part-01, ... and SHA256SUMS. The parts are checked against their sums,
# joined, the tar checked, and unpacked in DIR/bundle. Into the environment: pip's resolver with
# --no-index takes only the bundle's wheels and keeps what is installed already and fits (torch,
# numpy, ...). With --target (a read-only environment): every bundled wheel whose distribution
# is not installed yet goes into that folder with --no-deps. Run from anywhere; PYTHON picks the
# interpreter (default python3). Exit 0: installed and every import works; 1: a part is missing
# or damaged, pip failed, or something does not import (one sentence says what).
set -euo pipefail
usage() { echo "usage: bash scripts/offline_install.sh DIR [--target FOLDER]" >&2; exit 2; }
[ $# -eq 1 ] || [ $# -eq 3 ] || usage
dir=$1; target=
if [ $# -eq 3 ]; then [ "$2" = "--target" ] || usage; target=$3; fi
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
fail() { echo "offline_install: $*" >&2; exit 1; }

[ -f "$dir/SHA256SUMS" ] || fail "$dir has no SHA256SUMS; copy every part-NN and SHA256SUMS of the bundle there."
parts=$(grep -c ' part-' "$dir/SHA256SUMS")
bad=$(cd "$dir" && grep ' part-' SHA256SUMS | sha256sum -c --quiet 2>/dev/null | sed -n 's/: FAILED.*//p' | tr '\n' ' ') || true
[ -z "$bad" ] || fail "part(s) ${bad% } of $dir are missing or damaged (sha256 differs); send them again."
cat "$dir"/part-* > "$dir/bundle.tar"
(cd "$dir" && grep ' bundle.tar$' SHA256SUMS | sha256sum -c --quiet >/dev/null 2>&1) ||
  fail "the $parts parts joined do not give the bundle's tar (sha256 differs); is a part from another bundle?"
rm -rf "$dir/bundle" && mkdir -p "$dir/bundle"
tar -C "$dir/bundle" -xf "$dir/bundle.tar" && rm "$dir/bundle.tar"
wheels="$dir/bundle/wheels"
echo "joined and checked $parts part(s): $(ls "$wheels" | wc -l) wheels"

other=$("$py" - "$wheels" <<'EOF'
import importlib.metadata as md, pathlib, sys
mine = {w.name.split("-")[0].replace("_", "-") for w in pathlib.Path(sys.argv[1]).glob("nvidia_dali_*.whl")}
installed = {d.metadata["Name"] for d in md.distributions() if (d.metadata["Name"] or "").startswith("nvidia-dali-")}
print(" ".join(sorted(installed - mine)) if mine else "")
EOF
)
[ -z "$other" ] || fail "$other is installed and the bundle brings $(cd "$wheels" && ls nvidia_dali_* | cut -d- -f1); two DALIs break each other: pip uninstall $other first."
if [ -z "$target" ]; then
  "$py" -m pip install -q --no-index --find-links "$wheels" -r "$dir/bundle/requirements.txt" ||
    fail "pip could not install the bundle's requirements from its wheels alone (see pip's message above)."
else
  # Leave out distributions the interpreter already has: a second numpy in front of torch's breaks it.
  new=$("$py" - "$wheels" <<'EOF'
import importlib.metadata as md, pathlib, re, sys
have = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in md.distributions() if d.metadata["Name"]}
for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    if re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() not in have:
        print(w)
EOF
)
  if [ -n "$new" ]; then
    # shellcheck disable=SC2086
    "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$target" $new ||
      fail "pip could not install the bundle's wheels into $target (see pip's message above)."
  fi
  echo "installed $(echo "$new" | grep -c . || true) wheel(s) into $target (the others were installed already); export PYTHONPATH=$target"
  export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" "$root/scripts/check_imports.py"
