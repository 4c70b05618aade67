"""Compile every Triton kernel for a real sm_90 target, without a GPU.

The interpreter runs the kernels' logic on CPU but not the compiler; this catches what only the
compiler sees (layouts, tl.dot shapes, bf16 paths) for the signatures the engine launches:
fp16 and bf16 activations, int64 lengths/steps, bool masks.

The compiles run in one child process without TRITON_INTERPRET: once triton.language is imported
in interpreter mode its @jit library functions (tl.max, tl.sum, ...) are interpreter objects, and
calling them from the code generator patches triton.language for good, so real compilation
cannot share a process with interpreted kernels.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

SM90 = ("cuda", 90, 32)


DTYPES = ("fp16", "bf16")
ATTENTION_GROUPS = [(4, 128), (3, 128), (1, 64)]  # (q heads per kv head, head_dim): 8B, 3B, echo decoder
PREFILL_GROUPS = [(4, 128), (1, 64)]  # the LLM's and the echo decoder's prefill
SHORT_PREFILL = (256, 32)  # (queries, B * Hq): a 256-token EchoX-8B prompt, tiles shrunk to fill 132 SMs
VOCODER_DTYPES = ("fp16", "bf16", "fp32", "fp32-tf32")  # fp32 exact, or as TF32 (torch's default for convs)
VOCODER_CONVS = {"resblock-k11": 11}  # name: kernel size
VOCODER_UPS = {"up-k11-s5": (11, 5), "up-k4-s2": (4, 2)}  # name: (kernel, stride): 3 and 2 taps per phase


def case_ids() -> list[str]:
    ids = []
    for dtype in DTYPES:
        ids += [f"attention-split-{dtype}-g{group}-d{dim}" for group, dim in ATTENTION_GROUPS]
        ids += [f"attention-combine-{dtype}"]
        ids += [f"prefill-attention-{dtype}-g{group}-d{dim}" for group, dim in PREFILL_GROUPS]
        ids += [f"prefill-attention-short-{dtype}-g4-d128"]
        ids += [f"select-gemv-{name}-{dtype}" for name in ("greedy", "sample", "store", "sample-per-row")]
    for dtype in VOCODER_DTYPES:
        ids += [f"vocoder-conv1d-{name}-{dtype}" for name in (*VOCODER_CONVS, "conv-post")]
        ids += [f"vocoder-{name}-{dtype}" for name in VOCODER_UPS]
    ids += [f"select-gemv-sample-{dtype}-seed-term-1" for dtype in DTYPES]
    return ids + ["select-count-pass", "select-mass-pass", "select-filtered-argmax", "select-filtered-argmax-per-row",
                  "select-filtered-argmax-seed-term-1",
                  "select-cutoff-combine-count", "select-cutoff-combine-mass", "select-argmax-combine"]


def vocoder_conv_cases() -> dict:
    """Both vocoder conv kernels at the tiles the launcher picks on a GPU, tl.dot and broadcast paths."""
    from echox_kernels import vocoder_conv as conv
    limits, cases = conv.GPU_TILES, {}
    for dtype in VOCODER_DTYPES:
        element = dtype.removesuffix("-tf32")
        dot = {"USE_DOT": True, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "BLOCK_CO": limits.block_co,
               "BLOCK_T": limits.block_t, "BLOCK_R": limits.block_r // 2 if element == "fp32" else limits.block_r}
        operands = {"x_ptr": f"*{element}", "weight_ptr": f"*{element}", "bias_ptr": f"*{element}",
                    "out_ptr": f"*{element}"}
        for name, kernel in VOCODER_CONVS.items():
            cases[f"vocoder-conv1d-{name}-{dtype}"] = (
                conv._conv1d_valid_kernel, {**operands, "residual_ptr": f"*{element}"}, ("input_slope",),
                {"KERNEL": kernel, "HAS_RESIDUAL": True, **dot})
        cases[f"vocoder-conv1d-conv-post-{dtype}"] = (
            conv._conv1d_valid_kernel, {**operands, "residual_ptr": f"*{element}"}, ("input_slope",),
            {"KERNEL": 7, "HAS_RESIDUAL": False, "USE_DOT": False, "DOT_PRECISION": "ieee", "BLOCK_CO": 1,
             "BLOCK_T": limits.block_t, "BLOCK_R": limits.broadcast // limits.block_t})
        for name, (kernel, stride) in VOCODER_UPS.items():
            cases[f"vocoder-{name}-{dtype}"] = (
                conv._conv_transpose1d_window_kernel, operands, ("input_slope",),
                {"KERNEL": kernel, "STRIDE": stride, "TAPS": -(-kernel // stride), **dot})
    return cases


def compile_cases() -> dict:
    """case id -> (kernel, pointer types, fp32 scalar names, constexprs); other scalars are int32."""
    from echox_kernels import decode_attention as attention
    from echox_kernels import head_select as select
    from echox_kernels import prefill_attention as prefill
    head_blocks = {"BLOCK_B": 1, "BLOCK_R": select.MAX_BLOCK_R, "BLOCK_K": 128}  # the LLM head at batch 1
    cases = {}
    for dtype in DTYPES:
        for group, dim in ATTENTION_GROUPS:
            cases[f"attention-split-{dtype}-g{group}-d{dim}"] = (
                attention._split_partials_kernel,
                {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "lengths_ptr": "*i64",
                 "key_valid_ptr": "*i1", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_acc_ptr": "*fp32",
                 "out_ptr": f"*{dtype}"},
                ("scale_log2",),
                {"GROUP": group, "HEAD_DIM": dim, "BLOCK_G": 16, "BLOCK_N": attention.BLOCK_N,
                 "DOT_PRECISION": "tf32", "SINGLE_SPLIT": False, "num_warps": 4, "num_stages": 2})
        cases[f"attention-combine-{dtype}"] = (
            attention._combine_splits_kernel,
            {"part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_acc_ptr": "*fp32", "lengths_ptr": "*i64",
             "out_ptr": f"*{dtype}"},
            (), {"HEAD_DIM": 128, "BLOCK_S": attention.MAX_SPLITS})
        torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        plans = {f"prefill-attention-{dtype}-g{group}-d{dim}": (group, dim, prefill.tile_plan(dim, torch_dtype))
                 for group, dim in PREFILL_GROUPS}
        plans[f"prefill-attention-short-{dtype}-g4-d128"] = (4, 128, prefill.tile_plan(128, torch_dtype, *SHORT_PREFILL,
                                                                                        sms=132))
        for case, (group, dim, plan) in plans.items():
            cases[case] = (
                prefill._prefill_attention_kernel,
                {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "positions_ptr": "*i64",
                 "key_valid_ptr": "*i1", "out_ptr": f"*{dtype}"},
                ("scale_log2",),
                {"GROUP": group, "HEAD_DIM": dim, "BLOCK_M": plan["BLOCK_M"], "BLOCK_N": plan["BLOCK_N"],
                 "DOT_PRECISION": "tf32", "num_warps": plan["num_warps"], "num_stages": plan["num_stages"]})
        for name, store, sample in (("greedy", False, False), ("sample", False, True), ("store", True, False)):
            cases[f"select-gemv-{name}-{dtype}"] = (
                select._gemv_kernel,
                {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "step_ptr": "*i64", "scaled_ptr": "*fp32",
                 "part_a_ptr": "*fp32", "part_b_ptr": "*i64" if store else "*i32",
                 "part_c_ptr": "*i64" if store else "*i32", "seed_term": "i64"},
                ("temperature_term",), {"RECIPROCAL": True, "STORE": store, "SAMPLE": sample,
                                        "PER_ROW_STEP": False, **head_blocks})
        # Sampled rows of 4 conversations in one call: a counter per row, a batch tile of 4.
        cases[f"select-gemv-sample-per-row-{dtype}"] = (
            cases[f"select-gemv-sample-{dtype}"][:3]
            + ({"RECIPROCAL": True, "STORE": False, "SAMPLE": True, "PER_ROW_STEP": True,
                **head_blocks, "BLOCK_B": 4, "BLOCK_K": 32},))
    logits_blocks = {"BLOCK_B": 1, "BLOCK_R": select.MAX_BLOCK_R}
    for mass in (False, True):
        cases[f"select-{'mass' if mass else 'count'}-pass"] = (
            select._cutoff_pass_kernel,
            {"scaled_ptr": "*fp32", "bracket_ptr": "*i64", "done_ptr": "*i32", "floor_ptr": "*i64", "max_ptr": "*fp32",
             "part_weight_ptr": "*fp32", "part_below_ptr": "*i64", "part_above_ptr": "*i64", "part_total_ptr": "*fp32"},
            (), {"MASS": mass, "NT": select.CANDIDATES, **logits_blocks})
    for per_row in (False, True):
        cases[f"select-filtered-argmax{'-per-row' if per_row else ''}"] = (
            select._argmax_kernel,
            {"scaled_ptr": "*fp32", "cutoff_ptr": "*i64", "step_ptr": "*i64", "part_value_ptr": "*fp32",
             "part_index_ptr": "*i32", "seed_term": "i64"}, (), {**logits_blocks, "PER_ROW_STEP": per_row})
    for mass in (False, True):
        cases[f"select-cutoff-combine-{'mass' if mass else 'count'}"] = (
            select._cutoff_combine_kernel,
            {"bracket_ptr": "*i64", "done_ptr": "*i32", "part_weight_ptr": "*fp32", "part_below_ptr": "*i64",
             "part_above_ptr": "*i64", "part_total_ptr": "*fp32"},
            ("bound",), {"MASS": mass, "NT": select.CANDIDATES, "BLOCK_P": 64})
    # A seed whose hash term is 1: a launch specialises an int argument equal to 1 into a constant.
    for name in [f"select-gemv-sample-{dtype}" for dtype in DTYPES] + ["select-filtered-argmax"]:
        kernel, pointers, floats, constexprs = cases[name]
        cases[f"{name}-seed-term-1"] = (kernel, {k: v for k, v in pointers.items() if k != "seed_term"}, floats,
                                        {**constexprs, "seed_term": 1})
    cases["select-argmax-combine"] = (
        select._argmax_combine_kernel, {"part_value_ptr": "*fp32", "part_index_ptr": "*i32", "out_ptr": "*i64"},
        (), {"BLOCK_P": 64})
    return cases | vocoder_conv_cases()


# Integers the real launch passes as multiples of 16 (Triton specialises those), so the compiled
# loads are the 16-byte vectors the GPU will run; every pointer from torch is 16-byte aligned.
ALIGNED_INTS = ("hidden_size", "stride_hb", "stride_wr", "rows_per_program")


def weight_loop(ptx: str) -> list[str]:
    """The PTX lines of the innermost loop that reads global memory (a GEMV's weight loop)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, m in enumerate(re.match(r"\s*(\$L\w+):", line) for line in lines) if m}
    loops = []
    for i, line in enumerate(lines):
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$L\w+);", line)
        if branch and labels.get(branch.group(1), i) < i:  # a backward branch closes a loop
            loops.append(lines[labels[branch.group(1)]:i + 1])
    reading = [body for body in loops if any("ld.global" in line for line in body)]
    return min(reading, key=len) if reading else []


def ptxas_report(ptx: str) -> str:
    """Registers, spills and stack of the kernel, from `ptxas -v` (the one Triton ships) for sm_90a."""
    import triton.backends.nvidia
    ptxas = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "-arch=sm_90a", "-v", source, "-o", os.path.join(folder, "kernel.cubin")],
                              capture_output=True, text=True)
    return " ".join(line.split("info    : ")[-1].strip() for line in done.stderr.splitlines()
                    if "Used" in line or "spill" in line)


def compile_for_sm90(kernel, pointers: dict, floats: tuple, constexprs: dict) -> dict:
    """Build sm_90 cubin for `kernel`: {"status": "ok" or the compiler's error, and for the ok ones
    the weight loop's instruction mix per iteration and the ptxas resource report}. num_warps and
    num_stages among `constexprs` are the launch options the launcher passes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    options = {name: constexprs[name] for name in ("num_warps", "num_stages") if name in constexprs}
    constexprs = {name: value for name, value in constexprs.items() if name not in options}
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "fp32" if name in floats else "i32")
        if name in ALIGNED_INTS or signature[name].startswith("*"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget(*SM90), options=options)
    except Exception as error:  # reported per case by the parent test
        return {"status": f"{type(error).__name__}: {error}"}
    if not compiled.asm.get("cubin"):
        return {"status": "no cubin"}
    ptx = compiled.asm["ptx"]
    loop = weight_loop(ptx)
    return {"status": "ok", "loop_lines": len(loop), "loop_shuffles": sum("shfl.sync" in line for line in loop),
            "loop_barriers": sum("bar.sync" in line for line in loop),
            "loop_vector_loads": sum("ld.global.v4" in line for line in loop),
            "approximate_divisions": ptx.count("div.full") + ptx.count("div.approx"),
            "rounded_multiplies": len(re.findall(r"fma\.rn\.f32[^;]*, 0f00000000;", ptx)),
            "shared_bytes": compiled.metadata.shared, "ptxas": ptxas_report(ptx)}


@pytest.fixture(scope="module")
def compile_results() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", case_ids())
def test_compiles_for_sm90(compile_results, case):
    assert compile_results[case]["status"] == "ok", compile_results[case]["status"]


@pytest.mark.parametrize("case", [f"select-gemv-{mode}-{dtype}" for mode in ("sample", "store", "sample-per-row")
                                  for dtype in DTYPES])
def test_head_gemv_tempers_with_one_rounding(compile_results, case):
    """logits * fp32(1 / T) as torch's CUDA division by a scalar: fmas with a zero addend, one per
    logit a thread holds (a plain multiply would be fused with the noise addition into one fma),
    and no approximate division anywhere (Triton's `/` on fp32 is div.full)."""
    result = compile_results[case]
    assert result["approximate_divisions"] == 0 and result["rounded_multiplies"] >= 1, result


@pytest.mark.parametrize("case", [f"select-gemv-{mode}-{dtype}" for mode in ("greedy", "sample", "store")
                                  for dtype in DTYPES])
def test_head_gemv_loop_has_no_cross_thread_reduction(compile_results, case):
    """Per 16 KB of weight (a [64, 128] 16-bit tile): eight 16-byte loads per thread and no warp
    shuffle; the 448 shuffles and 26 barriers of a per-iteration tl.sum capped it near 2.2 TB/s.
    The two barriers left stage the hidden vector through shared memory; no registers spill."""
    result = compile_results[case]
    assert result["loop_shuffles"] == 0 and result["loop_barriers"] <= 2, result
    assert result["loop_vector_loads"] >= 8, result
    assert "0 bytes spill stores" in result["ptxas"], result


def test_every_case_is_checked(compile_results):
    assert sorted(compile_results) == sorted(case_ids())


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps({name: compile_for_sm90(*case) for name, case in compile_cases().items()}))
