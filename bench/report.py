"""Run every benchmark and write bench/results/<date>-<device>.json plus a Markdown summary.

    python bench/report.py                 microbenchmarks (pytest-benchmark) + e2e.py, then the report
    python bench/report.py --readme        print the newest report as the table the README quotes

The summary holds the device, the torch/triton/CUDA versions and the date; every microbenchmark
median with its speed-up over the torch reference (and, for Triton/CUDA kernels, over the best
baseline timed beside it); the end-to-end table; and each DESIGN.md performance target with its
measured value and met/missed. An existing results file is never replaced without --overwrite.
"""

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from echox.outputs import atomic_file

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
REFERENCE = "torch_reference"
KERNELS = ("triton", "cuda")  # implementations under test; every other one is a baseline


# ---- environment and file names --------------------------------------------------------------

def environment(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = device == "cuda"
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "device_type": device,
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def write_report(out_dir: str | Path, name: str, report: dict, markdown: str) -> Path:
    """Write <out_dir>/<report date>-<name>.json and .md; returns their common stem. A run rewrites
    its report as it goes (bench/gpu.sh cuts a phase at its time limit): a cut mid-write leaves
    the last whole one."""
    stem = report_stem(out_dir, report["environment"], name)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((stem.with_suffix(".json"), json.dumps(report, indent=1) + "\n"),
                       (stem.with_suffix(".md"), markdown)):
        with atomic_file(path) as temporary:
            temporary.write_text(text)
    return stem


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile of `values` (None for none)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def playback(arrivals: list[tuple[float, float]]) -> tuple[int, float, float]:
    """(underruns, stall ms, end s) of audio chunks (arrival s, duration s) played from the first
    one on; end: when the last one has played."""
    underruns, stall, played_until = 0, 0.0, None
    for arrival, duration in arrivals:
        if played_until is not None and arrival > played_until:
            underruns += 1
            stall += arrival - played_until
        played_until = max(played_until or arrival, arrival) + duration
    return underruns, stall * 1000, played_until or 0.0


def device_slug(env: dict) -> str:
    name = env["device"] if env["device_type"] == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def shown(path: Path) -> str:
    """`path` relative to the repository when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def report_stem(out_dir: str | Path, env: dict, name: str) -> Path:
    """<out_dir>/<the report's date>-<name>: its .json and .md."""
    return Path(out_dir) / f"{env['created'][:10]}-{name}"


def result_paths(env: dict, out_dir: Path) -> tuple[Path, Path]:
    stem = report_stem(out_dir, env, device_slug(env))
    return stem.with_suffix(".json"), stem.with_suffix(".md")


# ---- microbenchmarks ---------------------------------------------------------------------------

# One pytest run each, in this order: the vocoder convs, whose torch.compile baselines take the
# longest to build, last.
MICRO_FILES = ("bench_decode_attention.py", "bench_head_select.py", "bench_prefill_attention.py",
               "bench_vocoder_conv.py")


def run_microbenchmarks(json_path: Path, file: str) -> int:
    """pytest's exit code for one bench/ file: a failing case (a kernel off its reference) is
    reported, not fatal, so the other cases and the e2e run still make it into the results."""
    return subprocess.run([sys.executable, "-m", "pytest", f"bench/{file}", "-q", "-p", "no:cacheprovider",
                           f"--benchmark-json={json_path}"], cwd=ROOT).returncode


def micro_rows(benchmark_json: dict) -> list[dict]:
    """One row per timed case: median, speed-up over the torch reference of the same case and,
    for kernels, over the fastest baseline of that case."""
    rows = []
    for bench in benchmark_json["benchmarks"]:
        function, _, case = bench["name"].partition("[")
        rows.append({"file": Path(bench["fullname"].split("::")[0]).stem.removeprefix("bench_"),
                     "case": case.rstrip("]"), "implementation": function.removeprefix("test_"),
                     "median_ms": bench["stats"]["median"] * 1000})
    by_case: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_case.setdefault((row["file"], row["case"]), []).append(row)
    for group in by_case.values():
        reference = next((r["median_ms"] for r in group if r["implementation"] == REFERENCE), None)
        baselines = [r for r in group if r["implementation"] not in KERNELS]
        best = min(baselines, key=lambda r: r["median_ms"]) if baselines else None
        for row in group:
            row["vs_reference"] = reference / row["median_ms"] if reference else None
            is_kernel = row["implementation"] in KERNELS and best is not None
            row["best_baseline"] = best["implementation"] if is_kernel else None
            row["vs_best_baseline"] = best["median_ms"] / row["median_ms"] if is_kernel else None
    return rows


# ---- end to end --------------------------------------------------------------------------------

def run_e2e(device: str, size: str, repeats: int, jsonl_path: Path) -> list[dict]:
    """e2e.py at one size, its result appended to `jsonl_path`; every result there so far."""
    command = [sys.executable, "bench/e2e.py", "--device", device, "--repeats", str(repeats), "--out", str(jsonl_path),
               "--sizes", size]
    subprocess.run(command, cwd=ROOT, check=True)
    return [json.loads(line) for line in jsonl_path.read_text().splitlines()]


# ---- performance targets (shared/DESIGN.md) ------------------------------------------------------

@dataclass(frozen=True)
class Target:
    text: str
    size: str  # which e2e size the target speaks of
    read: Callable[[dict], float | None]
    unit: str
    limit: float
    at_most: bool  # True: measured <= limit; False: measured >= limit
    absolute: bool = True  # a time or rate, which depends on the GPU (a share of its roofline, or units, do not)


TARGETS = [
    Target("LLM decode step, EchoX-8B: <= 5.6 ms/token", "8b", lambda r: r["llm_ms_per_token"], "ms/token", 5.6, True),
    Target("LLM decode step, EchoX-3B: <= 2.4 ms/token", "3b", lambda r: r["llm_ms_per_token"], "ms/token", 2.4, True),
    Target("LLM decode step at >= 80% of HBM roofline, EchoX-8B", "8b", lambda r: r["llm_hbm_roofline_pct"], "%",
           80, False, absolute=False),
    Target("LLM decode step at >= 80% of HBM roofline, EchoX-3B", "3b", lambda r: r["llm_hbm_roofline_pct"], "%",
           80, False, absolute=False),
    Target("Echo decoder: <= 0.15 ms per unit token", "8b", lambda r: r["echo_ms_per_unit"], "ms/unit", 0.15, True),
    Target("Vocoder: >= 500x real time, streaming", "8b", lambda r: r["vocoder_x_realtime"], "x real time", 500,
           False),
    Target("Vocoder: first chunk after <= 25 units of look-ahead", "8b",
           lambda r: r["vocoder_units_before_first_chunk"], "units", 25, True, absolute=False),
    Target("Time to first audio, 5 s question, EchoX-8B, released segmentation: <= 150 ms", "8b",
           lambda r: r["ttfa"]["released"]["ms"], "ms", 150, True),
    Target("Time to first audio, 5 s question, EchoX-8B, low-latency first segment (opt-in): <= 80 ms", "8b",
           lambda r: r["ttfa"]["low_latency"]["ms"], "ms", 80, True),
]
KERNEL_TARGET = "Each kernel beats its best available baseline in bench/"
# The kernels each microbenchmark file times on a GPU (echox_cuda has no prefill attention).
EXPECTED_KERNELS = {"decode_attention": KERNELS, "head_select": KERNELS, "prefill_attention": ("triton",),
                    "vocoder_conv": KERNELS}


def is_target_device(device: str) -> bool:
    """DESIGN.md sets the targets for an H100 SXM ("NVIDIA H100 80GB HBM3"; not the PCIe or NVL cards)."""
    return "H100" in device and not any(other in device for other in ("PCIe", "NVL"))


def evaluate(target: Target, e2e: dict[str, dict], device: str) -> dict:
    row = {"target": target.text, "measured": None, "unit": target.unit, "device": device}
    if target.size not in e2e:
        return row | {"status": f"not measured (no {target.size} run on this device)"}
    value = target.read(e2e[target.size])
    if value is None:
        return row | {"status": "not measured (see the e2e details)"}
    met = value <= target.limit if target.at_most else value >= target.limit
    if target.absolute and not is_target_device(device):  # another GPU's speed says nothing of met or missed
        return row | {"measured": value, "status": f"set for an H100 SXM; measured on {device}: "
                                                  f"{'within' if met else 'outside'} the limit there"}
    return row | {"measured": value, "status": "met" if met else "missed"}


def missing_kernel_cases(micro: list[dict]) -> list[str]:
    """The kernel cases of EXPECTED_KERNELS without a timing: skipped, or failed their check."""
    missing = []
    for file, kernels in EXPECTED_KERNELS.items():
        timed = {(r["case"], r["implementation"]) for r in micro if r["file"] == file}
        cases = sorted({case for case, _ in timed})
        if not cases:
            missing.append(f"bench_{file}.py (no case)")
        missing += [f"{file}[{case}] {kernel}" for case in cases for kernel in kernels if (case, kernel) not in timed]
    return missing


def evaluate_kernels(micro: list[dict], micro_exit_code: int, env: dict) -> dict:
    """Met only if every kernel case ran and beat its best baseline: a case whose check failed is
    not timed, so a failed pytest run or a missing GPU case is a miss, whatever the others did."""
    ratios = [r["vs_best_baseline"] for r in micro if r["vs_best_baseline"] is not None]
    row = {"target": KERNEL_TARGET, "unit": "x over best baseline (slowest case)", "device": env["device"],
           "measured": min(ratios) if ratios else None}
    reasons = [f"pytest exit code {micro_exit_code}"] if micro_exit_code != 0 else []
    missing = missing_kernel_cases(micro) if env["device_type"] == "cuda" else []
    if missing:
        reasons.append(f"{len(missing)} kernel case(s) not timed: {', '.join(missing[:4])}"
                       + (", ..." if len(missing) > 4 else ""))
    if ratios:
        row["cases"] = f"{sum(r > 1 for r in ratios)} of {len(ratios)} kernel cases faster"
        if min(ratios) <= 1:
            reasons.append(row["cases"])
    elif not reasons:
        return row | {"status": "not measured (no Triton/CUDA kernel timed on this device)"}
    return row | {"status": f"missed ({'; '.join(reasons)})" if reasons else "met"}


def evaluate_targets(e2e: list[dict], micro: list[dict], micro_exit_code: int, env: dict) -> list[dict]:
    by_size = {r["size"]: r for r in e2e}
    return [evaluate(t, by_size, env["device"]) for t in TARGETS] + [evaluate_kernels(micro, micro_exit_code, env)]


# ---- Markdown ------------------------------------------------------------------------------------

def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]


def targets_table(targets: list[dict]) -> list[str]:
    return table(["target", "measured", "measured on", "status"],
                 [[t["target"], "-" if t["measured"] is None else f"{fmt(t['measured'])} {t['unit']}",
                   t.get("device", "-"), t["status"]] for t in targets])


def e2e_table(e2e: list[dict]) -> list[str]:
    rows = [[r["size"], r["encoder_ms"], r["adapter_ms"], r["prefill_ms"], r["llm_ms_per_token"],
             r["llm_hbm_roofline_pct"], r["echo_ms_per_unit"], r["vocoder_x_realtime"],
             r.get("vocoder_x_realtime_eager"), r["ttfa"]["released"]["ms"], r["ttfa"]["low_latency"]["ms"]]
            for r in e2e]
    return table(["size", "encoder ms", "adapter ms", "prefill ms", "LLM ms/token", "HBM roofline %",
                  "echo ms/unit", "vocoder x real time", "same without CUDA graphs", "TTFA released ms",
                  "TTFA low-latency ms"], rows)


def ttfa_details(e2e: list[dict]) -> list[str]:
    rows = [[r["size"], policy, t["ms"], t["cold_ms"], r["prompt_length"], t.get("audio_segment"),
             t.get("audio_segment_tokens"), t.get("tokens_before_audio_segment_cut"), t.get("audio_segment_cut_by"),
             t.get("units_before_first_chunk"), t.get("first_chunk_at_flush")]
            for r in e2e for policy, t in r["ttfa"].items()]
    return table(["size", "policy", "TTFA ms", "cold first turn ms", "prompt slots", "audio segment",
                  "its tokens", "tokens when cut", "cut by", "units before first chunk", "only at flush"], rows)


def micro_table(micro: list[dict]) -> list[str]:
    rows = [[r["file"], r["case"], r["implementation"], f"{r['median_ms']:.4f}", r["vs_reference"],
             r["best_baseline"], r["vs_best_baseline"]] for r in micro]
    return table(["benchmark", "case", "implementation", "median ms", "x vs torch reference", "best baseline",
                  "x vs best baseline"], rows)


def render_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Benchmarks: {env['device']}, {env['created'][:10]}", "",
             f"torch {env['torch']} ({env['torch_threads']} CPU threads), triton {env['triton']}, CUDA {env['cuda']}, "
             f"Python {env['python']}; "
             f"created {env['created']} by `{report['command']}`. Random weights; every number is a median.", ""]
    if not report.get("complete", True):  # reports before 2026-12 did not say
        lines += ["**Incomplete**: the run stopped (a time limit or an error) before it had measured everything "
                  f"it was asked for (e2e sizes measured: {len(report['e2e'])}; microbenchmark files: "
                  f"{len({r['file'] for r in report['micro']})} with timed cases); the tables hold what it measured.", ""]
    if env["device_type"] == "cpu":
        lines += ["CPU run: shapes are tiny and mid, not EchoX's; on a shared machine the timings are noisy.", ""]
    lines += [f"## Performance targets (DESIGN.md sets them for an H100 SXM, batch 1, bf16; measured on {env['device']})",
              "", *targets_table(report["targets"]),
              "", "## End to end", "", *e2e_table(report["e2e"]), "",
              "What each time to first audio waited for (random weights do not segment like the trained model):",
              "", *ttfa_details(report["e2e"]), "",
              "## Microbenchmarks", "", f"pytest exit code {report['micro_exit_code']} (0: every case passed).", "",
              *micro_table(report["micro"]), ""]
    return "\n".join(lines)


def readme_table(results_dir: Path = RESULTS) -> str:
    """The newest report as the lines the README quotes: where and when, e2e, targets."""
    reports = [json.loads(p.read_text()) | {"path": p} for p in results_dir.glob("*.json")]
    reports = [report for report in reports if "e2e" in report]  # not the other benches' results beside them
    if not reports:
        raise SystemExit(f"no reports of bench/report.py in {results_dir}")
    newest = max(reports, key=lambda r: r["environment"]["created"])
    env = newest["environment"]
    lines = [f"Measured on {env['device']}, {env['created'][:10]} (torch {env['torch']}, random weights; "
             f"{shown(newest['path'])}):", "", *e2e_table(newest["e2e"]), "",
             *targets_table(newest["targets"])]
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------------

def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", help="e2e sizes (default: 8b 3b on CUDA, tiny mid on CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--overwrite", action="store_true", help="replace today's results for this device")
    parser.add_argument("--readme", action="store_true", help="print the newest report as a README table")
    args = parser.parse_args(argv)
    if args.readme:
        print(readme_table(args.out_dir))
        return
    from e2e import default_sizes  # a sibling script (bench/ is on the path), importing the engine
    env = environment(args.device)
    json_path, md_path = result_paths(env, args.out_dir)
    existing = [p for p in (json_path, md_path) if p.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"{existing[0]} already exists; pass --overwrite to replace it")
    command = " ".join(["python", "bench/report.py", *(argv or sys.argv[1:])])
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def write(micro_exit_code: int, micro: list[dict], e2e: list[dict], complete: bool) -> str:
        """The report of what is measured so far: rewritten after each stage, so that a run cut
        short (bench/gpu.sh gives each phase a time limit) keeps what it measured, and says it
        was cut: only the last stage's report is complete."""
        report = {"environment": env, "command": command, "complete": complete, "micro_exit_code": micro_exit_code,
                  "micro": micro, "e2e": e2e, "targets": evaluate_targets(e2e, micro, micro_exit_code, env)}
        write_report(args.out_dir, device_slug(env), report, render_markdown(report))
        return render_markdown(report)

    sizes = args.sizes or default_sizes(torch.device(args.device))
    # The most telling first, so that a run cut at its time limit (bench/gpu.sh) keeps it: the first
    # size's turns, then the kernels file by file, then the other sizes.
    stages = [("e2e", size) for size in sizes[:1]] + [("micro", file) for file in MICRO_FILES] + \
        [("e2e", size) for size in sizes[1:]]
    micro_exit_code, micro, e2e = 0, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for done, (kind, what) in enumerate(stages, 1):
            if kind == "e2e":
                e2e = run_e2e(args.device, what, args.repeats, Path(tmp) / "e2e.jsonl")
            else:
                timed = Path(tmp) / f"{what}.json"
                micro_exit_code = run_microbenchmarks(timed, what) or micro_exit_code
                if timed.exists():  # pytest writes none when it fails before timing
                    micro += micro_rows(json.loads(timed.read_text()))
            markdown = write(micro_exit_code, micro, e2e, complete=done == len(stages))
    print(markdown)
    print(f"wrote {shown(json_path)} and {shown(md_path)}")


if __name__ == "__main__":
    main()
