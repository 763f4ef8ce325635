#!/usr/bin/env bash
# Run the README's two Quick start commands, as written there, in a fresh clone and a fresh virtual environment, and
# print how long each took. Not part of the test suite: it installs everything and runs the whole suite (minutes).
#
#   scripts/check_quickstart.sh [WORK_DIR]          # default: a new folder under /tmp
#   scripts/check_quickstart.sh --committed [DIR]   # clone HEAD only (default: HEAD plus the working tree's changes)
#   scripts/check_quickstart.sh --keep ...          # keep the clone after a pass (default: removed, log kept)
#
# The commands are read from the README's Quick start block, so this checks what a newcomer would type.
set -euo pipefail
committed=0 keep=0
while [ "${1:-}" = "--committed" ] || [ "${1:-}" = "--keep" ]; do
  [ "$1" = "--committed" ] && committed=1
  [ "$1" = "--keep" ] && keep=1
  shift
done
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/lorakit-quickstart.XXXXXX)}"
mkdir -p "$work"

mapfile -t cmds < <(awk '/^## Quick start/{q=1} q && /^```bash/{b=1; next} b && /^```/{exit} b && NF{print}' \
                    "$repo/README.md")
if [ "${#cmds[@]}" -ne 2 ]; then
  echo "check_quickstart: expected 2 commands in the README's Quick start block, found ${#cmds[@]}" >&2
  exit 1
fi

clone="$work/lorakit"
rm -rf "$clone"
git clone -q "$repo" "$clone"
if [ "$committed" = 0 ] && [ -n "$(git -C "$repo" status --porcelain)" ]; then
  # uncommitted work: the clone gets the working tree's tracked and new (not ignored) files, deletions included
  echo "check_quickstart: copying the working tree's uncommitted changes into the clone (--committed: HEAD only)"
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$repo" && xargs -0 -I{} sh -c 'if [ -e "$1" ]; then mkdir -p "$2/$(dirname "$1")" && cp -p "$1" "$2/$1"; else rm -f "$2/$1"; fi' _ {} "$clone")
fi

echo "check_quickstart: fresh clone in $clone"
echo "  1: ${cmds[0]}"
echo "  2: ${cmds[1]}"
# both commands in one shell, as a reader types them (the second runs in the venv the first activated)
cat > "$work/quickstart.sh" <<EOF
set -e
cd "$clone"
t0=\$(date +%s)
${cmds[0]}
t1=\$(date +%s)
echo "check_quickstart: command 1 finished in \$((t1 - t0)) s"
${cmds[1]}
t2=\$(date +%s)
echo "check_quickstart: command 2 finished in \$((t2 - t1)) s"
echo "check_quickstart: both commands passed in \$((t2 - t0)) s"
EOF
# a clean environment, as on a new machine: no venv of this checkout, no inherited Python path
env -u VIRTUAL_ENV -u PYTHONPATH PATH="$(echo "$PATH" | tr ':' '\n' | grep -v "$repo" | paste -sd:)" \
  bash "$work/quickstart.sh" 2>&1 | tee "$work/quickstart.log"
rc="${PIPESTATUS[0]}"
# a clone with its venv is ~2 GB: left behind by every check they filled the disk (and then CI's /tmp) once
if [ "$rc" = 0 ] && [ "$keep" = 0 ]; then rm -rf "$clone"; echo "check_quickstart: clone removed (--keep keeps it)"; fi
exit "$rc"
