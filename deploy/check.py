"""Checks deploy/prometheus/alerts.yml and deploy/grafana/lakesync.json against what lakesync
exports, with the ecosystems' own parsers:

- the /metrics scrape given as argument parses with prometheus_client's OpenMetrics parser
  (the Python client of the Prometheus project, strict about the format);
- every PromQL expression parses with promql-parser (Grafana variables are substituted first,
  as Grafana does), and names only metrics of that scrape (or Prometheus's own `up`);
- the rule file has Prometheus's shape (groups, rules with alert/expr/for/labels/annotations,
  durations Prometheus accepts, Go templates with balanced braces);
- the dashboard decodes with Grafana's foundation SDK, its panels have unique ids, known types,
  a grid position inside 24 columns, and use the dashboard's Prometheus data source variable.

Usage: python deploy/check.py <scrape.txt>. Prints what is wrong and exits 1, or prints a
summary and exits 0.
"""

import json
import re
import sys
from pathlib import Path

import promql_parser
import yaml
from grafana_foundation_sdk.models.dashboard import Dashboard
from prometheus_client.openmetrics.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
PANEL_TYPES = {"row", "stat", "timeseries", "table", "gauge", "bargauge", "text", "heatmap", "state-timeline"}
PROMETHEUS_OWN = {"up"}

problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


def exported(scrape_text):
    names = set()
    for family in text_string_to_metric_families(scrape_text):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        for sample in family.samples:
            names.add(sample.name)
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    return names


def selectors(node, out):
    """The metric names an expression selects."""
    kind = type(node).__name__
    if kind == "VectorSelector":
        if node.name:
            out.add(node.name)
        for m in getattr(node.matchers, "matchers", []) or []:
            if m.name == "__name__":
                out.add(m.value)
        return out
    for attr in ("lhs", "rhs", "expr", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (str, int, float)):
            selectors(child, out)
    for arg in getattr(node, "args", None) or []:
        selectors(arg, out)
    return out


def check_expr(where, expr, metrics):
    try:
        parsed = promql_parser.parse(expr)
    except Exception as e:  # promql_parser raises plain exceptions with the parser's message
        problem(where, f"PromQL does not parse ({e}): {expr}")
        return set()
    names = selectors(parsed, set())
    for name in sorted(names - metrics - PROMETHEUS_OWN):
        problem(where, f"{name} is not a metric lakesync exports")
    if not names:
        problem(where, f"selects no metric: {expr}")
    return names


def grafana_substituted(expr):
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def check_template(where, text):
    if text.count("{{") != text.count("}}"):
        problem(where, "unbalanced {{ }} in a template")


def check_alerts(metrics):
    path = ROOT / "prometheus" / "alerts.yml"
    doc = yaml.safe_load(path.read_text())
    used, alerts = set(), []
    if not isinstance(doc, dict) or set(doc) != {"groups"}:
        problem(path.name, "a rule file has exactly one key, groups")
        return used, alerts
    for g, group in enumerate(doc["groups"]):
        where = f"{path.name} group {group.get('name', g)}"
        if not isinstance(group.get("name"), str) or not isinstance(group.get("rules"), list):
            problem(where, "a group needs a name and a list of rules")
            continue
        for rule in group["rules"]:
            name = rule.get("alert")
            here = f"{where} alert {name}"
            unknown = set(rule) - {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            if not name or unknown:
                problem(here, f"an alerting rule has alert and expr (unknown keys: {sorted(unknown)})")
            if not re.match(r"^[a-zA-Z_][a-zA-Z0-9_]*$", name or ""):
                problem(here, "the alert name is not a valid label value for alertname")
            if "for" in rule and not DURATION.match(str(rule["for"])):
                problem(here, f"for: {rule['for']!r} is not a Prometheus duration")
            severity = (rule.get("labels") or {}).get("severity")
            if severity not in {"critical", "warning", "info"}:
                problem(here, f"severity {severity!r}: expected critical, warning or info")
            annotations = rule.get("annotations") or {}
            for key in ("summary", "description"):
                if not annotations.get(key):
                    problem(here, f"needs a {key} annotation")
            for key, text in annotations.items():
                check_template(f"{here} {key}", str(text))
            used |= check_expr(here, str(rule.get("expr", "")), metrics)
            alerts.append(name)
    return used, alerts


def check_dashboard(metrics):
    path = ROOT / "grafana" / "lakesync.json"
    doc = json.loads(path.read_text())
    decoded = Dashboard.from_json(doc)
    used = set()
    if decoded.uid != "lakesync" or not decoded.title:
        problem(path.name, "the dashboard needs its uid (lakesync) and a title")
    variables = {v["name"]: v for v in doc.get("templating", {}).get("list", [])}
    if variables.get("DS_PROMETHEUS", {}).get("type") != "datasource":
        problem(path.name, "a DS_PROMETHEUS data source variable lets the dashboard be imported anywhere")
    for name, v in variables.items():
        if v.get("type") == "query":
            used |= check_expr(f"{path.name} variable {name}", re.sub(r"^label_values\(([^,]+),.*\)$", r"\1", v["definition"]), metrics)
    ids = set()
    for panel in doc.get("panels", []):
        where = f"{path.name} panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("id") in ids:
            problem(where, "panel ids must be unique")
        ids.add(panel.get("id"))
        if panel.get("type") not in PANEL_TYPES:
            problem(where, f"unknown panel type {panel.get('type')!r}")
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in "xywh") or grid["x"] + grid["w"] > 24:
            problem(where, f"gridPos {grid} does not fit Grafana's 24 columns")
        if panel.get("type") == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            problem(where, "the panel must use the ${DS_PROMETHEUS} data source")
        if not panel.get("targets"):
            problem(where, "a panel without queries")
        for target in panel.get("targets", []):
            used |= check_expr(f"{where} {target.get('refId')}", grafana_substituted(target.get("expr", "")), metrics)
    return used, len(ids)


def main():
    scrape = Path(sys.argv[1]).read_text()
    try:
        metrics = exported(scrape)
    except Exception as e:
        print(f"/metrics does not parse as OpenMetrics: {e}")
        return 1
    alert_metrics, alerts = check_alerts(metrics)
    dashboard_metrics, panels = check_dashboard(metrics)
    if problems:
        print("\n".join(problems))
        return 1
    print(f"ok: {len(alerts)} alerts and {panels} dashboard panels use {len(alert_metrics | dashboard_metrics)} metrics, "
          f"all exported ({len(metrics)} metric and sample names in the scrape)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
