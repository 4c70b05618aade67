#!/usr/bin/env bash
# Everything a lent GPU machine (no network, one call of at most 10 minutes) is for:
# build csrc into echox_cuda, run the `gpu` tests, then every benchmark into bench/results/
# (the speech path last, in whatever time is left).
# Each phase has a time limit, cut to what is left of a budget (GPU_SH_SECONDS, default 575 s, kill grace
# included), so the whole script ends within 10 minutes, and its log and an archive of the
# results (results.tar) go to $OUT when it is set (the device tool brings back only that folder),
# whichever phase fails.
#   bash bench/gpu.sh [report.py options, e.g. --overwrite]
# A lease of 15 device minutes fits one whole run; to split it (say, to rerun what failed after a
# fix), pick phases and a shorter budget: the build and import check always run first.
#   GPU_SH_PHASES="gpu-tests report" GPU_SH_SECONDS=300 bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# The image may carry nvcc only as a wrapper on the PATH; the toolkit's own bin holds the rest.
if [ -d /usr/local/cuda/bin ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
export MAX_JOBS="$(nproc)"  # torch's cpp_extension compiles the .cu files in parallel
PY="$(command -v python3 || command -v python)"  # the image's torch is behind `python3`
OUT_DIR="${OUT:-}"
log="${OUT_DIR:-/tmp}/gpu_sh.log"
: > "$log"
started=$(mktemp)  # its time stamp marks which results files this run wrote
phase_times=()
budget=${GPU_SH_SECONDS:-575}
selectable="gpu-tests report batch speech"  # gpu-info, build and import-check always run
wanted=" ${GPU_SH_PHASES:-$selectable} "
for name in $wanted; do  # a misspelt phase would otherwise be skipped in silence, a lease's minutes gone
    if [[ " $selectable " != *" $name "* ]]; then
        echo "GPU_SH_PHASES: unknown phase '$name' (phases: $selectable)"
        exit 2
    fi
done

# phase NAME SECONDS COMMAND...: run it under a time limit (cut to what is left of the budget), log
# it, remember its exit code and wall time. gpu-info, build and import-check always run with their
# own limits; a later phase not in GPU_SH_PHASES is left out (status 0: it was not asked for), one
# with under 30 s of the budget left is skipped with status SKIPPED, which fails the script as a
# failed phase does: a run missing a phase must not look whole.
SKIPPED=200  # not an exit code of `timeout` (124, 137) or of a shell (126, 127)
failed_phases=()
phase() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - SECONDS - 5))
    if [[ " $selectable " == *" $name "* ]]; then
        if [[ "$wanted" != *" $name "* ]]; then
            phase_times+=("${name}: not selected")
            return 0
        fi
        if [ "$left" -lt 30 ]; then
            echo "=== ${name}: SKIPPED (status ${SKIPPED}), ${left} s of the budget left" | tee -a "$log"
            phase_times+=("${name}: SKIPPED (status ${SKIPPED}), ${left} s of the budget left")
            failed_phases+=("$name")
            return "$SKIPPED"
        fi
        [ "$limit" -gt "$left" ] && limit=$left
    fi
    local begin=$SECONDS
    echo "=== ${name} (limit ${limit} s)" | tee -a "$log"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 40
    local code=${PIPESTATUS[0]}
    phase_times+=("${name}: exit ${code}, $((SECONDS - begin)) s")
    echo "=== ${name}: exit ${code}, $((SECONDS - begin)) s" | tee -a "$log"
    [ "$code" -ne 0 ] && failed_phases+=("$name")
    return "$code"
}

save_results() {
    # The device tool brings back at most 8 files from $OUT: the results travel as one archive
    # (unpack it at the repository's root: `tar -xf results.tar`), beside the log.
    if [ -n "$OUT_DIR" ] && [ -d bench/results ]; then
        find bench/results -newer "$started" -type f -print0 | tar --null -cf "$OUT_DIR/results.tar" --files-from=-
    fi
    printf '%s\n' "${phase_times[@]}"
}
trap save_results EXIT

phase gpu-info 15 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
phase build 160 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
# An old setuptools installs an editable package as a path to the checkout, where the Triton
# kernels' folder (kernels/) is not importable as `echox_kernels` (seen with setuptools 65): then
# a link of that name in a folder of its own goes on PYTHONPATH, for every phase below.
if ! "$PY" -c "import echox_kernels" 2>/dev/null; then
    shim="$(mktemp -d)"
    ln -s "$PWD/kernels" "$shim/echox_kernels"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "echox_kernels imported through a link in $shim" | tee -a "$log"
fi
# torch first: echox_cuda links against libtorch and libc10, which importing torch loads.
phase import-check 20 "$PY" -c "import torch, echox_cuda; print('echox_cuda built for', torch.cuda.get_device_name())" \
    || echo "echox_cuda NOT built: CUDA kernels are not timed"
# A failed build is not tried again inside the tests' time limit (tests/test_cuda_kernels.py would
# compile csrc/ on the fly, for a minute or more): those tests skip, the others run. Four pytest
# processes where pytest-xdist is installed (the GPU image has it): each Triton specialisation
# compiles for about a second on one core, and the machine has 16; a file's tests stay in one
# process, which builds the file's fixtures once.
workers=()
"$PY" -c "import xdist" 2>/dev/null && workers=(-n 4 --dist loadfile)
ECHOX_CUDA_NO_REBUILD=1 phase gpu-tests 110 "$PY" -m pytest -q -m gpu "${workers[@]}" tests/
# 3 rounds per e2e size (the default is 5): cold Triton and torch.compile builds share these 140 s.
# The report is rewritten after each stage (8B's turns, each microbenchmark file, then 3B), so a cut
# keeps what it measured (and says, with "complete": false, that it was cut).
phase report 140 "$PY" bench/report.py --device cuda --repeats 3 "$@"
# Many conversations on one engine at EchoX-8B shapes: 1..16 at once, batched vs one, with the
# released sampling (a server's default: rows of one setting share one read of the output head).
phase batch 100 "$PY" bench/batch_engine.py --size 8b --device cuda --repeats 1 --max-new-tokens 64 --sampling released
# Where a turn's time goes with the released echo decoder and vocoder beside a tiny LLM (turn vs
# critical path, streaming vs offline vocoding: issue 11's targets), in the time the phases above
# left of the budget.
stem="bench/results/$(date +%F)-gpu-speech"
phase speech "$budget" "$PY" bench/speech_path.py --device cuda --threads 1 --repeats 3 \
    --out "$stem.jsonl" --markdown "$stem.md"
if [ ${#failed_phases[@]} -gt 0 ]; then
    echo "INCOMPLETE: failed or skipped: ${failed_phases[*]}" | tee -a "$log"
    exit 1
fi
echo "every phase ran and passed" | tee -a "$log"
