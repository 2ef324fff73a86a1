"""The `afkv` command.

    afkv run [PROMPT ...]        generate with the default model (or --model/--config), streaming text
    afkv serve                   OpenAI-compatible HTTP server (colocated, or --attach HOST:PORT to a deployment)
    afkv bench decode            afkv vs transformers' generate: decode tokens/s and TTFT
    afkv bench serve             HTTP (afkv serve) vs the in-process Engine: tok/s and TTFT, 64 streams
    afkv bench kv                KV tiers: transfer GB/s against the copy limit; decode with tiers on/off
    afkv bench eplb              expert load balancing under Zipf skew: max/mean node load, tok/s (CPU or GPUs)
    afkv bench kv-quant          long-context decode: fp8/int8/int4 device KV blocks against the model dtype
    afkv bench long-context      contexts larger than the GPU: KV streamed from host memory vs the PCIe bound
    afkv bench pd                prefill/decode disaggregation vs colocated: decode ITL p50/p99 under long prompts
    afkv bench pd-handoff        the KV hand-off: GB/s vs the path's copy limit, last block -> first token
    afkv bench pd-rows           the hand-off's indexed row copies (each kernel) vs one copy of the same bytes
    afkv bench af                1A1F over NCCL vs colocated data parallel (two GPUs, real shapes)
    afkv bench experts-merged    2A1F: the expert node per attention node vs merged (FFN s/step, tok/s)
    afkv bench gpu               GPU suite: afkv (CUDA graphs) vs HF generate vs the HBM roofline (real shapes)
    afkv bench plot JSON         PNG plot of a `bench gpu` result
    afkv bench calibrate         measure this machine for `afkv plan` (one GPU, or the CPU): a profile JSON
    afkv bench kernels WHAT      Triton kernels vs roofline and torch: moe (sweep, bf16/fp8), fused, decode (batch 1)
    afkv plan --model M          predict every deployment of a model on a cluster; write the chosen config
    afkv launch CONFIG           start a deployment (attention + expert + prefill nodes) as local processes
    afkv make-tiny OUT           write tiny random HF checkpoints of each family (tests)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from afkv.model.tiny import FAMILIES as TINY_FAMILIES
from afkv.serve import run_async

DEFAULT_PROMPT = "What is the capital of France?"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-MoE"  # the name `afkv serve` gives the embedded default model


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _cmd_run(args) -> int:
    from afkv import Engine, SamplingParams
    from afkv.errors import EmptyPromptError

    texts = args.prompts or [DEFAULT_PROMPT]
    for text in texts:  # before loading anything
        if not text.strip():
            raise EmptyPromptError(f"prompt {text!r} is empty or whitespace only: nothing to answer")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                            top_p=args.top_p, top_k=args.top_k, stop=tuple(args.stop), logprobs=args.logprobs,
                            ignore_eos=args.ignore_eos)
    _err(f"afkv: loading {args.model or 'the default model (SmolLM2-135M-Instruct, upcycled to MoE)'} ...")
    t0 = time.monotonic()
    async with Engine(args.model, args.config) as engine:
        _err(f"afkv: loaded in {time.monotonic() - t0:.1f} s ({engine.spec.family.value}, "
             f"{engine.spec.num_layers} layers, {engine.stats().num_blocks} KV blocks)")
        chat = engine.tokenizer is not None and engine.tokenizer.chat_template and not args.raw
        for text in texts:
            prompt = [{"role": "user", "content": text}] if chat else text
            if len(texts) > 1:
                print(f"\n>>> {text}")
            last, chunks = None, []
            async for chunk in engine.generate(prompt, params):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
                chunks.append(chunk)
            print()
            if args.logprobs is not None:
                _err(_format_logprobs(engine.tokenizer, chunks))
            m = last.metrics
            n = len(m.token_times_s)
            decode = (n - 1) / (m.token_times_s[-1] - m.token_times_s[0]) if n > 1 else float("nan")
            _err(f"[{m.num_prompt_tokens} prompt tokens, {n} new tokens, TTFT {m.ttft_s * 1e3:.0f} ms, "
                 f"{decode:.1f} tok/s decode, finish: {last.finish_reason}]")
        if args.stats:
            from afkv.serve.metrics import engine_samples, format_samples

            _err("afkv: engine metrics (the same as afkv serve's /metrics):\n"
                 + format_samples(await engine_samples(engine)))
    return 0


def _format_logprobs(tokenizer, chunks) -> str:
    def text(token_id: int) -> str:
        return repr(tokenizer.token_text(token_id)) if tokenizer is not None else str(token_id)

    lines = ["logprobs (token, logprob, most likely tokens):"]
    for c in chunks:
        tops = c.top_logprobs or [{}] * len(c.token_ids)
        for token_id, lp, top in zip(c.token_ids, c.logprobs, tops):
            alts = ", ".join(f"{text(t)} {v:.3f}" for t, v in top.items())
            lines.append(f"  {text(token_id):<20} {lp:8.3f}" + (f"   [{alts}]" if alts else ""))
    return "\n".join(lines)


async def _cmd_serve(args) -> int:
    import asyncio
    import os
    import signal

    from afkv import Engine, attach
    from afkv.serve.http import OpenAIServer, ServedModel, check_bind

    api_key = args.api_key or os.environ.get("AFKV_API_KEY") or None
    check_bind(args.host, api_key, args.allow_unauthenticated)
    name = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    if args.attach:
        _err(f"afkv: attaching to the deployment at {args.attach} ...")
        engine = await attach(args.attach, token=args.token or os.environ.get("AFKV_TOKEN") or None)
        tokenizer = await asyncio.to_thread(_tokenizer_of, args.model)
    else:
        _err(f"afkv: loading {args.model or 'the default model (SmolLM2-135M-Instruct, upcycled to MoE)'} ...")
        engine = Engine(args.model, args.config)
        await engine.start()
        tokenizer = engine.tokenizer
    try:
        server = OpenAIServer(engine, ServedModel(name, tokenizer), api_key)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        ready = asyncio.Event()
        serving = asyncio.ensure_future(server.serve(args.host, args.port, ready))
        started = asyncio.ensure_future(ready.wait())
        await asyncio.wait([serving, started], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if ready.is_set():
            host = f"[{args.host}]" if ":" in args.host else args.host
            _err(f"afkv: serving {name!r} at http://{host}:{server.port}/v1 (OpenAI API; /metrics, /health)"
                 f"{'' if api_key else ', no API key'} -- Ctrl-C stops it")
        await serving
    finally:
        await engine.aclose()
    return 0


def _tokenizer_of(model: str | None):
    """The tokenizer of the model a deployment serves (for the token texts of logprobs)."""
    from afkv.config import EngineConfig
    from afkv.engine.engine import resolve_model
    from afkv.model.tokenizer import Tokenizer

    model_dir, _ = resolve_model(model, EngineConfig(), progress=False)
    return Tokenizer.from_dir(model_dir)


async def _cmd_bench_decode(args) -> int:
    from afkv.bench import write_json
    from afkv.bench.decode import format_table, run_decode_bench
    from afkv.config import EngineConfig

    cfg = EngineConfig.from_toml(args.config) if args.config else None
    result = await run_decode_bench(
        args.model, cfg, [int(b) for b in args.batch_sizes.split(",")], args.prompt_len, args.gen_len,
        with_hf=not args.no_hf, progress=_err, threads=args.threads, busy_processes=args.busy_processes,
        repeats=args.repeats,
    )
    print(format_table(result))
    out = write_json(result, args.json or f"bench-results/decode-{time.strftime('%Y%m%d-%H%M%S')}.json")
    _err(f"afkv: wrote {out}")
    return 0


async def _cmd_bench_serve(args) -> int:
    from afkv.bench import write_json
    from afkv.bench.serve import format_table, run_serve_bench
    from afkv.config import EngineConfig

    cfg = EngineConfig.from_toml(args.config) if args.config else None
    result = await run_serve_bench(args.model, cfg, args.concurrency, args.prompt_len, args.gen_len, args.repeats,
                                   progress=_err)
    print(format_table(result))
    out = write_json(result, args.json or f"bench-results/serve-{time.strftime('%Y%m%d-%H%M%S')}.json")
    _err(f"afkv: wrote {out}")
    return 0


async def _cmd_bench_pd(args) -> int:
    from afkv.bench import write_json
    from afkv.bench.pd import format_table, run_pd_bench

    result = await run_pd_bench(args.model, args.streams, args.prompt_len, args.interval_s, args.duration_s,
                                args.gen_len, args.long_tokens, device_memory_mib=args.device_memory_mib,
                                max_num_batched_tokens=args.max_num_batched_tokens, progress=_err)
    print(format_table(result))
    out = write_json(result, args.json or f"bench-results/pd-{time.strftime('%Y%m%d-%H%M%S')}.json")
    _err(f"afkv: wrote {out}")
    return 0


def _cmd_bench_pd_rows(args) -> int:
    from afkv.bench import write_json
    from afkv.bench.pd import format_rows_table, run_rows_bench

    result = run_rows_bench(tuple(int(n) for n in args.counts.split(",")), args.row_kib * 2**10, args.reps,
                            progress=_err)
    print(format_rows_table(result))
    out = write_json(result, args.json or f"bench-results/pd-rows-{time.strftime('%Y%m%d-%H%M%S')}.json")
    _err(f"afkv: wrote {out}")
    return 0 if all(r["correct"] for r in result["rows"]) else 1


async def _cmd_bench_pd_handoff(args) -> int:
    from afkv.bench import write_json
    from afkv.bench.pd import format_handoff_table, run_handoff_bench

    devices = None if args.devices is None else tuple(args.devices.split(","))
    if devices is not None and len(devices) != 2:
        _err(f"afkv: --devices needs two devices (decode,prefill), got {args.devices!r}")
        return 2
    result = await run_handoff_bench(args.model, tuple(int(n) for n in args.prompt_lens.split(",")),
                                     args.device_memory_mib, devices, progress=_err)
    print(format_handoff_table(result))
    out = write_json(result, args.json or f"bench-results/pd-handoff-{time.strftime('%Y%m%d-%H%M%S')}.json")
    _err(f"afkv: wrote {out}")
    return 0


async def _cmd_bench_kv(args) -> int:
    from afkv.bench import write_json
    from afkv.bench.kv import format_table, run_kv_bench

    result = await run_kv_bench(
        args.model, args.blocks, args.formats.split(","), args.io_threads, args.disk_dir,
        args.batch, args.prompt_len, args.gen_len, args.repeats, with_decode=not args.no_decode, progress=_err,
    )
    print(format_table(result))
    out = write_json(result, args.json or f"bench-results/kv-{time.strftime('%Y%m%d-%H%M%S')}.json")
    _err(f"afkv: wrote {out}")
    return 0


async def _cmd_bench_af(args) -> int:
    from afkv.bench import write_json
    from afkv.bench.af import format_af_table, run_af_bench

    result = await run_af_bench(args.model, [int(b) for b in args.batch_sizes.split(",")], args.context,
                                [int(m) for m in args.micro_batches.split(",")], args.steps, log=_err)
    print(format_af_table(result))
    out = write_json(result, args.json or f"bench-results/af-{time.strftime('%Y%m%d-%H%M%S')}.json")
    _err(f"afkv: wrote {out}")
    return 0


async def _cmd_bench_experts_merged(args) -> int:
    from afkv.bench import write_json
    from afkv.bench.experts_merged import format_table, run_experts_merged_bench

    devices = args.devices.split(",") if args.devices else None
    result = await run_experts_merged_bench(args.model, args.batch, args.prompt_len, args.gen_len, args.micro_batches,
                                            args.repeats, devices, args.dtype, log=_err)
    print(format_table(result))
    out = write_json(result, args.json or f"bench-results/experts-merged-{time.strftime('%Y%m%d-%H%M%S')}.json")
    _err(f"afkv: wrote {out}")
    return 0


async def _cmd_bench_eplb(args) -> int:
    from afkv.bench import write_json
    from afkv.bench.eplb import format_table, run_eplb_bench

    devices = args.devices.split(",") if args.devices else None
    result = await run_eplb_bench(args.exponent, args.expert_nodes, args.slots_per_node, args.batch,
                                  args.prompt_len, args.gen_len, args.repeats, args.seed, args.hidden_size,
                                  args.intermediate_size, args.layers, args.experts, devices=devices,
                                  dtype=args.dtype)
    print(format_table(result))
    out = write_json(result, args.json or f"bench-results/eplb-{time.strftime('%Y%m%d-%H%M%S')}.json")
    print(f"wrote {out}")
    return 0


def _cmd_bench_gpu(args) -> int:
    from afkv.bench import write_json
    from afkv.bench.gpu import format_table, run_gpu_suite, write_plot

    split = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    result = run_gpu_suite(args.models.split(","), split(args.batch_sizes), args.context, args.steps,
                           hf=not args.no_hf, hf_batches=split(args.hf_batch_sizes) if args.hf_batch_sizes else None,
                           expert_dtype=args.expert_dtype, log=_err)
    print(format_table(result))
    stem = args.json or f"bench-results/gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out = write_json(result, stem)
    _err(f"afkv: wrote {out}")
    png = write_plot(result, Path(stem).with_suffix(".png"))
    _err(f"afkv: wrote {png}" if png else "afkv: no plot (pip install matplotlib, then: afkv bench plot JSON)")
    return 0


def _cmd_bench_plot(args) -> int:
    import json

    from afkv.bench.gpu import write_plot

    path = Path(args.json)
    png = write_plot(json.loads(path.read_text()), args.out or path.with_suffix(".png"))
    if png is None:
        _err("afkv: error: the plot needs matplotlib: pip install matplotlib")
        return 2
    print(f"wrote {png}")
    return 0


def _cmd_bench_calibrate(args) -> int:
    from afkv.bench import write_json
    from afkv.bench.calibrate import format_profile, run_calibration

    profile = run_calibration(args.models.split(","), args.device, args.like, args.disk_dir, log=_err)
    print(format_profile(profile))
    out = write_json(profile, args.out or f"bench-results/profile-{time.strftime('%Y%m%d-%H%M%S')}.json")
    _err(f"afkv: wrote {out} (use it with: afkv plan --profile {out})")
    return 0


def _cmd_plan(args) -> int:
    import json
    import tomllib

    from afkv.config import EngineConfig
    from afkv.plan.planner import Cluster, Workload, format_plan, make_plan, to_json, to_toml
    from afkv.plan.shapes import load_shapes

    if args.check_runs:
        from afkv.plan.runs import check_runs, format_checks

        print(format_checks(check_runs(args.check_runs)))
        return 0
    if not args.model:
        _err("afkv: error: afkv plan needs --model (a known name, a checkpoint directory or a config.json)")
        return 2
    cluster = Cluster(_plan_profile(args), args.gpus, args.gpus_per_host, hbm_utilization=args.hbm_utilization,
                      host_memory_bytes_per_gpu=int(args.host_memory_gib * 2**30))
    workload = Workload(args.prompt_len, args.output_len, args.output_dist, args.tpot_slo_ms / 1e3)
    plan = make_plan(load_shapes(args.model), cluster, workload, tuple(int(m) for m in args.micro_batches.split(",")))
    toml = to_toml(plan)
    EngineConfig.from_dict(tomllib.loads(toml), source="afkv plan")  # what we write, afkv loads
    print(json.dumps(to_json(plan), indent=2) if args.json else format_plan(plan, args.top))
    if args.toml:
        Path(args.toml).write_text(toml)
        _err(f"afkv: wrote {args.toml}")
    return 0


def _plan_profile(args):
    import dataclasses

    from afkv.plan.builtin import builtin_profile
    from afkv.plan.profile import load_profile

    profile = load_profile(args.profile) if args.profile else builtin_profile(args.gpu)
    changes = {k: v for k, v in (("overlap", args.overlap), ("expert_batching", args.expert_batching)) if v is not None}
    return dataclasses.replace(profile, af=dataclasses.replace(profile.af, **changes)) if changes else profile


def _cmd_launch(args) -> int:
    import logging
    import signal

    from afkv.errors import PeerLostError
    from afkv.serve.launch import Deployment, RestartPolicy

    logging.basicConfig(level=logging.WARNING, format="afkv: %(message)s")
    dep = Deployment(args.config, args.model, log_dir=args.log_dir,
                     restart=RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window))
    d = dep.config.deployment
    _err(f"afkv: starting {d.attention_nodes} attention + {d.expert_nodes} expert + {d.prefill_nodes} prefill nodes ...")
    # Ctrl-C and SIGTERM stop the deployment, also where SIGINT was inherited ignored (a job
    # started in the background by a shell without job control: Python then installs no handler)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    with dep:
        try:
            if dep.token_made_up:  # stdout: the address, then the token nobody else knows
                _err(f"afkv: deployment ready; attach with afkv.attach({dep.address!r}, token=TOKEN) where "
                     "TOKEN is the second line of the output (or AFKV_TOKEN=TOKEN in the environment) -- Ctrl-C "
                     "stops it")
                print(f"{dep.address}\n{dep.token}", flush=True)
            else:
                _err(f"afkv: deployment ready; attach with afkv.attach({dep.address!r}, token=...) with the "
                     "deployment's token -- Ctrl-C stops it")
                print(dep.address, flush=True)
            while True:
                dep.supervise()  # restarts lost nodes (bounded), raises when one keeps failing
                time.sleep(0.5)
        except PeerLostError as exc:
            _err(f"afkv: {exc}; stopping the deployment")
            return 1
        except KeyboardInterrupt:
            _err("afkv: stopping ...")
    return 0


def _cmd_make_tiny(args) -> int:
    from afkv.model.tiny import FAMILIES, write_tiny_checkpoint

    families = FAMILIES if args.family == "all" else (args.family,)
    for fam in families:
        out = write_tiny_checkpoint(fam, Path(args.out) / fam, seed=args.seed)
        print(out)
    return 0


class _Help(argparse.HelpFormatter):
    """Help that shows each option's default, where it has one and its text does not say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d == [] or d == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    fmt = _Help
    p = argparse.ArgumentParser(prog="afkv", description="MoE serving with Attention-FFN disaggregation")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate text (default: the embedded SmolLM2-135M MoE)", formatter_class=fmt,
                         description="Generate text for each prompt, streaming it to stdout (timings to stderr).")
    run.add_argument("prompts", nargs="*", help=f"prompts, one answer each (default: {DEFAULT_PROMPT!r})")
    run.add_argument("--model", help="Hugging Face checkpoint directory (default: the embedded default model)")
    run.add_argument("--config", help="engine TOML config (see configs/; default: built-in defaults)")
    run.add_argument("--max-tokens", type=int, default=128, help="new tokens at most per prompt")
    run.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set of tokens with this mass")
    run.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    run.add_argument("--seed", type=int, help="sampling seed (same seed, same tokens)")
    run.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="stop when the output contains TEXT (not printed); repeat for several")
    run.add_argument("--logprobs", type=int, metavar="N",
                     help="after each answer, print every token's logprob and the N most likely tokens (0-20)")
    run.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    run.add_argument("--raw", action="store_true", help="send prompts as plain text, without the chat template")
    run.add_argument("--stats", action="store_true",
                     help="at the end, print the engine's metrics: requests, tokens, KV blocks and prefix hits per "
                          "tier, bytes spilled and promoted, layer timings")

    srv = sub.add_parser("serve", formatter_class=fmt,
                         help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)",
                         description="Serve the OpenAI API over HTTP: colocated (this process loads the model) or "
                                     "--attach to a deployment started by `afkv launch`.")
    srv.add_argument("--model", help="checkpoint directory (default: the embedded default model); with --attach, "
                                     "the model of the deployment (its tokenizer names logprob tokens)")
    srv.add_argument("--config", help="engine TOML config (colocated only)")
    srv.add_argument("--attach", metavar="HOST:PORT", help="front the deployment whose rendezvous is HOST:PORT "
                                                           "(printed by afkv launch)")
    srv.add_argument("--token", help="the deployment's shared token, with --attach (default: $AFKV_TOKEN)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    srv.add_argument("--api-key", help="clients must send 'Authorization: Bearer KEY' (default: $AFKV_API_KEY)")
    srv.add_argument("--allow-unauthenticated", action="store_true",
                     help="allow a --host beyond loopback without an API key")
    srv.add_argument("--served-model-name", help=f"the model name clients send (default: --model, or "
                                                 f"{DEFAULT_MODEL_NAME!r})")

    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    dec = bsub.add_parser("decode", help="afkv vs transformers generate: decode tokens/s and TTFT", formatter_class=fmt)
    dec.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    dec.add_argument("--config", help="engine TOML config")
    dec.add_argument("--batch-sizes", default="1,4,16")
    dec.add_argument("--prompt-len", type=int, default=64)
    dec.add_argument("--gen-len", type=int, default=32)
    dec.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    dec.add_argument("--threads", type=int, default=0, help="torch intra-op threads for both (0: as they are)")
    dec.add_argument("--repeats", type=int, default=1, help="runs of each, alternated; medians are reported")
    dec.add_argument("--busy-processes", type=int, default=0,
                     help="run this many spinning processes meanwhile (a machine shared with other jobs)")
    dec.add_argument("--json", help="output path (default bench-results/decode-<time>.json)")

    bsv = bsub.add_parser("serve", formatter_class=fmt,
                          help="HTTP (afkv serve, SSE) vs the in-process Engine: tok/s and TTFT, same workload")
    bsv.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    bsv.add_argument("--config", help="engine TOML config")
    bsv.add_argument("--concurrency", type=int, default=64, help="concurrent streaming requests")
    bsv.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (distinct, random)")
    bsv.add_argument("--gen-len", type=int, default=32, help="new tokens per request")
    bsv.add_argument("--repeats", type=int, default=2, help="runs of each side, alternated; the best counts")
    bsv.add_argument("--json", help="output path (default bench-results/serve-<time>.json)")

    bpd = bsub.add_parser("pd", formatter_class=fmt,
                          help="prefill/decode disaggregation vs colocated (CPU processes, one core each): decode "
                               "ITL p50/p99 and tok/s while long prompts arrive")
    bpd.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    bpd.add_argument("--streams", type=int, default=8, help="requests decoding all the time")
    bpd.add_argument("--prompt-len", type=int, default=2048, help="tokens of each long prompt")
    bpd.add_argument("--interval-s", type=float, default=1.0, help="a long prompt arrives this often")
    bpd.add_argument("--duration-s", type=float, default=30.0, help="how long long prompts arrive (the window)")
    bpd.add_argument("--gen-len", type=int, default=64, help="tokens per decode request (then the next starts)")
    bpd.add_argument("--long-tokens", type=int, default=4, help="new tokens per long prompt")
    bpd.add_argument("--device-memory-mib", type=int, default=2048, help="device KV per node")
    bpd.add_argument("--max-num-batched-tokens", type=int, default=512, help="prefill chunk (tokens per step)")
    bpd.add_argument("--json", help="output path (default bench-results/pd-<time>.json)")

    bph = bsub.add_parser("pd-handoff", formatter_class=fmt,
                          help="the KV hand-off of PD (CPU or one GPU): GB/s vs the path's copy limit, last block "
                               "-> first token vs colocated TTFT")
    bph.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    bph.add_argument("--prompt-lens", default="1024,4096", help="comma-separated prompt lengths")
    bph.add_argument("--device-memory-mib", type=int, default=2048, help="device KV per node")
    bph.add_argument("--devices", help="decode,prefill GPUs (e.g. cuda:0,cuda:1): the rows cross over NCCL "
                                       "(default: every node on one device)")
    bph.add_argument("--json", help="output path (default bench-results/pd-handoff-<time>.json)")

    bpr = bsub.add_parser("pd-rows", formatter_class=fmt,
                          help="the KV hand-off's indexed row copies (CPU or one GPU), each kernel, vs one copy")
    bpr.add_argument("--counts", default="64,256,500", help="comma-separated blocks per hand-off")
    bpr.add_argument("--row-kib", type=int, default=1536, help="row (one KV block) KiB: Qwen3-30B-A3B's 16 tokens")
    bpr.add_argument("--reps", type=int, default=10, help="timed calls per point")
    bpr.add_argument("--json", help="output path (default bench-results/pd-rows-<time>.json)")

    kvb = bsub.add_parser("kv", help="KV tiers: transfer GB/s against the copy limit; decode with tiers on/off")
    kvb.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    kvb.add_argument("--blocks", type=int, default=128, help="blocks moved at once in the transfer runs")
    kvb.add_argument("--formats", default="none,fp8,int8,int4")
    kvb.add_argument("--io-threads", type=int, default=4)
    kvb.add_argument("--disk-dir", help="where spill files go (default: a new directory under the temp dir)")
    kvb.add_argument("--batch", type=int, default=4)
    kvb.add_argument("--prompt-len", type=int, default=64)
    kvb.add_argument("--gen-len", type=int, default=32)
    kvb.add_argument("--repeats", type=int, default=3)
    kvb.add_argument("--no-decode", action="store_true", help="transfers only")
    kvb.add_argument("--json", help="output path (default bench-results/kv-<time>.json)")

    launch = sub.add_parser("launch", help="start every node of a deployment config as local processes")
    launch.add_argument("config", help="TOML with a [deployment] section (see configs/deploy-*.toml)")
    launch.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    launch.add_argument("--log-dir", help="write each node's output to LOG_DIR/node<rank>.log")
    launch.add_argument("--max-restarts", type=int, default=5,
                        help="restarts of one node within --restart-window before giving up (default 5; 0: none)")
    launch.add_argument("--restart-window", type=float, default=600.0, help="seconds (default 600)")

    af = bsub.add_parser("af", help="1A1F over NCCL vs colocated data parallel on two GPUs (real shapes)")
    af.add_argument("--model", default="random:qwen3-30b-a3b", help="random:qwen3-30b-a3b | random:mixtral-8x7b")
    af.add_argument("--batch-sizes", default="16,64,128,256,512")
    af.add_argument("--context", type=int, default=2048)
    af.add_argument("--micro-batches", default="1,2")
    af.add_argument("--steps", type=int, default=10)
    af.add_argument("--json", help="output path (default bench-results/af-<time>.json)")

    ep = bsub.add_parser("eplb", help="EPLB under Zipf skew: max/mean expert-node load and tok/s, with and without")
    ep.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent of expert popularity")
    ep.add_argument("--expert-nodes", type=int, default=2)
    ep.add_argument("--slots-per-node", type=int, default=6, help="expert slots per node with EPLB (8 experts)")
    ep.add_argument("--batch", type=int, default=16)
    ep.add_argument("--prompt-len", type=int, default=16)
    ep.add_argument("--gen-len", type=int, default=32)
    ep.add_argument("--repeats", type=int, default=2)
    ep.add_argument("--seed", type=int, default=0)
    ep.add_argument("--hidden-size", type=int, default=256)
    ep.add_argument("--intermediate-size", type=int, default=1024)
    ep.add_argument("--layers", type=int, default=4)
    ep.add_argument("--experts", type=int, default=8)
    ep.add_argument("--devices", help="the attention node's device, then each expert node's, comma-separated "
                                      "(e.g. cuda:0,cuda:0,cuda:1); default: all on the CPU")
    ep.add_argument("--dtype", default="float32")
    ep.add_argument("--json", help="output path (default bench-results/eplb-<time>.json)")

    exm = bsub.add_parser("experts-merged", help="2 attention nodes + 1 expert node: the expert node's steps per "
                                                 "attention node vs merged (FFN seconds per step, decode tok/s)")
    exm.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    exm.add_argument("--batch", type=int, default=8, help="sequences per attention node")
    exm.add_argument("--prompt-len", type=int, default=16)
    exm.add_argument("--gen-len", type=int, default=32)
    exm.add_argument("--micro-batches", type=int, default=1)
    exm.add_argument("--repeats", type=int, default=2)
    exm.add_argument("--devices", help="attention node 0's, attention node 1's and the expert node's device, "
                                       "comma-separated (e.g. cuda:0,cuda:1,cuda:2); default: all on the CPU")
    exm.add_argument("--dtype", default="float32")
    exm.add_argument("--json", help="output path (default bench-results/experts-merged-<time>.json)")

    kvq = bsub.add_parser("kv-quant", add_help=False,
                          help="long-context decode with fp8/int8/int4 device KV blocks against the model dtype")
    kvq.add_argument("args", nargs=argparse.REMAINDER, help="options of python -m afkv.bench.kv_quant (--help)")

    lc = bsub.add_parser("long-context", add_help=False,
                         help="contexts larger than the GPU: decode with KV streamed from host memory vs the PCIe bound")
    lc.add_argument("args", nargs=argparse.REMAINDER, help="options of python -m afkv.bench.long_context (--help)")

    gpu = bsub.add_parser("gpu", help="GPU suite: afkv (CUDA graphs) vs HF generate vs the HBM roofline, real shapes")
    gpu.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b",
                     help="comma-separated: qwen3-30b-a3b, mixtral-8x7b, deepseek-v2-lite, deepseek-v3-8l")
    gpu.add_argument("--expert-dtype", default="auto", choices=["auto", "fp8"],
                     help="how afkv holds the routed experts (fp8: deepseek-v3-8l on one 80 GB GPU)")
    gpu.add_argument("--batch-sizes", default="1,16,64,256")
    gpu.add_argument("--hf-batch-sizes", help="batches for HF generate (default: --batch-sizes)")
    gpu.add_argument("--context", type=int, default=2048)
    gpu.add_argument("--steps", type=int, default=10)
    gpu.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    gpu.add_argument("--json", help="output path (default bench-results/gpu-<time>.json; the plot goes beside it)")

    plot = bsub.add_parser("plot", help="PNG plot of an `afkv bench gpu` JSON (needs matplotlib)")
    plot.add_argument("json")
    plot.add_argument("--out", help="PNG path (default: the JSON's path with .png)")

    cal = bsub.add_parser("calibrate", help="measure this machine for afkv plan (one GPU, or the CPU): a profile JSON")
    cal.add_argument("--models", default="random:qwen3-30b-a3b",
                     help="comma-separated: random:<name> (real shapes, random weights) or checkpoint directories")
    cal.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    cal.add_argument("--like", default="h200", choices=("h200", "h100"),
                     help="built-in profile lending what one GPU cannot measure (AF runtime overheads, KV formats)")
    cal.add_argument("--disk-dir", help="where the disk-rate file goes (default: the temp dir)")
    cal.add_argument("--out", help="profile path (default bench-results/profile-<time>.json)")

    kern = bsub.add_parser("kernels", add_help=False,
                           help="Triton kernels vs their roofline and torch: moe | fused | decode (one GPU)")
    kern.add_argument("args", nargs=argparse.REMAINDER, help="options of python -m afkv.bench.kernels (--help)")

    plan = sub.add_parser("plan", help="predict colocated, EP and every rAyF deployment; choose one, write its config")
    plan.add_argument("--model", help="qwen3-30b-a3b | mixtral-8x7b, a checkpoint directory or a config.json")
    plan.add_argument("--gpu", default="h200", choices=("h200", "h100"), help="built-in profile (without --profile)")
    plan.add_argument("--profile", help="a profile JSON from afkv bench calibrate")
    plan.add_argument("--gpus", type=int, default=8)
    plan.add_argument("--gpus-per-host", type=int, default=8)
    plan.add_argument("--prompt-len", type=int, default=2048)
    plan.add_argument("--output-len", type=int, default=256)
    plan.add_argument("--output-dist", default="fixed", choices=("fixed", "geometric"))
    plan.add_argument("--tpot-slo-ms", type=float, default=50.0)
    plan.add_argument("--micro-batches", default="1,2,3,4")
    plan.add_argument("--overlap", type=float, help="what-if: micro-batch overlap in [0, 1] (1: ideal ping-pong)")
    plan.add_argument("--expert-batching", choices=("per_attention_node", "merged"),
                      help="what-if: merged = one expert launch per layer for all attention nodes")
    plan.add_argument("--host-memory-gib", type=float, default=0.0, help="host memory per GPU (half goes to a KV host tier)")
    plan.add_argument("--hbm-utilization", type=float, default=0.9)
    plan.add_argument("--top", type=int, default=8, help="table rows")
    plan.add_argument("--json", action="store_true", help="print JSON instead of the table")
    plan.add_argument("--toml", help="write the chosen deployment's config here")
    plan.add_argument("--check-runs", metavar="DIR",
                      help="instead: the model against every stored run under DIR (afkv/bench/results)")

    tiny = sub.add_parser("make-tiny", help="write tiny random HF checkpoints (needs transformers)")
    tiny.add_argument("out")
    tiny.add_argument("--family", default="all", choices=["all", *TINY_FAMILIES])
    tiny.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    from afkv.errors import AfkvError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not (args.command == "bench" and args.bench in ("kv-quant", "kernels", "long-context")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "run":
            return run_async(_cmd_run(args))
        if args.command == "serve":
            if args.attach and args.config:
                parser.error("--config is for a colocated server; a deployment has its own (afkv launch CONFIG)")
            return run_async(_cmd_serve(args))
        if args.command == "bench" and args.bench == "serve":
            return run_async(_cmd_bench_serve(args))
        if args.command == "bench" and args.bench == "kv":
            return run_async(_cmd_bench_kv(args))
        if args.command == "bench" and args.bench == "pd":
            return run_async(_cmd_bench_pd(args))
        if args.command == "bench" and args.bench == "pd-handoff":
            return run_async(_cmd_bench_pd_handoff(args))
        if args.command == "bench" and args.bench == "pd-rows":
            return _cmd_bench_pd_rows(args)
        if args.command == "bench" and args.bench == "af":
            return run_async(_cmd_bench_af(args))
        if args.command == "bench" and args.bench == "eplb":
            return run_async(_cmd_bench_eplb(args))
        if args.command == "bench" and args.bench == "experts-merged":
            return run_async(_cmd_bench_experts_merged(args))
        if args.command == "bench" and args.bench == "kv-quant":
            from afkv.bench.kv_quant import main as kv_quant_main

            kv_quant_main(extra + args.args)
            return 0
        if args.command == "bench" and args.bench == "long-context":
            from afkv.bench.long_context import main as long_context_main

            long_context_main(extra + args.args)
            return 0
        if args.command == "bench" and args.bench == "kernels":
            from afkv.bench.kernels import main as kernels_main

            return kernels_main(extra + args.args)
        if args.command == "bench" and args.bench == "gpu":
            return _cmd_bench_gpu(args)
        if args.command == "bench" and args.bench == "plot":
            return _cmd_bench_plot(args)
        if args.command == "bench" and args.bench == "calibrate":
            return _cmd_bench_calibrate(args)
        if args.command == "plan":
            return _cmd_plan(args)
        if args.command == "bench":
            return run_async(_cmd_bench_decode(args))
        if args.command == "launch":
            return _cmd_launch(args)
        return _cmd_make_tiny(args)
    except AfkvError as exc:
        _err(f"afkv: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _err("afkv: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
