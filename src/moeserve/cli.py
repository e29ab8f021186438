"""The ``moeserve`` command line. Thin: parses options, builds configs, calls the library.

Heavy imports (torch, transformers) happen inside commands so ``--help`` is instant.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from moeserve.errors import MoeserveError

app = typer.Typer(
    name="moeserve",
    help="Serve Mixture-of-Experts models cheaply. MODEL arguments default to the embedded reference model.",
    no_args_is_help=True,
    add_completion=False,
)
trace_app = typer.Typer(help="Record and inspect routing traces (moeserve-trace/1 .npz files).", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: implementations side by side in one process.", no_args_is_help=True)
app.add_typer(trace_app, name="trace")
predict_app = typer.Typer(help="Expert-popularity predictors (uniform, frequency, Bayesian).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(predict_app, name="predict")
serverless_app = typer.Typer(help="Plan MoE expert layers on serverless functions at minimum billed cost (modelled).", no_args_is_help=True)
app.add_typer(serverless_app, name="serverless")
committee_app = typer.Typer(help="Parameter committee: serve from a subset of experts per layer (lossy, measured).", no_args_is_help=True)
app.add_typer(committee_app, name="committee")
simulate_app = typer.Typer(help="Discrete-event simulation at scales this machine cannot run.", no_args_is_help=True)
app.add_typer(simulate_app, name="simulate")

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

ModelArg = Annotated[
    Path | None, typer.Argument(help="HF-format model folder (config.json, *.safetensors, tokenizer). Default: the reference model.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts instead of tables.")]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="torch intra-op threads (default: MOESERVE_NUM_THREADS, else torch's choice).")
]


def _emit(as_json: bool, payload: Callable[[], object], table: Callable[[], object]) -> None:
    """Print one JSON object (``--json``, for scripts) or a rich table (for people)."""
    if as_json:
        print(json.dumps(payload()))
    else:
        console.print(table())


def _fail(error: Exception) -> None:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


COMMITTEE_WARM_IN_HELP = (
    "With --committee and --expert-memory: from the cold cache, start each layer's committee as its best top_k "
    "planned members and load the others in the background, each joining once resident (tokens use the members "
    "resident: no token waits for a member; less gate mass served exactly until they land)."
)
SKIP_THRESHOLD_HELP = (
    "With --committee: skip routed slots whose gate weight, after the committee's renormalisation, is below this "
    "(their experts neither compute nor load for them; lossy). 0: none."
)
COMMITTEE_SWAPS_HELP = (
    "With --committee: the online scheduler changes up to N members per layer per step toward the experts with the "
    "most recent gate mass (with --expert-memory the incoming expert loads in the background and joins once "
    "resident); 0 keeps the plan's members."
)


def _moe_config(gating: str, capacity_factor: float, backend: str):
    from moeserve.config import MoEConfig

    try:
        return MoEConfig(gating=gating, capacity_factor=capacity_factor, backend=backend)
    except ValueError as error:
        _fail(error)


DTYPE_HELP = (
    "Weights and compute dtype: float32 or bfloat16 (half the memory; on CPUs without bf16 instructions the "
    "experts of small layers compute in fp32 from it)."
)


DEVICE_HELP = (
    "Where the model computes: cpu, or cuda (the current GPU; cuda:N another). With --expert-memory on cuda the "
    "resident experts are GPU slots filled by copies on a side CUDA stream that overlap compute."
)
HOST_MEMORY_HELP = (
    "With --expert-memory: a host-memory tier between the checkpoint and the resident experts, this big (a fraction "
    "of all experts' bytes as the checkpoint stores them, 25%, or a size, 4GiB; at least one expert), LRU. A resident "
    "miss is copied from it when it holds the expert, else read from disk into it first. On cuda it is pinned memory "
    "copied to the GPU asynchronously; on cpu a second RAM tier (it saves disk or page-cache reads, not copies). "
    "Default: none (disk -> staging -> resident experts)."
)


def _torch_dtype(name: str):
    """The torch dtype of a --dtype option; a clear error for anything but float32 or bfloat16."""
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise MoeserveError(f"--dtype must be float32 or bfloat16, got {name!r}")
    return dtypes[name]


def _prepare_model(model, moe_config, expert_memory: str | None, cache_policy: str, prefetch: bool,
                   committee: Path | None, check: Callable[[Any], object] | None = None, committee_swaps: int = 0,
                   dtype: str = "float32", device: str = "cpu", host_memory: str | None = None,
                   committee_warm_in: bool = False, skip_threshold: float = 0.0):
    """Load a model and apply the memory options shared by generate and serve: (model, cache, committee gate).

    ``committee_swaps`` > 0 adds the committee's online scheduler (stepped after every forward pass);
    ``committee_warm_in`` has it warm the members in from the cold cache (needs a budget).
    ``device``: where the model (and the cache's slots) go; ``host_memory``: the cache's host tier.
    """
    from moeserve.config import ExpertCacheConfig
    from moeserve.models.loader import load_model

    if expert_memory is None and (prefetch or cache_policy != "lru" or host_memory is not None):
        raise MoeserveError("--prefetch, --cache-policy and --host-memory need --expert-memory")
    if host_memory is not None:
        _check_host_memory(host_memory)
    if committee_swaps < 0 or (committee_swaps and committee is None):
        raise MoeserveError(f"--committee-swaps needs --committee and a count >= 0, got {committee_swaps}")
    if skip_threshold and committee is None:
        raise MoeserveError("--skip-threshold needs --committee (it skips slots of the committee's routing)")
    if committee_warm_in and (committee is None or expert_memory is None):
        raise MoeserveError("--committee-warm-in needs --committee and --expert-memory (without a budget every member is resident)")
    # With a budget the experts are read only by the cache: a model whose experts exceed memory loads.
    moe_model = load_model(model, dtype=_torch_dtype(dtype), moe=moe_config, load_experts=expert_memory is None,
                           device=device)
    if check is not None:
        check(moe_model)
    gate = plan = None
    if committee is not None:
        from moeserve.memory.committee import CommitteePlan, apply_committee

        plan = CommitteePlan.load(committee, moe_model)
        gate = apply_committee(moe_model, plan.members_by_layer(), skip_threshold=skip_threshold)
    cache = None
    if expert_memory is not None:
        from moeserve.memory.offload import apply_expert_cache

        cache_config = ExpertCacheConfig(memory=expert_memory, policy=cache_policy, host_memory=host_memory)
        cache = apply_expert_cache(moe_model, expert_memory, cache_config.policy, cache_config.per_layer, prefetch=prefetch,
                                   host_memory=cache_config.host_memory)
    if gate is not None and plan is not None and (committee_swaps or committee_warm_in):
        from moeserve.memory.committee import CommitteeScheduler

        gate.scheduler = CommitteeScheduler(moe_model, gate, max_swaps=committee_swaps, cache=cache, step_every=1,
                                            warm_in=plan.ranked_members() if committee_warm_in else None)
    return moe_model, cache, gate


def _check_host_memory(text: str) -> None:
    """--host-memory parses as a fraction or a size (its minimum, one expert, is checked by the cache)."""
    from moeserve.memory.cache import parse_expert_memory

    try:
        parse_expert_memory(text)
    except ValueError as error:
        raise MoeserveError(f"--host-memory: {error}") from None


def _start_expert_parallel(moe_model, processes: int, thread_count: int, cache, gate):
    """Move the model's routed experts to worker processes (sync); shared by generate and serve."""
    if cache is not None or gate is not None:
        raise MoeserveError("--expert-parallel does not combine with --expert-memory or --committee yet")
    if moe_model.layers and moe_model.layers[0].experts.dtype != _torch_dtype("float32"):
        raise MoeserveError("--expert-parallel runs float32 only (its expert workers compute in float32); drop --dtype")
    from moeserve.ep.serving import start_expert_parallel
    from moeserve.models.reference import reference_split_tokens

    if moe_model.tokenizer is None:
        raise MoeserveError(f"{moe_model.path} has no tokenizer; cannot measure expert loads for placement")
    calibration = reference_split_tokens(moe_model.tokenizer, held_out=False, max_tokens=2048)
    return start_expert_parallel(moe_model, processes, calibration, threads=thread_count)


@app.command()
def generate(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "def main():",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (with --temperature > 0).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    gating: Annotated[str, typer.Option(help="dropless or capacity.")] = "dropless",
    capacity_factor: Annotated[float, typer.Option(help="Slots per expert factor for --gating capacity.")] = 1.25,
    backend: Annotated[str, typer.Option(help="Experts backend: auto (chosen from device and dtype) or a registered one (loop, hybrid, grouped_mm, cpu).")] = "auto",
    routing: Annotated[bool, typer.Option("--routing", help="Also print per-layer routing facts of this run.")] = False,
    expert_memory: Annotated[str | None, typer.Option(help="Keep only this much expert memory resident: a fraction (25%, 0.5) or a size (2GiB); the rest is read from the checkpoint on demand.")] = None,
    cache_policy: Annotated[str, typer.Option(help="Eviction policy with --expert-memory: lru, lfu, fifo, lifo, lrfu (exact: outputs unchanged).")] = "lru",
    prefetch: Annotated[bool, typer.Option("--prefetch", help="With --expert-memory: predict the next layer's experts with its router and load them in the background.")] = False,
    committee: Annotated[Path | None, typer.Option(help="Serve with a parameter committee plan from `committee plan` (lossy: routes only to its members).")] = None,
    committee_swaps: Annotated[int, typer.Option(help=COMMITTEE_SWAPS_HELP)] = 0,
    committee_warm_in: Annotated[bool, typer.Option("--committee-warm-in", help=COMMITTEE_WARM_IN_HELP)] = False,
    skip_threshold: Annotated[float, typer.Option(help=SKIP_THRESHOLD_HELP)] = 0.0,
    expert_parallel: Annotated[int | None, typer.Option(help="Run the routed experts in N-1 worker processes (sync all-to-all per layer over gloo); no --routing.")] = None,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "float32",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    host_memory: Annotated[str | None, typer.Option(help=HOST_MEMORY_HELP)] = None,
    lean: Annotated[bool, typer.Option("--lean/--no-lean", help="Run moeserve's lean decoder forward where the family has one (Mixtral, Qwen2/3-MoE, OLMoE, dots.llm1, GLM-4.5, DeepSeek-V2/V3, GLM-4.7-Flash; the server's path); --no-lean runs transformers' forward, the reference.")] = True,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate text, streaming tokens to the terminal; reports tokens/s and time to first token."""
    from moeserve.config import SamplingConfig
    from moeserve.engine.generate import generate as run_generate
    from moeserve.engine.generate import prompt_token_ids, warm_up
    from moeserve.env import apply_thread_count
    from moeserve.traces.record import RoutingRecorder
    from moeserve.traces.stats import trace_stats

    service = None
    try:
        if expert_parallel is not None and routing:
            raise MoeserveError("--routing is not available with --expert-parallel (the experts run in other processes)")
        if expert_parallel is not None and device != "cpu":
            raise MoeserveError("--expert-parallel runs on the CPU (gloo workers); drop --device")
        thread_count = apply_thread_count(threads)
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        moe_model, cache, gate = _prepare_model(
            model, _moe_config(gating, capacity_factor, backend), expert_memory, cache_policy, prefetch, committee,
            check=lambda m: prompt_token_ids(m, prompt, sampling),  # context errors before anything is printed
            committee_swaps=committee_swaps, dtype=dtype, device=device, host_memory=host_memory,
            committee_warm_in=committee_warm_in, skip_threshold=skip_threshold,
        )
        if expert_parallel is not None:
            service = _start_expert_parallel(moe_model, expert_parallel, thread_count, cache, gate)
        warm_up(moe_model, lean=lean)
        if cache is not None:
            cache.reset_stats()
        recorder = RoutingRecorder(moe_model) if (routing or as_json) and service is None else None
        if not as_json:
            console.print(f"[dim]{moe_model.name} ({moe_model.family.model_type}, {len(moe_model.layers)} MoE layers, "
                          f"{moe_model.num_experts} experts, top-{moe_model.top_k})[/]")
            sys.stdout.write(prompt)
            sys.stdout.flush()

        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        with recorder if recorder is not None else contextlib.nullcontext():
            result = run_generate(moe_model, prompt, sampling, on_text=None if as_json else stream, lean=lean)
    except (MoeserveError, ValueError, KeyError) as error:
        _fail(error)
        return
    finally:
        if service is not None:
            service.stop()
    stats = trace_stats(recorder.trace()) if recorder is not None else None
    if as_json:
        payload = result.to_dict()
        payload["model"] = str(moe_model.path)
        if stats is not None:
            payload["routing"] = stats.to_dict()
        if cache is not None:
            payload["expert_cache"] = cache.stats().to_dict()
        if gate is not None:
            payload["committee"] = gate.telemetry()
        if service is not None:
            payload["expert_parallel"] = {"processes": expert_parallel, "worker_rows": service.stats.worker_rows,
                                          "expert_wait_s": service.stats.expert_wait_s}
        print(json.dumps(payload))
        return
    sys.stdout.write("\n")
    console.print(
        f"[bold]{result.new_tokens} tokens[/] in {result.seconds:.2f} s: {result.tokens_per_s:.1f} tokens/s "
        f"(decode {result.decode_tokens_per_s:.1f} tokens/s), time to first token {result.time_to_first_token_s * 1000:.1f} ms"
    )
    if cache is not None:
        cache_stats = cache.stats()
        console.print(
            f"expert cache ({cache_policy}, {cache_stats.budget_bytes / 2**20:.1f} MiB budget): hit rate "
            f"{cache_stats.hit_rate:.3f}, {cache_stats.loads} loads, {cache_stats.bytes_read / 2**20:.1f} MiB read, "
            f"max resident {cache_stats.max_resident_bytes / 2**20:.1f} MiB, {cache_stats.stalled_uses} stalled uses"
        )
        if cache_stats.host_tier != "none":
            console.print(
                f"host tier ({cache_stats.host_tier}, {cache_stats.host_budget_bytes / 2**20:.1f} MiB budget): "
                f"{cache_stats.host_hits} of {cache_stats.loads} loads served from it, max held "
                f"{cache_stats.max_host_resident_bytes / 2**20:.1f} MiB"
            )
    if gate is not None:
        console.print(f"committee: gate mass served exactly {gate.telemetry()['served_exactly']:.4f}")
    if stats is not None:
        from moeserve.traces.stats import render_stats_table

        console.print(render_stats_table(stats))


@app.command("train-tiny")
def train_tiny(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the model, tokenizer, training.json and README.md into.")],
    max_steps: Annotated[int, typer.Option(help="Optimizer steps (16 x 256 tokens each).")] = 1500,
    max_minutes: Annotated[float, typer.Option(help="Stop training after this many minutes even if steps remain.")] = 18.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the reference MoE model (Mixtral architecture, 16 experts, top-2) on the standard library's source."""
    from moeserve.models.reference import ReferenceModelConfig, train_reference_model, write_model_card

    try:
        cfg = ReferenceModelConfig(max_steps=max_steps, max_minutes=max_minutes, seed=seed)
    except ValueError as error:
        _fail(error)
        return
    result = train_reference_model(out, cfg, progress=True)
    console.print(f"trained {result.steps} steps, {result.tokens_seen:,} tokens, final loss {result.final_loss}")
    figures = write_model_card(out)
    quality = figures["quality"]
    console.print(f"held-out perplexity {quality['perplexity']:.2f}, next-token accuracy {quality['accuracy']:.4f}")
    console.print(f"wrote {out}")


@app.command()
def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    served_model_name: Annotated[str | None, typer.Option(help="The name clients send as `model` (default: the model folder's name).")] = None,
    max_running: Annotated[int, typer.Option(help="Requests decoded together (KV-cache slots).")] = 32,
    max_waiting: Annotated[int, typer.Option(help="Requests that may wait for a slot; more get 429 with Retry-After.")] = 256,
    max_prefill_tokens: Annotated[int, typer.Option(help="Padded prompt tokens per prefill step.")] = 4096,
    min_prefill_fill: Annotated[float, typer.Option(help="A prefill batch admits no request that would leave less than this share of its padded tokens real (0-1).")] = 0.75,
    warm_up: Annotated[bool, typer.Option("--warm-up/--no-warm-up", help="Run the largest steps once on dummy tokens before serving (memory at its high-water mark from the start; on a large model on CPU this takes as long as a prompt of --max-model-len tokens).")] = True,
    max_model_len: Annotated[int | None, typer.Option(help="Prompt + completion tokens per request; every KV slot preallocates this many positions (default: the model's context, at most 4096).")] = None,
    default_max_tokens: Annotated[int, typer.Option(help="max_tokens for chat requests that set none (capped by the context).")] = 256,
    gating: Annotated[str, typer.Option(help="dropless or capacity.")] = "dropless",
    capacity_factor: Annotated[float, typer.Option(help="Slots per expert factor for --gating capacity.")] = 1.25,
    backend: Annotated[str, typer.Option(help="Experts backend: auto or a registered one (loop, hybrid, grouped_mm, cpu).")] = "auto",
    expert_memory: Annotated[str | None, typer.Option(help="Keep only this much expert memory resident (25%, 0.5, 2GiB); the rest is read from the checkpoint on demand.")] = None,
    cache_policy: Annotated[str, typer.Option(help="Eviction policy with --expert-memory (lru, lfu, fifo, lifo, lrfu).")] = "lru",
    prefetch: Annotated[bool, typer.Option("--prefetch", help="With --expert-memory: load the next layer's predicted experts in the background.")] = False,
    committee: Annotated[Path | None, typer.Option(help="Serve with a parameter committee plan from `committee plan` (lossy: routes only to its members).")] = None,
    committee_swaps: Annotated[int, typer.Option(help=COMMITTEE_SWAPS_HELP)] = 0,
    committee_warm_in: Annotated[bool, typer.Option("--committee-warm-in", help=COMMITTEE_WARM_IN_HELP)] = False,
    skip_threshold: Annotated[float, typer.Option(help=SKIP_THRESHOLD_HELP)] = 0.0,
    expert_parallel: Annotated[int | None, typer.Option(help="Run the routed experts in N-1 worker processes (this process is the attention worker; sync all-to-all per layer over gloo).")] = None,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "float32",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    host_memory: Annotated[str | None, typer.Option(help=HOST_MEMORY_HELP)] = None,
    threads: ThreadsOpt = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level (critical, error, warning, info, debug).")] = "info",
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching.

    Routes: POST /v1/completions and /v1/chat/completions (stream with "stream": true),
    GET /v1/models, /health, /metrics (Prometheus: request latencies and MoE expert load,
    cache and committee metrics). Ctrl-C drains running requests, then exits.
    """
    from moeserve.engine.engine import EngineConfig
    from moeserve.engine.scheduler import SchedulerConfig
    from moeserve.env import apply_thread_count
    from moeserve.server.serve import build_server, run_server

    service = None
    try:
        thread_count = apply_thread_count(threads)
        if expert_parallel is not None and device != "cpu":
            raise MoeserveError("--expert-parallel runs on the CPU (gloo workers); drop --device")
        moe_model, cache, gate = _prepare_model(
            model, _moe_config(gating, capacity_factor, backend), expert_memory, cache_policy, prefetch, committee,
            committee_swaps=committee_swaps, dtype=dtype, device=device, host_memory=host_memory,
            committee_warm_in=committee_warm_in, skip_threshold=skip_threshold,
        )
        engine_config = EngineConfig(
            scheduler=SchedulerConfig(max_running=max_running, max_waiting=max_waiting, max_prefill_tokens=max_prefill_tokens,
                                      min_prefill_fill=min_prefill_fill),
            max_context=max_model_len,
        )
        if expert_parallel is not None:
            service = _start_expert_parallel(moe_model, expert_parallel, thread_count, cache, gate)
        server = build_server(moe_model, engine_config, served_model_name, cache=cache, committee=gate,
                              default_max_tokens_chat=default_max_tokens, expert_parallel=service, warm_up=warm_up)
    except (MoeserveError, ValueError, KeyError) as error:
        if service is not None:
            service.stop()
        _fail(error)
        return
    console.print(f"[dim]serving {server.config.model_name} ({moe_model.family.model_type}, {moe_model.num_experts} experts, "
                  f"top-{moe_model.top_k}) on http://{host}:{port}/v1[/]")
    run_server(server, host, port, log_level)


@trace_app.command("record")
def trace_record(
    text: Annotated[Path, typer.Option("--text", help="Text file to run through the model (split into chunks).")],
    out: Annotated[Path, typer.Option("--out", help="Output .npz (moeserve-trace/1).")],
    chunk_chars: Annotated[int, typer.Option(help="Characters per sequence.")] = 4000,
    max_tokens: Annotated[int, typer.Option(help="Tokens kept per sequence.")] = 1024,
    max_sequences: Annotated[int | None, typer.Option(help="Stop after this many sequences.")] = None,
    model: ModelArg = None,
) -> None:
    """Record the model's routing (expert ids and gate weights) over a text file."""
    from rich.progress import Progress

    from moeserve.models.loader import load_model
    from moeserve.traces.format import save_trace
    from moeserve.traces.record import record_texts, split_text_file

    if not text.is_file():
        _fail(MoeserveError(f"{text}: no such file"))
    for option, value in (("--chunk-chars", chunk_chars), ("--max-tokens", max_tokens), ("--max-sequences", max_sequences)):
        if value is not None and value < 1:
            _fail(MoeserveError(f"{option} must be >= 1, got {value}"))
    try:
        moe_model = load_model(model)
        chunks = split_text_file(text, chunk_chars)[:max_sequences]
        with Progress(transient=True) as progress:
            task = progress.add_task("recording", total=len(chunks))
            trace = record_texts(moe_model, chunks, max_tokens, on_text=lambda: progress.advance(task))
        if trace.num_tokens == 0:
            raise MoeserveError(f"{text}: no tokens recorded (empty file?); nothing written")
        save_trace(trace, out)
    except (MoeserveError, ValueError) as error:
        _fail(error)
        return
    console.print(f"wrote {out}: {trace.num_tokens:,} tokens, {trace.num_sequences} sequences, "
                  f"{trace.num_layers} MoE layers, {trace.meta.num_experts} experts, top-{trace.meta.top_k}")


@trace_app.command("stats")
def trace_stats_command(
    file: Annotated[Path, typer.Argument(help="A moeserve-trace/1 .npz file.")],
    pairs: Annotated[int, typer.Option(help="Most co-activated pairs to list per layer.")] = 5,
    as_json: JsonOpt = False,
) -> None:
    """Per layer: load skew (max/mean), routing entropy, temporal locality, most co-activated pairs."""
    from moeserve.traces.format import load_trace
    from moeserve.traces.stats import render_stats_table, trace_stats

    try:
        stats = trace_stats(load_trace(file), top_pairs=pairs)
    except MoeserveError as error:
        _fail(error)
        return
    _emit(as_json, lambda: stats.to_dict(), lambda: render_stats_table(stats, pairs_shown=min(pairs, 3)))


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        _fail(MoeserveError(f"{option} takes comma-separated integers, got {text!r}"))
        raise
    if not values or any(v <= 0 for v in values):
        _fail(MoeserveError(f"{option} needs positive integers, got {text!r}"))
    return values


@bench_app.command("moe-layer")
def bench_moe_layer(
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint whose first MoE layer to time (default: the reference model).")] = None,
    shape: Annotated[str, typer.Option(help="reference (the model's layer) or mixtral (Mixtral-8x7B-shaped, random weights, I scaled to fit).")] = "reference",
    tokens: Annotated[str, typer.Option(help="Comma-separated token counts.")] = "1,16,128,1024",
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16.")] = "float32",
    repeats: Annotated[int, typer.Option(help="Timed repeats per implementation and token count (median kept).")] = 7,
    device: Annotated[str, typer.Option(help="cpu or cuda: where the layer runs and the roofline is measured (on cuda the mixtral shape is Mixtral's own, I=14336).")] = "cpu",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Time one MoE layer: moeserve dropless and capacity gating vs transformers' experts, with the roofline."""

    from moeserve.bench.moe_layer import SHAPE_NAMES, render_table, run_moe_layer_bench
    from moeserve.env import apply_thread_count

    try:
        torch_dtype = _torch_dtype(dtype)
    except MoeserveError as error:
        _fail(error)
    if shape not in SHAPE_NAMES:
        _fail(MoeserveError(f"--shape must be one of {', '.join(SHAPE_NAMES)}, got {shape!r}"))
    token_counts = _int_list(tokens, "--tokens")
    try:
        apply_thread_count(threads)
        from moeserve.models.loader import resolve_device

        result = run_moe_layer_bench(shape, model, token_counts, torch_dtype, repeats, progress=not as_json,
                                     device=resolve_device(device))
    except (MoeserveError, ValueError) as error:
        _fail(error)
        return
    _emit(as_json, lambda: result.to_json(), lambda: render_table(result))


@bench_app.command("cache")
def bench_cache(
    trace: Annotated[Path, typer.Option("--trace", help="A moeserve-trace/1 file (e.g. ../shared/traces/*.npz or one from `trace record`).")],
    capacity: Annotated[str | None, typer.Option(help="Comma-separated experts resident per layer (default: a spread from top_k to E).")] = None,
    policies: Annotated[str | None, typer.Option(help="Comma-separated eviction policies (default: all registered).")] = None,
    scope: Annotated[str, typer.Option(help="per-layer (a cache of C experts per layer) or global (one cache of C*L slots).")] = "per-layer",
    warmup_sequences: Annotated[int, typer.Option(help="Sequences replayed first and not counted.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Replay a routing trace through every eviction policy; hit rates next to Belady's optimum."""
    from rich.progress import Progress

    from moeserve.bench.cache import default_capacities, render_table, run_cache_bench
    from moeserve.traces.format import load_trace

    try:
        if capacity is None:
            meta = load_trace(trace).meta
            capacities = default_capacities(meta.num_experts, meta.top_k)
        else:
            capacities = _int_list(capacity, "--capacity")
        names = [p.strip() for p in policies.split(",")] if policies else None
        with Progress(transient=True, disable=as_json) as progress:
            task = progress.add_task("replaying", total=None)
            result = run_cache_bench(trace, capacities, names, scope, warmup_sequences,
                                     on_row=lambda row: progress.advance(task))
    except (MoeserveError, ValueError, KeyError) as error:
        _fail(error)
        return
    _emit(as_json, lambda: result.to_dict(), lambda: render_table(result))


@bench_app.command("serve")
def bench_serve(
    url: Annotated[list[str] | None, typer.Option("--url", help="A running OpenAI-compatible server (repeat to compare several).")] = None,
    model_name: Annotated[str | None, typer.Option(help="`model` to send to --url servers (default: the first of its /v1/models).")] = None,
    launch: Annotated[str | None, typer.Option(help="Start these servers one after another and load each: moeserve, transformers (`transformers serve --continuous-batching`), comma-separated.")] = None,
    model: Annotated[Path | None, typer.Option(help="Model folder for --launch (default: the reference model).")] = None,
    requests: Annotated[int, typer.Option(help="Measured requests per server.")] = 100,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at most.")] = 16,
    request_rate: Annotated[float | None, typer.Option(help="Poisson arrivals at this many requests/s (default: as fast as --concurrency allows).")] = None,
    prompt_chars: Annotated[int, typer.Option(help="Median prompt length in characters (log-normal spread).")] = 600,
    max_tokens: Annotated[int, typer.Option(help="Median max_tokens (log-normal spread).")] = 64,
    ignore_eos: Annotated[bool, typer.Option(help="Send ignore_eos (vLLM's extension) so every request generates max_tokens; transformers serve refuses it.")] = False,
    malformed: Annotated[int, typer.Option(help="Malformed requests to mix in; each must get a 4xx.")] = 0,
    warmup: Annotated[int, typer.Option(help="Sequential warm-up requests before measuring.")] = 4,
    warmup_wave: Annotated[bool, typer.Option(help="After them, one uncounted wave of --concurrency requests at once (steady state under load).")] = True,
    corpus: Annotated[Path | None, typer.Option(help="A text file to cut prompts from besides the Python standard library sources (e.g. ../shared/corpora/tinyshakespeare.txt).")] = None,
    threads: Annotated[int | None, typer.Option(help="Threads of each launched server (MOESERVE_NUM_THREADS / OMP_NUM_THREADS).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of prompt choice, lengths and arrivals.")] = 0,
    rounds: Annotated[int, typer.Option(help="Load every server this many times, alternating; the run with the median throughput is reported.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Load-test OpenAI-compatible servers with streaming completions cut from real text.

    Reports output-token throughput and TTFT / TPOT / ITL / end-to-end latency percentiles per
    server, errors by status, /health failures during the run, and the server's resident memory
    after warm-up and at the end (when it exports process_resident_memory_bytes). With several
    servers, each gets the same prompts, one server at a time, and ratios to the first are shown.
    """
    import asyncio

    import httpx

    from moeserve.bench.serve import (
        LoadConfig,
        default_text_files,
        launch_server,
        make_prompts,
        median_run,
        ratios_to,
        report_row,
        run_load,
    )
    from moeserve.models.loader import resolve_model_path

    try:
        config = LoadConfig(requests=requests, concurrency=concurrency, request_rate=request_rate,
                            prompt_chars_median=prompt_chars, max_tokens_median=max_tokens, ignore_eos=ignore_eos,
                            malformed=malformed, warmup=warmup, warmup_wave=warmup_wave, seed=seed)
        kinds = [k.strip() for k in launch.split(",") if k.strip()] if launch else []
        if not url and not kinds:
            raise MoeserveError("give --url of a running server, or --launch moeserve[,transformers]")
        if rounds < 1:
            raise MoeserveError(f"--rounds must be >= 1, got {rounds}")
        specs = make_prompts(default_text_files(corpus), config, config.warmup_total + config.requests)
        runs: dict[str, list[dict]] = {}
        model_path = resolve_model_path(model)
        for _ in range(rounds):  # alternate the servers, so drifting machine load hits all of them alike
            for target in url or []:
                name = model_name
                if name is None:
                    listed = httpx.get(target.rstrip("/") + "/v1/models", timeout=30).json()
                    name = listed["data"][0]["id"]
                runs.setdefault(target, []).append(asyncio.run(run_load(target, name, specs, config)))
            for kind in kinds:
                if not as_json:
                    console.print(f"[dim]starting {kind} server ...[/]")
                with launch_server(kind, model_path, threads) as server:
                    runs.setdefault(kind, []).append(asyncio.run(run_load(server.url, server.model_name, specs, config)))
    except (MoeserveError, ValueError, httpx.HTTPError) as error:
        _fail(error)
        return
    results = {name: median_run(server_runs) for name, server_runs in runs.items()}
    names = list(results)
    ratios = {name: ratios_to(results[names[0]], result) for name, result in results.items()}

    def table():
        from rich.console import Group
        from rich.table import Table

        rows = [report_row(name, result) for name, result in results.items()]
        grid = Table(title=f"bench serve: {requests} requests, concurrency {concurrency}"
                     + (f", {request_rate}/s" if request_rate else "") + " (latencies in ms)")
        for column in rows[0]:
            grid.add_column(column, justify="left" if column == "server" else "right")
        for row in rows:
            grid.add_row(*[f"{v:.1f}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in row.values()])
        lines = []
        for name, result in results.items():
            rss = result["server_rss_bytes"]
            growth = f"{rss['growth_fraction'] * 100:+.1f}%" if rss["growth_fraction"] is not None else "n/a"
            ratio = ratios[name]["output_throughput"]
            lines.append(
                f"{name}: 5xx {result['server_errors_5xx']}, errors {result['errors_by_status'] or 0}, malformed 4xx "
                f"{result['malformed']['answered_4xx']}/{result['malformed']['sent']}, /health failures "
                f"{result['health_checks']['failed']}/{result['health_checks']['count']}, server RSS growth {growth}"
                + (f", throughput x{ratio:.2f} of {names[0]}" if ratio is not None and name != names[0] else "")
            )
        return Group(grid, *lines)

    _emit(as_json, lambda: {"config": {**config.__dict__}, "results": results, "ratios_to_first": ratios}, table)


@app.command("placement")
def placement(
    trace: Annotated[Path, typer.Option("--trace", help="A moeserve-trace/1 file whose routing predicts expert loads.")],
    ranks: Annotated[int, typer.Option("--ranks", help="Expert-parallel ranks (processes or GPUs).")],
    replicas: Annotated[int, typer.Option("--replicas", help="Extra physical slots for replicas of hot experts (EPLB-style).")] = 0,
    train_fraction: Annotated[float, typer.Option(help="Share of sequences the plan is fitted on; the rest measures it.")] = 0.5,
    step_tokens: Annotated[int, typer.Option(help="Tokens per step when replaying held-out routing (replica queues reset each step).")] = 256,
    anticorrelation: Annotated[bool, typer.Option(help="Refine so experts that fire together sit on different ranks.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Place experts on ranks: greedy balance, anti-correlation, hot-expert replication; balancedness per layer."""
    from moeserve.placement.balance import plan_placement
    from moeserve.placement.report import placement_report, render_placement_table
    from moeserve.traces.format import load_trace

    try:
        plan = plan_placement(
            load_trace(trace), num_ranks=ranks, num_replicas=replicas, anticorrelation=anticorrelation,
            train_fraction=train_fraction, step_tokens=step_tokens,
        )
    except (MoeserveError, ValueError) as error:
        _fail(error)
        return
    _emit(as_json, lambda: placement_report(plan), lambda: render_placement_table(plan))


@predict_app.command("eval")
def predict_eval(
    trace: Annotated[Path, typer.Option("--trace", help="A moeserve-trace/1 file.")],
    train_fraction: Annotated[float, typer.Option(help="Share of sequences used to calibrate; the rest is held out.")] = 0.5,
    window: Annotated[int, typer.Option(help="Tokens per prediction window (predict, then update).")] = 64,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Also show every layer.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Held-out log-likelihood, top-k recall and load-forecast error of every predictor on a trace."""
    from moeserve.predict.evaluate import evaluate_predictors
    from moeserve.traces.format import load_trace

    try:
        evaluation = evaluate_predictors(load_trace(trace), train_fraction=train_fraction, window=window)
    except (MoeserveError, ValueError) as error:
        _fail(error)
        return
    _emit(as_json, lambda: evaluation.to_dict(), lambda: evaluation.render_table(per_layer=per_layer))


@bench_app.command("offload")
def bench_offload(
    model: ModelArg = None,
    expert_memory: Annotated[str, typer.Option(help="Comma-separated budgets: fractions (25%) or sizes (2GiB).")] = "25%,50%,75%",
    policies: Annotated[str, typer.Option(help="Comma-separated online eviction policies.")] = "lru,lfu,lrfu",
    prefetch: Annotated[bool, typer.Option("--prefetch", help="Prefetch the next layer's experts.")] = False,
    committee: Annotated[bool, typer.Option("--committee", help="Also run a parameter committee sized to each budget (lossy), calibrated on the stdlib training split.")] = False,
    committee_warm_in: Annotated[bool, typer.Option("--committee-warm-in", help="With --committee: also a row whose members warm in from the cold cache on the background loader while tokens use those resident (generate/serve --committee-warm-in).")] = False,
    calibration_tokens: Annotated[int, typer.Option(help="Committee calibration tokens.")] = 8192,
    large: Annotated[Path | None, typer.Option("--large", help="Use (building it there first if missing) a random-weight Mixtral whose experts take 5.6 GB; overrides MODEL.")] = None,
    new_tokens: Annotated[int, typer.Option(help="Tokens per generation.")] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy; above 0: sampled with a fixed seed (every run draws the same numbers).")] = 0.0,
    cold_reads: Annotated[bool, typer.Option("--cold-reads", help="Ask the kernel to drop the checkpoint's pages from the page cache before the run and after each expert read (posix_fadvise DONTNEED), so loads go to the disk as where a model does not fit RAM. Advisory (a file system or another process may keep them).")] = False,
    committee_swaps: Annotated[int, typer.Option(help="With --committee: run the online scheduler, up to N asynchronous member swaps per layer per step; 0: the calibrated members stay.")] = 0,
    warmup_tokens: Annotated[int, typer.Option(help="Before each row's timed generation, generate this many tokens from another prompt and count only what follows (a warm cache, as in a server that has served requests); 0: cold start.")] = 0,
    device: Annotated[str, typer.Option(help=DEVICE_HELP + " The resident baseline then runs its own backend (grouped_mm), so 'identical' may differ by rounding.")] = "cpu",
    host_memory: Annotated[str | None, typer.Option(help="Give the policy rows' caches a host tier this big (as generate's --host-memory: a fraction of all experts' bytes as stored, 100%, or a size); pinned memory on cuda, a second RAM tier on cpu. Default: none.")] = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generation under expert-memory budgets vs all experts resident: tokens/s, bytes, hit rate vs Belady, stalls."""
    from moeserve.bench.offload import render_table, run_offload_bench
    from moeserve.env import apply_thread_count

    try:
        apply_thread_count(threads)
        if host_memory is not None:
            _check_host_memory(host_memory)
        if large is not None:
            from moeserve.models.random_init import build_large_random_model

            with console.status(f"building the 5.6 GB random model in {large} (once)"):
                model = build_large_random_model(large)
        result = run_offload_bench(
            model,
            [b.strip() for b in expert_memory.split(",") if b.strip()],
            [p.strip() for p in policies.split(",") if p.strip()],
            prefetch=prefetch,
            new_tokens=new_tokens,
            committee=committee,
            calibration_tokens=calibration_tokens,
            cold_reads=cold_reads,
            temperature=temperature,
            warmup_tokens=warmup_tokens,
            committee_swaps=committee_swaps,
            device=device,
            host_memory=host_memory,
            committee_warm_in=committee_warm_in,
        )
    except (MoeserveError, ValueError, KeyError) as error:
        _fail(error)
        return
    _emit(as_json, lambda: result.to_dict(), lambda: render_table(result))


@serverless_app.command("plan")
def serverless_plan(
    trace: Annotated[Path, typer.Option("--trace", help="A moeserve-trace/1 file whose routing drives the expert-load forecast.")],
    throughput: Annotated[float, typer.Option("--throughput", help="Required throughput, tokens/s.")],
    model: Annotated[Path | None, typer.Argument(help="A HF checkpoint folder whose expert shape to plan for (instead of --shape).")] = None,
    shape: Annotated[str | None, typer.Option(help="Expert shape: tiny-moe (the reference model, the default) or a published one (deepseek-v2-lite, mixtral-8x7b).")] = None,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per batch sent through the MoE layers.")] = 256,
    trials: Annotated[int, typer.Option(help="Optimiser trials.")] = 200,
    max_throughput_loss: Annotated[float | None, typer.Option(help="Also require throughput within this fraction of the LambdaML-style design.")] = 0.15,
    calibrate_here: Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="Use the deployed handler's calibration on this machine (timed at the shape once, then cached) instead of the built-in default.")] = True,
    calibration: Annotated[Path, typer.Option("--calibration", help="Calibration cache (JSON keyed by device and shape); shared with `serverless run`.")] = Path("runs/serverless/calibration.json"),
    recalibrate: Annotated[bool, typer.Option("--recalibrate", help="Time the handler again and replace the cached calibration.")] = False,
    seed: Annotated[int, typer.Option(help="Optimiser seed.")] = 0,
    wire_dtype: Annotated[str, typer.Option("--wire-dtype", help="Dtype token rows travel in: float32 (exact, default), or float16 / bfloat16 (half the bytes, lossy: activations are rounded). Baselines stay float32.")] = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Cheapest Lambda plan for the expert layers, next to a CPU cluster and a LambdaML-style design (modelled)."""
    from moeserve.serverless.optimize import plan_deployment
    from moeserve.serverless.perf import cached_calibration
    from moeserve.serverless.plan import CostModel
    from moeserve.serverless.plan import render_table as render_plan_table
    from moeserve.serverless.shapes import checkpoint_shape, shape_by_name
    from moeserve.traces.format import load_trace

    try:
        if model is not None and shape is not None:
            raise MoeserveError("give a checkpoint folder or --shape, not both")
        expert_shape = checkpoint_shape(model) if model is not None else shape_by_name(shape or "tiny-moe")
        cost_model = (
            CostModel(calibration=cached_calibration(expert_shape, calibration, recalibrate)) if calibrate_here else CostModel()
        )
        plan_model = cost_model
        if wire_dtype != "float32" and calibrate_here:
            plan_model = CostModel(calibration=cached_calibration(expert_shape, calibration, recalibrate, wire_dtype))
        report = plan_deployment(
            load_trace(trace), expert_shape, throughput, batch_tokens=batch_tokens, model=plan_model, trials=trials,
            seed=seed, max_throughput_loss_vs_lambdaml=max_throughput_loss, wire_dtype=wire_dtype,
            baseline_model=cost_model,
        )
    except (MoeserveError, ValueError, KeyError) as error:
        _fail(error)
        return
    payload = report.to_dict()
    if as_json:
        print(json.dumps(payload))
    else:
        plan = payload["plan"]
        console.print(render_plan_table(report.search.evaluation))
        console.print(
            f"modelled: saving vs CPU cluster {payload['saving_vs_cpu_cluster']:.1%}, vs LambdaML-style "
            f"{payload['saving_vs_lambdaml']:.1%}, throughput loss vs LambdaML-style {payload['throughput_loss_vs_lambdaml']:.1%}"
            f" (plan found by: {plan['best_found_by']})"
        )
    violations = report.search.evaluation.violations
    if violations:
        # The best plan found (printed above) breaks a constraint: the target cannot be met.
        shown = "; ".join(violations[:3]) + (f"; and {len(violations) - 3} more" if len(violations) > 3 else "")
        raised = report.workload.throughput_tokens_per_s
        if raised > throughput:
            shown += (f" (the {throughput:g} tokens/s asked for was raised to {raised:.1f} by --max-throughput-loss "
                      f"{max_throughput_loss:g}: within that of the LambdaML-style design's throughput; pass a larger one)")
        _fail(MoeserveError(f"no feasible plan for this target; the best one found breaks: {shown}"))


@serverless_app.command("export")
def serverless_export(
    plan: Annotated[Path, typer.Argument(help="Plan JSON (the output of `serverless plan --json`, or a saved plan file).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for template.yaml, the handler package and README.md.")],
    model: Annotated[Path | None, typer.Option("--model", help="Also write this checkpoint's expert weights (read one function's experts at a time).")] = None,
    weights_seed: Annotated[int | None, typer.Option(help="Also write random expert weights of the plan's shape (seeded) for a test deployment.")] = None,
    bundle_weights: Annotated[bool, typer.Option(help="Put the weights inside the function package instead of an S3 bucket.")] = False,
    timeout: Annotated[int, typer.Option(help="Function timeout in seconds (<= 900).")] = 60,
    reserve_concurrency: Annotated[bool, typer.Option(help="Reserve each function's replica count of concurrency.")] = False,
    arch: Annotated[str | None, typer.Option(help="x86_64 or arm64 (default: the plan's).")] = None,
) -> None:
    """Write an AWS SAM template and handler package for a plan. Nothing is deployed."""
    from moeserve.serverless.export import export_plan, load_plan_json, synthetic_expert_weights

    try:
        plan_file = load_plan_json(plan)
        weights: Any = None
        if model is not None and weights_seed is not None:
            raise MoeserveError("give --model or --weights-seed, not both")
        if model is not None:
            from moeserve.serverless.shapes import checkpoint_shape, shape_mismatch
            from moeserve.serverless.weights import CheckpointWeights

            found = checkpoint_shape(model)
            mismatch = shape_mismatch(plan_file.shape, found, model) if plan_file.shape is not None else None
            if mismatch or len(plan_file.plan.layers) > found.num_layers:
                raise MoeserveError(mismatch or f"the plan has {len(plan_file.plan.layers)} MoE layers, {model} {found.num_layers}")
            weights = CheckpointWeights(model)
        if weights_seed is not None:
            if plan_file.shape is None:
                raise MoeserveError(f"{plan}: the plan records no expert shape; cannot make weights for it")
            weights = synthetic_expert_weights(plan_file.shape, weights_seed)
        result = export_plan(plan_file, out, weights, architecture=arch, timeout_s=timeout,
                             bundle_weights=bundle_weights, reserve_concurrency=reserve_concurrency)
    except (MoeserveError, ValueError, OSError) as error:
        _fail(error)
        return
    console.print(f"wrote {result.template} ({len(result.function_ids)} functions) and {result.package_dir}; "
                  f"see {result.readme} to deploy")


@serverless_app.command("run")
def serverless_run(
    plan: Annotated[Path, typer.Argument(help="Plan JSON (the output of `serverless plan --json`, or a saved plan file).")],
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint whose experts (and, without --trace, routing) to use. Default: the reference model for a tiny-moe plan, else random weights of the plan's shapes.")] = None,
    trace: Annotated[Path | None, typer.Option("--trace", help="A moeserve-trace/1 file whose routing the gate replays (inputs random).")] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help="Tokens to replay (default: 4 batches).")] = None,
    layers: Annotated[int | None, typer.Option("--layers", help="Run only the plan's first N MoE layers (host memory).")] = None,
    batch_tokens: Annotated[int | None, typer.Option(help="Tokens per batch (default: the plan's).")] = None,
    timeout: Annotated[float, typer.Option(help="Invocation timeout in seconds (<= 900).")] = 60.0,
    concurrency: Annotated[int | None, typer.Option(help="Concurrent invocations allowed (default: the account limit in the price file).")] = None,
    host_slots: Annotated[int | None, typer.Option(help="Invocations computing at once on this host, so emulated functions do not time-slice its cores (default: the cores available; 0: no limit).")] = None,
    network: Annotated[str, typer.Option(help="modelled (the gate waits the cost model's transfer times) or none.")] = "modelled",
    calibrate_here: Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="Predict with the cached calibration of this machine, as `serverless plan` does (else the plan's recorded calibration).")] = True,
    calibration: Annotated[Path, typer.Option("--calibration", help="Calibration cache (JSON keyed by device and shape); shared with `serverless plan`.")] = Path("runs/serverless/calibration.json"),
    recalibrate: Annotated[bool, typer.Option("--recalibrate", help="Time the handler again and replace the cached calibration.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of random inputs and weights.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Run a plan on local worker processes emulating Lambda; measured bill and throughput vs the cost model."""
    from moeserve.serverless.emulator import EmulatorConfig, emulate_plan

    try:
        config = EmulatorConfig(timeout_s=timeout, concurrency_limit=concurrency, network=network, host_slots=host_slots)
        report = emulate_plan(plan, model, trace, tokens=tokens, layers=layers, batch_tokens=batch_tokens,
                              config=config, calibrate_here=calibrate_here, seed=seed,
                              calibration_path=calibration, recalibrate=recalibrate)
    except (MoeserveError, ValueError, KeyError, OSError) as error:
        _fail(error)
        return
    _emit(as_json, lambda: report.to_dict(), lambda: report.render_table())
    if not as_json:
        for note in report.notes():
            console.print(f"[dim]- {note}[/]")


def _committee_tokens(model, text: Path | None, held_out: bool, max_tokens: int):
    """Tokens of ``text``, or of the reference model's stdlib split (train or held-out) when None."""
    import torch

    from moeserve.models.reference import reference_split_tokens

    if model.tokenizer is None:
        raise MoeserveError(f"{model.path} has no tokenizer; cannot tokenize text")
    if text is None:
        return reference_split_tokens(model.tokenizer, held_out=held_out, max_tokens=max_tokens)
    if not text.is_file():
        raise MoeserveError(f"{text}: no such file")
    ids = model.tokenizer(text.read_text(encoding="utf-8", errors="replace"))["input_ids"][: max_tokens + 1]
    if len(ids) < 2:
        raise MoeserveError(f"{text}: fewer than 2 tokens")
    return torch.tensor(ids)


@committee_app.command("plan")
def committee_plan(
    out: Annotated[Path, typer.Option("--out", help="Plan JSON to write.")],
    budget: Annotated[float, typer.Option(help="Share of all experts kept as committee members (0-1].")] = 0.5,
    calibration: Annotated[Path | None, typer.Option(help="Calibration text (default: the stdlib training split).")] = None,
    tokens: Annotated[int, typer.Option(help="Calibration tokens.")] = 16384,
    model: ModelArg = None,
) -> None:
    """Profile expert gate mass on calibration text and size each layer's committee under the budget."""
    from moeserve.memory.committee import plan_committee
    from moeserve.models.loader import load_model

    try:
        moe_model = load_model(model)
        plan = plan_committee(moe_model, _committee_tokens(moe_model, calibration, False, tokens), budget)
        plan.save(out)
    except (MoeserveError, ValueError) as error:
        _fail(error)
        return
    console.print(f"wrote {out}: {plan.total_members} of {plan.num_layers * plan.num_experts} experts, "
                  f"members per layer {[len(m) for m in plan.members]}")


@committee_app.command("eval")
def committee_eval(
    plan: Annotated[Path, typer.Option("--plan", help="Plan JSON from `committee plan`.")],
    text: Annotated[Path | None, typer.Option(help="Evaluation text (default: the stdlib held-out split).")] = None,
    tokens: Annotated[int, typer.Option(help="Evaluation tokens.")] = 16384,
    skip_threshold: Annotated[float, typer.Option(help="Skip (compute nothing for) routed slots whose gate weight, after the committee's renormalisation, is below this.")] = 0.0,
    model: ModelArg = None,
    as_json: JsonOpt = False,
) -> None:
    """Next-token accuracy and perplexity with the committee vs the full model, gate mass served exactly,
    and the evaluation's tokens/s with and without the committee (prefill windows, one process)."""
    from moeserve.memory.committee import CommitteePlan, apply_committee, remove_committee
    from moeserve.models.evaluate import evaluate_tokens
    from moeserve.models.loader import load_model

    try:
        moe_model = load_model(model)
        committee = CommitteePlan.load(plan, moe_model)
        token_ids = _committee_tokens(moe_model, text, True, tokens)
        started = time.perf_counter()
        full, _ = evaluate_tokens(moe_model, token_ids, max_tokens=tokens)
        full_s = time.perf_counter() - started
        gate = apply_committee(moe_model, committee.members_by_layer(), skip_threshold=skip_threshold)
        try:
            started = time.perf_counter()
            lossy, _ = evaluate_tokens(moe_model, token_ids, max_tokens=tokens)
            committee_s = time.perf_counter() - started
            telemetry = gate.telemetry()
        finally:
            remove_committee(moe_model, gate)
        started = time.perf_counter()  # the full model again: the two timings bracket the committee's
        evaluate_tokens(moe_model, token_ids, max_tokens=tokens)
        full_s = (full_s + time.perf_counter() - started) / 2
    except (MoeserveError, ValueError) as error:
        _fail(error)
        return
    payload = {
        "plan": str(plan),
        "budget_fraction": committee.budget_fraction,
        "tokens": full.tokens,
        "full": full.to_dict(),
        "committee": lossy.to_dict(),
        "accuracy_change_pp": 100 * (lossy.accuracy - full.accuracy),
        "perplexity_change": lossy.perplexity / full.perplexity - 1,
        "served_exactly": telemetry["served_exactly"],
        "skipped_slots": sum(layer["skipped_slots"] for layer in telemetry["layers"].values()),
        "full_tokens_per_s": full.tokens / full_s,
        "committee_tokens_per_s": lossy.tokens / committee_s,
    }
    if as_json:
        print(json.dumps(payload))
        return
    console.print(
        f"{full.tokens} tokens: accuracy {full.accuracy:.4f} -> {lossy.accuracy:.4f} "
        f"({payload['accuracy_change_pp']:+.2f} pp), perplexity {full.perplexity:.2f} -> {lossy.perplexity:.2f}, "
        f"gate mass served exactly {telemetry['served_exactly']:.4f}; {payload['skipped_slots']} slots skipped; "
        f"{payload['committee_tokens_per_s']:.0f} vs {payload['full_tokens_per_s']:.0f} tokens/s (full model, "
        f"timed before and after)"
    )


@bench_app.command("ep")
def bench_ep(
    trace: Annotated[Path | None, typer.Option("--trace", help="Replay this moeserve-trace/1 file's routing through random-weight experts (e.g. ../shared/traces/deepseek-v2-lite-puffin-a.npz).")] = None,
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint to serve when no --trace (default: the reference model).")] = None,
    expert_parallel: Annotated[int, typer.Option("--expert-parallel", help="Processes in all: 1 attention worker + N-1 expert workers (gloo on CPU).")] = 2,
    mode: Annotated[str, typer.Option(help="sync (barrier all-to-all per layer), async (mu-queues + layer scheduler) or both (same processes, one after the other).")] = "both",
    requests: Annotated[int, typer.Option(help="Requests decoded together.")] = 32,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens per request.")] = 16,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens generated per request.")] = 16,
    micro_batches: Annotated[int, typer.Option(help="async: micro-batches the requests are split into.")] = 2,
    scheduler: Annotated[str, typer.Option(help="async layer scheduler: defrag, flfs, max-batch.")] = "defrag",
    hold_tokens_per_expert: Annotated[float, typer.Option(help="async: hold a layer until it has this many rows per held expert ...")] = 0.0,
    flush_after_ms: Annotated[float, typer.Option(help="async: ... or its oldest entry waited this long (ms).")] = 2.0,
    rounds: Annotated[int, typer.Option(help="Runs of each mode per launch, alternating sync and async.")] = 3,
    repeats: Annotated[int, typer.Option(help="Launches; figures are medians over all their rounds.")] = 2,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Real expert parallelism over local processes: sync vs async throughput, latency, barrier wait, mu-queues."""
    from moeserve.bench.ep import render_table, run_ep_bench
    from moeserve.env import read_environment
    from moeserve.ep.config import MODES, EPConfig

    if mode not in (*MODES, "both"):
        _fail(MoeserveError(f"--mode must be sync, async or both, got {mode!r}"))
    if trace is not None and model is not None:
        _fail(MoeserveError("give --trace or --model, not both"))
    if trace is not None and not trace.is_file():
        _fail(MoeserveError(f"{trace}: no such file"))
    try:
        chosen_threads = threads if threads is not None else (read_environment().num_threads or 1)
        config = EPConfig(
            processes=expert_parallel,
            modes=MODES if mode == "both" else (mode,),
            model=None if model is None else str(model),
            trace=None if trace is None else str(trace),
            requests=requests,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            micro_batches=micro_batches,
            rounds=rounds,
            scheduler=scheduler,
            hold_tokens_per_expert=hold_tokens_per_expert,
            flush_after_s=flush_after_ms / 1e3,
            threads=chosen_threads,
        )
        result = run_ep_bench(config, repeats)
    except (MoeserveError, ValueError, KeyError) as error:
        _fail(error)
        return
    _emit(as_json, lambda: result.to_dict(), lambda: render_table(result))


@simulate_app.command("ep")
def simulate_ep(
    trace: Annotated[Path, typer.Option("--trace", help="A moeserve-trace/1 file whose routing the simulated workers replay.")],
    attention_workers: Annotated[int, typer.Option(help="Attention workers (embeddings, attention, router, KV cache).")] = 8,
    expert_workers: Annotated[int, typer.Option(help="Expert workers.")] = 8,
    mode: Annotated[str, typer.Option(help="sync (barrier all-to-all per layer) or async (mu-queues + layer scheduler).")] = "async",
    scheduler: Annotated[str, typer.Option(help="Async layer scheduler: defrag, flfs, max-batch.")] = "defrag",
    passes: Annotated[int, typer.Option(help="Decode-only workload: forward passes every in-flight token makes.")] = 4,
    tokens_per_attention_worker: Annotated[int, typer.Option(help="Decode-only workload: in-flight tokens per attention worker.")] = 256,
    requests: Annotated[int, typer.Option(help="Requests with a prefill then decode steps, as `moeserve bench ep` runs them (0: the decode-only workload).")] = 0,
    prompt_tokens: Annotated[int, typer.Option(help="With --requests: prompt tokens per request.")] = 16,
    new_tokens: Annotated[int, typer.Option(help="With --requests: generated tokens per request.")] = 16,
    micro_batches: Annotated[int, typer.Option(help="async: micro-batches per attention worker.")] = 4,
    hold_tokens_per_expert: Annotated[float, typer.Option(help="async: a layer runs once it holds this many rows per held expert ...")] = 32.0,
    flush_after_ms: Annotated[float, typer.Option(help="async: ... or its oldest entry waited this long (ms).")] = 0.02,
    cores: Annotated[int | None, typer.Option(help="Processors all workers share (0: one each). Default: the calibration's measured effective cores with --costs/--calibrate, else 0.")] = None,
    costs_file: Annotated[Path | None, typer.Option("--costs", help="A moeserve-sim-costs/1 JSON file (from --save-costs) to use instead of the GPU-class defaults.")] = None,
    calibrate_here: Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="Measure the costs on this machine now (expert backend, attention-side layer, thread hand-off, gloo messages and the sync exchange among 1 + expert-workers processes, as bench ep runs them; processors left to us).")] = False,
    save_costs: Annotated[Path | None, typer.Option("--save-costs", help="With --calibrate: write the measured costs here.")] = None,
    hidden_size: Annotated[int, typer.Option(help="--calibrate: hidden size D of the measured experts (bench ep's synthetic model: 128).")] = 128,
    intermediate_size: Annotated[int, typer.Option(help="--calibrate: expert intermediate size I (bench ep's synthetic model: 160).")] = 160,
    calibrate_device: Annotated[str, typer.Option("--device", help="--calibrate: time the expert and attention-side calls on cpu or cuda (on cuda the message costs stay the GPU-class defaults and each worker has its own device).")] = "cpu",
    calibrate_dtype: Annotated[str, typer.Option("--dtype", help="--calibrate: float32 (bench ep's) or bfloat16 experts and activations.")] = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Simulated expert parallelism: throughput and latency of sync vs async on real routing (simulator figures)."""
    from dataclasses import asdict

    from moeserve.sim.calibrate import CalibrationShape, calibrate_costs, load_calibration, save_calibration
    from moeserve.sim.ep import EPSimConfig, RequestWorkload, SimCosts, simulate_trace
    from moeserve.traces.format import load_trace

    if calibrate_here and costs_file is not None:
        _fail(MoeserveError("give --calibrate or --costs, not both"))
    try:
        loaded = load_trace(trace)
        costs = SimCosts()
        source = "assumed GPU-class defaults"
        measured_cores = 0
        if costs_file is not None:
            loaded_calibration = load_calibration(costs_file)
            costs, measured_cores = loaded_calibration.costs, loaded_calibration.effective_cores
            source = str(costs_file)
        elif calibrate_here:
            shape = CalibrationShape(
                hidden=hidden_size,
                intermediate=intermediate_size,
                experts_per_worker=-(-loaded.meta.num_experts // expert_workers),
                top_k=loaded.meta.top_k,
                processes=1 + expert_workers,  # as bench ep runs them: one attention rank
                layers=loaded.num_layers,
                device=calibrate_device,
                dtype=calibrate_dtype,
            )
            if requests:  # time the sizes this workload's calls have, not only the small default grid
                shape = shape.covering(requests, prompt_tokens, attention_workers, expert_workers, micro_batches)
            calibration = calibrate_costs(shape)
            if save_costs is not None:
                save_calibration(calibration, save_costs)
            costs, measured_cores = calibration.costs, calibration.effective_cores
            source = "measured now" if shape.device == "cpu" else (
                f"expert and attention calls measured now on {calibration.machine} ({shape.dtype}); "
                "messages and the sync exchange: GPU-class defaults"
            )
        elif calibrate_device != "cpu" or calibrate_dtype != "float32":
            raise MoeserveError("--device and --dtype apply to --calibrate")
        workload = (
            RequestWorkload(requests=requests, prompt_tokens=prompt_tokens, new_tokens=new_tokens) if requests else None
        )
        config = EPSimConfig(attention_workers=attention_workers, expert_workers=expert_workers, mode=mode,
                             scheduler=scheduler, passes=passes, tokens_per_attention_worker=tokens_per_attention_worker,
                             micro_batches_per_worker=micro_batches, hold_tokens_per_expert=hold_tokens_per_expert,
                             flush_after_s=flush_after_ms / 1e3, workload=workload,
                             cores=measured_cores if cores is None else cores)
        result = simulate_trace(loaded, config, costs)
    except (MoeserveError, ValueError, KeyError, OSError) as error:
        _fail(error)
        return
    document = {**result.to_dict(), "costs": {**asdict(costs), "measured": list(costs.measured)}, "costs_source": source}
    _emit(as_json, lambda: document, lambda: result.render_table() + f"\ncosts: {source} (simulator figures)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
