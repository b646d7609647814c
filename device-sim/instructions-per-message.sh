#!/usr/bin/env bash
# Vigil's instructions per stored message during a durable fill, counted by
# valgrind's callgrind: a count, not a time, so steal and a slow disk do not
# enter it, and two builds can be compared on a machine too noisy for their
# fill rates to tell them apart. User-space instructions only: the kernel's
# part (loopback TCP, the page cache, fsync) is not counted.
#
# Each round runs `vigil-sim bench --ingest-only` twice with Vigil under
# callgrind, at 20,000 and at 60,000 messages, and divides the difference of
# the two totals by 40,000, so start-up and shutdown cancel out. Round to
# round the figure moves by about 1-2 % (group commits' sizes and fjall's
# skiplist heights vary), and timing still enters through the group commit:
# with other work on the machine (a build, say) commits are smaller and the
# figure higher (seen: +5 %). Compare builds in interleaved rounds on an
# otherwise idle machine.
#
# Usage: device-sim/instructions-per-message.sh [ROUNDS] [VIGIL] [VIGIL_SIM]
#   ROUNDS     rounds to run (default 2)
#   VIGIL      the vigil binary (default target/release/vigil)
#   VIGIL_SIM  the vigil-sim binary (default target/release/vigil-sim)
# BENCH_ARGS in the environment adds options to both fills, e.g.
#   BENCH_ARGS="--topics-per-device 16" device-sim/instructions-per-message.sh
# Needs valgrind (apt-get install valgrind). Keeps its files in a temporary
# directory it prints; `callgrind_annotate --inclusive=yes FILE` reads one.
set -euo pipefail

rounds=${1:-2}
vigil=$(realpath "${2:-target/release/vigil}")
sim=$(realpath "${3:-target/release/vigil-sim}")
command -v valgrind >/dev/null || { echo "valgrind is not installed: apt-get install valgrind" >&2; exit 2; }
[[ -x $vigil ]] || { echo "no vigil binary at $vigil: cargo build --release -p vigil" >&2; exit 2; }
[[ -x $sim ]] || { echo "no vigil-sim binary at $sim: cargo build --release -p vigil-sim" >&2; exit 2; }

work=$(mktemp -d /tmp/vigil-instructions.XXXXXX)
echo "instructions per message: $vigil, $rounds round(s), bench options '${BENCH_ARGS:-}', files in $work"

# Total instructions of one fill of SCALE million messages, Vigil under callgrind.
fill() {
    local dir=$work/$1
    mkdir -p "$dir"
    cat >"$dir/vigil.sh" <<EOF
#!/usr/bin/env bash
exec valgrind --tool=callgrind --callgrind-out-file=$dir/callgrind.out --dump-instr=no "$vigil" "\$@"
EOF
    chmod +x "$dir/vigil.sh"
    # shellcheck disable=SC2086 # BENCH_ARGS is a list of options
    if ! "$sim" bench --ingest-only --scale "$2" --vigil "$dir/vigil.sh" --out "$dir/bench" ${BENCH_ARGS:-} >"$dir/bench.txt" 2>&1; then
        echo "the bench failed; its output: $dir/bench.txt" >&2
        exit 1
    fi
    awk '/^summary:/ {print $2}' "$dir/callgrind.out"
}

for round in $(seq 1 "$rounds"); do
    small=$(fill "r$round-20k" 0.02)
    large=$(fill "r$round-60k" 0.06)
    echo "round $round: $(( (large - small) / 40000 )) instructions per message ($small for 20,000 messages, $large for 60,000)"
done
