"""Lambda and instance prices: the shipped data, billing arithmetic, limits and validation errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from moeserve.serverless.prices import (
    PricesError,
    billed_cost,
    check_memory,
    default_prices,
    load_prices,
    vcpu_share,
)

X86_PER_GB_SECOND = 0.0000166667
ARM_PER_GB_SECOND = 0.0000133334
PER_REQUEST = 0.20 / 1e6


def test_shipped_file_holds_the_published_us_east_1_figures():
    prices = load_prices()
    lambda_prices = prices.lambda_prices
    assert prices.region == "us-east-1" and prices.currency == "USD"
    assert prices.recorded == "2026-11-22"
    assert any("pricing" in source.name.lower() for source in prices.sources)
    assert lambda_prices.price_per_gb_second == {"x86_64": X86_PER_GB_SECOND, "arm64": ARM_PER_GB_SECOND}
    assert lambda_prices.price_per_million_requests == 0.20
    assert (lambda_prices.memory_min_mb, lambda_prices.memory_max_mb, lambda_prices.memory_step_mb) == (
        128,
        10240,
        1,
    )
    assert (lambda_prices.timeout_s, lambda_prices.default_concurrency) == (900, 1000)
    assert lambda_prices.payload_limit_bytes("synchronous") == 6291456
    assert lambda_prices.payload_limit_bytes("asynchronous") == 1 << 20
    superseded = [limit for limit in lambda_prices.payload_history if limit.until is not None]
    assert [(limit.invocation, limit.limit_mb, limit.until) for limit in superseded] == [
        ("asynchronous", 0.25, "2025-10")
    ]
    assert prices.instance("c6i.xlarge").price_per_hour == 0.17
    assert prices.instance("c7g.4xlarge").vcpus == 16
    assert default_prices() is default_prices()


def test_billing_rounds_up_to_the_next_millisecond():
    lambda_prices = default_prices().lambda_prices
    assert lambda_prices.billed_duration_ms(1.2) == 2
    assert lambda_prices.billed_duration_ms(2.0) == 2
    assert lambda_prices.billed_duration_ms(0.1 + 0.2) == 1  # float noise does not add a millisecond
    assert lambda_prices.billed_duration_ms(0.0) == 1  # an invocation bills at least one increment
    # 1,024 MB for 1.2 ms bills 2 ms = 0.002 GB-seconds.
    assert billed_cost(1024, 1.2) == pytest.approx(0.002 * X86_PER_GB_SECOND + PER_REQUEST, rel=1e-12)
    assert billed_cost(1024, 1.2, "arm64") == pytest.approx(
        0.002 * ARM_PER_GB_SECOND + PER_REQUEST, rel=1e-12
    )
    # 128 MB is 0.125 GB; a thousand 100 ms requests.
    expected = 1000 * (0.125 * 0.1 * X86_PER_GB_SECOND + PER_REQUEST)
    assert billed_cost(128, 100.0, requests=1000) == pytest.approx(expected, rel=1e-12)
    assert billed_cost(128, 5.0, requests=0) == 0.0


def test_billing_rejects_what_lambda_would_not_run():
    with pytest.raises(ValueError, match="architecture 'riscv'"):
        billed_cost(128, 1.0, "riscv")
    with pytest.raises(ValueError, match="duration_ms"):
        billed_cost(128, -1.0)
    with pytest.raises(ValueError, match="requests"):
        billed_cost(128, 1.0, requests=-1)


def test_vcpu_share_is_proportional_to_memory_and_capped():
    assert vcpu_share(1769) == 1.0
    assert vcpu_share(3538) == 2.0
    assert vcpu_share(10240) == pytest.approx(10240 / 1769)
    # The 6 vCPU cap binds only above the current 10,240 MB maximum: try it with a larger one.
    prices = default_prices()
    roomy = dataclasses.replace(
        prices, lambda_prices=dataclasses.replace(prices.lambda_prices, memory_max_mb=20000)
    )
    assert vcpu_share(12000, roomy) == 6.0
    assert vcpu_share(20000, roomy) == 6.0


def test_memory_bounds():
    assert check_memory(128) == 128
    assert check_memory(10240) == 10240
    assert check_memory(1769) == 1769
    with pytest.raises(ValueError, match=r"127 MB is outside 128\.\.10240 MB"):
        check_memory(127)
    with pytest.raises(ValueError, match=r"10241 MB is outside"):
        vcpu_share(10241)
    with pytest.raises(ValueError, match="whole number of MB"):
        check_memory(512.5)  # type: ignore[arg-type]
    stepped = dataclasses.replace(default_prices().lambda_prices, memory_step_mb=64)
    with pytest.raises(ValueError, match="128 MB plus a multiple of 64 MB"):
        stepped.check_memory(200)


def test_instance_cost_bills_seconds_with_a_minute_minimum():
    c6i = default_prices().instance("c6i.large")
    assert c6i.cost(3600) == pytest.approx(0.085)
    assert c6i.cost(10) == pytest.approx(60 / 3600 * 0.085)
    assert c6i.cost(90.5, count=4) == pytest.approx(4 * 91 / 3600 * 0.085)
    assert c6i.cost(0) == 0.0
    with pytest.raises(KeyError, match="known: c6i.large"):
        default_prices().instance("p5.48xlarge")


# -- validation of a prices file -----------------------------------------------------------------


def shipped_document() -> dict:
    from importlib import resources

    text = (
        resources.files("moeserve.serverless").joinpath("data").joinpath("aws_lambda_prices.json").read_text()
    )
    return json.loads(text)


def write(tmp_path: Path, document: dict) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(document))
    return path


def test_a_copy_of_the_shipped_file_loads_from_a_path(tmp_path):
    assert load_prices(write(tmp_path, shipped_document())) == load_prices()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["lambda"]["memory_mb"].update(min=-5),
            r"lambda\.memory_mb\.min must be a positive integer",
        ),
        (lambda d: d["lambda"]["memory_mb"].pop("max"), r"lambda\.memory_mb\.max is missing"),
        (lambda d: d["lambda"]["memory_mb"].update(max=100), r"lambda: memory_max_mb \(100\) is below"),
        (
            lambda d: d["lambda"].update(price_per_million_requests="0.2"),
            r"price_per_million_requests must be a number",
        ),
        (lambda d: d["lambda"]["price_per_gb_second"].update(sparc=1e-5), r"unknown architecture 'sparc'"),
        (lambda d: d["lambda"]["payload_mb"].pop("asynchronous"), r"payload_mb lacks asynchronous"),
        (
            lambda d: d["instances"]["types"][1].update(vcpus=True),
            r"instances\.types\[1\]\.vcpus must be an integer",
        ),
        (
            lambda d: d["instances"]["types"][0].update(architecture="ppc"),
            r"instances\.types\[0\]: architecture",
        ),
        (lambda d: d.update(recorded="last week"), r"recorded must be an ISO date"),
        (lambda d: d.update(format="other/1"), r"format is 'other/1'"),
    ],
)
def test_errors_name_the_bad_field(tmp_path, edit, message):
    document = shipped_document()
    edit(document)
    with pytest.raises(PricesError, match=message):
        load_prices(write(tmp_path, document))


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(PricesError, match="no such prices file"):
        load_prices(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(PricesError, match="not valid JSON"):
        load_prices(broken)
