"""The monitoring files the repository ships, read for tests: the Grafana dashboard, the
alert rules, the Prometheus scrape config and compose.yaml, and the metric names their PromQL
refers to."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "compose.yaml"
ALERT_RULES = ROOT / "config" / "prometheus-alerts.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
MAKE_CERTS = DEPLOY / "make-certs.sh"

# The product's series, and the process collector's (CPU, memory, descriptors) the dashboard
# draws; ``up`` and PromQL functions never match.
_METRIC = re.compile(r"\b(?:e911_sip|process)_[a-z_]+\b")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def dashboards() -> dict[Path, dict[str, Any]]:
    """Every dashboard JSON under deploy/grafana/dashboards/."""
    return {
        path: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARD_DIR.glob("*.json"))
    }


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL text of a dashboard: panel targets and template variable queries."""
    queries = [
        target["expr"]
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and query:
            queries.append(query)
    return queries


def alert_exprs(path: Path = ALERT_RULES) -> dict[str, str]:
    """``alert name -> expr`` of a rules file."""
    rules = load_yaml(path)
    return {
        rule.get("alert") or rule["record"]: str(rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    }


def referenced_metrics(queries: Iterable[str]) -> set[str]:
    """Metric names the PromQL texts select, as written (``..._bucket`` included).

    A plain scan for identifiers, not a parser: label values and strings of this product
    never look like metric names, and a false hit fails loudly rather than passing quietly.
    """
    return {name for query in queries for name in _METRIC.findall(query)}


def exposed_families(exposition: str) -> dict[str, str]:
    """``name -> type`` from the ``# TYPE`` lines of a Prometheus text exposition: a family
    with no samples yet (a labelled counter before its first increment) is still listed."""
    return {name: kind for name, kind in _TYPE_LINE.findall(exposition)}


def missing_metrics(referenced: Iterable[str], exposition: str) -> set[str]:
    """The referenced names that no family of ``exposition`` provides.

    A histogram ``h`` provides ``h_bucket``, ``h_sum`` and ``h_count``; a counter or
    histogram provides ``..._created``.
    """
    families = exposed_families(exposition)
    missing: set[str] = set()
    for name in referenced:
        if name in families:
            continue
        base = next((name[: -len(s)] for s in _HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if base is not None and families.get(base) == "histogram":
            continue
        if name.endswith("_created"):
            stem = name[: -len("_created")]
            if families.get(f"{stem}_total") == "counter" or families.get(stem) == "histogram":
                continue
        missing.add(name)
    return missing


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """``(host source, container target)`` of a compose service's bind mounts (short
    ``SRC:DST[:MODE]`` and long ``{type: bind}`` syntax); named volumes are left out."""
    mounts: list[tuple[str, str]] = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":", 1)[0]
            if source.startswith((".", "/", "~")):
                mounts.append((source, target))
        elif volume.get("type") == "bind":
            mounts.append((volume["source"], volume["target"]))
    return mounts


def host_path(container_path: str, mounts: Iterable[tuple[str, str]]) -> Path | None:
    """The file on this checkout a container path of a service maps to, through its bind
    mounts (the deepest mount wins); None when no mount covers it."""
    best: tuple[str, str] | None = None
    for source, target in mounts:
        covered = container_path == target or container_path.startswith(target.rstrip("/") + "/")
        if covered and (best is None or len(target) > len(best[1])):
            best = (source, target)
    if best is None:
        return None
    source, target = best
    return (ROOT / source / container_path[len(target) :].lstrip("/")).resolve()
