"""The dry run: every Linear with its tower, the rule that selected or excluded it, and its planned format and bytes.

``rcc compress --dry-run`` and ``compress_model(..., dry_run=True)`` build this report from the
same selection the stages make (:func:`~.matching.select`) and, with a target rate, from the
same per-layer plan the run would follow, so the layers it lists as compressed are exactly the
layers the real run compresses; nothing is compressed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import CompressionError
from .lowrank import budget_rank
from .matching import linear_layers, match_layers, select
from .planner import Choice, LayerShape, choice_bytes


def union_selection(model: nn.Module, section: Any, stages: Sequence[str]) -> dict[str, list[str]]:
    """Layer name -> the stages that select it, over ``stages`` of a compression section (config order)."""
    chosen: dict[str, list[str]] = {}
    for st in stages:
        cfg = getattr(section, st, None)
        if cfg is None or not hasattr(cfg, "targets"):
            continue
        try:
            names = select(model, cfg.targets, cfg.ignore)
        except CompressionError as exc:
            raise CompressionError(f"compression.{st}: {exc}") from None
        for n in names:
            chosen.setdefault(n, []).append(st)
    return chosen


def dry_run_report(model: nn.Module, section: Any, plan: Mapping[str, Any] | None = None,
                   formats: Mapping[str, tuple[str, int | None]] | None = None) -> dict[str, Any]:
    """Every Linear with its tower, selection rule, and planned format and bytes; nothing is compressed.

    ``plan`` is a rate plan (:func:`~.rate.apply_rate`'s return, which has already written the
    planned stages into ``section``); ``formats`` gives each selected layer's (format, bytes)
    when there is no per-layer plan. Returns ``{"layers": [...], "towers": {...}, "totals": {...}}``.
    """
    stages = list(section.cascade.stages)
    chosen = union_selection(model, section, stages)
    first = next((s for s in stages if hasattr(getattr(section, s, None), "targets")), None)
    cfg = getattr(section, first) if first else None
    rows = match_layers(model, getattr(cfg, "targets", None), getattr(cfg, "ignore", None), check=False)
    per_layer = (plan or {}).get("layers") or {}
    prot = ((plan or {}).get("towers") or {}).get("protection") or {}
    acting = list(dict.fromkeys(s for s in stages if hasattr(getattr(section, s, None), "targets")))
    for row in rows:
        row.selected = row.name in chosen
        if row.selected and set(chosen[row.name]) != set(acting):
            row.notes.append("selected by " + ", ".join(dict.fromkeys(chosen[row.name])) + " only")
        if row.selected and not row.rule.startswith(("targets", "default targets")):
            st = chosen[row.name][0]
            c = getattr(section, st)
            row.rule = f"{st} " + ("targets" if c.targets is not None else "default targets")
        if row.name in prot.get("protected", {}):
            released = row.name in prot.get("released", [])
            row.notes.append(f"{prot['protected'][row.name]}: " + (
                "protection released (the rate needs its bytes)" if released else f">= {prot['bits']} bits"))
        elif row.name in prot.get("lifted", {}):
            row.notes.append(f"protection lifted: {prot['lifted'][row.name]}")
        if not row.selected:
            row.format, row.planned_bytes = "dense (not compressed)", row.dense_bytes
        elif row.name in per_layer:
            entry = per_layer[row.name]
            row.format, row.planned_bytes = str(entry.get("choice") or "float (kept)"), int(entry["bytes"])
        elif formats is not None and row.name in formats:
            row.format, row.planned_bytes = formats[row.name]
        else:
            row.format, row.planned_bytes = "decided on the data at run time", None
    towers: dict[str, dict[str, Any]] = {}
    for row in rows:
        t = towers.setdefault(row.tower, {"linear": 0, "selected": 0, "dense_bytes": 0, "planned_bytes": 0,
                                          "planned_known": True})
        t["linear"] += 1
        t["selected"] += int(row.selected)
        t["dense_bytes"] += row.dense_bytes
        if row.planned_bytes is None:
            t["planned_known"] = False
        else:
            t["planned_bytes"] += row.planned_bytes
    known = all(t["planned_known"] for t in towers.values())
    totals = {"linear": len(rows), "selected": sum(r.selected for r in rows),
              "dense_bytes": sum(r.dense_bytes for r in rows),
              "planned_bytes": sum(r.planned_bytes or 0 for r in rows) if known else None,
              "stages": stages}
    summary = {k: v for k, v in (plan or {}).items() if k not in ("layers", "alternatives")} or None
    if summary is not None:  # the other plans at the same bytes, which the run measures end to end
        summary["alternatives"] = sorted(k for k, v in (plan or {}).get("alternatives", {}).items()
                                         if "layers" in v)
    return {"layers": [r.to_dict() for r in rows], "towers": towers, "totals": totals, "plan": summary}


def format_report(report: Mapping[str, Any]) -> str:
    """The dry-run report as a plain-text table (one line per Linear, then a line per tower)."""
    rows = report["layers"]
    width = max([len(r["name"]) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'tower':<14} {'role':<15} {'shape':>11}  {'compress':<8} "
             f"{'planned format':<30} {'bytes':>19}  rule"]
    for r in rows:
        shape = f"{r['out_features']}x{r['in_features']}"
        planned = "?" if r["planned_bytes"] is None else f"{r['planned_bytes']:,}"
        size = f"{r['dense_bytes']:,}->{planned}"
        lines.append(f"{r['name']:<{width}}  {r['tower']:<14} {r['role']:<15} {shape:>11}  "
                     f"{'yes' if r['selected'] else 'no':<8} {r['format'][:30]:<30} {size:>19}  {r['rule']}"
                     + (f" ({'; '.join(r['notes'])})" if r["notes"] else ""))
    lines.append("")
    for tower, t in report["towers"].items():
        planned = f"{t['planned_bytes']:,}" if t["planned_known"] else "decided at run time"
        lines.append(f"tower {tower}: {t['selected']}/{t['linear']} Linear layers compressed, "
                     f"{t['dense_bytes']:,} dense bytes -> {planned}")
    tot = report["totals"]
    planned = f"{tot['planned_bytes']:,}" if tot["planned_bytes"] is not None else "decided at run time"
    lines.append(f"total: {tot['selected']}/{tot['linear']} Linear layers compressed by "
                 f"{' -> '.join(tot['stages'])}; {tot['dense_bytes']:,} dense bytes -> {planned}")
    alts = (report.get("plan") or {}).get("alternatives")
    if alts:
        lines.append("the run also measures, end to end at the same bytes, the plans " + ", ".join(alts)
                     + ", and keeps the one the gate and the output error favour (formats above: the per-layer plan)")
    return "\n".join(lines) + "\n"


def stage_formats(model: nn.Module, section: Any) -> dict[str, tuple[str, int | None]]:
    """(format, stored bytes) of every selected layer under fixed stage settings (no rate plan).

    Bytes are ``None`` where the data decides them (a rank by energy threshold); formats name
    what each stage does to the layer.
    """
    stages = list(section.cascade.stages)
    chosen = union_selection(model, section, stages)
    layers = linear_layers(model)
    out: dict[str, tuple[str, int | None]] = {}
    for name, by in chosen.items():
        mod = layers[name]
        m, n = mod.out_features, mod.in_features
        es = mod.weight.element_size() if isinstance(mod, nn.Linear) else mod.element_size
        shape = LayerShape(m, n, es, getattr(mod, "bias", None) is not None)
        parts, pruning, rank, known = [], 0.0, 0, True
        keep_s = True
        if "dare" in by:
            d = section.dare
            nm = d.nm_pair()
            pruning = (d.layer_rates or {}).get(name, 1 - nm[0] / nm[1] if nm else d.pruning_rate)
            parts.append(f"{pruning:.0%} sparse" + (f" ({d.nm})" if nm else ""))
        if "nullu" in by and section.nullu.mode == "lowrank":
            u = section.nullu
            if u.layer_ranks and name in u.layer_ranks:
                rank = u.layer_ranks[name]
            elif u.param_budget is not None and u.budget_allocation == "layer":
                rank = budget_rank(m, n, u.param_budget)
            elif u.rank_reduction is not None and u.energy_threshold is None and u.param_budget is None:
                rank = max(1, round(min(m, n) * (1.0 - u.rank_reduction)))
            else:
                known = False
            parts.append(f"rank {rank}" if known else "rank from data")
            keep_s = "dare" in by
        bits = factor_bits = group = None
        sym = True
        if "quant" in by:
            q = section.quant
            fmt = (q.layers or {}).get(name) if q.layers is not None else None
            if q.layers is not None and fmt is None:
                parts.append("float (no quant plan entry)")
            else:
                bits = fmt.bits if fmt is not None else q.bits
                factor_bits = (fmt.factor_bits if fmt is not None else q.factor_bits) or bits
                group = fmt.group_size if fmt is not None else q.group_size
                sym = fmt.symmetric if fmt is not None else q.symmetric
                parts.append(f"int{bits}" + (f"/g{group}" if group else ""))
        for st in by:
            if st not in ("dare", "nullu", "quant"):
                parts.append(st)
        size = None
        if known:
            size = choice_bytes(shape, Choice(pruning_rate=pruning, bits=bits if keep_s else None, group_size=group,
                                              symmetric=sym, rank=rank, factor_bits=factor_bits if rank else None,
                                              keep_s=keep_s), section.dare.resolved_scope())
        out[name] = (" + ".join(parts) or "float", size)
    return out
