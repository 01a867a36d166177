"""Datasets in the common on-disk formats, one class per format (docs/guides/your-dataset.md).

* :class:`ImageFolderDataset` - ImageNet-style ``split/class_folder/image`` plus a class-name file
* :class:`KarpathyCaptionsDataset` (:class:`COCOCaptionsDataset`, :class:`Flickr30kDataset`) -
  captions in the Karpathy split json
* :class:`ConceptualCaptionsDataset` - a tsv of local image paths and captions
* :class:`HFDataset` - a Hugging Face ``datasets`` dataset by local path (or cached name)
* :class:`VQADataset` - VQAv2 question and annotation json files

Every dataset is a list of :class:`Record` (one image with its captions, label or question),
validated when it is built, in the calling process: a malformed json, a missing image file or an
empty caption raises :class:`~rcc_compression.errors.DataError` naming the file, or with
``skip_bad=True`` is skipped and counted in :attr:`MultimodalDataset.skipped`. An image that exists
but cannot be decoded is only found when loaded; ``__getitem__`` then returns the error as data,
and :class:`~rcc_compression.data.loaders.SafeLoader` raises it (or counts it) in the main process,
so no traceback ever comes out of a DataLoader worker.

``__getitem__`` returns a plain dict (a *sample*): ``pixel_values`` (uint8, 3 x H x W, resized
and cropped by the dataset's :class:`~rcc_compression.data.transforms.ImageTransform`; collation
normalises), ``index``, ``image_id``, ``captions``, ``label``, ``question``, ``answers``,
``question_id`` and ``error`` (``None`` unless the image could not be read).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..utils.logging import get_logger
from .cache import CachedPixels, build_cache
from .collate import Collator
from .images import open_image
from .secure import DATASET_FORMATS, DATASET_MAX_PIXELS, DatasetGuard
from .transforms import ImageTransform, clean_caption
from .world import ensure_world, load_world_info

log = get_logger("data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


@dataclass
class Record:
    """One item before loading: where its image is and what is known about it."""

    image: Any
    image_id: str
    captions: list[str] = field(default_factory=list)
    label: int | None = None
    question: str | None = None
    answers: list[str] | None = None
    question_id: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a json file; a missing or malformed file is a ``DataError`` naming it (and the position)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def load_image(source: str | os.PathLike[str] | bytes) -> Any:
    """An RGB PIL image, fully decoded (so a truncated file fails here, not later).

    Only the formats of :data:`~rcc_compression.data.secure.DATASET_FORMATS` are decoded, and an
    image declaring more than :data:`~rcc_compression.data.secure.DATASET_MAX_PIXELS` pixels is
    refused from its header, before decoding (a decompression bomb reads a few bytes, no pixel).
    """
    return open_image(source, max_pixels=DATASET_MAX_PIXELS, formats=DATASET_FORMATS)


def _annotation(guard: DatasetGuard, path: Path) -> None:
    """Check an annotation file against the root's manifest when it lies under the root."""
    if guard.manifest is not None:
        try:
            Path(os.path.realpath(path)).relative_to(guard.root)
        except ValueError:
            return
        guard.verify(os.path.realpath(path))


class MultimodalDataset(Dataset):
    """Records plus an image transform; the base of every format.

    ``skipped`` counts records dropped while building (``skip_bad=True``) by reason.
    """

    format_name = "records"
    #: which benchmarks can use the dataset: "classification", "captions" or "vqa"
    task = "captions"
    #: the split and the spec it was opened as (set by :func:`~rcc_compression.data.splits.open_split`)
    split: str | None = None
    spec: str | None = None

    def __init__(
        self,
        records: Sequence[Record],
        transform: ImageTransform | None = None,
        skip_bad: bool = False,
        source: str = "",
        classnames: Sequence[str] | None = None,
        templates: str | Sequence[str] | None = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform or ImageTransform()
        self.skip_bad = skip_bad
        self.source = source
        self.classnames = list(classnames) if classnames is not None else None
        self.templates = templates
        self.skipped: Counter[str] = getattr(self, "skipped", Counter())
        self._pixels: Any = None  # a CachedPixels when cache_data() ran
        #: confines the image paths to the dataset's root and checks its manifest (formats read from disk)
        self.guard: DatasetGuard | None = getattr(self, "guard", None)
        if not self.records:
            extra = f" ({sum(self.skipped.values())} skipped as bad)" if self.skipped else ""
            raise DataError(f"{source or self.format_name}: no usable items{extra}")

    # ---------------------------------------------------------------- validation helpers
    def _bad(self, message: str, reason: str) -> None:
        """Raise ``message`` as a DataError, or count it when skipping bad items."""
        if not self.skip_bad:
            raise DataError(message + " (pass skip_bad=True / --skip-bad to skip such items)")
        self.skipped[reason] += 1
        if sum(self.skipped.values()) <= 5:
            log.warning("skipping: %s", message)

    # ---------------------------------------------------------------- dataset protocol
    def __len__(self) -> int:
        return len(self.records)

    def load_raw(self, index: int) -> Any:
        """The decoded image of record ``index`` (PIL); formats with images in memory override."""
        path = self.records[index].image
        return load_image(self.guard.verify(path) if self.guard is not None else path)

    def image_key(self, index: int) -> str:
        """What identifies the image of a record (several records may share one, as in VQA)."""
        return str(self.records[index].image)

    def pixels(self, index: int) -> torch.Tensor:
        """uint8 pixels (3 x H x W) of record ``index``, from the cache when there is one."""
        if self._pixels is not None:
            return self._pixels.get(self.image_key(index))
        return self.transform.to_uint8(self.load_raw(index))

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        draw = None
        if isinstance(index, tuple):  # a SampleKey: (index, seed of this item's random choices)
            index, draw = index
        rec = self.records[index]
        sample: dict[str, Any] = {
            "index": index, "image_id": rec.image_id, "captions": rec.captions, "label": rec.label,
            "question": rec.question, "answers": rec.answers, "question_id": rec.question_id,
            "pixel_values": None, "error": None, "draw": draw,
        }
        try:
            sample["pixel_values"] = self.pixels(index)
        except DataError as exc:
            sample["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - any decoder failure becomes data, raised in the main process
            sample["error"] = f"{rec.image}: cannot read image: {type(exc).__name__}: {exc}"
        return sample

    def get_transform(self) -> ImageTransform:
        """The deterministic image transform (resize and crop) the dataset applies."""
        return self.transform

    def get_collate_fn(self, tokenizer: Any = None, **kwargs: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """A collate function that batches samples and tokenises their text (see ``loaders``)."""
        return Collator(tokenizer=tokenizer, mean=self.transform.mean, std=self.transform.std,
                        skip_bad=self.skip_bad, **kwargs)

    def cache_data(self, cache_dir: str | os.PathLike[str], progress: bool = False) -> Path:
        """Preprocess every image once into safetensors shards under ``cache_dir`` and use them.

        The cache is keyed by the transform's fingerprint and the files' names, sizes and mtimes.
        """
        path = build_cache(self, cache_dir, progress=progress)
        self._pixels = CachedPixels(path)
        return path

    def fingerprint(self) -> str:
        """A hash of the image files (names, sizes, mtimes) and annotations, for cache keys."""
        h = hashlib.sha256(self.format_name.encode())
        for key in dict.fromkeys(self.image_key(i) for i in range(len(self))):
            h.update(key.encode())
            try:
                st = os.stat(key)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                pass
        return h.hexdigest()[:16]

    # ---------------------------------------------------------------- views for evaluation
    @property
    def labels(self) -> list[int]:
        """Class index of every record (classification datasets)."""
        return [int(r.label) for r in self.records if r.label is not None]

    def describe(self) -> dict[str, Any]:
        """A short description for reports: format, source, size, skipped counts."""
        out = {"format": self.format_name, "source": self.source, "items": len(self), "skipped": dict(self.skipped)}
        if self.guard is not None:
            out["guard"] = self.guard.describe()
        return out


# --------------------------------------------------------------------------------- formats
def _read_classnames(path: Path, folders: Sequence[str]) -> tuple[list[str], list[str]]:
    """(folders in label order, class names) from a class-name file.

    Accepted: ``folder<TAB or space>name`` lines (ImageNet's ``LOC_synset_mapping.txt``: the name is
    the text up to the first comma), a json object ``{folder: name}``, or one name per line in the
    order of the sorted folders.
    """
    if path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise DataError(f"{path}: expected a JSON object mapping folder name to class name")
        return list(data), [data[k] for k in data]
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read class names: {exc}") from None
    if not lines:
        raise DataError(f"{path}: class-name file is empty")
    firsts = [ln.split(None, 1)[0] for ln in lines]
    folder_set = set(folders)
    if folder_set and folder_set <= set(firsts):
        names = [ln.split(None, 1)[1].split(",")[0].strip() if len(ln.split(None, 1)) > 1 else ln for ln in lines]
        return firsts, names
    if len(lines) == len(folders):
        return list(folders), lines
    raise DataError(
        f"{path}: {len(lines)} class names for {len(folders)} class folders, and the lines do not start with "
        f"the folder names; write one 'folder<TAB>name' line per class"
    )


class ImageFolderDataset(MultimodalDataset):
    """ImageNet-style class folders: ``root/[split/]class_folder/*.png|jpg`` and a class-name file.

    The label space is the class-name file's order (``classnames.txt`` or ``.json`` in ``root`` or
    ``root/split``); without one, the sorted folder names are the classes. An optional
    ``dataset.json`` next to it may name the prompt template set (``{"templates": "world"}``).
    """

    format_name = "imagefolder"
    task = "classification"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | None = None,
        classnames_file: str | os.PathLike[str] | None = None,
        transform: ImageTransform | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.skipped = Counter()
        self.skip_bad = skip_bad
        base = Path(root)
        if not base.is_dir():
            raise DataError(f"{base}: not a directory")
        self.guard = guard = DatasetGuard(base)
        data_dir = guard.resolve(split) if split else base
        if not data_dir.is_dir():
            have = sorted(p.name for p in base.iterdir() if p.is_dir())
            raise DataError(f"{data_dir}: no such split directory (found: {', '.join(have) or 'none'})")
        folders = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataError(f"{data_dir}: no class folders")
        cn_path = Path(classnames_file) if classnames_file else None
        if cn_path is None:
            for cand in (data_dir / "classnames.txt", base / "classnames.txt", data_dir / "classnames.json",
                         base / "classnames.json"):
                if cand.is_file():
                    cn_path = cand
                    break
        if cn_path is not None:
            _annotation(guard, cn_path)
            order, names = _read_classnames(cn_path, folders)
            unknown = sorted(set(folders) - set(order))
            if unknown:
                raise DataError(f"{cn_path}: class folders {unknown[:5]} of {data_dir} are not listed")
        else:
            order, names = folders, [f.replace("_", " ") for f in folders]
        index = {f: i for i, f in enumerate(order)}
        records = []
        for folder in folders:
            for p in sorted(guard.resolve(data_dir / folder).iterdir()):
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    records.append(Record(image=str(guard.resolve(p)), image_id=f"{folder}/{p.name}",
                                          label=index[folder]))
        meta_file = base / "dataset.json"
        if meta_file.is_file():
            _annotation(guard, meta_file)
        meta = read_json(meta_file) if meta_file.is_file() else {}
        if not isinstance(meta, dict):
            raise DataError(f"{meta_file}: expected a JSON object")
        templates = meta.get("templates")
        self.meta = meta
        self.folders = order
        super().__init__(records, transform, skip_bad, str(data_dir), classnames=names, templates=templates)


def _karpathy_image_root(json_path: Path, first: dict[str, Any]) -> Path:
    rel = Path(str(first.get("filepath", ""))) / str(first.get("filename", ""))
    for cand in (json_path.parent, json_path.parent.parent):
        if (cand / rel).is_file():
            return cand
    return json_path.parent


class KarpathyCaptionsDataset(MultimodalDataset):
    """Captions in the Karpathy split json (``dataset_coco.json``, ``dataset_flickr30k.json``).

    One record per image with all its captions. ``split="train"`` includes ``restval`` (the
    Karpathy convention); ``"all"`` takes every image. Image paths are
    ``image_root/filepath/filename`` (COCO) or ``image_root/filename`` (Flickr30k); without
    ``image_root`` the json's directory (or its parent) is used, whichever holds the images.
    """

    format_name = "karpathy"
    task = "captions"

    def __init__(
        self,
        json_path: str | os.PathLike[str],
        split: str = "test",
        image_root: str | os.PathLike[str] | None = None,
        transform: ImageTransform | None = None,
        skip_bad: bool = False,
        max_captions: int | None = None,
    ) -> None:
        self.skipped = Counter()
        self.skip_bad = skip_bad
        path = Path(json_path)
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DataError(f"{path}: not a Karpathy captions file: expected an object with an 'images' list")
        images = data["images"]
        wanted = {"train": {"train", "restval"}}.get(split, {split})
        root = Path(image_root) if image_root is not None else (
            _karpathy_image_root(path, images[0]) if images and isinstance(images[0], dict) else path.parent)
        self.guard = guard = DatasetGuard(root)
        _annotation(guard, path)
        records = []
        for n, entry in enumerate(images):
            if not isinstance(entry, dict) or "filename" not in entry or not isinstance(entry.get("sentences"), list):
                raise DataError(f"{path}: images[{n}]: expected an object with 'filename' and a 'sentences' list")
            if split != "all" and entry.get("split") not in wanted:
                continue
            img = guard.resolve(Path(str(entry.get("filepath", ""))) / str(entry["filename"]))
            caps = []
            for k, sent in enumerate(entry["sentences"]):
                raw = sent.get("raw") if isinstance(sent, dict) else None
                if raw is None and isinstance(sent, dict) and isinstance(sent.get("tokens"), list):
                    raw = " ".join(map(str, sent["tokens"]))
                if not isinstance(raw, str):
                    raise DataError(f"{path}: images[{n}].sentences[{k}]: expected 'raw' text or a 'tokens' list")
                text = clean_caption(raw)
                if not text:
                    where = f"{path}: images[{n}] ({entry['filename']})"
                    self._bad(f"{where}: sentence {k} is an empty caption", "empty caption")
                    continue
                caps.append(text)
            if not caps:
                self._bad(f"{path}: images[{n}] ({entry['filename']}): no captions", "no captions")
                continue
            if not img.is_file():
                self._bad(f"{img}: image file not found (listed in {path}, images[{n}])", "missing image")
                continue
            image_id = str(entry.get("cocoid", entry.get("imgid", n)))
            meta = {k: entry[k] for k in ("scene",) if k in entry}
            records.append(Record(image=str(img), image_id=image_id, captions=caps[:max_captions], meta=meta))
        self.name = str(data.get("dataset", "karpathy"))
        super().__init__(records, transform, skip_bad, f"{path} [{split}]")


class COCOCaptionsDataset(KarpathyCaptionsDataset):
    """MS-COCO captions, Karpathy splits (``dataset_coco.json``; images under ``train2014/``, ``val2014/``)."""

    format_name = "coco"


class Flickr30kDataset(KarpathyCaptionsDataset):
    """Flickr30k captions, Karpathy splits (``dataset_flickr30k.json``; images in ``flickr30k-images/``)."""

    format_name = "flickr30k"

    def __init__(
        self,
        json_path: str | os.PathLike[str],
        split: str = "test",
        image_root: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        path = Path(json_path)
        if image_root is None and (path.parent / "flickr30k-images").is_dir():
            image_root = path.parent / "flickr30k-images"
        super().__init__(path, split, image_root, **kwargs)


class ConceptualCaptionsDataset(MultimodalDataset):
    """Conceptual Captions as a tsv of local images: ``caption<TAB>image_path`` (either column order).

    An optional header row (``caption``, ``image``/``path``/``file``/``url``) names the columns;
    otherwise the column whose values end in an image extension is the path. Paths are relative to
    ``image_root`` (default: the tsv's directory). Rows sharing an image are one record with
    several captions.
    """

    format_name = "conceptual_captions"
    task = "captions"

    def __init__(
        self,
        tsv_path: str | os.PathLike[str],
        image_root: str | os.PathLike[str] | None = None,
        transform: ImageTransform | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.skipped = Counter()
        self.skip_bad = skip_bad
        path = Path(tsv_path)
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        root = Path(image_root) if image_root is not None else path.parent
        self.guard = guard = DatasetGuard(root)
        _annotation(guard, path)
        try:
            with open(path, encoding="utf-8", newline="") as fh:
                rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{path}: cannot read tsv: {exc}") from None
        rows = [(i + 1, r) for i, r in enumerate(rows) if r and any(c.strip() for c in r)]
        if not rows:
            raise DataError(f"{path}: empty tsv")
        cap_col, img_col = 0, 1
        header = [c.strip().lower() for c in rows[0][1]]
        if len(header) == 2 and any(h in ("caption", "text") for h in header):
            cap_col = 0 if header[0] in ("caption", "text") else 1
            img_col = 1 - cap_col
            rows = rows[1:]
        elif len(rows[0][1]) == 2 and rows[0][1][0].strip().lower().endswith(IMAGE_EXTENSIONS):
            cap_col, img_col = 1, 0
        grouped: dict[str, list[str]] = {}
        for lineno, row in rows:
            if len(row) != 2:
                raise DataError(
                    f"{path}:{lineno}: expected 2 tab-separated columns (caption, image path), got {len(row)}"
                )
            text = clean_caption(row[cap_col])
            rel = row[img_col].strip()
            if not rel:
                self._bad(f"{path}:{lineno}: empty image path", "missing image")
                continue
            if not text:
                self._bad(f"{path}:{lineno}: empty caption for {rel}", "empty caption")
                continue
            img = guard.resolve(rel)
            if str(img) not in grouped and not img.is_file():
                self._bad(f"{img}: image file not found (listed in {path}:{lineno})", "missing image")
                continue
            grouped.setdefault(str(img), []).append(text)
        records = [Record(image=img, image_id=Path(img).name, captions=caps) for img, caps in grouped.items()]
        super().__init__(records, transform, skip_bad, str(path))


class VQADataset(MultimodalDataset):
    """VQAv2 json: a questions file and (optionally) an annotations file with ten answers each.

    One record per question. The image of a question is its ``image`` field (a path relative to
    ``image_root``) when present, else ``image_pattern.format(image_id=...)`` (VQAv2 on COCO:
    ``val2014/COCO_val2014_{image_id:012d}.jpg``).
    """

    format_name = "vqa"
    task = "vqa"

    def __init__(
        self,
        questions_json: str | os.PathLike[str],
        annotations_json: str | os.PathLike[str] | None = None,
        image_root: str | os.PathLike[str] | None = None,
        image_pattern: str = "COCO_val2014_{image_id:012d}.jpg",
        transform: ImageTransform | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.skipped = Counter()
        self.skip_bad = skip_bad
        qpath = Path(questions_json)
        qdata = read_json(qpath)
        if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
            raise DataError(f"{qpath}: not a VQA questions file: expected an object with a 'questions' list")
        answers: dict[int, list[str]] = {}
        answer_types: dict[int, str] = {}
        if annotations_json is not None:
            apath = Path(annotations_json)
            adata = read_json(apath)
            if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
                raise DataError(f"{apath}: not a VQA annotations file: expected an object with an 'annotations' list")
            for n, ann in enumerate(adata["annotations"]):
                try:
                    answers[int(ann["question_id"])] = [str(a["answer"]) for a in ann["answers"]]
                    answer_types[int(ann["question_id"])] = str(ann.get("answer_type", ""))
                except (KeyError, TypeError, ValueError):
                    raise DataError(
                        f"{apath}: annotations[{n}]: expected 'question_id' and an 'answers' list of {{'answer': ...}}"
                    ) from None
        root = Path(image_root) if image_root is not None else qpath.parent.parent
        self.guard = guard = DatasetGuard(root)
        for annotation in (qpath, annotations_json):
            if annotation is not None:
                _annotation(guard, Path(annotation))
        records = []
        for n, q in enumerate(qdata["questions"]):
            if not isinstance(q, dict) or not {"question", "question_id", "image_id"} <= set(q):
                raise DataError(f"{qpath}: questions[{n}]: expected 'question', 'question_id' and 'image_id'")
            text = clean_caption(str(q["question"]))
            if not text:
                self._bad(f"{qpath}: questions[{n}]: empty question", "empty question")
                continue
            qid = int(q["question_id"])
            rel = q.get("image") or image_pattern.format(image_id=int(q["image_id"]))
            img = guard.resolve(rel)
            if not img.is_file():
                self._bad(f"{img}: image file not found (question {qid} in {qpath})", "missing image")
                continue
            ans = answers.get(qid)
            if annotations_json is not None and not ans:
                self._bad(f"{annotations_json}: no answers for question {qid}", "no answers")
                continue
            records.append(
                Record(
                    image=str(img),
                    image_id=str(q["image_id"]),
                    question=text,
                    answers=ans,
                    question_id=qid,
                    meta={"answer_type": answer_types.get(qid, "")},
                )
            )
        super().__init__(records, transform, skip_bad, str(qpath))


class HFDataset(MultimodalDataset):
    """A Hugging Face ``datasets`` dataset: a directory saved with ``save_to_disk`` or a cached hub name.

    Columns: ``image_column`` (an ``Image`` feature or file paths); captions from ``text_column``
    (a string or a list of strings; default: the first of caption/captions/text/sentences found);
    or class labels from ``label_column`` (a ``ClassLabel`` gives the class names). Nothing is
    downloaded on a machine without network; a name that is not cached is a clear error.
    """

    format_name = "hf"

    def __init__(
        self,
        name_or_path: str | os.PathLike[str],
        split: str = "test",
        image_column: str = "image",
        text_column: str | None = None,
        label_column: str | None = None,
        transform: ImageTransform | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.skipped = Counter()
        self.skip_bad = skip_bad
        ds = _open_hf(str(name_or_path), split)
        cols = list(ds.column_names)
        if image_column not in cols:
            raise DataError(f"{name_or_path}: no image column {image_column!r} (columns: {', '.join(cols)})")
        if text_column is None and label_column is None:
            text_column = next((c for c in ("caption", "captions", "text", "sentences") if c in cols), None)
            if text_column is None and "label" in cols:
                label_column = "label"
        if text_column is None and label_column is None:
            raise DataError(f"{name_or_path}: no caption or label column (columns: {', '.join(cols)})")
        for col in (text_column, label_column):
            if col is not None and col not in cols:
                raise DataError(f"{name_or_path}: no column {col!r} (columns: {', '.join(cols)})")
        ds = _undecoded(ds, image_column)
        self._ds = ds
        local = Path(os.path.expanduser(str(name_or_path)))
        self.guard = DatasetGuard(local) if local.is_dir() else None
        self.task = "captions" if text_column else "classification"
        classnames = None
        records = []
        if label_column:
            feat = ds.features[label_column]
            classnames = list(getattr(feat, "names", []) or []) or None
            for i, lab in enumerate(ds[label_column]):
                records.append(Record(image=i, image_id=str(i), label=int(lab)))
            if classnames is None:
                n = max(r.label for r in records) + 1 if records else 0
                classnames = [str(k) for k in range(n)]
        else:
            for i, value in enumerate(ds[text_column]):
                texts = [value] if isinstance(value, str) else list(value or [])
                texts = [clean_caption(t.get("raw", "") if isinstance(t, dict) else str(t)) for t in texts]
                caps = [t for t in texts if t]
                if len(caps) < len(texts) or not caps:
                    self._bad(f"{name_or_path}: row {i}: empty caption", "empty caption")
                    if not caps:
                        continue
                records.append(Record(image=i, image_id=str(i), captions=caps))
        self.image_column = image_column
        super().__init__(records, transform, skip_bad, f"{name_or_path} [{split}]", classnames=classnames)

    def load_raw(self, index: int) -> Any:
        value = self._ds[int(self.records[index].image)][self.image_column]
        if isinstance(value, dict) and value.get("bytes"):
            return load_image(value["bytes"])  # embedded bytes, decoded here (bounded), not by ``datasets``
        path = value.get("path") if isinstance(value, dict) else value
        if isinstance(path, str) and path:
            return load_image(self.guard.verify(path) if self.guard is not None else path)
        if hasattr(value, "convert"):  # a decoded image from a column that is not an Image feature
            return value.convert("RGB")
        raise DataError(f"{self.source}: row {self.records[index].image}: no image in column {self.image_column!r}")

    def image_key(self, index: int) -> str:
        return f"{self.source}#{self.records[index].image}"


def _undecoded(ds: Any, column: str) -> Any:
    """``ds`` with an ``Image`` column left as bytes/paths, so images are decoded by :func:`load_image` (bounded)."""
    import datasets

    feature = ds.features.get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _open_hf(name_or_path: str, split: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets are not installed: pip install 'rcc-compression[data]'") from None
    path = Path(os.path.expanduser(name_or_path))
    try:
        if path.is_dir():
            obj = datasets.load_from_disk(str(path))
        else:
            obj = datasets.load_dataset(name_or_path, split=split)
    except FileNotFoundError as exc:
        raise DataError(f"{name_or_path}: not a saved Hugging Face dataset: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - hub and cache failures come in many types
        raise DataError(
            f"{name_or_path}: cannot load the Hugging Face dataset "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "without network only datasets saved with save_to_disk() or already cached can be read"
        ) from None
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DataError(f"{name_or_path}: no split {split!r} (splits: {', '.join(obj)})")
        obj = obj[split]
    return obj


class ArrayDataset(MultimodalDataset):
    """Images already in memory (uint8 H x W x 3 arrays or PIL images) with captions or labels.

    The generated world uses it for calibration and training without touching the disk.
    """

    format_name = "memory"

    def __init__(
        self,
        images: Sequence[Any],
        records: Sequence[Record],
        transform: ImageTransform | None = None,
        task: str = "captions",
        **kwargs: Any,
    ) -> None:
        if len(images) != len(records):
            raise DataError(f"{len(images)} images for {len(records)} records")
        self._images = list(images)
        self.task = task
        super().__init__(records, transform, **kwargs)

    def load_raw(self, index: int) -> Any:
        return self._images[int(self.records[index].image)]

    def image_key(self, index: int) -> str:
        return f"memory#{id(self)}#{self.records[index].image}"


# ------------------------------------------------------------------------------- resolution
#: names of well-known datasets, looked up as directories under the data root
KNOWN_DATASETS = {
    "imagenet": "imagenet",
    "mscoco": "coco",
    "coco": "coco",
    "flickr30k": "flickr30k",
    "cc3m": "conceptual_captions",
    "conceptual_captions": "conceptual_captions",
    "vqav2": "vqav2",
}
#: the task of each known name, known before (or without) opening it
KNOWN_TASKS = {
    "imagenet": "classification",
    "mscoco": "captions",
    "coco": "captions",
    "flickr30k": "captions",
    "cc3m": "captions",
    "conceptual_captions": "captions",
    "vqav2": "vqa",
}
WORLD_PARTS = ("captions", "vqa", "shape", "colour", "colour_shape")


def data_root(root: str | os.PathLike[str] | None = None) -> Path | None:
    """Where named datasets live: ``root``, else ``$RCC_DATA_ROOT``, else none."""
    value = root or os.environ.get("RCC_DATA_ROOT")
    return Path(os.path.expanduser(str(value))) if value else None


def open_world(
    world_dir: str | os.PathLike[str],
    part: str = "colour_shape",
    split: str = "test",
    transform: ImageTransform | None = None,
    skip_bad: bool = False,
) -> MultimodalDataset:
    """One part of a generated world: ``captions``, ``vqa`` or a classification task."""
    root = Path(world_dir)
    info = load_world_info(root)
    if split not in info.get("spec", {}).get("splits", ()):
        raise DataError(
            f"{root}: this world has no {split!r} split (generated: "
            f"{', '.join(info.get('spec', {}).get('splits', ()))}); regenerate it with that split"
        )
    if part in ("captions", "vqa") and not info.get(part):
        raise DataError(f"{root}: this world was generated without its {part} part")
    if part == "captions":
        return KarpathyCaptionsDataset(
            root / info["captions"], split, image_root=root, transform=transform, skip_bad=skip_bad
        )
    if part == "vqa":
        files = info["vqa"][split]
        return VQADataset(
            root / files["questions"],
            root / files["annotations"],
            image_root=root,
            transform=transform,
            skip_bad=skip_bad,
        )
    if part in info.get("tasks", {}):
        return ImageFolderDataset(root / info["tasks"][part], split, transform=transform, skip_bad=skip_bad)
    raise DataError(f"{root}: unknown world part {part!r}; parts: {', '.join(WORLD_PARTS)}")


def _detect(
    path: Path, split: str, task: str | None, transform: ImageTransform | None, skip_bad: bool, root: Path | None = None
) -> MultimodalDataset:
    kw = {"transform": transform, "skip_bad": skip_bad}
    if path.is_file():
        if path.suffix == ".tsv":
            return ConceptualCaptionsDataset(path, **kw)
        if path.suffix == ".json":
            data = read_json(path)
            if isinstance(data, dict) and "images" in data:
                name = str(data.get("dataset", "")).lower()
                cls = (
                    Flickr30kDataset
                    if "flickr" in name
                    else COCOCaptionsDataset
                    if name == "coco"
                    else KarpathyCaptionsDataset
                )
                return cls(path, split, **kw)
            if isinstance(data, dict) and "questions" in data:
                ann = _vqa_annotations_for(path)
                return VQADataset(path, ann, image_root=root, **kw)
            raise DataError(f"{path}: json is neither Karpathy captions ('images') nor VQA questions ('questions')")
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected .json or .tsv, or a directory)")
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    if (path / "world.json").is_file():
        part = (
            task
            if task in WORLD_PARTS
            else {"classification": "colour_shape", "vqa": "vqa"}.get(task or "", "captions")
        )
        return open_world(path, part, split, **kw)
    if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return HFDataset(path, split, **kw)
    if task in (None, "captions"):
        karpathy = sorted(path.glob("dataset_*.json")) + sorted(path.glob("*/dataset_*.json"))
        if karpathy:
            return _detect(karpathy[0], split, task, transform, skip_bad)
        tsvs = sorted(path.glob(f"*{split}*.tsv")) or sorted(path.glob("*.tsv"))
        if tsvs:
            return ConceptualCaptionsDataset(tsvs[0], **kw)
    if task in (None, "vqa"):
        qs = sorted(path.glob(f"*questions*{split}*.json")) + sorted(path.glob(f"*{split}*questions*.json"))
        if qs:
            return _detect(qs[0], split, "vqa", transform, skip_bad, root=path)
    if task in (None, "classification"):
        cn = next(
            (c for c in ("classnames.txt", "classnames.json", "LOC_synset_mapping.txt") if (path / c).is_file()), None
        )
        have = sorted(d for d in ("train", "val", "validation", "test") if (path / d).is_dir())
        if have and not (path / split).is_dir():
            raise DataError(f"{path}: no such split directory {split!r} (found: {', '.join(have)})")
        if (path / split).is_dir() or cn:
            return ImageFolderDataset(
                path, split if (path / split).is_dir() else None, classnames_file=path / cn if cn else None, **kw
            )
    raise DataError(
        f"{path}: cannot tell the dataset format{f' for task {task}' if task else ''}: expected world.json, a saved "
        "Hugging Face dataset, dataset_*.json (Karpathy captions), a .tsv (Conceptual Captions), "
        f"*questions*{split}*.json (VQA), or class folders under {split}/ with classnames.txt"
    )


def _vqa_annotations_for(questions: Path) -> Path | None:
    name = questions.name
    cands = [
        name.replace("questions", "annotations"),
        name.replace("OpenEnded_", "").replace("_questions", "_annotations"),
    ]
    for cand in cands:
        p = questions.with_name(cand)
        if p != questions and p.is_file():
            return p
    return None


def open_dataset(
    spec: str | os.PathLike[str],
    split: str = "test",
    task: str | None = None,
    transform: ImageTransform | None = None,
    skip_bad: bool = False,
    root: str | os.PathLike[str] | None = None,
) -> MultimodalDataset:
    """A dataset from a spec: a path (format detected), ``hf:NAME``, ``world[:PART]``, or a known name.

    ``world`` is the reference world at the default seed, generated once into the cache;
    ``world:PART`` picks ``captions``, ``vqa``, ``shape``, ``colour`` or ``colour_shape``; a path
    to a generated world works too. Known names (``imagenet``, ``coco``, ``flickr30k``, ``cc3m``,
    ``vqav2``) are directories under ``root`` or ``$RCC_DATA_ROOT``. ``task``
    (``classification``/``captions``/``vqa``) disambiguates directories holding several formats.
    """
    text = str(spec)
    kw = {"transform": transform, "skip_bad": skip_bad}
    if text.startswith("hf:"):
        return HFDataset(text[3:], split, **kw)
    if text == "world" or text.startswith("world:"):
        part = text.split(":", 1)[1] if ":" in text else None
        if part is None:
            part = {"classification": "colour_shape", "vqa": "vqa"}.get(task or "", "captions")
        return open_world(ensure_world(splits=(split,)), part, split, **kw)
    key = text.lower()
    if key in KNOWN_DATASETS and not Path(text).exists():
        base = data_root(root)
        if base is None:
            raise DataError(
                f"dataset {text!r}: set dataset.root or $RCC_DATA_ROOT to the directory that holds "
                f"{KNOWN_DATASETS[key]}/ (this machine downloads nothing)"
            )
        path = base / KNOWN_DATASETS[key]
        if not path.exists():
            raise DataError(f"dataset {text!r}: {path} does not exist")
        return _detect(path, split, task, transform, skip_bad)
    return _detect(Path(os.path.expanduser(text)), split, task, transform, skip_bad)
