#!/usr/bin/env bash
# run-tests.sh: runs every test binary given, shows what failed and why each skip happened,
# and ends with one line over all of them: "tests: N passed, N failed, N skipped".
# Exit status 1 if anything failed or a binary crashed.
# An argument --env=NAME=VALUE sets NAME for the binaries after it (the emulated CUDA tests
# run with LOUPE_REQUIRE_GPU=1, where the real CUDA tests may skip).
set -u
pass=0 fail=0 skip=0
envs=()
for t in "$@"; do
    case $t in --env=*) envs+=("${t#--env=}"); continue ;; esac
    echo "== $t"
    out=$(env ${envs[@]+"${envs[@]}"} "$t" --verbose --jobs 2 2>&1)
    rc=$?
    printf '%s\n' "$out" | grep -vE '^\[(RUN |PASS)\]'
    line=$(printf '%s\n' "$out" | grep 'Synthesis:' | tail -n 1)
    p=$(sed -n 's/.*Passing: \([0-9]*\).*/\1/p' <<<"$line")
    f=$(sed -n 's/.*Failing: \([0-9]*\) | Crashing: \([0-9]*\).*/\1 \2/p' <<<"$line")
    s=$(printf '%s\n' "$out" | grep -c '^\[SKIP\]')
    nf=0
    for x in $f; do nf=$((nf + x)); done
    if [ -z "$line" ] || { [ "$rc" -ne 0 ] && [ "$nf" -eq 0 ]; }; then nf=$((nf + 1)); echo "   $t exited with status $rc"; fi
    pass=$((pass + ${p:-0})) fail=$((fail + nf)) skip=$((skip + s))
done
echo "tests: $pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ]
