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
import subprocess
import sys

import pytest
import torch

SM90 = ("cuda", 90, 32)


DTYPES = ("fp16", "bf16")
ATTENTION_GROUPS = [(4, 128), (3, 128), (1, 64)]  # (q heads per kv head, head_dim): 8B, 3B, echo decoder
PREFILL_GROUPS = [(4, 128), (1, 64)]  # the LLM's and the echo decoder's prefill
VOCODER_DTYPES = ("fp16", "bf16", "fp32")
VOCODER_CONVS = {"resblock-k11": 11}  # name: kernel size
VOCODER_UPS = {"up-k11-s5": (11, 5), "up-k4-s2": (4, 2)}  # name: (kernel, stride): 3 and 2 taps per phase


def case_ids() -> list[str]:
    ids = []
    for dtype in DTYPES:
        ids += [f"attention-split-{dtype}-g{group}-d{dim}" for group, dim in ATTENTION_GROUPS]
        ids += [f"attention-combine-{dtype}"]
        ids += [f"prefill-attention-{dtype}-g{group}-d{dim}" for group, dim in PREFILL_GROUPS]
        ids += [f"select-{name}-{dtype}" for name in ("stats", "count-pass", "mass-pass", "greedy", "sample")]
    for dtype in VOCODER_DTYPES:
        ids += [f"vocoder-conv1d-{name}-{dtype}" for name in (*VOCODER_CONVS, "conv-post")]
        ids += [f"vocoder-{name}-{dtype}" for name in VOCODER_UPS]
    return ids + ["select-cutoff-combine-count", "select-cutoff-combine-mass", "select-argmax-combine"]


def vocoder_conv_cases() -> dict:
    """Both vocoder conv kernels at the tiles the launcher picks on a GPU, tl.dot and broadcast paths."""
    from echox_kernels import vocoder_conv as conv
    limits, cases = conv.GPU_TILES, {}
    for dtype in VOCODER_DTYPES:
        dot = {"USE_DOT": True, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "BLOCK_CO": limits.block_co,
               "BLOCK_T": limits.block_t, "BLOCK_R": limits.block_r // 2 if dtype == "fp32" else limits.block_r}
        operands = {"x_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
        for name, kernel in VOCODER_CONVS.items():
            cases[f"vocoder-conv1d-{name}-{dtype}"] = (
                conv._conv1d_valid_kernel, {**operands, "residual_ptr": f"*{dtype}"}, ("input_slope",),
                {"KERNEL": kernel, "HAS_RESIDUAL": True, **dot})
        cases[f"vocoder-conv1d-conv-post-{dtype}"] = (
            conv._conv1d_valid_kernel, {**operands, "residual_ptr": f"*{dtype}"}, ("input_slope",),
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
    head_blocks = {"BLOCK_B": 1, "BLOCK_R": select.BLOCK_R, "BLOCK_K": 128}
    cases = {}
    for dtype in DTYPES:
        for group, dim in ATTENTION_GROUPS:
            cases[f"attention-split-{dtype}-g{group}-d{dim}"] = (
                attention._split_partials_kernel,
                {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "lengths_ptr": "*i64",
                 "key_valid_ptr": "*i1", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_acc_ptr": "*fp32"},
                ("scale_log2",),
                {"GROUP": group, "HEAD_DIM": dim, "BLOCK_G": 16, "BLOCK_N": attention.BLOCK_N,
                 "DOT_PRECISION": "tf32"})
        cases[f"attention-combine-{dtype}"] = (
            attention._combine_splits_kernel,
            {"part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_acc_ptr": "*fp32", "lengths_ptr": "*i64",
             "out_ptr": f"*{dtype}"},
            (), {"HEAD_DIM": 128, "BLOCK_S": attention.MAX_SPLITS})
        for group, dim in PREFILL_GROUPS:
            plan = prefill.tile_plan(dim, {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
            cases[f"prefill-attention-{dtype}-g{group}-d{dim}"] = (
                prefill._prefill_attention_kernel,
                {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "positions_ptr": "*i64",
                 "key_valid_ptr": "*i1", "out_ptr": f"*{dtype}"},
                ("scale_log2",),
                {"GROUP": group, "HEAD_DIM": dim, "BLOCK_M": plan["BLOCK_M"], "BLOCK_N": plan["BLOCK_N"],
                 "DOT_PRECISION": "tf32"})
        head = {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}"}
        cases[f"select-stats-{dtype}"] = (
            select._stats_kernel,
            {**head, "part_max_ptr": "*fp32", "part_min_key_ptr": "*i64", "part_max_key_ptr": "*i64"},
            ("temperature",), head_blocks)
        for mass in (False, True):
            cases[f"select-{'mass' if mass else 'count'}-pass-{dtype}"] = (
                select._cutoff_pass_kernel,
                {**head, "bracket_ptr": "*i64", "done_ptr": "*i32", "floor_ptr": "*i64", "max_ptr": "*fp32",
                 "part_weight_ptr": "*fp32", "part_below_ptr": "*i64", "part_above_ptr": "*i64",
                 "part_total_ptr": "*fp32"},
                ("temperature",), {"MASS": mass, "NT": select.CANDIDATES, **head_blocks})
        for sample in (False, True):
            cases[f"select-{'sample' if sample else 'greedy'}-{dtype}"] = (
                select._argmax_kernel,
                {**head, "cutoff_ptr": "*i64", "step_ptr": "*i64", "part_value_ptr": "*fp32",
                 "part_index_ptr": "*i32", "seed_term": "i64"},
                ("temperature",), {"SAMPLE": sample, **head_blocks})
    for mass in (False, True):
        cases[f"select-cutoff-combine-{'mass' if mass else 'count'}"] = (
            select._cutoff_combine_kernel,
            {"bracket_ptr": "*i64", "done_ptr": "*i32", "part_weight_ptr": "*fp32", "part_below_ptr": "*i64",
             "part_above_ptr": "*i64", "part_total_ptr": "*fp32"},
            ("bound",), {"MASS": mass, "NT": select.CANDIDATES, "BLOCK_P": 64})
    cases["select-argmax-combine"] = (
        select._argmax_combine_kernel, {"part_value_ptr": "*fp32", "part_index_ptr": "*i32", "out_ptr": "*i64"},
        (), {"BLOCK_P": 64})
    return cases | vocoder_conv_cases()


def compile_for_sm90(kernel, pointers: dict, floats: tuple, constexprs: dict) -> str:
    """Build sm_90 cubin for `kernel`; returns "ok" or the compiler's error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "fp32" if name in floats else "i32")
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget(*SM90))
    except Exception as error:  # reported per case by the parent test
        return f"{type(error).__name__}: {error}"
    return "ok" if compiled.asm.get("cubin") else "no cubin"


@pytest.fixture(scope="module")
def compile_results() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", case_ids())
def test_compiles_for_sm90(compile_results, case):
    assert compile_results[case] == "ok", compile_results[case]


def test_every_case_is_checked(compile_results):
    assert sorted(compile_results) == sorted(case_ids())


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps({name: compile_for_sm90(*case) for name, case in compile_cases().items()}))
