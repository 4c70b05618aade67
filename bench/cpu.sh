#!/usr/bin/env bash
# The CPU variant of bench/gpu.sh, for the CI machine: microbenchmarks at CPU shapes and the
# e2e benchmark at tiny and mid sizes, in the same report format under bench/results/.
#   bash bench/cpu.sh [report.py options, e.g. --overwrite]
set -euo pipefail
# One intra-op thread unless told otherwise: on a small machine shared with other jobs, torch's
# multi-threaded CPU ops were seen to run 10-30x slower under contention (spinning threads).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$(dirname "$0")/.."
python bench/report.py --device cpu "$@"
# Where a turn's time goes with the released echo decoder and vocoder, and streaming vs offline vocoding.
stem="bench/results/$(date +%F)-cpu-speech"
python bench/speech_path.py --out "$stem.jsonl" --markdown "$stem.md"
# The same stages against this machine's limits (<date>-cpu-roofline-voice.md).
python bench/cpu_roofline.py
# Many conversations on one engine: 1..16 at once, batched vs one (bench/results/<date>-cpu-batch-tiny.md).
python bench/batch_engine.py --size tiny
# What the interpreter lock costs the LLM's batched step beside speech work (<date>-cpu-interpreter-lock-tiny.md).
python bench/interpreter_lock.py --size tiny
# The server under load, batched and queued: clients all at once, then paced live conversations
# (bench/results/serve/<date>-cpu-batch{16,1}[-paced].md).
for batch in 16 1; do
    python bench/serve_load.py --max-batch "$batch"
    python bench/serve_load.py --max-batch "$batch" --turns 3
done
