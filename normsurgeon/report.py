"""One report type for every transform: a record per BatchNorm site."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Action", "SiteRecord", "ConversionReport"]


class Action:
    """What happened to a BatchNorm site."""

    FOLDED = "folded"
    REPLACED = "replaced"
    RECALIBRATED = "recalibrated"
    SKIPPED = "skipped"
    EXCLUDED = "excluded"


@dataclass
class SiteRecord:
    """One BatchNorm site.

    ``name`` is the module's qualified name (or ``<region>:<node>`` for a functional
    ``F.batch_norm``); ``target`` the layer it was folded into or replaced by; ``reason`` why it
    was left alone (empty when it was transformed); ``trace`` how its region was analysed.
    """

    name: str
    kind: str
    action: str
    target: str = ""
    detail: str = ""
    reason: str = ""
    trace: str = ""
    samples: int | None = None  # recalibration: values seen per channel
    moved: float | None = None  # recalibration: max |Δ running_mean| in old standard deviations

    @property
    def changed(self) -> bool:
        return self.action in (Action.FOLDED, Action.REPLACED, Action.RECALIBRATED)


@dataclass
class ConversionReport:
    """Everything ``convert`` did and did not do.

    ``sites`` lists every BatchNorm in the model exactly once. ``regions`` maps each traced
    region (``""`` is the whole model) to how it was traced: ``symbolic`` (torch.fx),
    ``concrete`` (fx with example values, shape-specialised, used for analysis only) or
    ``untraceable: <error>``. ``max_rel_error`` is ``rel(converted, original)`` on the example
    inputs when they were given, and ``bar`` the self-check's allowed error (docs/bars.md).
    """

    transform: str
    sites: list[SiteRecord] = field(default_factory=list)
    regions: dict[str, str] = field(default_factory=dict)
    max_rel_error: float | None = None
    bar: float | None = None  # the self-check's allowed rel error (docs/bars.md)
    seconds: float = 0.0
    dry_run: bool = False

    # -- summaries -----------------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        """Number of sites per action."""
        return dict(Counter(s.action for s in self.sites))

    @property
    def num_changed(self) -> int:
        return sum(s.changed for s in self.sites)

    @property
    def skipped(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.action == Action.SKIPPED]

    def __getitem__(self, key: str | int) -> SiteRecord:
        """``report["layer1.0.bn1"]`` by name, or ``report[0]`` by position."""
        if isinstance(key, int):
            return self.sites[key]
        for s in self.sites:
            if s.name == key:
                return s
        raise KeyError(f"no BatchNorm site named {key!r} in this report")

    def __iter__(self) -> Iterator[SiteRecord]:
        """``for site in report``: the SiteRecords, in model order."""
        return iter(self.sites)

    def __contains__(self, name: object) -> bool:
        return any(s.name == name for s in self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def summary(self) -> str:
        c = self.counts
        parts = [f"{len(self.sites)} BatchNorm site(s)"]
        parts += [f"{c[a]} {a}" for a in (Action.FOLDED, Action.REPLACED, Action.RECALIBRATED,
                                           Action.SKIPPED, Action.EXCLUDED) if c.get(a)]
        text = f"[{self.transform}{', dry run' if self.dry_run else ''}] " + ", ".join(parts)
        if self.max_rel_error is not None:
            text += f"; max rel error vs original {self.max_rel_error:.2e}"
        return text

    def table(self, max_width: int = 110) -> str:
        """A fixed-width table, one row per site, then the summary line."""
        header = ("BatchNorm", "kind", "action", "into / why")
        import textwrap

        rows = []
        for s in self.sites:
            what = s.target + (f" ({s.detail})" if s.detail else "") if s.changed else s.reason
            # long reasons wrap onto continuation rows: nothing is cut (hints such as "pass
            # example_inputs" come last)
            parts = textwrap.wrap(what, max_width) or [""]
            rows.append((s.name, s.kind, s.action, parts[0]))
            rows += [("", "", "", more) for more in parts[1:]]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        untraced = {k: v for k, v in self.regions.items() if v.startswith("untraceable")}
        for k, v in untraced.items():
            lines.append(f"note: {k or '<model>'} {v}")
        lines.append(self.summary())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "transform": self.transform,
            "counts": self.counts,
            "max_rel_error": self.max_rel_error,
            "bar": self.bar,
            "seconds": self.seconds,
            "dry_run": self.dry_run,
            "regions": dict(self.regions),
            "sites": [asdict(s) for s in self.sites],
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)


@dataclass
class ConversionResult:
    """What :func:`normsurgeon.convert_with_report` returns: the converted model (an
    ``nn.Module``, ``ExportedProgram`` or ``onnx.ModelProto``) and its report."""

    model: Any
    report: ConversionReport

    def __iter__(self):  # allows ``model, report = convert_with_report(...)``
        return iter((self.model, self.report))

    def __getitem__(self, i: int) -> Any:  # ... and ``convert_with_report(...)[1]``
        return (self.model, self.report)[i]

    def __len__(self) -> int:
        return 2
