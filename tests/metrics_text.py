"""Reading one series from a Prometheus text page, exactly: the tests' metric() helpers use this.

A query is ``name`` or ``name{label="value",...}``. A sample counts when its
name equals ``name`` and every given label has the given value; labels the
query leaves out are summed over (``modelfleet_engine_rebuilds_total`` adds
up every cause). A name that no metric on the page exposes raises instead of
reading 0, so a renamed or misspelt metric fails the assertion that uses it.
"""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

_QUERY = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse_query(query: str) -> tuple[str, dict[str, str]]:
    match = _QUERY.match(query.strip())
    if match is None:
        raise ValueError(f"not a series name: {query!r}")
    name, body = match.group(1), match.group(2) or ""
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        label = _LABEL.match(body, pos)
        if label is None:
            raise ValueError(f"cannot read the labels of {query!r}")
        labels[label.group(1)] = label.group(2)
        pos = label.end()
    return name, labels


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


def series_value(text: str, query: str) -> float:
    """The sum of the samples ``query`` names on a /metrics page (see the module docstring)."""
    name, labels = parse_query(query)
    known: set[str] = set()
    total = 0.0
    for family in text_string_to_metric_families(text):
        known.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        for sample in family.samples:
            known.add(sample.name)
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    if name not in known:
        raise LookupError(f"no metric named {name} on this page")
    return total
