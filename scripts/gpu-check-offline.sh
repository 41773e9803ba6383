#!/usr/bin/env bash
# gpu-check-offline.sh: the one prepared check for a lent GPU machine, which has no network,
# no package installs and one call of about 8 minutes.
#
#   bash scripts/gpu-check-offline.sh build   here: builds the CUDA tests and benchmarks for
#                                             sm_90 with -lineinfo into build/gpucheck/bundle
#                                             (binaries, the shared libraries they need beyond
#                                             the CUDA toolkit's) and packs it as
#                                             build/gpucheck/bundle.tar.xz (~16 MB: the 64 MiB
#                                             that travel with the tree hold it and the fixtures)
#   bash scripts/gpu-check-offline.sh run     there, from the repository root: writes
#                                             $OUT/summary.txt (and one log per step)
#
# The run checks with ldd that every library resolves (the bundled ones are used only when
# the machine lacks them), runs every CUDA test binary with LOUPE_REQUIRE_GPU=1 (a skip for
# want of a GPU is a failure), then the small-size builds of the same tests under
# compute-sanitizer memcheck, racecheck and synccheck when it is installed, then the GPU
# sections of the benchmarks; every step has its own time limit and a failure never stops
# the ones after it (bench_forward also times the tensor-core attention against the row
# kernels, forward and backward). The fixtures travel with the tree (tests/fixtures); the real model does
# not, and the tests and benchmark sections that need it skip, saying so.
# Order: the tests at full size, the benchmarks, then the sanitizers (memcheck, racecheck,
# synccheck), so that what is cut when time runs out is the least needed. Time limits
# (seconds) can be changed through the environment: TEST_S per test binary (90), BENCH_S
# per benchmark (60), GRAPH_S for bench_graph's GPU section (180), SAN_S per sanitizer run (40) and TOTAL_S for the whole run (420, so
# the run and the unpacking fit an 8-minute call).
set -u
BUNDLE=${BUNDLE:-build/gpucheck/bundle}

build() {
    local t0=$SECONDS b=build/gpucheck
    make --no-print-directory -j"${JOBS:-2}" BUILD=$b CUDA=1 CUDA_ARCH=sm_90 LINEINFO=1 \
        $(ls tests/test_*_cuda.c | sed "s|tests/\(.*\)\.c|$b/\1|") \
        $(ls tests/test_*_cuda.c | sed "s|tests/\(.*\)\.c|$b/small/\1|") \
        $(ls bench/bench_*.c | sed "s|bench/\(.*\)\.c|$b/\1|") || return 1
    rm -rf "$BUNDLE"
    mkdir -p "$BUNDLE/bin/small" "$BUNDLE/lib"
    cp $b/test_*_cuda $b/bench_* "$BUNDLE/bin/"
    cp $b/small/test_*_cuda "$BUNDLE/bin/small/"
    strip --strip-debug "$BUNDLE"/bin/* "$BUNDLE"/bin/small/* 2>/dev/null # host debug info only; -lineinfo lives in the fatbin
    # Libraries from outside the CUDA toolkit and the C/C++ runtime, for a machine without them.
    ldd "$BUNDLE"/bin/test_ops_cuda "$BUNDLE"/bin/bench_* | awk '/=> \//{print $3}' | sort -u |
        grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|libpthread|libdl|librt|ld-linux[^/]*)\.so|/cuda|libcu' |
        while read -r l; do cp -L "$l" "$BUNDLE/lib/"; done
    tar -C "$(dirname "$BUNDLE")" -cf - "$(basename "$BUNDLE")" | xz -6 -T2 >"$BUNDLE.tar.xz" || return 1
    echo "bundle: $BUNDLE.tar.xz, $(du -h "$BUNDLE.tar.xz" | cut -f1) ($(du -sh "$BUNDLE" | cut -f1) unpacked; fixtures in the tree: $(du -sh tests/fixtures | cut -f1)), built in $((SECONDS - t0)) s"
    echo "on the device, from the repository root: bash scripts/gpu-check-offline.sh run   (carry: $BUNDLE.tar.xz)"
}

# One step: `step NAME SECONDS CMD...` runs CMD with a time limit, logs it and adds a line
# (PASS/FAIL/TIMEOUT, seconds, and the test counts when it is a test binary) to the summary.
step() {
    local name=$1 limit=$2
    shift 2
    local log="$OUT/logs/$name.log" t0=$SECONDS rc left=$((T_END - SECONDS))
    if [ "$left" -lt 10 ]; then # the whole run keeps inside TOTAL_S
        printf '%-8s %-44s        out of time (TOTAL_S=%s)\n' SKIP "$name" "$TOTAL_S" >>"$SUMMARY"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local st=PASS
    [ $rc -ne 0 ] && st=FAIL
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && st=TIMEOUT
    local synth
    synth=$(grep 'Synthesis:' "$log" | tail -1 | sed 's/.*Synthesis: //')
    local skips
    skips=$(grep -c '^\[SKIP\]' "$log")
    printf '%-8s %-44s %4ds  %s%s\n' "$st" "$name" $((SECONDS - t0)) "${synth:-rc=$rc}" \
        "$([ "$skips" -gt 0 ] && echo " | skipped $skips")" >>"$SUMMARY"
    [ "$st" = PASS ] || grep -E '^\[(FAIL|----|SKIP)\] *[^ ]|ERROR SUMMARY|========= [A-Z]|validation failed' "$log" |
        head -12 | sed 's/^/           /' >>"$SUMMARY"
}

run() {
    OUT=${OUT:-gpucheck-out}
    TOTAL_S=${TOTAL_S:-420}
    T_END=$((SECONDS + TOTAL_S))
    mkdir -p "$OUT/logs"
    SUMMARY="$OUT/summary.txt"
    local t0=$SECONDS
    if [ ! -x "$BUNDLE/bin/test_ops_cuda" ] && [ -f "$BUNDLE.tar.xz" ]; then
        tar -C "$(dirname "$BUNDLE")" -xJf "$BUNDLE.tar.xz"
    fi
    {
        echo "loupe offline GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
        echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    } >"$SUMMARY"
    if [ ! -x "$BUNDLE/bin/test_ops_cuda" ]; then
        echo "FAIL     no bundle at $BUNDLE (build it with: bash scripts/gpu-check-offline.sh build)" >>"$SUMMARY"
        cat "$SUMMARY"
        return 1
    fi
    # ldd: every library must resolve; the bundled copies fill what the machine lacks.
    local missing
    missing=$(for b in "$BUNDLE"/bin/* "$BUNDLE"/bin/small/*; do [ -f "$b" ] && ldd "$b"; done | grep 'not found' | sort -u)
    if [ -n "$missing" ]; then
        export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        missing=$(for b in "$BUNDLE"/bin/* "$BUNDLE"/bin/small/*; do [ -f "$b" ] && ldd "$b"; done | grep 'not found' | sort -u)
        echo "ldd: used the bundled libraries" >>"$SUMMARY"
    fi
    if [ -n "$missing" ]; then
        echo "FAIL     ldd: unresolved libraries:" >>"$SUMMARY"
        echo "$missing" | sed 's/^/           /' >>"$SUMMARY"
    else
        echo "PASS     ldd: every library resolves" >>"$SUMMARY"
    fi
    export LOUPE_REQUIRE_GPU=1

    echo "== tests (full sizes)" >>"$SUMMARY"
    for t in "$BUNDLE"/bin/test_*_cuda; do
        step "$(basename "$t")" "${TEST_S:-90}" "$t" --jobs 1 --verbose
    done

    echo "== benchmarks (GPU sections)" >>"$SUMMARY"
    step bench_forward.gpt2 "${BENCH_S:-60}" "$BUNDLE/bin/bench_forward" --only gpt2 --cpu-seq 16
    step bench_forward.llama8b "${BENCH_S:-60}" "$BUNDLE/bin/bench_forward" --only llama8b --cpu-seq 16
    step bench_sae "${BENCH_S:-60}" "$BUNDLE/bin/bench_sae" --gpu-only
    step bench_attrib "${BENCH_S:-60}" "$BUNDLE/bin/bench_attrib" --gpu-only
    # attribution graphs, graph.device = cuda: Gemma-2-2B-shaped random weights at 32, 2,048
    # and 8,192 tokens (the long ones stop after GRAPH_LIMIT_S of backward passes each and
    # extrapolate from their seconds per backward)
    step bench_graph.gpu "${GRAPH_S:-180}" "$BUNDLE/bin/bench_graph" --gpu-only --gpu-limit "${GRAPH_LIMIT_S:-20}"
    for b in bench_forward.gpt2 bench_forward.llama8b bench_sae bench_attrib bench_graph.gpu; do
        echo "-- $b figures" >>"$SUMMARY"
        grep -E 'tokens/s|GB/s|TFLOP|ms|/s|target|skipped|valid|plan:|stopped|to the plan|^ *[0-9]+ +[0-9]' "$OUT/logs/$b.log" 2>/dev/null | head -40 | sed 's/^/   /' >>"$SUMMARY"
    done
    local cs
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    if [ -n "$cs" ]; then
        echo "== compute-sanitizer (small-size builds; Criterion forks, so all target processes)" >>"$SUMMARY"
        for tool in memcheck racecheck synccheck; do
            for t in "$BUNDLE"/bin/small/test_*_cuda; do
                step "$tool.$(basename "$t")" "${SAN_S:-40}" "$cs" --tool "$tool" --target-processes all \
                    --error-exitcode 99 "$t" --jobs 1
            done
        done
    else
        echo "SKIP     compute-sanitizer: not installed" >>"$SUMMARY"
    fi

    echo "total: $((SECONDS - t0)) s; $(grep -cE '^(FAIL|TIMEOUT)' "$SUMMARY") steps failed" >>"$SUMMARY"
    cat "$SUMMARY"
}

case "${1:-}" in
build) build ;;
run) run ;;
*)
    echo "usage: gpu-check-offline.sh build|run" >&2
    exit 2
    ;;
esac
