"""The byte budgets of the sparse (``dare``) and low-rank (``nullu``) parts over a cascade's rounds.

Scheduling each stage's own target along the rounds (pruning rate ``p f``, parameter budget
``1 - (1 - b) f``) lets early rounds hold nearly dense factors next to a mostly dense S: a run
of four rounds stored 1.6 times the dense bytes after its first steps. Here the two parts are
scheduled together, in bytes. With ``S_F`` and ``L_F`` the bytes of S and of the factors that the
final targets store and ``D`` the dense weights' bytes, round ``k`` (schedule fraction ``f_k``)
aims at the total

    T_k = D - f_k (D - S_F - L_F),

split between the parts in the final proportion (``S_k = c_k S_F``, ``L_k = c_k L_F``,
``c_k = T_k / (S_F + L_F)``). Both parts only shrink from round to round, so masks only lose
entries and ranks only fall, and the totals ``T_k`` fall to the final one; a step in round ``k``
stores at most what round ``k - 1`` ended with (the first stage of the round shrinks its part,
the second spends at most what the first freed). The byte model is the planner's, that is, what a
saved checkpoint holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .planner import LayerShape, layer_bytes


def _sparse_bytes(shapes: Sequence[LayerShape], p: float, scope: str) -> float:
    return float(sum(layer_bytes(s, p, None, False, bias=False, scope=scope) for s in shapes))


def _lowrank_bytes(shapes: Sequence[LayerShape], b: float, allocation: str) -> float:
    if allocation == "global":
        return b * sum(s.out_features * s.in_features * s.element_size for s in shapes)
    return float(sum(layer_bytes(s, None, b, False, bias=False) for s in shapes))


def _bisect(f: Any, target: float, good: float, bad: float, iters: int = 50) -> float:
    """The point nearest ``bad`` on the segment from ``good`` to ``bad`` where a monotone ``f`` is ``<= target``.

    ``bad`` itself when ``f(bad) <= target``; else bisection that keeps ``f(good) <= target`` (``good``
    is returned as it is when no point nearer ``bad`` qualifies). The largest budget within a byte
    target is ``_bisect(f, t, lo, hi)``; the smallest pruning rate is ``_bisect(f, t, hi, lo)``.
    """
    if f(bad) <= target:
        return bad
    for _ in range(iters):
        mid = (good + bad) / 2
        if f(mid) <= target:
            good = mid
        else:
            bad = mid
    return good


def joint_schedule(
    shapes: Sequence[LayerShape],
    pruning_rate: float,
    param_budget: float,
    fractions: Sequence[float],
    prune_scope: str = "layer",
    rank_allocation: str = "layer",
) -> list[dict[str, float]]:
    """Per round, the ``pruning_rate`` and ``param_budget`` whose bytes follow the joint schedule.

    ``fractions`` are the schedule fractions ``f_k`` of the rounds (the last one is 1). Each entry
    also holds the bytes it plans (``sparse_bytes``, ``lowrank_bytes``, ``total_bytes``) and the
    dense weights' bytes (``dense_bytes``). Pruning rates never fall and budgets never rise from
    one round to the next; the final round gets exactly the final targets.
    """
    dense = float(sum(s.out_features * s.in_features * s.element_size for s in shapes))
    s_final = _sparse_bytes(shapes, pruning_rate, prune_scope)
    l_final = _lowrank_bytes(shapes, param_budget, rank_allocation)
    t_final = s_final + l_final
    out: list[dict[str, float]] = []
    prev_p, prev_b = 0.0, 1.0
    for f in fractions:
        if f >= 1.0 or t_final >= dense:
            p, b = pruning_rate, param_budget
        else:
            c = (dense - f * (dense - t_final)) / t_final
            b = _bisect(lambda x: _lowrank_bytes(shapes, x, rank_allocation), c * l_final, param_budget, 1.0)
            b = min(b, prev_b)
            room = c * t_final - _lowrank_bytes(shapes, b, rank_allocation)
            p = max(_bisect(lambda x: _sparse_bytes(shapes, x, prune_scope), room, 1.0 - 1e-9, 0.0), prev_p)
            p = min(p, pruning_rate) if f < 1.0 else p
            b = max(b, param_budget)
        prev_p, prev_b = p, b
        sb, lb = _sparse_bytes(shapes, p, prune_scope), _lowrank_bytes(shapes, b, rank_allocation)
        out.append({"pruning_rate": p, "param_budget": b, "sparse_bytes": sb, "lowrank_bytes": lb,
                    "total_bytes": sb + lb, "dense_bytes": dense})
    return out
