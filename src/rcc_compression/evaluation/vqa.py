"""VQA accuracy as the official VQAv2 evaluation computes it (soft accuracy over ten answers).

For each question, the prediction is scored against every leave-one-out subset of nine human
answers as ``min(1, matches / 3)``, and the ten scores are averaged. Answers are normalised with
the official rules (punctuation, number words to digits, articles dropped, contractions), and, as
in the official script, only when the human answers disagree; ``official=False`` normalises always.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..analysis.stats import DEFAULT_SAMPLES, bootstrap_ci
from ..errors import DataError
from .common import image_batches

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: drop or space out punctuation, strip sentence periods."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))  # the official script passes re.UNICODE as count


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: number words to digits, articles dropped, contractions fixed."""
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Whitespace cleanup, punctuation and digit/article processing, as the official evaluation does."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], official: bool = True) -> float:
    """Soft VQA accuracy of one prediction against the human answers (usually ten)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    if not official or len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    if len(gts) == 1:  # leave-one-out is undefined for one answer: exact match
        return float(gts[0] == pred)
    scores = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        scores.append(min(1.0, matches / 3.0))
    return float(np.mean(scores))


def vqa_metrics(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], answer_types: Sequence[str] | None = None,
    samples: int = DEFAULT_SAMPLES, seed: int = 0, official: bool = True,
) -> dict[str, Any]:
    """Overall soft accuracy (and per answer type) with bootstrap CIs over questions."""
    if len(predictions) != len(answers):
        raise DataError(f"{len(predictions)} predictions for {len(answers)} questions")
    acc = np.array([vqa_accuracy(p, a, official) for p, a in zip(predictions, answers, strict=True)])
    metrics: dict[str, Any] = {"accuracy": bootstrap_ci(acc, samples=samples, seed=seed).to_dict()}
    if answer_types is not None:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(answer_types):
            if t:
                groups[t].append(i)
        for t, idx in sorted(groups.items()):
            metrics[f"accuracy_{t.replace('/', '_')}"] = bootstrap_ci(acc[idx], samples=samples, seed=seed).to_dict()
    return metrics


@torch.no_grad()
def evaluate_vqa(
    wrapper: Any,
    dataset: Any,
    batch_size: int = 32,
    max_length: int = 10,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    progress: bool = False,
    examples: int = 5,
) -> dict[str, Any]:
    """Answer every question of a VQA dataset with a BLIP VQA or LLaVA model and score with soft accuracy."""
    if "vqa" not in getattr(wrapper, "tasks", ()):
        raise DataError("VQA needs a question-answering model (BlipForQuestionAnswering, LLaVA)")
    preds, answers, types, index = [], [], [], []
    for batch in image_batches(dataset, batch_size, progress, "vqa"):
        out = wrapper.answer(batch["pixel_values"].to(wrapper.device, wrapper.dtype), batch["question"],
                             max_length=max_length)
        preds += out
        answers += batch["answers"]
        index += batch["index"].tolist()
    if any(a is None for a in answers):
        raise DataError(f"{dataset.source}: questions without answers; give the annotations file")
    types = [dataset.records[i].meta.get("answer_type", "") for i in index]
    result = {
        "metrics": vqa_metrics(preds, answers, types if any(types) else None, samples, seed),
        "questions": len(preds),
        "examples": [{"question": dataset.records[i].question, "prediction": p, "answers": sorted(set(a))}
                     for i, p, a in list(zip(index, preds, answers, strict=True))[:examples]],
    }
    return result
