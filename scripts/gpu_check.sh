#!/usr/bin/env bash
# Does every GPU path work, and how fast is it? One command, at most 10 minutes, on a machine with
# one CUDA GPU: the tests marked gpu; benchmarks/generate.py (t5-base, bf16: greedy batch 1 and 32,
# beam 4, against transformers' default and static-cache generate); benchmarks/train.py
# (t5-v1_1-base: t5kit eager and each --compile mode, then transformers eager); benchmarks/long.py
# (the LongT5 transient-global base encoder at 16,384 tokens, bf16, against transformers' LongT5:
# issue 20's target is 3x); benchmarks/lora.py (flan-t5-xl's shape, LoRA r=8 on q,v, bf16: state,
# peak memory and step time against transformers + peft, generation with the adapter merged against
# peft's unmerged one: issue 21); benchmarks/encode.py (the v1.1 encoder at xl, then at xxl, the
# shape of the published text encoders, when it fits).
# Writes OUT/gpu_report.json (pass/fail per test, every benchmark JSON line, each part's exit
# status and seconds, torch / CUDA / GPU names) and prints a summary of at most 10 lines. Exit 0
# when every test passed and every part ran within its time.
#
#   bash scripts/gpu_check.sh [OUT]        (OUT: a folder, default runs/gpu_check in this repository)
#
# Each part runs under its own time limit (timeout), and a part that fails or runs out of time
# leaves the others to run; a benchmark's JSON lines printed before its limit are kept. Without a
# CUDA GPU it says so in one line and exits 0. Python: the repo's .venv when there is one, else
# python3 (a lent GPU machine brings its own torch and transformers); t5kit comes from src/.
set -uo pipefail
OUT=$(realpath -m "${1:-$(dirname "$0")/../runs/gpu_check}")
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

# Seconds. The per-part limits are first estimates, to be set from the seconds each part records in
# the report; TOTAL_S caps them all: a part gets at most what is left of TOTAL_S less ENCODE_MIN_S,
# which is kept for encoding, the last part (its xxl checkpoint, 19 GB of fp32 built on the host,
# written and read back four times, is the part whose time is least known; xl's line comes first).
# Worst case: TOTAL_S + 3 helper calls (the first and last outside it) + 5 s of grace per part:
# 520 + 2 x 20 + 6 x 5 = 590 s.
TOTAL_S=520 ENCODE_MIN_S=60 HELPER_S=20 TESTS_S=170 GENERATE_S=130 TRAIN_S=120 LONG_S=90 LORA_S=120
start=$SECONDS

env_json=$(timeout "$HELPER_S" "$PY" scripts/gpu_report.py env)
case $? in
    0) ;;
    3) echo "$env_json"; exit 0 ;;  # no CUDA GPU: the helper's one line
    *) echo "gpu_check: '$PY scripts/gpu_report.py env' failed (is torch installed for $PY?)"; exit 1 ;;
esac
mkdir -p "$OUT"
rm -f "$OUT"/*.out "$OUT"/*.log "$OUT"/parts.tsv "$OUT"/tests.xml "$OUT"/gpu_report.json
echo "$env_json" > "$OUT/env.json"

# part NAME LIMIT COMMAND...: runs COMMAND with stdout in OUT/NAME.out and stderr in OUT/NAME.log,
# in a temp folder of its own (TMPDIR: checkpoints, compile caches; removed even after a timeout),
# and appends "NAME <tab> exit status <tab> seconds <tab> limit <tab> command" to OUT/parts.tsv.
part() {
    local name=$1 limit=$2 begin=$SECONDS rc tmp cap
    shift 2
    cap=$((TOTAL_S - (SECONDS - start)))
    [ "$name" = encode ] || cap=$((cap - ENCODE_MIN_S))
    limit=$((limit < cap ? limit : cap))
    if [ "$limit" -lt 1 ]; then  # TOTAL_S spent: recorded as run out of time, not run
        printf '%s\t124\t0\t0\t%s\n' "$name" "$*" >> "$OUT/parts.tsv"
        return
    fi
    tmp=$(mktemp -d)
    TMPDIR=$tmp timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log" < /dev/null
    rc=$?
    rm -rf "$tmp"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - begin))" "$limit" "$*" >> "$OUT/parts.tsv"
}

part tests "$TESTS_S" "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --junitxml="$OUT/tests.xml" tests
part generate "$GENERATE_S" "$PY" benchmarks/generate.py --device cuda --dtype bf16 --shapes t5-base \
    --cases greedy_b1 greedy_b32 beam4_b1 --no-ctranslate2 --repeats 3
part train "$TRAIN_S" "$PY" benchmarks/train.py --device cuda --shapes t5-v1_1-base \
    --cases t5kit t5kit_compile_block t5kit_compile_model transformers
part long "$LONG_S" "$PY" benchmarks/long.py --device cuda --dtype bf16 --lengths 16384 --repeats 2
part lora "$LORA_S" "$PY" benchmarks/lora.py --device cuda --shape flan-t5-xl --batch 8 --inputs 512 \
    --targets-length 114 --cases t5kit_lora peft_lora --steps 5 --repeats 3
encode_shapes=$(timeout "$HELPER_S" "$PY" scripts/gpu_report.py shapes t5-v1_1-xl t5-v1_1-xxl)
# shellcheck disable=SC2086  # encode_shapes is a list
part encode "$TOTAL_S" "$PY" benchmarks/encode.py --device cuda --dtype bf16 --batch 32 \
    --length 512 --encoder-only --shapes $encode_shapes
timeout "$HELPER_S" "$PY" scripts/gpu_report.py report "$OUT"
