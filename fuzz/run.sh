#!/usr/bin/env bash
# Runs fuzz targets for a while each, on the stable toolchain (RUSTC_BOOTSTRAP=1 unlocks the
# sanitizer flags cargo-fuzz passes), starting from the seeds in fuzz/seeds/<target>/ and
# keeping the grown corpus in fuzz/corpus/<target>/ (git-ignored).
#
#     fuzz/run.sh [SECONDS] [TARGET...]        (default: 60 s each, every target)
#
# Prints one line per target with the executions, coverage (libFuzzer's `cov`/`ft`) and corpus
# size at the end; a crash stops that target and leaves its input in fuzz/artifacts/<target>/.
# Needs cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
SECONDS_EACH=${1:-60}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(frame_tracker frame_reader request_head jwt patterns config proxy_header)
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build
status=0
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t"
    cp -n seeds/"$t"/* "corpus/$t/" 2>/dev/null || true
    log=$(mktemp)
    if cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$SECONDS_EACH" -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result="CRASH (see fuzz/artifacts/$t/)"
        status=1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    cov=$(echo "$last" | grep -o 'cov: [0-9]*' || true)
    ft=$(echo "$last" | grep -o 'ft: [0-9]*' || true)
    corp=$(echo "$last" | grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' || true)
    echo "$t: ${SECONDS_EACH}s, $execs executions, $cov, $ft, $corp: $result"
    [ "$result" = ok ] || tail -40 "$log"
    rm -f "$log"
done
exit $status
