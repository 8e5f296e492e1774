"""Merging the replicas' Prometheus expositions into the ingress's `/metrics`."""

from __future__ import annotations


def sum_metrics(texts: list[str]) -> str:
    """One exposition with each sample summed over the replicas' expositions."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str]] = {}
    totals: dict[str, dict[tuple, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, (family.type, family.documentation))
            samples = totals.setdefault(family.name, {})
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # a creation time, meaningless summed
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = samples.get(key, 0.0) + sample.value
    lines = []
    for name, (kind, documentation) in families.items():
        lines += [f"# HELP {name} {documentation}", f"# TYPE {name} {kind}"]
        for (sample_name, labels), value in totals[name].items():
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(
                f"{sample_name}{{{label_text}}} {value}" if labels else f"{sample_name} {value}"
            )
    return "\n".join(lines) + "\n" if lines else ""
