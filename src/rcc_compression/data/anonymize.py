"""Anonymising an image-text dataset: personal data out of captions, metadata out of images, faces blurred.

:func:`anonymize_dataset` writes a copy of a dataset, in the same format, in which

* every caption, question and answer went through Microsoft Presidio: its analyzer finds personal
  data (names, places, e-mail addresses, phone numbers, card and bank numbers, IP addresses) and
  its anonymizer replaces each span by its type (``<PERSON>``, ``<EMAIL_ADDRESS>``...); nothing
  else of the text changes;
* every image is decoded (bounded, :mod:`.images`) and written again from its pixels alone, so
  EXIF (GPS position, camera, time), XMP, IPTC, ICC profiles, comments and text chunks are gone;
  the EXIF orientation is applied first, so the picture looks as before;
* faces found by OpenCV's Haar cascade (``haarcascade_frontalface_default.xml``, shipped with
  ``opencv-python-headless``) are blurred beyond recognition;

and a report (``anonymization_report.json``) that says, per entity type and per recognizer, how
many spans were replaced, which metadata each image lost and how many faces were blurred, without
repeating any of the personal data it removed.

Names and places need a named-entity model. With a spaCy pipeline installed (``--nlp-model``,
default ``en_core_web_sm``; not on PyPI: ``python -m spacy download en_core_web_sm``) Presidio's
spaCy recognizer finds them. Without one, a blank spaCy tokenizer runs Presidio's pattern
recognizers, and names are found by a heuristic (:class:`CapitalisedNameRecognizer`): runs of
capitalised words. It misses names written in lower case and a single name that starts a
sentence, and it reports any capitalised proper noun (a place, a brand) as ``PERSON``. The report
names the engine that ran.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..utils.io import atomic_write_json
from ..utils.logging import get_logger
from .images import open_image
from .secure import DATASET_FORMATS, DATASET_MAX_PIXELS, DatasetGuard, iter_files
from .world import ensure_world

log = get_logger("data")

REPORT_NAME = "anonymization_report.json"
DEFAULT_ENTITIES = ("PERSON", "LOCATION", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE",
                    "IP_ADDRESS")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
#: words that start a caption in capitals without being a name
_COMMON = frozenset("""a an the this that these those there here it its one two three four five six seven eight nine
ten some many several few all each every no not and or but with without of in on at by for from to into onto over under
above below near next behind front left right top bottom inside outside is are was were be being been has have had do
does did what which who whom whose where when why how my your his her our their i we you he she they me us him them
photo picture image view close closeup shot""".split())
_UPPER = "A-ZÀ-ÖØ-ÞĀ-Ž"
_WORD = rf"[{_UPPER}][\w'’\-]*"
_RUN = re.compile(rf"(?<![\w@.]){_WORD}(?:[ \t]+{_WORD})*(?![\w@])")
_SENTENCE_END = re.compile(r"[.!?:;]\s*$")


# ------------------------------------------------------------------------------------- text
def capitalised_names(text: str) -> list[tuple[int, int]]:
    """Spans of likely names: runs of capitalised words, less leading common words, and single capitalised
    words that do not start a sentence."""
    spans = []
    for m in _RUN.finditer(text):
        words = [(w.start() + m.start(), w.end() + m.start()) for w in re.finditer(r"\S+", m.group())]
        while words and text[words[0][0]:words[0][1]].lower().strip("'’-") in _COMMON:
            words.pop(0)
        if not words:
            continue
        start, end = words[0][0], words[-1][1]
        sentence_start = start == 0 or bool(_SENTENCE_END.search(text[:start]))
        if len(words) >= 2 or not sentence_start:
            spans.append((start, end))
    return spans


def _name_recognizer_class() -> type:
    from presidio_analyzer import EntityRecognizer, RecognizerResult

    class CapitalisedNameRecognizer(EntityRecognizer):
        """``PERSON`` spans by :func:`capitalised_names` (for when no named-entity model is installed)."""

        def __init__(self) -> None:
            super().__init__(supported_entities=["PERSON"], name="CapitalisedNameRecognizer",
                             supported_language="en")

        def load(self) -> None:  # nothing to load
            pass

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[Any]:
            if "PERSON" not in entities:
                return []
            return [RecognizerResult("PERSON", s, e, 0.6,
                                     analysis_explanation=None,
                                     recognition_metadata={RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                                                           RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id})
                    for s, e in capitalised_names(text)]

    return CapitalisedNameRecognizer


def _offline_email_check() -> None:
    """Presidio's e-mail recognizer checks domains with ``tldextract``, which would fetch the public suffix
    list from the web on first use; it gets the snapshot ``tldextract`` ships instead (no data leaves the machine)."""
    import tldextract
    from presidio_analyzer.predefined_recognizers.generic import email_recognizer

    if not isinstance(getattr(email_recognizer, "tldextract", None), _OfflineTld):
        email_recognizer.tldextract = _OfflineTld(tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None))


class _OfflineTld:
    def __init__(self, extractor: Any) -> None:
        self.extract = extractor


@dataclass
class TextScrubber:
    """Presidio's analyzer and anonymizer over short texts; counts what it replaced, by entity and recognizer.

    ``nlp_model``: the spaCy pipeline for named entities (``None``: never load one, use the
    heuristic); ``score_threshold``: the analyzer's minimum confidence.
    """

    entities: Sequence[str] = DEFAULT_ENTITIES
    nlp_model: str | None = "en_core_web_sm"
    score_threshold: float = 0.4
    counts: Counter = field(default_factory=Counter)
    by_recognizer: Counter = field(default_factory=Counter)
    scanned: int = 0
    changed: int = 0

    def __post_init__(self) -> None:
        try:
            import spacy
            from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
            from presidio_analyzer.nlp_engine import SpacyNlpEngine
            from presidio_anonymizer import AnonymizerEngine
        except ImportError:
            raise ConfigError("anonymisation needs Presidio: pip install 'rcc-compression[privacy]'") from None
        _offline_email_check()
        has_ner = bool(self.nlp_model) and spacy.util.is_package(self.nlp_model)
        nlp = spacy.load(self.nlp_model) if has_ner else spacy.blank("en")
        if has_ner and "ner" not in nlp.pipe_names:
            raise ConfigError(f"--nlp-model {self.nlp_model}: this spaCy pipeline has no named-entity recognizer")
        engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": self.nlp_model or "blank"}])
        engine.nlp = {"en": nlp}
        registry = RecognizerRegistry(supported_languages=["en"])
        registry.load_predefined_recognizers(languages=["en"], nlp_engine=engine)
        if not has_ner:
            registry.remove_recognizer("SpacyRecognizer")
            registry.add_recognizer(_name_recognizer_class()())
        self.engine = (f"spaCy {self.nlp_model} {nlp.meta.get('version', '')} (named entities)".strip() if has_ner
                       else "blank spaCy tokenizer, no named-entity model: names by the capitalised-words heuristic, "
                            "no LOCATION")
        if self.nlp_model and not has_ner:
            log.warning("spaCy pipeline %s is not installed: names are found by a heuristic (capitalised words), "
                        "places not at all; install a pipeline with named entities for them", self.nlp_model)
        self.analyzer = AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])
        self.anonymizer = AnonymizerEngine()
        wanted = set(self.entities)
        self.recognizers = sorted(r.name for r in registry.recognizers
                                  if wanted & set(r.supported_entities) and "en" == r.supported_language)

    def scrub(self, text: str) -> str:
        """``text`` with every span of personal data replaced by ``<ENTITY_TYPE>``."""
        self.scanned += 1
        if not text:
            return text
        found = self.analyzer.analyze(text=text, language="en", entities=list(self.entities),
                                      score_threshold=self.score_threshold)
        if not found:
            return text
        out = self.anonymizer.anonymize(text=text, analyzer_results=found)
        if out.text != text:
            self.changed += 1
        self.counts.update(item.entity_type for item in out.items)  # spans replaced, after overlaps are merged
        self.by_recognizer.update((r.recognition_metadata or {}).get("recognizer_name", "?") for r in found)
        return out.text

    def describe(self) -> dict[str, Any]:
        return {"engine": self.engine, "entities_searched": list(self.entities), "recognizers": self.recognizers,
                "replaced": dict(sorted(self.counts.items())),
                "detections_by_recognizer": dict(sorted(self.by_recognizer.items())),
                "texts_scanned": self.scanned, "texts_changed": self.changed,
                "score_threshold": self.score_threshold}


# ------------------------------------------------------------------------------------- images
@dataclass
class ImageSanitizer:
    """Writes images again from their pixels (no metadata), faces blurred; counts what it removed."""

    blur_faces: bool = True
    removed: Counter = field(default_factory=Counter)
    images: int = 0
    faces: int = 0
    with_faces: int = 0

    def __post_init__(self) -> None:
        self.detector: Any = None
        if self.blur_faces:
            try:
                import cv2
            except ImportError:
                raise ConfigError("face blurring needs OpenCV: pip install 'rcc-compression[privacy]' "
                                  "(or --keep-faces)") from None
            path = os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", ""),
                                "haarcascade_frontalface_default.xml")
            if not hasattr(cv2, "CascadeClassifier") or not os.path.isfile(path):
                raise ConfigError(f"OpenCV {cv2.__version__} ships no Haar face cascade; install "
                                  "opencv-python-headless<5 (or pass --keep-faces)")
            self.detector = cv2.CascadeClassifier(path)
            self.detector_name = f"OpenCV {cv2.__version__} Haar cascade haarcascade_frontalface_default.xml"

    def metadata_of(self, img: Any) -> list[str]:
        """The kinds of metadata an opened PIL image carries."""
        kinds = []
        exif = img.getexif()
        if len(exif):
            kinds.append("exif")
            if exif.get_ifd(0x8825):
                kinds.append("gps")
        for key, kind in (("icc_profile", "icc_profile"), ("xmp", "xmp"), ("XML:com.adobe.xmp", "xmp"),
                          ("comment", "comment"), ("photoshop", "iptc"), ("dpi", "dpi")):
            if key in img.info and kind not in kinds:
                kinds.append(kind)
        if getattr(img, "text", None):
            kinds.append("text_chunks")
        return kinds

    def sanitize(self, data: bytes, what: str) -> tuple[bytes, dict[str, Any]]:
        """The image in ``data`` re-encoded from its pixels (same format), faces blurred; and what changed."""
        import numpy as np
        from PIL import Image, ImageOps

        img = open_image(data, max_pixels=DATASET_MAX_PIXELS, formats=DATASET_FORMATS, mode=None, what=what)
        fmt, kinds = img.format, self.metadata_of(img)
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            mode = "RGBA"
        else:
            mode = "L" if img.mode in ("L", "1") else "RGB"
        arr = np.asarray(img.convert(mode)).copy()
        boxes = self._faces(arr) if self.detector is not None else []
        for x, y, w, h in boxes:  # the box grown by 15 % a side: hairline, ears and chin go too
            dx, dy = int(0.15 * w), int(0.15 * h)
            x0, y0 = max(0, x - dx), max(0, y - dy)
            x1, y1 = min(arr.shape[1], x + w + dx), min(arr.shape[0], y + h + dy)
            arr[y0:y1, x0:x1] = _blur(arr[y0:y1, x0:x1])
        clean = Image.fromarray(arr)
        buf = io.BytesIO()
        save_fmt = fmt if fmt in ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM") else "PNG"
        if save_fmt == "JPEG" and clean.mode == "RGBA":
            clean = clean.convert("RGB")
        clean.save(buf, format=save_fmt, **({"quality": 95} if save_fmt in ("JPEG", "WEBP") else {}))
        self.images += 1
        self.removed.update(kinds)
        self.faces += len(boxes)
        self.with_faces += bool(boxes)
        return buf.getvalue(), {"metadata_removed": kinds, "faces_blurred": len(boxes)}

    def _faces(self, arr: Any) -> list[tuple[int, int, int, int]]:
        import cv2

        gray = cv2.cvtColor(arr[..., :3], cv2.COLOR_RGB2GRAY) if arr.ndim == 3 else arr
        side = min(gray.shape[:2])
        if side < 24:
            return []
        found = self.detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        return [tuple(int(v) for v in box) for box in found]

    def describe(self) -> dict[str, Any]:
        return {"images": self.images, "metadata_removed": dict(sorted(self.removed.items())),
                "faces_blurred": self.faces, "images_with_faces": self.with_faces,
                "face_detector": getattr(self, "detector_name", "off (--keep-faces)")}


def _blur(region: Any) -> Any:
    """Pixelate to 4 x 4 blocks, then blur over half the face: no facial detail survives (nor does the
    detector find a face there again)."""
    import cv2

    h, w = region.shape[:2]
    big = cv2.resize(cv2.resize(region, (4, 4), interpolation=cv2.INTER_AREA), (w, h),
                     interpolation=cv2.INTER_NEAREST)
    k = max(3, (min(w, h) // 2) | 1)
    return cv2.GaussianBlur(big, (k, k), 0)


# ------------------------------------------------------------------------------------- formats
def _scrub_karpathy(data: dict[str, Any], scrub: Callable[[str], str]) -> int:
    changed = 0
    for entry in data.get("images", []):
        for sent in entry.get("sentences", []) if isinstance(entry, dict) else []:
            if isinstance(sent, dict) and isinstance(sent.get("raw"), str):
                new = scrub(sent["raw"])
                if new != sent["raw"]:
                    sent["raw"], changed = new, changed + 1
                    if isinstance(sent.get("tokens"), list):  # placeholders kept whole
                        sent["tokens"] = [t if t.startswith("<") else t.lower()
                                          for t in re.findall(r"<[A-Z_]+>|\w+", new)]
    return changed


def _scrub_vqa(data: dict[str, Any], scrub: Callable[[str], str]) -> int:
    changed = 0
    for q in data.get("questions", []):
        if isinstance(q, dict) and isinstance(q.get("question"), str):
            new = scrub(q["question"])
            changed += new != q["question"]
            q["question"] = new
    for ann in data.get("annotations", []):
        if not isinstance(ann, dict):
            continue
        for a in ann.get("answers", []) if isinstance(ann.get("answers"), list) else []:
            if isinstance(a, dict) and isinstance(a.get("answer"), str):
                new = scrub(a["answer"])
                changed += new != a["answer"]
                a["answer"] = new
        if isinstance(ann.get("multiple_choice_answer"), str):
            ann["multiple_choice_answer"] = scrub(ann["multiple_choice_answer"])
    return changed


def _scrub_json(src: Path, scrub: Callable[[str], str]) -> tuple[bytes | None, int, str]:
    """(new bytes or None when not a text-bearing format, texts changed, kind)."""
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{src}: not readable JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("images"), list) and any(
            isinstance(e, dict) and "sentences" in e for e in data["images"]):
        n, kind = _scrub_karpathy(data, scrub), "karpathy captions"
    elif isinstance(data, dict) and (isinstance(data.get("questions"), list)
                                     or isinstance(data.get("annotations"), list)):
        n, kind = _scrub_vqa(data, scrub), "vqa"
    else:
        return None, 0, "json (no captions)"
    return (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8"), n, kind


def _scrub_tsv(src: Path, scrub: Callable[[str], str]) -> tuple[bytes, int]:
    with open(src, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    body = [r for r in rows if r]
    cap_col, start = 0, 0
    if body and len(body[0]) == 2:
        head = [c.strip().lower() for c in body[0]]
        if any(h in ("caption", "text") for h in head):
            cap_col, start = (0 if head[0] in ("caption", "text") else 1), 1
        elif body[0][0].strip().lower().endswith(IMAGE_SUFFIXES):
            cap_col = 1
    changed = 0
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
    for i, row in enumerate(rows):
        if row and i >= start and len(row) == 2 and (i > 0 or start == 0):
            new = scrub(row[cap_col])
            changed += new != row[cap_col]
            row = list(row)
            row[cap_col] = new
        writer.writerow(row)
    return out.getvalue().encode("utf-8"), changed


# ------------------------------------------------------------------------------------- the dataset
def _source_root(spec: str) -> tuple[Path | None, str | None]:
    """(directory to copy, or None) and (HF dataset name, or None) for a spec."""
    if spec.startswith("hf:"):
        return None, spec[3:]
    if spec == "world" or spec.startswith("world:"):
        return Path(ensure_world()), None
    p = Path(os.path.expanduser(spec))
    if p.is_file():
        return p.parent, None
    if p.is_dir():
        return p, None
    raise DataError(f"{spec}: no such file or directory")


def _is_hf_dir(root: Path) -> bool:
    return any((root / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def anonymize_dataset(spec: str | os.PathLike[str], output: str | os.PathLike[str], *,
                      entities: Sequence[str] = DEFAULT_ENTITIES, nlp_model: str | None = "en_core_web_sm",
                      blur_faces: bool = True, overwrite: bool = False,
                      progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Write an anonymised copy of the dataset ``spec`` to ``output``; returns (and writes) the report.

    ``spec`` is a dataset directory or file (the directory holding it is copied: every format the
    project reads), ``world``, or ``hf:NAME`` / a directory saved by ``datasets``. The copy is
    built in a temporary directory beside ``output`` and renamed into place when complete.
    """
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    root, hf_name = _source_root(str(spec))
    text = TextScrubber(entities=entities, nlp_model=nlp_model)
    images = ImageSanitizer(blur_faces=blur_faces)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files: list[dict[str, Any]] = []
    try:
        if hf_name is not None or (root is not None and _is_hf_dir(root)):
            files = _anonymize_hf(hf_name or str(root), tmp, text, images)
        else:
            files = _anonymize_tree(root, tmp, text, images, progress)
        report = {"format": "rcc-anonymization-report", "source": str(spec), "output": str(out),
                  "text": text.describe(), "images": images.describe(),
                  "files_changed": [f for f in files if f.get("changed")],
                  "files_copied_unchanged": sorted(f["path"] for f in files if not f.get("changed")),
                  "not_covered": "file names, folder names and class names are copied as they are; text inside "
                                 "images is not read"}
        atomic_write_json(tmp / REPORT_NAME, report)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _anonymize_tree(root: Path, dst: Path, text: TextScrubber, images: ImageSanitizer,
                    progress: Callable[[str, int, int], None] | None) -> list[dict[str, Any]]:
    guard = DatasetGuard(root)
    paths = list(iter_files(guard.root))
    files = []
    for n, src in enumerate(paths, 1):
        rel = guard.relative(src)  # a link out of the root is refused, never followed
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        entry: dict[str, Any] = {"path": rel}
        suffix = src.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            data, info = images.sanitize(src.read_bytes(), str(src))
            target.write_bytes(data)
            entry.update(kind="image", **info, changed=bool(info["metadata_removed"] or info["faces_blurred"]))
        elif suffix == ".json":
            data, changed, kind = _scrub_json(src, text.scrub)
            target.write_bytes(data) if data is not None else shutil.copyfile(src, target)
            entry.update(kind=kind, texts_changed=changed, changed=changed > 0)
        elif suffix == ".tsv":
            data, changed = _scrub_tsv(src, text.scrub)
            target.write_bytes(data)
            entry.update(kind="tsv captions", texts_changed=changed, changed=changed > 0)
        else:
            shutil.copyfile(src, target)
            entry.update(kind="copied")
        files.append(entry)
        if progress is not None:
            progress("anonymize", n, len(paths))
    return files


def _anonymize_hf(name: str, dst: Path, text: TextScrubber, images: ImageSanitizer) -> list[dict[str, Any]]:
    """A Hugging Face dataset (saved directory or cached name): text columns scrubbed, images cleaned."""
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets are not installed: pip install 'rcc-compression[data]'") from None
    path = Path(os.path.expanduser(name))
    obj = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(name)
    parts = obj if isinstance(obj, datasets.DatasetDict) else {"": obj}
    files = []
    for split, ds in parts.items():
        ds, changed = _anonymize_hf_split(ds, text, images)
        parts[split] = ds
        files.append({"path": split or ".", "kind": "hf dataset", "texts_changed": changed, "changed": changed > 0})
    result = datasets.DatasetDict(parts) if isinstance(obj, datasets.DatasetDict) else parts[""]
    result.save_to_disk(str(dst))
    return files


def _anonymize_hf_split(ds: Any, text: TextScrubber, images: ImageSanitizer) -> tuple[Any, int]:
    import datasets

    image_cols = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    for c in image_cols:
        ds = ds.cast_column(c, datasets.Image(decode=False))
    text_cols = [c for c, f in ds.features.items() if _is_text_feature(f)]
    counter = {"changed": 0}

    def fix(row: dict[str, Any]) -> dict[str, Any]:
        for c in text_cols:
            row[c] = _scrub_value(row[c], text.scrub, counter)
        for c in image_cols:
            value = row[c]
            data = value.get("bytes") if isinstance(value, dict) else None
            if data is None and isinstance(value, dict) and value.get("path"):
                data = Path(value["path"]).read_bytes()
            if data is not None:
                clean, _ = images.sanitize(data, f"{c}")
                row[c] = {"bytes": clean, "path": None}
        return row

    return ds.map(fix, load_from_cache_file=False), counter["changed"]


def _is_text_feature(f: Any) -> bool:
    import datasets

    if isinstance(f, datasets.Value):
        return f.dtype in ("string", "large_string")
    inner = getattr(f, "feature", None)
    return inner is not None and _is_text_feature(inner) if not isinstance(f, dict) else any(
        _is_text_feature(v) for v in f.values())


def _scrub_value(value: Any, scrub: Callable[[str], str], counter: dict[str, int]) -> Any:
    if isinstance(value, str):
        new = scrub(value)
        counter["changed"] += new != value
        return new
    if isinstance(value, list):
        return [_scrub_value(v, scrub, counter) for v in value]
    if isinstance(value, dict):
        return {k: _scrub_value(v, scrub, counter) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------- measuring
PLANT_FIRST = ("Maria", "John", "Aisha", "Wei", "Olga", "Carlos", "Priya", "Liam", "Fatima", "Kenji", "Sofia", "Ahmed",
               "Emma", "Mateo", "Chloe", "Dmitri", "Nia", "Lucas", "Ingrid", "Tomasz", "Amara", "Hiroshi", "Elena",
               "Kwame", "Zoe", "Rafael", "Leila", "Noah", "Yuki", "Omar")
PLANT_LAST = ("Garcia", "Smith", "Khan", "Chen", "Petrova", "Silva", "Patel", "Murphy", "Haddad", "Tanaka", "Rossi",
              "Hassan", "Johansson", "Lopez", "Dubois", "Ivanov", "Okafor", "Martin", "Berg", "Nowak", "Mensah", "Sato",
              "Popescu", "Asante", "Fischer", "Costa", "Nasser", "Williams", "Kim", "Farouk")
PLANT_TEMPLATES = {
    "PERSON": ("{c} photo by {p}", "{p} took this: {c}", "{c} (owner: {p})"),
    "EMAIL_ADDRESS": ("{c} contact {p}", "sent by {p}: {c}"),
    "PHONE_NUMBER": ("{c} call {p} for prints", "{c} tel. {p}"),
}
_PLANT_DOMAINS = ("example.com", "mail.example.org", "photos.example.net", "uni.example.edu")
_PLANT_PHONES = ("(415) 555-{:04d}", "+1 212 555 {:04d}", "+44 20 7946 {:04d}", "020 7946 {:04d}", "+49 30 9018{:04d}")


@dataclass
class PlantedCaptions:
    """Captions with personal data planted in some: what a scrubber gets and what it should give back."""

    planted: list[str]
    expected: list[str]  #: each planted value replaced by ``<ENTITY_TYPE>``, every other character as it was
    values: list[tuple[int, str, str]]  #: (caption index, entity type, planted value)

    def score(self, scrubbed: Sequence[str]) -> dict[str, Any]:
        """Share of planted values gone, and how many captions differ from what was expected."""
        removed = sum(v not in scrubbed[i] for i, _, v in self.values)
        by_kind = Counter(k for _, k, _ in self.values)
        missed = Counter(k for i, k, v in self.values if v in scrubbed[i])
        wrong = [i for i, (o, e) in enumerate(zip(scrubbed, self.expected, strict=True)) if o != e]
        return {"captions": len(self.planted), "planted": len(self.values), "removed": removed,
                "removed_share": removed / max(len(self.values), 1), "planted_by_type": dict(by_kind),
                "missed_by_type": dict(missed), "captions_not_as_expected": len(wrong),
                "unplanted_changed": sum(1 for i in wrong if i not in {j for j, _, _ in self.values})}


def plant_pii(captions: Sequence[str], n: int, seed: int = 0) -> PlantedCaptions:
    """Plant ``n`` names, e-mail addresses and phone numbers (in turn) into ``n`` seeded captions of ``captions``.

    Names are "First Last" from lists of many origins, e-mails ``first.last@<example domain>``,
    phones in US, UK and German formats; each goes in by one of a few phrasings, at the end or
    the start of the caption.
    """
    import random

    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(captions)), n))
    kinds = list(PLANT_TEMPLATES)
    planted, expected, values = [], [], []
    for i, c in enumerate(captions):
        if i not in chosen:
            planted.append(c)
            expected.append(c)
            continue
        kind = kinds[len(values) % len(kinds)]
        first, last = rng.choice(PLANT_FIRST), rng.choice(PLANT_LAST)
        value = {"PERSON": f"{first} {last}",
                 "EMAIL_ADDRESS": f"{first.lower()}.{last.lower()}@{rng.choice(_PLANT_DOMAINS)}",
                 "PHONE_NUMBER": rng.choice(_PLANT_PHONES).format(rng.randrange(10000))}[kind]
        template = rng.choice(PLANT_TEMPLATES[kind])
        planted.append(template.format(c=c, p=value))
        expected.append(template.format(c=c, p=f"<{kind}>"))
        values.append((i, kind, value))
    return PlantedCaptions(planted, expected, values)
