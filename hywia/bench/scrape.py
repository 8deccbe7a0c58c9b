"""Read a server's /metrics into plain numbers: for tests and benchmarks."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


class Samples(dict):
    """{(sample name, frozenset of label pairs): value}."""

    def value(self, name: str, **labels) -> float:
        """The sample with exactly these labels (0.0 when absent: a counter never incremented)."""
        return self.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels) -> float:
        """Sum over every sample of NAME whose labels include LABELS."""
        wanted = set(labels.items())
        return sum(v for (n, lbls), v in self.items() if n == name and wanted <= lbls)

    def names(self) -> set[str]:
        return {name for name, _ in self}


def parse_metrics(text: str) -> Samples:
    samples = Samples()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape(base_url: str, api_key: str | None = None, timeout: float = 10) -> Samples:
    request = urllib.request.Request(base_url.rstrip("/") + "/metrics")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return parse_metrics(response.read().decode())
