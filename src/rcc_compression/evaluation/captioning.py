"""Captioning metrics through ``pycocoevalcap``: BLEU-1..4, METEOR, ROUGE-L, CIDEr (CIDEr-D).

Captions are tokenised with pycocoevalcap's PTB tokenizer (Java); without Java a Python
tokenizer that lower-cases and drops the same punctuation is used and the result says so. METEOR
runs only with Java (it is reported as not computed otherwise, with the reason). SPICE is not
computed: it downloads Stanford CoreNLP models on first use, which needs network.

Confidence intervals resample images. CIDEr-D and ROUGE-L resample per-image scores (for CIDEr the
document frequencies stay those of the whole test set, as in the point estimate); BLEU is
recomputed as a corpus score from per-image n-gram statistics; METEOR's corpus score is not the
mean of its segment scores, so its interval is the spread of resampled segment means, centred on
the corpus score.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..analysis.stats import DEFAULT_SAMPLES, bleu_statistic, bootstrap_ci
from ..errors import DataError
from .common import image_batches

SPICE_NOTE = "SPICE not computed: it needs Stanford CoreNLP models downloaded on first use (no network here)"
_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]+")


def java_available() -> bool:
    """Whether a ``java`` executable is on the PATH (PTB tokenizer and METEOR need it)."""
    return shutil.which("java") is not None


def simple_tokenize(captions: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
    """Lower-case, split words from punctuation, drop PTB punctuation tokens (Java-free fallback)."""
    out = {}
    for key, caps in captions.items():
        out[key] = [" ".join(t for t in _TOKEN.findall(c.lower()) if t not in _PUNCT) for c in caps]
    return out


def tokenize(captions: Mapping[Any, Sequence[str]], use_java: bool | None = None) -> tuple[dict[Any, list[str]], str]:
    """(tokenised captions, tokenizer name): PTB via Java when available, else :func:`simple_tokenize`."""
    if use_java is None:
        use_java = java_available()
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        data = {k: [{"caption": c} for c in v] for k, v in captions.items()}
        return PTBTokenizer().tokenize(data), "ptb"
    return simple_tokenize(captions), "simple"


def bleu_item_stats(
    gts: Mapping[Any, Sequence[str]], res: Mapping[Any, Sequence[str]], n: int = 4
) -> tuple[list[float], np.ndarray]:
    """pycocoevalcap corpus BLEU-1..n and the per-image statistics (``N x (2 + 2n)``) behind them.

    Columns: hypothesis length, closest reference length, clipped matches n=1..N, hypothesis
    n-grams n=1..N, exactly as pycocoevalcap's ``BleuScorer`` sums them.
    """
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=n)
    for key in gts:
        scorer += (res[key][0], list(gts[key]))
    scores, _ = scorer.compute_score(option="closest", verbose=0)
    rows = []
    for comps in scorer.ctest:
        reflen = scorer._single_reflen(comps["reflen"], "closest", comps["testlen"])
        rows.append([comps["testlen"], reflen, *comps["correct"], *comps["guess"]])
    return list(scores), np.asarray(rows, dtype=np.float64)


def caption_metrics(
    gts: Mapping[Any, Sequence[str]],
    res: Mapping[Any, Sequence[str] | str],
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    meteor: bool | None = None,
    use_java: bool | None = None,
) -> dict[str, Any]:
    """BLEU-1..4, ROUGE-L, CIDEr and (with Java) METEOR of predictions ``res`` against references ``gts``.

    ``gts``: image id -> reference captions; ``res``: image id -> one caption (or a one-item list).
    Both are tokenised first (PTB when Java is present). Returns ``metrics`` (name -> estimate with
    CI) and ``notes`` (what was not computed, and why).
    """
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res_lists = {k: [v] if isinstance(v, str) else list(v) for k, v in res.items()}
    if set(gts) != set(res_lists):
        raise DataError(f"predictions and references cover different images ({len(res_lists)} vs {len(gts)})")
    if any(len(v) != 1 for v in res_lists.values()):
        raise DataError("each image needs exactly one predicted caption")
    if any(not refs for refs in gts.values()):
        raise DataError("every image needs at least one reference caption")
    keys = list(gts)
    gts_tok, tokenizer = tokenize({k: list(gts[k]) for k in keys}, use_java)
    res_tok, _ = tokenize({k: res_lists[k] for k in keys}, use_java)
    metrics: dict[str, Any] = {}
    notes: list[str] = []
    bleu_scores, bleu_rows = bleu_item_stats(gts_tok, res_tok, 4)
    for n in range(1, 5):
        cols = [0, 1, *range(2, 2 + n), *range(6, 6 + n)]
        metrics[f"BLEU-{n}"] = bootstrap_ci(
            bleu_rows[:, cols], bleu_statistic(n), samples=samples, seed=seed, point=bleu_scores[n - 1]
        ).to_dict()
    rouge, rouge_items = Rouge().compute_score(gts_tok, res_tok)
    metrics["ROUGE-L"] = bootstrap_ci(np.asarray(rouge_items), samples=samples, seed=seed, point=rouge).to_dict()
    cider, cider_items = Cider().compute_score(gts_tok, res_tok)
    metrics["CIDEr"] = bootstrap_ci(np.asarray(cider_items), samples=samples, seed=seed, point=cider).to_dict()
    run_meteor = java_available() if meteor is None else meteor
    if run_meteor and not java_available():
        notes.append("METEOR not computed: Java was not found on the PATH")
    elif run_meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            score, items = scorer.compute_score(gts_tok, res_tok)
        finally:
            del scorer
        # the corpus METEOR is not the mean of segment scores: keep their spread, centred on the corpus score
        metrics["METEOR"] = bootstrap_ci(
            np.asarray(items), samples=samples, seed=seed, point=score, recentre=True
        ).to_dict()
    else:
        notes.append(
            "METEOR not computed: Java was not found on the PATH"
            if not java_available()
            else "METEOR not computed (disabled)"
        )
    notes.append(SPICE_NOTE)
    if tokenizer != "ptb":
        notes.append("captions tokenised in Python (no Java for the PTB tokenizer); scores may differ slightly")
    return {"metrics": metrics, "tokenizer": tokenizer, "notes": notes, "images": len(keys)}


@torch.no_grad()
def generate_captions(
    wrapper: Any, dataset: Any, batch_size: int = 32, num_beams: int = 3, max_length: int = 30, progress: bool = False
) -> dict[str, str]:
    """Image id -> generated caption for every image of a captions dataset."""
    out: dict[str, str] = {}
    for batch in image_batches(dataset, batch_size, progress, "captioning"):
        caps = wrapper.generate_caption(
            batch["pixel_values"].to(wrapper.device, wrapper.dtype), num_beams=num_beams, max_length=max_length
        )
        for i, cap in zip(batch["index"].tolist(), caps, strict=True):
            out[str(i)] = cap
    return out


def evaluate_captioning(
    wrapper: Any,
    dataset: Any,
    batch_size: int = 32,
    num_beams: int = 3,
    max_length: int = 30,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    progress: bool = False,
    examples: int = 5,
    meteor: bool | None = None,
) -> dict[str, Any]:
    """Caption every image of a captions dataset with a BLIP or LLaVA captioner and score against its references.

    ``meteor=None`` runs METEOR when Java is present (it starts a JVM: tens of seconds).
    """
    if "captioning" not in getattr(wrapper, "tasks", ()):
        raise DataError("captioning needs a captioning model (BLIP captioning, LLaVA)")
    preds = generate_captions(wrapper, dataset, batch_size, num_beams, max_length, progress)
    gts = {k: dataset.records[int(k)].captions for k in preds}
    result = caption_metrics(gts, {k: [v] for k, v in preds.items()}, samples=samples, seed=seed, meteor=meteor)
    result["examples"] = [
        {"image_id": dataset.records[int(k)].image_id, "prediction": preds[k], "references": gts[k][:3]}
        for k in list(preds)[:examples]
    ]
    result["decoding"] = {"num_beams": num_beams, "max_length": max_length}
    empty = sum(1 for v in preds.values() if not v.strip())
    if empty:
        result["notes"].append(f"{empty} generated captions were empty")
    return result
