#!/usr/bin/env bash
# fuzz.sh: builds the libFuzzer harnesses in fuzz/ against the CPU-only library (host/*/*.c but
# host/cli, host/ops/cpu/*.c, kernels/cuda_stub.c and kernels/ctx_stub.c) compiled with clang,
# ASan and UBSan, then runs each for FUZZ_SECONDS (default 60) from its committed seeds
# (fuzz/corpus/NAME) plus a working corpus under the build directory. Exit status 1 if any
# harness crashed, leaked or tripped a sanitizer; the input that did it is kept and a command
# to replay it printed.
#
#   scripts/fuzz.sh [NAME...]     NAME: a harness fuzz/fuzz_NAME.c; all of them by default
#                                 (make fuzz; FUZZ_SECONDS=600 make fuzz; make fuzz FUZZ=npz)
# Environment: FUZZ_SECONDS, BUILD (default build; outputs go to $BUILD/fuzz), CLANG,
# FUZZ_KEEP_GOING=1: fuzz on past crashes, leaks and out-of-memory (libFuzzer's fork mode),
# keeping every distinct input that found one: for surveying a reader with known bugs.
set -u
cd "$(dirname "$0")/.."

SECONDS_EACH=${FUZZ_SECONDS:-60}
OUT=${BUILD:-build}/fuzz
CLANG=${CLANG:-clang}
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then # every harness in fuzz/
    for h in fuzz/fuzz_*.c; do h=${h#fuzz/fuzz_}; TARGETS+=("${h%.c}"); done
fi

if ! command -v "$CLANG" >/dev/null 2>&1; then
    echo "fuzz.sh: $CLANG not found; the fuzzers need clang with libFuzzer: apt-get install clang" >&2
    exit 1
fi
mkdir -p "$OUT/obj" "$OUT/artifacts"
probe="$OUT/probe.c"
echo 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }' >"$probe"
if ! "$CLANG" -fsanitize=fuzzer,address,undefined "$probe" -o "$OUT/probe" 2>"$OUT/probe.log"; then
    echo "fuzz.sh: $CLANG cannot build a libFuzzer binary ($(head -n 1 "$OUT/probe.log")); install clang's" \
         "runtime: apt-get install clang" >&2
    exit 1
fi

PKGS="openblas libcjson libpcre2-8 libutf8proc yaml-0.1"
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
CFLAGS="-std=c11 -D_GNU_SOURCE -g -O1 $SAN -Iinclude -Ihost $(pkg-config --cflags $PKGS 2>/dev/null) -pthread"
LIBS="$(pkg-config --libs $PKGS 2>/dev/null) -lm -pthread"

# Library objects with coverage instrumentation, rebuilt when the source or a header changed.
newest_header=$(ls -t include/loupe/*.h host/*/*.h | head -n 1)
srcs=(host/{core,dist,ops,io,model,store,sae,attrib,analysis}/*.c host/ops/cpu/*.c kernels/cuda_stub.c kernels/ctx_stub.c)
stale=()
for s in "${srcs[@]}"; do
    o="$OUT/obj/${s//\//_}.o"
    if [ ! -f "$o" ] || [ "$s" -nt "$o" ] || [ "$newest_header" -nt "$o" ]; then stale+=("$s"); fi
done
echo "fuzz.sh: compiling ${#stale[@]} of ${#srcs[@]} library sources with $CLANG (ASan, UBSan, coverage)"
if [ ${#stale[@]} -gt 0 ]; then
    printf '%s\n' "${stale[@]}" |
        xargs -P "$(nproc)" -I{} sh -c 'o="$1/obj/$(echo "$2" | tr / _).o"; '"$CLANG"' '"$CFLAGS"' -fsanitize=fuzzer-no-link -c "$2" -o "$o" || { rm -f "$o"; exit 255; }' _ "$OUT" {} ||
        { echo "fuzz.sh: compiling the library failed" >&2; exit 1; }
fi
rm -f "$OUT/libloupe-fuzz.a"
ar rcs "$OUT/libloupe-fuzz.a" "$OUT"/obj/*.o

status=0
for t in "${TARGETS[@]}"; do
    h="fuzz/fuzz_$t.c"
    [ -f "$h" ] || { echo "fuzz.sh: no harness $h" >&2; exit 1; }
    # shellcheck disable=SC2086
    "$CLANG" $CFLAGS -fsanitize=fuzzer "$h" "$OUT/libloupe-fuzz.a" $LIBS -o "$OUT/fuzz_$t" ||
        { echo "fuzz.sh: building $h failed" >&2; exit 1; }
    mkdir -p "$OUT/corpus/$t"
    dict=()
    [ -f "fuzz/$t.dict" ] && dict=(-dict="fuzz/$t.dict")
    [ "${FUZZ_KEEP_GOING:-0}" = 1 ] && dict+=(-fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1)
    echo "== fuzz_$t for ${SECONDS_EACH}s (seeds: fuzz/corpus/$t, working corpus: $OUT/corpus/$t)"
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ASAN_OPTIONS=detect_leaks=1 \
        "$OUT/fuzz_$t" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        "${dict[@]}" -artifact_prefix="$OUT/artifacts/$t-" "$OUT/corpus/$t" "fuzz/corpus/$t" \
        >"$OUT/fuzz_$t.log" 2>&1
    rc=$?
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb|new_units_added)|^#[0-9]+.*DONE' "$OUT/fuzz_$t.log" | sed 's/^/   /'
    if [ $rc -ne 0 ]; then
        status=1
        echo "   fuzz_$t FAILED (exit $rc); log: $OUT/fuzz_$t.log"
        grep -E 'ERROR: |SUMMARY: |runtime error|Test unit written to' "$OUT/fuzz_$t.log" | head -n 8 | sed 's/^/   /'
        art=$(sed -n 's/.*Test unit written to \(.*\)/\1/p' "$OUT/fuzz_$t.log" | tail -n 1)
        [ -n "$art" ] && echo "   replay: $OUT/fuzz_$t $art"
    else
        echo "   fuzz_$t: no crash in ${SECONDS_EACH}s"
    fi
done
exit $status
