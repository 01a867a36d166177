"""The reference world: determinism, held-out pairs, captions that tell the truth, vectorised shapes."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rcc_compression.data import world as W
from rcc_compression.errors import DataError

from .conftest import TINY_SPEC


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic_per_seed(tmp_path: Path, tiny_world: Path) -> None:
    again = tmp_path / "again"
    W.generate_world(again, W.WorldSpec(seed=0, **TINY_SPEC))
    a, b = _tree_bytes(tiny_world), _tree_bytes(again)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]
    other = tmp_path / "other"
    W.generate_world(other, W.WorldSpec(seed=1, **TINY_SPEC))
    c = _tree_bytes(other)
    pngs = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != c[k] for k in pngs) == len(pngs)  # every image differs with another seed


def test_in_memory_scenes_equal_the_files(tiny_world: Path) -> None:
    from PIL import Image

    for item in W.world_scenes(0, "test", 5, start=3):
        disk = np.asarray(Image.open(tiny_world / "images" / "test" / f"{item.index:06d}.png"))
        assert np.array_equal(disk, item.image)
    data = json.loads((tiny_world / "captions" / "dataset_world.json").read_text())
    test = [e for e in data["images"] if e["split"] == "test"]
    item = next(W.world_scenes(0, "test", 1, start=7))
    assert [s["raw"] for s in test[7]["sentences"]] == item.captions


def test_train_split_never_shows_a_held_out_pair(tiny_world: Path) -> None:
    held = set(W.HELD_OUT_PAIRS)
    assert len(held) == 16
    assert Counter(c for c, _ in held) == Counter({c: 2 for c in W.COLOURS})
    assert Counter(s for _, s in held) == Counter({s: 2 for s in W.SHAPES})
    data = json.loads((tiny_world / "captions" / "dataset_world.json").read_text())
    train_pairs = {
        (o["colour"], o["shape"]) for e in data["images"] if e["split"] == "train" for o in e["scene"]["objects"]
    }
    assert train_pairs and not train_pairs & held
    # nor in text: no train caption or question names a held-out pair
    names = [f"{c} {s}" for c, s in held] + [f"{c} {W.plural(s)}" for c, s in held]
    train_text = [s["raw"] for e in data["images"] if e["split"] == "train" for s in e["sentences"]]
    train_text += [
        q["question"] for q in json.loads((tiny_world / "vqa" / "questions_train.json").read_text())["questions"]
    ]
    assert not [t for t in train_text if any(n in t for n in names)]
    # the colour+shape class folders: train has only seen pairs, test has every pair, the held-out ones included
    cs = tiny_world / "classification" / "colour_shape"
    train_folders = {p.name for p in (cs / "train").iterdir()}
    test_folders = {p.name for p in (cs / "test").iterdir()}
    assert len(train_folders) == 48 and len(test_folders) == 64
    assert {f"{c}_{s}" for c, s in held} == test_folders - train_folders


def test_many_train_scenes_stay_clear_of_held_out_pairs() -> None:
    held = set(W.HELD_OUT_PAIRS)
    seen = Counter()
    for item in W.world_scenes(3, "train", 300):
        pairs = set(item.scene.pairs())
        assert not pairs & held
        seen.update(pairs)
    assert len(seen) == 48  # and they cover every seen pair


def test_canonical_caption_names_every_object_left_to_right() -> None:
    for item in W.world_scenes(5, "val", 40):
        objs = sorted(item.scene.objects, key=lambda o: o.x)
        cap = item.captions[0]
        assert cap == W.canonical_caption(item.scene)
        pos = [cap.find(o.colour) for o in objs]
        assert all(p >= 0 for p in pos) and pos == sorted(pos), cap
        assert all(o.shape in cap for o in objs)
        assert len(item.captions) == 5 == len(set(item.captions))


def test_captions_vary_in_words_and_order() -> None:
    caps = [c for item in W.world_scenes(0, "train", 200) for c in item.captions]
    words = Counter(w for c in caps for w in c.replace(".", "").replace(",", "").replace(":", "").split())
    for w in (
        "violet",
        "disc",
        "plus",
        "rhombus",
        "little",
        "big",
        "above",
        "below",
        "left",
        "right",
        "two",
        "striped",
        "checkered",
        "photo",
        "that",
    ):
        assert words[w] > 0, w
    assert any(c.startswith("a pair of") or c.startswith("two ") for c in caps)


def test_every_world_text_tokenises_without_unknown_words(tiny_world: Path) -> None:
    tok = W.build_world_tokenizer("clip")
    unk = tok.unk_token_id
    texts = [c for item in W.world_scenes(1, "test", 150) for c in item.captions]
    texts += [t.format(c) for t in W.WORLD_TEMPLATES for c, s in [("red", "circle")]] + [
        t.format("red") for t in W.WORLD_COLOUR_TEMPLATES
    ]
    for name in ("train", "test"):
        qs = json.loads((tiny_world / "vqa" / f"questions_{name}.json").read_text())["questions"]
        anns = json.loads((tiny_world / "vqa" / f"annotations_{name}.json").read_text())["annotations"]
        texts += [q["question"] for q in qs] + [a["answer"] for ann in anns for a in ann["answers"]]
    bad = [t for t in texts if unk in tok(t)["input_ids"]]
    assert not bad, bad[:5]
    blip = W.build_world_tokenizer("blip")
    ids = blip("a red circle.")["input_ids"]
    assert blip.convert_ids_to_tokens(ids) == ["[DEC]", "a", "red", "circle", ".", "[EOS]"]


def test_vqa_answers_are_true() -> None:
    rng = np.random.default_rng(0)
    for item in W.world_scenes(2, "test", 60):
        for q, answers, atype in W.questions_for(item.scene, rng, W.ALL_PAIRS):
            assert len(answers) == 10
            objs = item.scene.objects
            if q.startswith("what colour is the") or q.startswith("what color is the"):
                shape = q.split()[-1].rstrip("?")
                (obj,) = [o for o in objs if o.shape == shape]
                assert answers[0] == obj.colour
            elif q.startswith("what shape"):
                colour = q.split()[4]
                (obj,) = [o for o in objs if o.colour == colour]
                assert answers[0] == obj.shape
            elif q.startswith("how many"):
                assert answers == [str(len(objs))] * 10 and atype == "number"
            else:
                colour, shape = q.removeprefix("is there ").split()[-2:]
                present = (colour, shape.rstrip("?")) in item.scene.pairs()
                assert answers[0] == ("yes" if present else "no")


def test_rendered_object_has_its_colour_and_shape_area() -> None:
    rng = np.random.default_rng(0)
    areas = {}
    for shape in W.SHAPES:
        u, v = np.meshgrid(np.linspace(-1.5, 1.5, 301), np.linspace(-1.5, 1.5, 301))
        areas[shape] = W.shape_mask(shape, u, v).mean() * 9.0
    assert areas["circle"] == pytest.approx(np.pi, rel=0.01)
    assert areas["square"] == pytest.approx(1.64**2, rel=0.01)
    assert areas["ring"] == pytest.approx(np.pi * (1 - 0.52**2), rel=0.02)
    assert areas["diamond"] == pytest.approx(2 * 0.8, rel=0.02)
    assert areas["triangle"] == pytest.approx(0.5 * 1.7 * (1.7 / 1.7) * 2 * 1.0, rel=0.03)
    assert 0.5 < areas["star"] < 1.5 and 1.5 < areas["heart"] < 3.5 and 1.0 < areas["cross"] < 2.5
    scene = W.sample_scene(rng, [("blue", "square")], n_objects=1)
    img = W.render_scene(scene).astype(float)
    o = scene.objects[0]
    centre = img[int(o.y) - 2 : int(o.y) + 3, int(o.x) - 2 : int(o.x) + 3].reshape(-1, 3).mean(0)
    assert np.abs(centre - np.asarray(o.rgb)).max() < 3 * scene.noise_sigma + 0.2 * 255 * abs(o.shade) + 2
    assert centre[2] > centre[0] + 80  # blue, not red


def test_relations_and_positions() -> None:
    a = W.WorldObject("circle", "red", "small", 10, 32, 7)
    b = W.WorldObject("star", "blue", "small", 50, 30, 7)
    c = W.WorldObject("heart", "green", "small", 12, 58, 7)
    assert W.relation(a, b) == "to the left of" and W.relation(b, a) == "to the right of"
    assert W.relation(a, c) == "above" and W.relation(c, a) == "below"
    assert W.position_phrase(a) == "on the left" and W.position_phrase(c) == "in the bottom left corner"


def test_swap_negative_binds_colours_to_other_shapes() -> None:
    from rcc_compression.jobs.reference import swap_negative

    allowed = set(W.SEEN_PAIRS)
    assert ("blue", "star") in allowed and ("red", "square") in allowed
    assert ("blue", "square") in allowed and ("red", "star") not in allowed
    rng = random.Random(0)
    scene = {"objects": [{"colour": "red", "shape": "square", "x": 10}, {"colour": "blue", "shape": "star", "x": 40}]}
    outs = {swap_negative(scene, rng, allowed) for _ in range(100)}
    assert "a blue square and a red star." not in outs  # the swap would name a held-out pair
    scene["objects"][1] = {"colour": "yellow", "shape": "heart", "x": 40}
    assert {("yellow", "square"), ("red", "heart"), ("yellow", "heart")} <= allowed
    outs = {swap_negative(scene, rng, allowed) for _ in range(100)}
    assert "a yellow square and a red heart." in outs  # the attribute swap
    held_names = {f"{c} {s}" for c, s in W.HELD_OUT_PAIRS}
    assert all(not any(h in t for h in held_names) for t in outs)
    assert "a red square and a yellow heart." not in outs  # never the positive itself


def test_bad_requests_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split"):
        W.generate_world(tmp_path, W.WorldSpec(splits=("training",)))
    with pytest.raises(DataError, match="world.json"):
        W.load_world_info(tmp_path / "nothing")
    with pytest.raises(DataError, match="captions"):
        W.generate_world(tmp_path / "x", W.WorldSpec(parts=("vqa",)))


def test_ensure_world_generates_once_and_reuses(tmp_path: Path) -> None:
    def spec() -> W.WorldSpec:
        return W.WorldSpec(test=4, cls_test_per_class=1, vqa_test=4)

    first = W.ensure_world(0, ("test",), tmp_path, spec=spec())
    stamp = (first / "world.json").stat().st_mtime_ns
    again = W.ensure_world(0, ("test",), tmp_path, spec=spec())
    assert again == first and (again / "world.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "worlds").iterdir()] == [first.name]  # no temporary leftovers
    assert W.load_world_info(first)["spec"]["splits"] == ["test"]
    assert W.ensure_world(1, ("test",), tmp_path, spec=spec()) != first
