"""Reading Prometheus exposition text back, for assertions."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample called `name` with exactly these labels (besides le)."""
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and s.labels == labels
    ]
    if len(found) != 1:
        raise AssertionError(f"{len(found)} samples of {name}{labels}")
    return float(found[0])


def sample_or_zero(text: str, name: str, **labels: str) -> float:
    """Like `sample`, for series that appear only once something happened."""
    try:
        return sample(text, name, **labels)
    except AssertionError:
        return 0.0
