"""
wsgateway/version.py and wsgateway_build_info: the version is setup.cfg's,
read from the installed metadata; the metric is one series at 1, also
after the workers' parent merges its workers' pages with its own.
"""

from __future__ import annotations

import configparser
import platform

import autobahn
import twisted
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from support.gateway import ROOT
from wsgateway.ops.metrics import register_build_info
from wsgateway.version import build_info, describe, version
from wsgateway.workers.aggregate import MetricsAggregate


def setup_cfg_version() -> str:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "setup.cfg")
    return parser["metadata"]["version"]


def test_the_version_is_setup_cfgs() -> None:
    assert version() == setup_cfg_version()


def test_describe_names_wsgateway_python_twisted_and_autobahn() -> None:
    assert describe() == (f"wsgateway {setup_cfg_version()} (Python {platform.python_version()}, "
                          f"Twisted {twisted.__version__}, Autobahn {autobahn.__version__})")


def _build_info_samples(text: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(s.labels), s.value) for f in text_string_to_metric_families(text)
            if f.name == "wsgateway_build_info" for s in f.samples]


def test_build_info_is_one_gauge_series_at_1() -> None:
    registry = CollectorRegistry()
    register_build_info(registry)
    text = generate_latest(registry).decode()
    assert "# TYPE wsgateway_build_info gauge" in text
    assert _build_info_samples(text) == [(build_info(), 1.0)]
    assert set(build_info()) == {"version", "python", "twisted", "autobahn"}


def test_the_workers_parent_keeps_build_info_one_series_at_1() -> None:
    pages = []
    for _ in range(3):  # two workers and the parent
        registry = CollectorRegistry()
        register_build_info(registry)
        pages.append(generate_latest(registry).decode())
    merged = MetricsAggregate()
    merged.update(101, pages[0])
    merged.update(102, pages[1])
    assert _build_info_samples(merged.render(pages[2]).decode()) == [(build_info(), 1.0)]
