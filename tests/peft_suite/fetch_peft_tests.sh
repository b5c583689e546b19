#!/usr/bin/env bash
# Fetch PEFT's own test suite (tests/ of the PEFT sdist) for the PEFT version installed in the active environment.
#
# PEFT's wheel does not ship its tests, so tests/test_peft_common.py needs the sdist's `tests/` folder. This script
# downloads the sdist of exactly the installed version (`pip download --no-binary :all:`) and extracts only its
# `tests/` folder to  .cache/peft-tests/peft-<version>/tests  (git-ignored). It is idempotent: when that folder is
# already complete, nothing is downloaded.
#
# Usage (from any directory, with the project's environment active):
#     bash tests/peft_suite/fetch_peft_tests.sh
# Environment:
#     PYTHON           interpreter whose PEFT version is used (default: python)
#     PEFT_TESTS_CACHE cache folder (default: <repo>/.cache/peft-tests)
# Prints the path of the extracted tests/ folder on its last line of stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$(command -v python || command -v python3)}"
cache="${PEFT_TESTS_CACHE:-$repo/.cache/peft-tests}"

version="$("$python" -c 'import importlib.metadata as m; print(m.version("peft"))')"
dest="$cache/peft-$version"
marker="$dest/.complete"

if [[ -f "$marker" && -f "$dest/tests/test_custom_models.py" ]]; then
    echo "PEFT $version tests already present in $dest/tests" >&2
    echo "$dest/tests"
    exit 0
fi

mkdir -p "$cache"
work="$(mktemp -d "$cache/.download.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "Downloading the PEFT $version sdist ..." >&2
"$python" -m pip download --quiet --no-binary :all: --no-deps "peft==$version" -d "$work" >&2

sdist="$(find "$work" -maxdepth 1 -name 'peft-*.tar.gz' | head -n 1)"
if [[ -z "$sdist" ]]; then
    echo "error: no peft-$version sdist was downloaded" >&2
    exit 1
fi

# Extract only tests/ (the archive's top folder is peft-<version>/), into a staging folder first so that an
# interrupted run never leaves a half-extracted tree behind.
mkdir -p "$work/extract"
tar -xzf "$sdist" -C "$work/extract" --strip-components=1 --wildcards '*/tests/*'
if [[ ! -f "$work/extract/tests/test_custom_models.py" ]]; then
    echo "error: $sdist has no tests/test_custom_models.py" >&2
    exit 1
fi
rm -rf "$dest"
mkdir -p "$dest"
mv "$work/extract/tests" "$dest/tests"
touch "$marker"
echo "PEFT $version tests extracted to $dest/tests" >&2
echo "$dest/tests"
