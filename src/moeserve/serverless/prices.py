"""Serverless (AWS Lambda) and CPU-instance prices and limits, read from dated JSON data.

The figures live in ``data/aws_lambda_prices.json`` (format ``moeserve-prices/1``): us-east-1
Lambda prices per GB-second and per request, its billing increment, memory range, CPU share,
payload, timeout and concurrency limits, and a few on-demand EC2 instance types for a
CPU-cluster baseline; each with the date it was recorded and the pages it came from. A newer
or another region's file is passed to :func:`load_prices`; nothing here hard-codes a price.

Billing model (Lambda): a request costs ``price_per_million_requests / 1e6`` plus
``billed_seconds * memory_mb / 1024 * price_per_gb_second[architecture]``, the duration rounded
up to the billing increment (1 ms). Volume tiers, the free tier, provisioned concurrency and
ephemeral storage beyond 512 MB are not modelled (the JSON's notes say so too).

This module knows nothing of models or plans; the serverless planner and cost model use it.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

from moeserve.errors import MoeserveError

PRICES_FORMAT = "moeserve-prices/1"
ARCHITECTURES = ("x86_64", "arm64")
"""Lambda instruction-set architectures, as the Lambda API names them."""
INVOCATIONS = ("synchronous", "asynchronous")
BYTES_PER_MB = 1 << 20
"""Payload limits in MB are binary: the 6 MB synchronous limit is 6,291,456 bytes in Lambda's errors."""
_DATA_FILE = "aws_lambda_prices.json"


class PricesError(MoeserveError, ValueError):
    """A prices file is missing, malformed, or has a value out of range (the message names the field)."""


@dataclass(frozen=True)
class Source:
    """A page the figures were taken from."""

    name: str
    url: str | None
    """None where the page's exact address was not recorded."""


@dataclass(frozen=True)
class PayloadLimit:
    """One documented invocation payload limit and the period it held."""

    invocation: str
    """"synchronous" or "asynchronous"."""
    limit_mb: float
    since: str | None
    """First month (YYYY-MM) it applied, or None if it predates the record."""
    until: str | None
    """Month it was replaced, or None if it still applies."""
    note: str

    def __post_init__(self) -> None:
        if self.invocation not in INVOCATIONS:
            raise ValueError(f"invocation must be one of {INVOCATIONS}, got {self.invocation!r}")
        _check_positive("limit_mb", self.limit_mb)


@dataclass(frozen=True)
class LambdaPrices:
    """AWS Lambda prices and limits for one region; helpers that apply them.

    Contract (checked on construction, ``ValueError`` naming the field): prices > 0 for at least
    one architecture in :data:`ARCHITECTURES`; ``0 < memory_min_mb <= memory_max_mb``, with
    ``memory_step_mb`` dividing the range; every other limit > 0.
    """

    price_per_gb_second: dict[str, float]
    """USD per GB-second (1 GB = 1024 MB) by architecture, first volume tier."""
    price_per_million_requests: float
    """USD per million requests (all architectures)."""
    billing_increment_ms: int
    """Durations are rounded up to a multiple of this (1 ms)."""
    memory_min_mb: int
    memory_max_mb: int
    memory_step_mb: int
    """Configurable memory: min..max in steps of this (128..10,240 in 1 MB steps)."""
    memory_mb_per_vcpu: float
    """Memory that buys one vCPU's share of CPU time (1,769 MB)."""
    max_vcpus: float
    """Ceiling of the CPU share (6 vCPUs)."""
    timeout_s: int
    """Longest invocation (900 s)."""
    default_concurrency: int
    """Concurrent executions per account and region by default (1,000; new accounts start lower)."""
    payload_mb: dict[str, float]
    """Current payload limit by invocation type: "synchronous" (each way) and "asynchronous"."""
    payload_history: tuple[PayloadLimit, ...] = ()
    """Dated payload limits, including ones since replaced."""
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.price_per_gb_second:
            raise ValueError("price_per_gb_second must name at least one architecture")
        for architecture, price in self.price_per_gb_second.items():
            if architecture not in ARCHITECTURES:
                raise ValueError(
                    f"price_per_gb_second has unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}"
                )
            _check_positive(f"price_per_gb_second.{architecture}", price)
        _check_positive("price_per_million_requests", self.price_per_million_requests)
        for name in (
            "billing_increment_ms",
            "memory_min_mb",
            "memory_max_mb",
            "memory_step_mb",
            "memory_mb_per_vcpu",
            "max_vcpus",
            "timeout_s",
            "default_concurrency",
        ):
            _check_positive(name, getattr(self, name))
        if self.memory_max_mb < self.memory_min_mb:
            raise ValueError(
                f"memory_max_mb ({self.memory_max_mb}) is below memory_min_mb ({self.memory_min_mb})"
            )
        if (self.memory_max_mb - self.memory_min_mb) % self.memory_step_mb:
            raise ValueError(
                f"memory_step_mb ({self.memory_step_mb}) does not divide the range "
                f"{self.memory_min_mb}..{self.memory_max_mb}"
            )
        missing = [invocation for invocation in INVOCATIONS if invocation not in self.payload_mb]
        if missing:
            raise ValueError(f"payload_mb lacks {', '.join(missing)}")
        for invocation, limit in self.payload_mb.items():
            if invocation not in INVOCATIONS:
                raise ValueError(
                    f"payload_mb has unknown invocation {invocation!r}; known: {', '.join(INVOCATIONS)}"
                )
            _check_positive(f"payload_mb.{invocation}", limit)

    def check_memory(self, memory_mb: int) -> int:
        """``memory_mb`` if Lambda accepts it (an int in range, on a step); ``ValueError`` saying why otherwise."""
        if not isinstance(memory_mb, int) or isinstance(memory_mb, bool):
            raise ValueError(f"Lambda memory must be a whole number of MB, got {memory_mb!r}")
        if not self.memory_min_mb <= memory_mb <= self.memory_max_mb:
            raise ValueError(
                f"Lambda memory {memory_mb} MB is outside {self.memory_min_mb}..{self.memory_max_mb} MB"
            )
        if (memory_mb - self.memory_min_mb) % self.memory_step_mb:
            raise ValueError(
                f"Lambda memory {memory_mb} MB is not {self.memory_min_mb} MB plus a multiple of "
                f"{self.memory_step_mb} MB"
            )
        return memory_mb

    def vcpu_share(self, memory_mb: int) -> float:
        """vCPUs' worth of CPU time a function of ``memory_mb`` gets: ``memory / memory_mb_per_vcpu``, at most ``max_vcpus``.

        1.0 at 1,769 MB; 5.79 at the 10,240 MB maximum (the documented 6 vCPU ceiling is the cap).
        """
        self.check_memory(memory_mb)
        return min(memory_mb / self.memory_mb_per_vcpu, self.max_vcpus)

    def billed_duration_ms(self, duration_ms: float) -> int:
        """``duration_ms`` rounded up to the billing increment; at least one increment per invocation.

        Durations within 1e-9 ms above a whole increment count as that increment (float noise,
        e.g. 0.1 + 0.2), not as the next.
        """
        if not (math.isfinite(duration_ms) and duration_ms >= 0):
            raise ValueError(f"duration_ms must be a finite number >= 0, got {duration_ms}")
        increments = math.ceil(duration_ms / self.billing_increment_ms - 1e-9)
        return max(increments, 1) * self.billing_increment_ms

    def billed_cost(
        self, memory_mb: int, duration_ms: float, architecture: str = "x86_64", requests: int = 1
    ) -> float:
        """USD for ``requests`` invocations of ``duration_ms`` each at ``memory_mb`` on ``architecture``."""
        self.check_memory(memory_mb)
        if architecture not in self.price_per_gb_second:
            known = ", ".join(sorted(self.price_per_gb_second))
            raise ValueError(f"no Lambda price for architecture {architecture!r}; known: {known}")
        if not isinstance(requests, int) or isinstance(requests, bool) or requests < 0:
            raise ValueError(f"requests must be an integer >= 0, got {requests!r}")
        gb_seconds = self.billed_duration_ms(duration_ms) / 1000.0 * memory_mb / 1024.0
        per_request = gb_seconds * self.price_per_gb_second[architecture]
        per_request += self.price_per_million_requests / 1e6
        return requests * per_request

    def payload_limit_bytes(self, invocation: str) -> int:
        """Largest payload in bytes for "synchronous" (each way) or "asynchronous" invocations."""
        if invocation not in self.payload_mb:
            raise ValueError(f"unknown invocation {invocation!r}; known: {', '.join(INVOCATIONS)}")
        return int(self.payload_mb[invocation] * BYTES_PER_MB)


@dataclass(frozen=True)
class InstanceType:
    """One on-demand CPU instance type (Linux) for the CPU-cluster baseline."""

    name: str
    architecture: str
    vcpus: int
    memory_gib: float
    price_per_hour: float
    """USD per instance-hour, on-demand."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("vcpus", "memory_gib", "price_per_hour"):
            _check_positive(name, getattr(self, name))

    def cost(self, seconds: float, count: int = 1) -> float:
        """USD for ``count`` instances running ``seconds``: per-second billing, 60 s minimum when running."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds}")
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        billed = max(math.ceil(seconds - 1e-9), 60) if seconds > 0 else 0
        return count * billed / 3600.0 * self.price_per_hour


@dataclass(frozen=True)
class Prices:
    """Everything in one prices file."""

    recorded: str
    """ISO date (YYYY-MM-DD) the figures were typed in."""
    provenance: str
    region: str
    currency: str
    sources: tuple[Source, ...]
    lambda_prices: LambdaPrices
    instance_billing: str
    instances: tuple[InstanceType, ...]

    def __post_init__(self) -> None:
        names = [instance.name for instance in self.instances]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"instances lists {', '.join(duplicates)} more than once")

    def instance(self, name: str) -> InstanceType:
        """The instance type called ``name``; ``KeyError`` listing the known ones."""
        for instance in self.instances:
            if instance.name == name:
                return instance
        known = ", ".join(instance.name for instance in self.instances)
        raise KeyError(f"unknown instance type {name!r}; known: {known}")


def load_prices(path: str | os.PathLike[str] | None = None) -> Prices:
    """Read and validate a ``moeserve-prices/1`` file; None reads the one shipped with moeserve.

    Raises ``PricesError`` naming the file and the field (as a dotted JSON path) when the file is
    missing, is not JSON, lacks a field, or holds a value of the wrong type or out of range.
    """
    if path is None:
        where = f"moeserve/serverless/data/{_DATA_FILE}"
        text = resources.files("moeserve.serverless").joinpath("data").joinpath(_DATA_FILE).read_text("utf-8")
    else:
        where = str(path)
        if not Path(path).is_file():
            raise PricesError(f"{where}: no such prices file")
        text = Path(path).read_text("utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise PricesError(f"{where}: not valid JSON ({error})") from None
    return _parse(_Fields(document, where, ""))


@functools.cache
def default_prices() -> Prices:
    """The prices shipped with moeserve, read once (``Prices`` is immutable)."""
    return load_prices()


def billed_cost(
    memory_mb: int,
    duration_ms: float,
    architecture: str = "x86_64",
    requests: int = 1,
    prices: Prices | None = None,
) -> float:
    """USD for ``requests`` Lambda invocations; see :meth:`LambdaPrices.billed_cost` (default prices)."""
    return (prices or default_prices()).lambda_prices.billed_cost(
        memory_mb, duration_ms, architecture, requests
    )


def vcpu_share(memory_mb: int, prices: Prices | None = None) -> float:
    """vCPUs' worth of CPU a Lambda function of ``memory_mb`` gets; see :meth:`LambdaPrices.vcpu_share`."""
    return (prices or default_prices()).lambda_prices.vcpu_share(memory_mb)


def check_memory(memory_mb: int, prices: Prices | None = None) -> int:
    """``memory_mb`` if Lambda accepts it, else ``ValueError``; see :meth:`LambdaPrices.check_memory`."""
    return (prices or default_prices()).lambda_prices.check_memory(memory_mb)


# -- parsing -------------------------------------------------------------------------------------


def _check_positive(name: str, value: float) -> None:
    if not (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


class _Fields:
    """A JSON object and its dotted path in the file, for reads whose errors name the field."""

    def __init__(self, document: object, where: str, path: str) -> None:
        if not isinstance(document, dict):
            raise PricesError(
                f"{where}: {path or 'the top level'} must be a JSON object, got {_kind(document)}"
            )
        self.document: dict[str, Any] = document
        self.where = where
        self.path = path

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, problem: str) -> PricesError:
        return PricesError(f"{self.where}: {self.name(key)} {problem}")

    def value(self, key: str) -> Any:
        if key not in self.document:
            raise self.fail(key, "is missing")
        return self.document[key]

    def string(self, key: str) -> str:
        value = self.value(key)
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {_kind(value)}")
        return value

    def optional_string(self, key: str) -> str | None:
        """A string, or None when the key is absent or null."""
        if self.document.get(key) is None:
            return None
        return self.string(key)

    def number(self, key: str) -> float:
        value = self.value(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number, got {_kind(value)}")
        if not (math.isfinite(value) and value > 0):
            raise self.fail(key, f"must be a positive number, got {value}")
        return float(value)

    def integer(self, key: str) -> int:
        value = self.value(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {_kind(value)}")
        if value <= 0:
            raise self.fail(key, f"must be a positive integer, got {value}")
        return value

    def object(self, key: str) -> _Fields:
        return _Fields(self.value(key), self.where, self.name(key))

    def objects(self, key: str) -> list[_Fields]:
        value = self.value(key)
        if not isinstance(value, list):
            raise self.fail(key, f"must be a JSON list, got {_kind(value)}")
        return [_Fields(item, self.where, f"{self.name(key)}[{index}]") for index, item in enumerate(value)]

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.value(key)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(key, "must be a JSON list of strings")
        return tuple(value)

    def numbers(self) -> dict[str, float]:
        """Every key of this object, each a positive number."""
        return {key: self.number(key) for key in self.document}

    def build(self, constructor: Any, **values: Any) -> Any:
        """``constructor(**values)``, its ``ValueError`` turned into a ``PricesError`` naming this object."""
        try:
            return constructor(**values)
        except ValueError as error:
            raise PricesError(f"{self.where}: {self.path or 'prices'}: {error}") from None


def _kind(value: object) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _parse(top: _Fields) -> Prices:
    file_format = top.string("format")
    if file_format != PRICES_FORMAT:
        raise top.fail("format", f"is {file_format!r}, but this moeserve reads {PRICES_FORMAT!r}")
    lambda_fields = top.object("lambda")
    memory = lambda_fields.object("memory_mb")
    payload = lambda_fields.object("payload_mb")
    history = tuple(
        entry.build(
            PayloadLimit,
            invocation=entry.string("invocation"),
            limit_mb=entry.number("limit_mb"),
            since=entry.optional_string("since"),
            until=entry.optional_string("until"),
            note=entry.optional_string("note") or "",
        )
        for entry in lambda_fields.objects("payload_history")
    )
    lambda_prices = lambda_fields.build(
        LambdaPrices,
        price_per_gb_second=lambda_fields.object("price_per_gb_second").numbers(),
        price_per_million_requests=lambda_fields.number("price_per_million_requests"),
        billing_increment_ms=lambda_fields.integer("billing_increment_ms"),
        memory_min_mb=memory.integer("min"),
        memory_max_mb=memory.integer("max"),
        memory_step_mb=memory.integer("step"),
        memory_mb_per_vcpu=lambda_fields.number("memory_mb_per_vcpu"),
        max_vcpus=lambda_fields.number("max_vcpus"),
        timeout_s=lambda_fields.integer("timeout_s"),
        default_concurrency=lambda_fields.integer("default_concurrency"),
        payload_mb=payload.numbers(),
        payload_history=history,
        notes=lambda_fields.strings("notes"),
    )
    instance_fields = top.object("instances")
    instances = tuple(
        entry.build(
            InstanceType,
            name=entry.string("name"),
            architecture=entry.string("architecture"),
            vcpus=entry.integer("vcpus"),
            memory_gib=entry.number("memory_gib"),
            price_per_hour=entry.number("price_per_hour"),
        )
        for entry in instance_fields.objects("types")
    )
    sources = tuple(
        Source(name=entry.string("name"), url=entry.optional_string("url"))
        for entry in top.objects("sources")
    )
    recorded = top.string("recorded")
    try:
        date.fromisoformat(recorded)
    except ValueError:
        raise top.fail("recorded", f"must be an ISO date YYYY-MM-DD, got {recorded!r}") from None
    return top.build(
        Prices,
        recorded=recorded,
        provenance=top.string("provenance"),
        region=top.string("region"),
        currency=top.string("currency"),
        sources=sources,
        lambda_prices=lambda_prices,
        instance_billing=instance_fields.string("billing"),
        instances=instances,
    )
