#!/usr/bin/env bash
# Builds the GPU test bundle here (no CUDA needed): target/gpu-bundle/ with the GPU test
# binary, the CPU unit tests of sdpa-cuda, the bench binary, the kernels, the golden
# cases (if any), ci/bench_torch.py and run.sh. Copy or carry the folder to any Linux
# CUDA machine and run `bash target/gpu-bundle/run.sh`: it needs no Rust, prints a
# summary last, and writes logs to $OUT (or the bundle's results/).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BUNDLE=${GPU_BUNDLE:-$ROOT/target/gpu-bundle}
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/bin"

# Test executables: cargo prints their paths in its JSON messages.
cargo test -p sdpa-cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        kind = m["target"]["kind"][0]
        name = m["target"]["name"]
        if kind in ("lib", "test"):
            print(("unit" if kind == "lib" else name) + " " + m["executable"])
' > "$BUNDLE/tests.txt"
while read -r name exe; do
  cp "$exe" "$BUNDLE/bin/sdpa-cuda-$name"
done < "$BUNDLE/tests.txt"
rm "$BUNDLE/tests.txt"
# The device halves of nested batches and of the module (their `cuda` test targets).
for crate in sdpa-nested sdpa-nn; do
  cargo test -p "$crate" --test cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])
' | while read -r exe; do cp "$exe" "$BUNDLE/bin/$crate-cuda"; done
done
# The module goldens on CUDA (tests/golden_module.rs, its #[ignore]d CUDA test).
cargo test -p sdpa-nn --test golden_module --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "golden_module":
        print(m["executable"])
' | while read -r exe; do cp "$exe" "$BUNDLE/bin/sdpa-nn-golden_module"; done
cargo build --release -p sdpa-cuda --bin sdpa-cuda-bench
cp "$TARGET_DIR/release/sdpa-cuda-bench" "$BUNDLE/bin/"
cargo build --release -p sdpa-nn --bin sdpa-nn-bench
cp "$TARGET_DIR/release/sdpa-nn-bench" "$BUNDLE/bin/"
cargo build --release -p sdpa-cli --bin sdpa
cp "$TARGET_DIR/release/sdpa" "$BUNDLE/bin/"
# The training demo (crates/sdpa-nn/examples/train.rs), run there with --device cuda.
cargo build --release -p sdpa-nn --example train
cp "$TARGET_DIR/release/examples/train" "$BUNDLE/bin/sdpa-nn-train"
# The facade's CUDA example (crates/sdpa/examples/cuda.rs).
cargo build --release -p sdpa --example cuda
cp "$TARGET_DIR/release/examples/cuda" "$BUNDLE/bin/sdpa-example-cuda"
# A bench binary of an earlier revision, for a before/after table in the same device call
# (run.sh bench-compare): BEFORE_BENCH=path/to/sdpa-cuda-bench bash ci/gpu.sh.
if [ -n "${BEFORE_BENCH:-}" ]; then
  cp "$BEFORE_BENCH" "$BUNDLE/bin/sdpa-cuda-bench-before"
fi
# Symbols and debug info are most of the size; neither is needed on the device.
for f in "$BUNDLE"/bin/*; do strip --strip-all "$f" 2>/dev/null || true; done

# The Python package: the abi3 wheel (installed there with --no-deps into the machine's
# Python with torch), its tests and the call-overhead timing (run.sh python).
mkdir -p "$BUNDLE/python"
cp "$(bash ci/python.sh --build-only | tail -1)" "$BUNDLE/python/"
cp -r bindings/python/tests "$BUNDLE/python/tests"
cp bindings/python/bench/overhead.py "$BUNDLE/python/"

cp -r kernels "$BUNDLE/kernels"
# The goldens travel with the working tree when the bundle is carried inside it (run.sh
# reads ../../golden first), so a copy would only double the upload (the device tool
# takes 64 MiB in all). GPU_BUNDLE_GOLDEN=1 puts a copy in for a bundle used elsewhere.
if [ "${GPU_BUNDLE_GOLDEN:-0}" = 1 ] && [ -d golden ] && [ -n "$(ls -A golden 2>/dev/null)" ]; then
  cp -r golden "$BUNDLE/golden"
fi
cp ci/bench_torch.py ci/bench_torch_bwd.py ci/bench_torch_sweep.py ci/bench_torch_decode.py ci/ceilings.py ci/bench_torch_module.py ci/bench_compare.py ci/planted_bugs.py "$BUNDLE/"
cp ci/planted-bugs.sh "$BUNDLE/planted-bugs.sh"
cp ci/tile-sweep.sh "$BUNDLE/tile-sweep.sh"
cp ci/decode-sweep.sh "$BUNDLE/decode-sweep.sh"
cp ci/mods-bench.sh "$BUNDLE/mods-bench.sh"
cp ci/gpu_env.sh "$BUNDLE/gpu_env.sh"
cp ci/gpu_run.sh "$BUNDLE/run.sh"
chmod +x "$BUNDLE/run.sh" "$BUNDLE"/bin/*
du -sh "$BUNDLE"
ls -la "$BUNDLE/bin"
