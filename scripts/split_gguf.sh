#!/usr/bin/env bash
# Stage what the GPU LLM run needs (run HERE, from the repo root, before the two `run` calls).
#
# The SmolLM2 GGUF is 98,362,432 bytes: more than one device call can carry (64 MiB with the
# working tree), so it travels in two git-ignored halves:
#   .carry/gguf_a/  SmolLM2-135M-Instruct.Q4_1.gguf.part.aa (48 MiB)
#                   + data/wikitext-2-raw/ and data/stories260k/ (staged data does not travel:
#                     ../shared/data is outside the repo and data/ is git-ignored)
#   .carry/gguf_b/  SmolLM2-135M-Instruct.Q4_1.gguf.part.ab (46 MiB)
#   .whl/           the gguf wheel (pure Python; not installed on the device image)
# scripts/gpu_llm.sh part1 / part2 put them together on the device (see there).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF=$(python3 -c "from mixq.hf.loading import fetch_smollm2; print(fetch_smollm2())")
echo "gguf: $GGUF"
echo "$SHA  $GGUF" | sha256sum -c -
DATA=$(python3 -c "from mixq.data import find_data; print(find_data('wikitext-2-raw').parent)")
rm -rf .carry/gguf_a .carry/gguf_b
mkdir -p .carry/gguf_a/data .carry/gguf_b .whl
split -b 48m -a 2 "$GGUF" ".carry/gguf_a/$NAME.part."
mv ".carry/gguf_a/$NAME.part.ab" .carry/gguf_b/
ls .carry/gguf_a/$NAME.part.* .carry/gguf_b/$NAME.part.* >/dev/null
cp -r "$DATA/wikitext-2-raw" .carry/gguf_a/data/
python3 -c "from mixq.data import find_data; find_data('stories260k')" >/dev/null && \
  cp -r "$(python3 -c "from mixq.data import find_data; print(find_data('stories260k'))")" \
        .carry/gguf_a/data/
rm -f .whl/gguf-*.whl
VER=$(python3 -c "import importlib.metadata as m; print(m.version('gguf'))")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 -d .whl "gguf==$VER"
du -sh .carry/gguf_a .carry/gguf_b .whl
ls -la .carry/gguf_a .carry/gguf_b .whl
