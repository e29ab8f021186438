"""Export a serverless plan as an AWS SAM application (template + handler package). Nothing is deployed.

Plan files: :func:`save_plan_json` writes, and :func:`load_plan_json` reads, JSON holding a
plan; the reader also accepts the output of ``moeserve serverless plan --json`` (a
``DeploymentReport.to_dict()``: the best plan is at ``["plan"]["plan"]``), a
``SearchResult.to_dict()`` and a bare ``DeploymentPlan.to_dict()``. The shape and
architecture are kept when the JSON has them.

:func:`export_plan` writes into ``out_dir``:

* ``template.yaml``: a SAM template (``Transform: AWS::Serverless-2016-10-31``) written as
  JSON, which is valid YAML without custom tags (intrinsics in their long ``{"Ref": ...}``
  form). One ``AWS::Serverless::Function`` per function of every layer, logical id
  ``Layer{l}Function{g}``, with the plan's memory, a timeout, the architecture, runtime
  python3.12, handler ``handler.lambda_handler``, ``CodeUri: package/`` and environment
  variables naming the layer, function and expert ids (``handler_template`` documents them);
  a ``WeightsBucket`` (unless weights are bundled into the package) and, if any layer uses
  the object-store channel, an ``ExchangeBucket`` whose objects expire after a day; Outputs
  with every function's ARN and the bucket names;
* ``package/``: ``handler.py`` (the source of :mod:`moeserve.serverless.handler_template`)
  and ``requirements.txt`` (numpy), plus ``weights/`` when bundled;
* ``weights/layer{l}/function{g}.npz`` when expert weights are given and not bundled (to be
  uploaded to the weights bucket under the same keys);
* ``routing.json``: per layer its micro-batches, channel and functions (logical id, experts,
  replicas), for the gate that invokes them;
* ``README.md``: how to build and deploy (``sam build`` then ``sam deploy --guided``).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeserve.serverless import handler_template
from moeserve.serverless.optimize import DeploymentReport, SearchResult
from moeserve.serverless.perf import CHANNELS
from moeserve.serverless.plan import DeploymentPlan, FunctionPlan, LayerPlan
from moeserve.serverless.prices import ARCHITECTURES, default_prices
from moeserve.serverless.shapes import ExpertShape
from moeserve.serverless.weights import ExpertWeightsSource

PLAN_FORMAT = "moeserve-serverless-plan"
PLAN_FORMAT_VERSION = 1
RUNTIME = "python3.12"
HANDLER = "handler.lambda_handler"
PACKAGE_DIR = "package"
MAX_UNZIPPED_PACKAGE_MB = 250
"""Lambda's limit on a function's unzipped deployment package."""
NUMPY_RESERVE_MB = 80
"""Room left for numpy in the package when weights are bundled."""
UNRESERVED_CONCURRENCY = 100
"""Lambda keeps this many of an account's concurrent executions unreserved."""


@dataclass(frozen=True)
class PlanFile:
    """A plan as read from JSON, with the shape and architecture when the JSON named them."""

    plan: DeploymentPlan
    shape: ExpertShape | None = None
    architecture: str = "x86_64"


@dataclass(frozen=True)
class LayerExpertWeights:
    """All E experts of one layer: gate/up float [E, I, D], down float [E, D, I] (SiLU-gated MLPs)."""

    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray

    def __post_init__(self) -> None:
        if self.gate.ndim != 3 or self.up.shape != self.gate.shape:
            raise ValueError(f"gate and up must both be [E, I, D], got {self.gate.shape} and {self.up.shape}")
        experts, intermediate, hidden = self.gate.shape
        if self.down.shape != (experts, hidden, intermediate):
            raise ValueError(f"down must be [{experts}, {hidden}, {intermediate}], got {self.down.shape}")


def synthetic_expert_weights(shape: ExpertShape, seed: int = 0) -> list[LayerExpertWeights]:
    """Random float32 weights for every layer of ``shape`` (scaled 1/sqrt(fan-in)); for tests and demos."""
    rng = np.random.default_rng(seed)
    d, i, e = shape.hidden_size, shape.intermediate_size, shape.num_experts
    return [
        LayerExpertWeights(
            gate=(rng.standard_normal((e, i, d)) / math.sqrt(d)).astype(np.float32),
            up=(rng.standard_normal((e, i, d)) / math.sqrt(d)).astype(np.float32),
            down=(rng.standard_normal((e, d, i)) / math.sqrt(i)).astype(np.float32),
        )
        for _ in range(shape.num_layers)
    ]


# -- plan files ----------------------------------------------------------------------------------


def _plan_dict(source: DeploymentReport | SearchResult | DeploymentPlan | PlanFile) -> dict[str, Any]:
    if isinstance(source, DeploymentReport):
        return {
            "plan": source.search.plan.to_dict(),
            "shape": source.workload.shape.to_dict(),
            "architecture": source.model.architecture,
            "evaluation": source.search.evaluation.to_dict(),
        }
    if isinstance(source, SearchResult):
        return {"plan": source.plan.to_dict(), "evaluation": source.evaluation.to_dict()}
    if isinstance(source, PlanFile):
        out: dict[str, Any] = {"plan": source.plan.to_dict(), "architecture": source.architecture}
        if source.shape is not None:
            out["shape"] = source.shape.to_dict()
        return out
    return {"plan": source.to_dict()}


def save_plan_json(
    source: DeploymentReport | SearchResult | DeploymentPlan | PlanFile, path: str | Path
) -> Path:
    """Write ``{"format", "version", "plan", ["shape", "architecture", "evaluation"]}`` to ``path``; returns it."""
    path = Path(path)
    document = {"format": PLAN_FORMAT, "version": PLAN_FORMAT_VERSION, **_plan_dict(source)}
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def plan_from_dict(data: dict[str, Any]) -> DeploymentPlan:
    """Inverse of ``DeploymentPlan.to_dict()``; ``ValueError`` if malformed."""
    try:
        layers = tuple(
            LayerPlan(
                functions=tuple(
                    FunctionPlan(
                        tuple(int(e) for e in f["experts"]), int(f["memory_mb"]), int(f.get("replicas", 1))
                    )
                    for f in layer["functions"]
                ),
                micro_batches=int(layer["micro_batches"]),
                channel=str(layer["channel"]),
                wire_dtype=str(layer.get("wire_dtype", "float32")),
            )
            for layer in data["layers"]
        )
    except (KeyError, TypeError) as error:
        raise ValueError(f"malformed plan: {error!r}") from error
    if not layers:
        raise ValueError("plan has no layers")
    return DeploymentPlan(layers, str(data.get("found_by", "loaded")))


def plan_file_from_dict(data: dict[str, Any]) -> PlanFile:
    """A :class:`PlanFile` from any JSON form listed in the module docstring."""
    if "layers" in data:
        plan_data: Any = data
    else:
        plan_data = data.get("plan")
        # A report nests the search result (with its own "plan") under "plan".
        if isinstance(plan_data, dict) and "layers" not in plan_data:
            plan_data = plan_data.get("plan")
    if not isinstance(plan_data, dict):
        raise ValueError(
            "no plan found: expected a 'layers' list, or 'plan' holding one (possibly nested once)"
        )
    shape = None
    if isinstance(data.get("shape"), dict):
        fields = dict(data["shape"])
        fields.pop("expert_bytes", None)
        shape = ExpertShape(**fields)
    architecture = str(data.get("architecture", "x86_64"))
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    return PlanFile(plan_from_dict(plan_data), shape, architecture)


def load_plan_json(path: str | Path) -> PlanFile:
    """Read a plan file (any JSON form in the module docstring)."""
    return plan_file_from_dict(json.loads(Path(path).read_text()))


# -- export --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_plan` wrote (absolute paths)."""

    out_dir: Path
    template: Path
    package_dir: Path
    readme: Path
    routing: Path
    function_ids: tuple[str, ...]
    """Logical ids, ``Layer{l}Function{g}``, in plan order."""
    weight_files: tuple[Path, ...] = field(default=())
    object_store: bool = False
    """Whether any layer uses the object-store channel (the template then has an ExchangeBucket)."""


def function_id(layer: int, function: int) -> str:
    return f"Layer{layer}Function{function}"


def _weights_key(layer: int, function: int) -> str:
    return f"weights/layer{layer}/function{function}.npz"


def _check_plan(plan: DeploymentPlan, timeout_s: int, reserve_concurrency: bool) -> None:
    limits = default_prices().lambda_prices
    if not 1 <= timeout_s <= limits.timeout_s:
        raise ValueError(f"timeout_s must be in 1..{limits.timeout_s}, got {timeout_s}")
    for index, layer in enumerate(plan.layers):
        if layer.channel not in CHANNELS:
            raise ValueError(f"layer {index}: unknown channel {layer.channel!r}")
        for g, function in enumerate(layer.functions):
            if not limits.memory_min_mb <= function.memory_mb <= limits.memory_max_mb:
                raise ValueError(
                    f"layer {index} function {g}: memory {function.memory_mb} MB outside Lambda's "
                    f"{limits.memory_min_mb}..{limits.memory_max_mb} MB"
                )
    if reserve_concurrency:
        total = sum(f.replicas for layer in plan.layers for f in layer.functions)
        most = limits.default_concurrency - UNRESERVED_CONCURRENCY
        if total > most:
            raise ValueError(
                f"reserving {total} concurrent executions exceeds the {most} an account with the default "
                f"{limits.default_concurrency} limit can reserve; export without reserve_concurrency"
            )


def _write_weights(
    plan: DeploymentPlan, weights: Sequence[LayerExpertWeights] | ExpertWeightsSource, root: Path
) -> tuple[list[Path], dict[tuple[int, int], str]]:
    """Each function's ``.npz`` under ``root``, one function's experts in memory at a time."""
    if isinstance(weights, Sequence):
        if len(weights) != len(plan.layers):
            raise ValueError(f"expert_weights has {len(weights)} layers, the plan {len(plan.layers)}")
        weights = _LayerArrays(weights)
    files, keys = [], {}
    for index, layer in enumerate(plan.layers):
        for g, function in enumerate(layer.functions):
            function_weights = weights.function_weights(index, function.experts)
            key = _weights_key(index, g)
            target = root / key
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as handle:
                handler_template.save_weights(handle, function_weights)
            files.append(target)
            keys[(index, g)] = key
    return files, keys


class _LayerArrays:
    """:class:`LayerExpertWeights` per layer as an :class:`~moeserve.serverless.weights.ExpertWeightsSource`."""

    description = "expert weights given in memory"

    def __init__(self, layers: Sequence[LayerExpertWeights]) -> None:
        self.layers = layers

    def function_weights(self, layer: int, experts: Sequence[int]) -> handler_template.ExpertWeights:
        arrays = self.layers[layer]
        ids = np.array(experts, dtype=np.int64)
        if ids.max() >= arrays.gate.shape[0]:
            raise ValueError(f"layer {layer}: plan names expert {ids.max()}, weights hold {arrays.gate.shape[0]}")
        return handler_template.ExpertWeights.from_projections(ids, arrays.gate[ids], arrays.up[ids], arrays.down[ids])


def build_template(
    plan: DeploymentPlan,
    architecture: str = "x86_64",
    timeout_s: int = 60,
    bundled_weights: bool = False,
    reserve_concurrency: bool = False,
    description: str = "",
) -> dict[str, Any]:
    """The SAM template for ``plan`` as a JSON-ready dict (see the module docstring).

    ``bundled_weights``: weights are in the package (``MOESERVE_WEIGHTS_PATH``), else in the
    template's ``WeightsBucket`` under ``weights/layer{l}/function{g}.npz``.
    ``reserve_concurrency``: set ``ReservedConcurrentExecutions`` to each function's replicas
    (``ValueError`` if the total exceeds what a default account may reserve).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    _check_plan(plan, timeout_s, reserve_concurrency)
    object_store = any(layer.channel == "object_store" for layer in plan.layers)
    resources: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    if not bundled_weights:
        resources["WeightsBucket"] = {
            "Type": "AWS::S3::Bucket",
            "Properties": {
                "PublicAccessBlockConfiguration": {
                    "BlockPublicAcls": True,
                    "BlockPublicPolicy": True,
                    "IgnorePublicAcls": True,
                    "RestrictPublicBuckets": True,
                }
            },
        }
        outputs["WeightsBucketName"] = {
            "Description": "Upload weights/ here (aws s3 sync weights s3://BUCKET/weights)",
            "Value": {"Ref": "WeightsBucket"},
        }
    if object_store:
        resources["ExchangeBucket"] = {
            "Type": "AWS::S3::Bucket",
            "Properties": {
                "LifecycleConfiguration": {
                    "Rules": [{"Id": "ExpireActivations", "Status": "Enabled", "ExpirationInDays": 1}]
                },
                "PublicAccessBlockConfiguration": {
                    "BlockPublicAcls": True,
                    "BlockPublicPolicy": True,
                    "IgnorePublicAcls": True,
                    "RestrictPublicBuckets": True,
                },
            },
        }
        outputs["ExchangeBucketName"] = {
            "Description": "Bucket of the object-store channel (activations expire after a day)",
            "Value": {"Ref": "ExchangeBucket"},
        }
    for index, layer in enumerate(plan.layers):
        for g, function in enumerate(layer.functions):
            name = function_id(index, g)
            environment: dict[str, Any] = {
                "MOESERVE_LAYER": str(index),
                "MOESERVE_FUNCTION": str(g),
                "MOESERVE_EXPERTS": ",".join(str(e) for e in function.experts),
                "MOESERVE_CHANNEL": layer.channel,
                "MOESERVE_WIRE_DTYPE": layer.wire_dtype,
                **handler_template.MALLOC_ENVIRONMENT,
                "MOESERVE_MICRO_BATCHES": str(layer.micro_batches),
                "MOESERVE_REPLICAS": str(function.replicas),
            }
            policies: list[Any] = []
            if bundled_weights:
                environment["MOESERVE_WEIGHTS_PATH"] = _weights_key(index, g)
            else:
                environment["MOESERVE_WEIGHTS_BUCKET"] = {"Ref": "WeightsBucket"}
                environment["MOESERVE_WEIGHTS_KEY"] = _weights_key(index, g)
                policies.append({"S3ReadPolicy": {"BucketName": {"Ref": "WeightsBucket"}}})
            if layer.channel == "object_store":
                environment["MOESERVE_EXCHANGE_BUCKET"] = {"Ref": "ExchangeBucket"}
                policies.append({"S3CrudPolicy": {"BucketName": {"Ref": "ExchangeBucket"}}})
            properties: dict[str, Any] = {
                "Description": (
                    f"MoE layer {index} function {g}: experts {list(function.experts)}, "
                    f"{function.replicas} replica(s), {layer.channel} channel"
                )[:256],
                "CodeUri": f"{PACKAGE_DIR}/",
                "Handler": HANDLER,
                "Runtime": RUNTIME,
                "Architectures": [architecture],
                "MemorySize": function.memory_mb,
                "Timeout": timeout_s,
                "Environment": {"Variables": environment},
            }
            if policies:
                properties["Policies"] = policies
            if reserve_concurrency:
                properties["ReservedConcurrentExecutions"] = function.replicas
            resources[name] = {"Type": "AWS::Serverless::Function", "Properties": properties}
            outputs[f"{name}Arn"] = {
                "Description": f"ARN of layer {index} function {g}",
                "Value": {"Fn::GetAtt": [name, "Arn"]},
            }
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Transform": "AWS::Serverless-2016-10-31",
        "Description": (description or "moeserve serverless MoE expert functions (exported plan)")[:1024],
        "Resources": resources,
        "Outputs": outputs,
    }


def handler_source() -> str:
    """The source written to ``package/handler.py``: :mod:`moeserve.serverless.handler_template`."""
    return inspect.getsource(handler_template)


def _readme(
    plan: DeploymentPlan, bundled: bool, object_store: bool, has_weights: bool, functions: int
) -> str:
    lines = [
        "# moeserve serverless export",
        "",
        f"A SAM application with {functions} Lambda function(s) for {len(plan.layers)} MoE layer(s).",
        f"Plan: {plan.found_by}. Costs and throughputs in the plan are modelled, not measured.",
        "Nothing has been deployed. Deploying creates billable AWS resources.",
        "",
        "## Files",
        "",
        "- `template.yaml`: the SAM template (JSON syntax, which is valid YAML).",
        "- `package/`: the handler (`handler.py`, numpy only) and `requirements.txt`; every function uses it.",
        "- `routing.json`: per layer, its functions (logical ids), experts, replicas, micro-batches and channel.",
    ]
    if has_weights and not bundled:
        lines.append("- `weights/`: one `.npz` per function, to upload to the weights bucket.")
    lines += [
        "",
        "## Deploy",
        "",
        "```sh",
        "sam validate --lint",
        "sam build",
        "sam deploy --guided",
        "```",
        "",
    ]
    if not bundled:
        lines += [
            "Then upload each function's weights (`.npz` with `experts`, `gate` [n, I, D], `up` [n, I, D],",
            "`down` [n, D, I], float32) under the keys named by `MOESERVE_WEIGHTS_KEY`:",
            "",
            "```sh",
            "aws s3 sync weights s3://$(aws cloudformation describe-stacks --stack-name STACK \\",
            "  --query \"Stacks[0].Outputs[?OutputKey=='WeightsBucketName'].OutputValue\" --output text)/weights",
            "```",
            "",
            "Functions load their weights on their first invocation, so upload before invoking.",
            "",
        ]
    lines += [
        "## Invoke",
        "",
        "The request format (base64 little-endian arrays in a JSON event; rows in the layer's wire dtype) and",
        "the raw-bytes response are documented at the top of `package/handler.py`. Synchronous payloads are",
        "limited to 6 MB each way;",
        "the handler raises `PayloadTooLargeError` rather than exceed it.",
    ]
    if object_store:
        lines.append(
            "Layers on the object-store channel exchange activations through `ExchangeBucketName` (see outputs)."
        )
    return "\n".join(lines) + "\n"


def export_plan(
    plan: DeploymentPlan | PlanFile,
    out_dir: str | Path,
    expert_weights: Sequence[LayerExpertWeights] | ExpertWeightsSource | None = None,
    *,
    architecture: str | None = None,
    timeout_s: int = 60,
    bundle_weights: bool = False,
    reserve_concurrency: bool = False,
) -> ExportResult:
    """Write the SAM application for ``plan`` into ``out_dir`` (created; existing files overwritten).

    ``expert_weights``: one :class:`LayerExpertWeights` per plan layer, or a source that gives one
    function's experts at a time (e.g. :class:`~moeserve.serverless.weights.CheckpointWeights`
    for a checkpoint of any size); each function's experts are written to ``weights/layer{l}/function{g}.npz`` (in the package with ``bundle_weights``,
    which must then fit Lambda's 250 MB unzipped package beside numpy; ``ValueError`` otherwise).
    ``architecture`` defaults to the plan file's (else x86_64). ``timeout_s`` in 1..900.
    Raises ``ValueError`` for memory outside Lambda's range. Nothing is deployed.
    """
    if isinstance(plan, PlanFile):
        architecture = architecture or plan.architecture
        plan = plan.plan
    architecture = architecture or "x86_64"
    if bundle_weights and expert_weights is None:
        raise ValueError("bundle_weights needs expert_weights")
    out = Path(out_dir).resolve()
    package = out / PACKAGE_DIR
    package.mkdir(parents=True, exist_ok=True)
    template = build_template(
        plan, architecture, timeout_s, bundled_weights=bundle_weights, reserve_concurrency=reserve_concurrency
    )
    weight_files: list[Path] = []
    if expert_weights is not None:
        weight_files, _ = _write_weights(plan, expert_weights, package if bundle_weights else out)
        if bundle_weights:
            total_mb = sum(p.stat().st_size for p in weight_files) / 2**20
            if total_mb + NUMPY_RESERVE_MB > MAX_UNZIPPED_PACKAGE_MB:
                raise ValueError(
                    f"bundled weights take {total_mb:.0f} MB; with numpy that exceeds Lambda's "
                    f"{MAX_UNZIPPED_PACKAGE_MB} MB unzipped package limit; export without bundle_weights"
                )
    template_path = out / "template.yaml"
    template_path.write_text(json.dumps(template, indent=2) + "\n")
    (package / "handler.py").write_text(handler_source())
    (package / "requirements.txt").write_text("numpy>=1.26\n")
    ids = tuple(function_id(i, g) for i, layer in enumerate(plan.layers) for g in range(len(layer.functions)))
    routing = {
        "layers": [
            {
                "layer": i,
                "micro_batches": layer.micro_batches,
                "channel": layer.channel,
                "wire_dtype": layer.wire_dtype,
                "functions": [
                    {
                        "logical_id": function_id(i, g),
                        "arn_output": f"{function_id(i, g)}Arn",
                        "experts": list(f.experts),
                        "replicas": f.replicas,
                        "memory_mb": f.memory_mb,
                    }
                    for g, f in enumerate(layer.functions)
                ],
            }
            for i, layer in enumerate(plan.layers)
        ]
    }
    routing_path = out / "routing.json"
    routing_path.write_text(json.dumps(routing, indent=2) + "\n")
    object_store = any(layer.channel == "object_store" for layer in plan.layers)
    readme = out / "README.md"
    readme.write_text(_readme(plan, bundle_weights, object_store, expert_weights is not None, len(ids)))
    return ExportResult(
        out_dir=out,
        template=template_path,
        package_dir=package,
        readme=readme,
        routing=routing_path,
        function_ids=ids,
        weight_files=tuple(weight_files),
        object_store=object_store,
    )
