"""The ``moeserve`` command line. Thin: parses options, builds configs, calls the library.

Heavy imports (torch, transformers) happen inside commands so ``--help`` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

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
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True)

ModelArg = Annotated[
    Path | None, typer.Argument(help="HF-format model folder (config.json, *.safetensors, tokenizer). Default: the reference model.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts instead of tables.")]


def _fail(error: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code=2)


def _moe_config(gating: str, capacity_factor: float, backend: str):
    from moeserve.config import MoEConfig

    try:
        return MoEConfig(gating=gating, capacity_factor=capacity_factor, backend=backend)
    except ValueError as error:
        _fail(error)


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
    backend: Annotated[str, typer.Option(help="Experts backend: auto, loop, grouped_mm.")] = "auto",
    routing: Annotated[bool, typer.Option("--routing", help="Also print per-layer routing facts of this run.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate text, streaming tokens to the terminal; reports tokens/s and time to first token."""
    from moeserve.config import SamplingConfig
    from moeserve.engine.generate import generate as run_generate
    from moeserve.models.loader import load_model
    from moeserve.traces.record import RoutingRecorder
    from moeserve.traces.stats import trace_stats

    try:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        moe_model = load_model(model, moe=_moe_config(gating, capacity_factor, backend))
        recorder = RoutingRecorder(moe_model) if routing or as_json else None
        if not as_json:
            console.print(f"[dim]{moe_model.name} ({moe_model.family.model_type}, {len(moe_model.layers)} MoE layers, "
                          f"{moe_model.num_experts} experts, top-{moe_model.top_k})[/]")
            sys.stdout.write(prompt)
            sys.stdout.flush()

        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        with recorder if recorder is not None else _null():
            result = run_generate(moe_model, prompt, sampling, on_text=None if as_json else stream)
    except (MoeserveError, ValueError) as error:
        _fail(error)
        return
    stats = trace_stats(recorder.trace()) if recorder is not None else None
    if as_json:
        payload = result.to_dict()
        payload["model"] = str(moe_model.path)
        if stats is not None:
            payload["routing"] = stats.to_dict()
        print(json.dumps(payload))
        return
    sys.stdout.write("\n")
    console.print(
        f"[bold]{result.new_tokens} tokens[/] in {result.seconds:.2f} s: {result.tokens_per_s:.1f} tokens/s "
        f"(decode {result.decode_tokens_per_s:.1f} tokens/s), time to first token {result.time_to_first_token_s * 1000:.1f} ms"
    )
    if stats is not None:
        from moeserve.traces.stats import render_stats_table

        console.print(render_stats_table(stats))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    app()


if __name__ == "__main__":
    main()
