#!/usr/bin/env bash
# Compile a copy of pobox's hot modules with mypyc, for measuring (bench/results/mypyc.md):
#   bench/compile_tree.sh DEST [pobox/PATH.py ...]
# copies src/pobox to DEST/src/pobox and compiles there the sans-IO core, the driver, the
# session and the Maildir store's access (or the modules named) into C extensions
# (DEST/src/*.so beside the sources).  This tree is left as it is.  Then, for example:
#   POBOX_COMPILED_SRC=DEST/src .venv/bin/python bench/run.py --workloads session \
#       --servers pobox,pobox-compiled,dovecot-tuned
# Needs a C compiler and Python's headers; mypyc comes with mypy (the lint group).
# Not for serving mail: the compiled build crashed and changed behaviour in the test suite.
set -euo pipefail
[ "$#" -ge 1 ] || { echo "usage: bench/compile_tree.sh DEST [pobox/PATH.py ...]" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=$1
shift
modules=(
  pobox/protocol/_events.py pobox/protocol/_parser.py pobox/protocol/_replies.py
  pobox/protocol/_sasl.py pobox/protocol/_server.py pobox/protocol/_state.py
  pobox/protocol/errors.py pobox/server/_driver.py pobox/server/_session.py
  pobox/storage/maildir/_access.py pobox/storage/maildir/_names.py
)
[ "$#" -eq 0 ] || modules=("$@")
mkdir -p "$dest/src"
rm -rf "$dest/src/pobox"
cp -r "$repo/src/pobox" "$dest/src/"
find "$dest/src" -name '*.so' -delete
cd "$dest/src"
"$repo/.venv/bin/mypyc" --strict "${modules[@]}" >"$dest/mypyc.log" 2>&1 || {
  tail -30 "$dest/mypyc.log" >&2
  exit 1
}
rm -rf build
echo "compiled $(find . -name '*.so' | wc -l) extensions in $dest/src (log: $dest/mypyc.log)"
