"""Built-in profiles, for a fresh install: `h200` (measured) and `h100` (estimated).

h200  the H200 machine of afkv's stored runs (afkv/bench/results/2026-11-30, RESULTS.md): the
      final runs' records below (the fields profiles read, copied from the JSON; a test checks
      them against the files) through afkv.plan.runs, as `afkv plan --check-runs` does:
      Qwen3-30B-A3B and Mixtral-8x7B attention steps of gpu-final.json, expert FFN of
      af-qwen3-fixed-plane.json / af-mixtral-final.json, bare NCCL round trips, the runtime's
      round trip, step overhead and overlap; device KV formats from kv-quant-long-context.json.
h100  the same software on H100 SXM (80 GB): the H200's kernel floors and efficiencies with
      bytes timed at 3.35 / 4.8 of the H200's measured copy ceiling (the HBM bandwidth ratio of
      the two specs). Not measured: calibrate an H100 (afkv bench calibrate) to replace it.

Not measured on either: the dense-GEMM peak (0.7 x the 989 TFLOP/s bf16 spec; it bounds the
MoE compute rate and times the small attention-side GEMMs).
"""

from __future__ import annotations

import dataclasses
import functools

from afkv.errors import ConfigError
from afkv.plan.profile import Profile
from afkv.plan.runs import RUN_SETS, kv_format_costs, machine_profile, shapes_of

NAMES = ("h200", "h100")
H100_HBM_BYTES = 81559 * 2**20  # what the device reports
H100_COPY_SHARE = 3.35 / 4.8  # H100 SXM / H200 HBM bandwidth (specs)
FINAL_SETS = tuple(s for s in RUN_SETS if s.gpu_file == "gpu-final.json")

SOURCES = {
    "copy_bytes_per_s": "gpu-final.json (measured in the run)",
    "calibrations": "attention: gpu-final.json; FFN: af-qwen3-fixed-plane.json, af-mixtral-final.json (m = 1) and "
                    "gpu-final.json batch 1",
    "link": "bare NCCL round trips of the two 1A1F runs",
    "af": "round trip: the 1A1F runs' eager round trips; step overhead and overlap fitted on af-mixtral-final.json",
    "kv_formats": "kv-quant-long-context.json (eager steps, Qwen3 shapes, 16k context)",
    "gemm_flops_per_s": "0.7 x 989 TFLOP/s bf16 (spec): not measured",
    "pcie, disk": "afkv bench kv on the same machine, 2026-11-29 (RESULTS.md)",
}


STORED_RUNS = {
    "gpu-final.json": {
        "bench": "gpu",
        "context": 2048,
        "copy_bytes_per_s": 4277174052720.8057,
        "models": {
            "qwen3-30b-a3b": {
                "afkv": {
                    "1": {"tpot_s": 0.006580512046813965, "t_attn_s": 0.002446975946426392},
                    "16": {"tpot_s": 0.01583679962158203, "t_attn_s": 0.003456415891647339},
                    "64": {"tpot_s": 0.026195968627929687, "t_attn_s": 0.007690271854400635},
                    "128": {"tpot_s": 0.029826976776123046, "t_attn_s": 0.010740096092224122},
                    "256": {"tpot_s": 0.04359968185424805, "t_attn_s": 0.019611360549926758},
                },
            },
            "mixtral-8x7b": {
                "afkv": {
                    "1": {"tpot_s": 0.009986495971679688, "t_attn_s": 0.0020332159996032714},
                    "16": {"tpot_s": 0.02723619270324707, "t_attn_s": 0.0032219839096069335},
                    "64": {"tpot_s": 0.03232662582397461, "t_attn_s": 0.007133920192718506},
                    "128": {"tpot_s": 0.04125680160522461, "t_attn_s": 0.011896800041198731},
                },
            },
        },
    },
    "af-mixtral-final.json": {
        "bench": "af",
        "context": 2048,
        "copy_bytes_per_s": 4221479720691.573,
        "model": "random:mixtral-8x7b",
        "colocated": {
            "64": {"tpot_s": 0.0322053108215332, "t_attn_s": 0.007464320182800293},
            "128": {"tpot_s": 0.04139593505859375, "t_attn_s": 0.012383359909057617},
        },
        "af": {
            "64": {
                "1": {
                    "tpot_s": 0.04012550354003906, "t_attn_s": 0.007464320182800293,
                    "t_ffn_s": 0.025585920333862304, "caps": [64], "transfer_bare_s": 0.0017694720029830932,
                },
                "2": {
                    "tpot_s": 0.05744508743286133, "t_attn_s": 0.007464320182800293,
                    "t_ffn_s": 0.04763289642333984, "caps": [32, 32], "transfer_bare_s": 0.00359935998916626,
                },
            },
            "128": {
                "1": {
                    "tpot_s": 0.04698495864868164, "t_attn_s": 0.012383359909057617,
                    "t_ffn_s": 0.029835359573364258, "caps": [128], "transfer_bare_s": 0.001819648027420044,
                },
                "2": {
                    "tpot_s": 0.0611640625, "t_attn_s": 0.012383359909057617, "t_ffn_s": 0.051272640228271486,
                    "caps": [64, 64], "transfer_bare_s": 0.0030341120958328246,
                },
            },
            "256": {
                "1": {
                    "tpot_s": 0.07089014434814453, "t_attn_s": None, "t_ffn_s": 0.036182720184326174,
                    "caps": [256], "transfer_bare_s": 0.0017530879974365235,
                },
                "2": {
                    "tpot_s": 0.08664332580566406, "t_attn_s": None, "t_ffn_s": 0.05913888168334961,
                    "caps": [128, 128], "transfer_bare_s": 0.003015679955482483,
                },
            },
            "384": {
                "1": {
                    "tpot_s": 0.08566451263427734, "t_attn_s": None, "t_ffn_s": 0.04727257537841797,
                    "caps": [512], "transfer_bare_s": 0.00250982403755188,
                },
                "2": {
                    "tpot_s": 0.10090630340576172, "t_attn_s": None, "t_ffn_s": 0.07264825439453125,
                    "caps": [256, 256], "transfer_bare_s": 0.0038103040456771856,
                },
            },
        },
        "round_trip": [
            {
                "runtime_rtt_s": 0.0009125440120697022, "expert_compute_s": 0.000799560010433197,
                "bare_nccl_rtt_s": 4.713600128889084e-05, "dispatch_bytes": 525312, "combine_bytes": 524288,
            },
            {
                "runtime_rtt_s": 0.00091948801279068, "expert_compute_s": 0.000799560010433197,
                "bare_nccl_rtt_s": 4.083200171589851e-05, "dispatch_bytes": 525312, "combine_bytes": 524288,
            },
        ],
    },
    "af-qwen3-fixed-plane.json": {
        "bench": "af",
        "context": 2048,
        "copy_bytes_per_s": 4279151701879.3706,
        "model": "random:qwen3-30b-a3b",
        "colocated": {
            "64": {"tpot_s": 0.02579974365234375, "t_attn_s": 0.007258463859558106},
            "256": {"tpot_s": 0.045768287658691405, "t_attn_s": 0.020035455703735352},
        },
        "af": {
            "64": {
                "1": {
                    "tpot_s": 0.04401596832275391, "t_attn_s": 0.007258463859558106,
                    "t_ffn_s": 0.01842838478088379, "caps": [64], "transfer_bare_s": 0.0027095040678977965,
                },
            },
            "256": {
                "1": {
                    "tpot_s": 0.05424028778076172, "t_attn_s": 0.020035455703735352,
                    "t_ffn_s": 0.020762496948242188, "caps": [256], "transfer_bare_s": 0.0030382078886032103,
                },
            },
        },
        "round_trip": [
            {
                "runtime_rtt_s": 0.000633247971534729, "expert_compute_s": 0.000383924682935079,
                "bare_nccl_rtt_s": 7.82719999551773e-05, "dispatch_bytes": 266240, "combine_bytes": 262144,
            },
            {
                "runtime_rtt_s": 0.0006354879736900329, "expert_compute_s": 0.000383924682935079,
                "bare_nccl_rtt_s": 6.233600154519081e-05, "dispatch_bytes": 266240, "combine_bytes": 262144,
            },
        ],
    },
}

KV_QUANT_RUN = {
    "workload": {"context_len": 16384, "num_seqs": 4},
    "rows": [
        {"format": "auto", "step_ms": 47.43380916666714, "kv_bytes_per_token": 98304.0},
        {"format": "int8", "step_ms": 87.42251949999986, "kv_bytes_per_token": 73728.0},
        {"format": "int4", "step_ms": 124.29005050000323, "kv_bytes_per_token": 49152.0},
    ],
}


@functools.cache
def builtin_profile(name: str) -> Profile:
    if name not in NAMES:
        raise ConfigError(f"no built-in profile {name!r}; built in: {', '.join(NAMES)} (or pass --profile a JSON "
                          "written by afkv bench calibrate)", key="gpu")
    h200 = machine_profile("h200", STORED_RUNS, FINAL_SETS, machine={"gpu": "NVIDIA H200", "gpus": 2},
                           software={"torch": "2.11.0+cu130", "triton": "3.6.0", "source": "afkv/bench/results/2026-11-30"},
                           sources=SOURCES)
    kernels, _ = h200.kernels(shapes_of("qwen3-30b-a3b"))
    h200 = dataclasses.replace(h200, kv_formats=kv_format_costs(KV_QUANT_RUN, kernels))
    if name == "h200":
        return h200
    return h200.scaled("h100", H100_HBM_BYTES, h200.copy_bytes_per_s * H100_COPY_SHARE,
                       {"copy_bytes_per_s": "H200 measured x 3.35 / 4.8 (HBM specs): estimated",
                        "hbm_bytes": "H100 SXM 80 GB as the device reports it"})

