#!/usr/bin/env bash
# The converged digits run on one GPU machine, where a step costs less than on the 2-core CPU:
# the run's task, its doubling, then its recover doubling (CDA and SRe2L), at the run's five seeds
# (README.md, "What finishes it"), each under its own time limit, into $1 (default
# ./gpu-converged), then both doubling tables. RUNS names the three task files, the run's task
# first: by default "doubled quadrupled doubled-recover300" (the run's task since 2026-12-07,
# README.md step 2); "base doubled recover300" runs the base schedules. A run cut short by its limit
# keeps every finished cell (records are appended as cells end) and resumes on the same folder.
# The students are small (0.3-1.5 M parameters at 8 px): one process leaves a GPU idle, so WORKERS
# processes (default 12, one CPU thread each) share it. A GPU's float path is not this CPU's: its
# teacher, sets and cells are a run of their own, never merged into runs/ here (README.md).
#     bash benchmarks/digits-converged/gpu.sh /tmp/gpu-converged
set -u -o pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$root/gpu-converged}"
workers="${WORKERS:-12}"
limit="${LIMIT:-240}"              # seconds per run; the device budget is what bounds it
device="${DEVICE:-cuda}"           # DEVICE=cpu: the same commands on a CPU (a dry run of this script)
cache="${CACHE:-$out/cache}"
read -r -a runs <<< "${RUNS:-doubled quadrupled doubled-recover300}"
[ "${#runs[@]}" -eq 3 ] || { echo "RUNS names three task files: the run's task, its doubling, its recover doubling" >&2; exit 2; }
here="$root/benchmarks/digits-converged"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
mkdir -p "$out"
cd "$root" || exit 2
[ "$device" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/env.log"
status=0
for run in "${runs[@]}"; do
    # The recover doubling compares CDA's and SRe2L's panel means: their soft-label cells.
    slice=(--suite cross-arch)
    [ "$run" = "${runs[2]}" ] && slice=(--suite "$here/soft.toml" --methods cda sre2l)
    echo "== $run (limit ${limit}s)"
    start=$SECONDS
    timeout "$limit" "$python" -m cdabench.cli run "${slice[@]}" --task "$here/$run.toml" --seeds 0 1 2 3 4 \
        --device "$device" --workers "$workers" --cache-dir "$cache" --out "$out/$run" --quiet 2>&1 | tail -n 40 | tee "$out/$run.log"
    rc=$?
    echo "== $run: exit $rc after $((SECONDS - start)) s, $(cat "$out/$run/records.jsonl" 2>/dev/null | wc -l) cells recorded"
    [ "$rc" -eq 0 ] || status=1
done
for pair in "${runs[1]}" "${runs[2]}"; do
    echo "== doubling: ${runs[0]} -> $pair"
    "$python" -m cdabench.cli doubling --base "$out/${runs[0]}" --doubled "$out/$pair" | tee "$out/doubling-$pair.md"
done
exit $status
