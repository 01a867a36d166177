"""The bundled reference models: loadable by name, small, and reproducing their recorded figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rcc_compression.data.datasets import open_world
from rcc_compression.data.transforms import transform_for
from rcc_compression.data.world import WORLD_VERSION, WorldSpec, generate_world, world_scenes
from rcc_compression.evaluation.zero_shot import evaluate_zero_shot
from rcc_compression.models import get_model
from rcc_compression.models.registry import BUNDLED

MAX_BYTES = 15 * 1024 * 1024


def _record(name: str) -> dict:
    return json.loads((BUNDLED[name] / "reference.json").read_text())


@pytest.mark.parametrize(
    "name,cls", [("rcc-clip-world", "CLIPModel"), ("rcc-blip-world", "BlipForConditionalGeneration"),
                 ("rcc-llava-world", "LlavaForConditionalGeneration")]
)
def test_bundled_models_load_by_name_and_are_small(name: str, cls: str) -> None:
    assert name in BUNDLED
    path = BUNDLED[name]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "reference.json"):
        assert (path / f).is_file(), f
    assert (path / "model.safetensors").stat().st_size <= MAX_BYTES
    wrapper = get_model(name)
    assert type(wrapper.model).__name__ == cls and wrapper.name == name
    assert wrapper.tokenizer is not None and wrapper.image_processor is not None
    rec = _record(name)
    assert rec["world"]["version"] == WORLD_VERSION and rec["world"]["train_split"] == "train"
    assert rec["parameters"] == sum(p.numel() for p in wrapper.model.parameters())


@pytest.mark.e2e
def test_bundled_clip_reproduces_its_recorded_zero_shot_accuracy(tmp_path: Path) -> None:
    rec = _record("rcc-clip-world")
    world = rec["world"]
    generate_world(
        tmp_path,
        WorldSpec(
            seed=world["seed"],
            splits=("test",),
            parts=("classification",),
            cls_test_per_class=world["test_sizes"]["cls_test_per_class"],
        ),
    )
    wrapper = get_model("rcc-clip-world")
    ds = open_world(tmp_path, "colour_shape", "test", transform_for(wrapper))
    res = evaluate_zero_shot(wrapper, ds, samples=0)
    recorded = rec["figures"]["zero_shot_colour_shape_top1"]
    assert abs(res["metrics"]["top1"]["value"] - recorded) <= 0.01
    assert abs(res["metrics_unseen"]["top1"]["value"] - rec["figures"]["zero_shot_colour_shape_top1_unseen"]) <= 0.01
    assert recorded >= 0.85  # the target the reference CLIP was trained for


def _captions_name_the_colour(name: str) -> tuple[object, list, torch.Tensor]:
    """16 single-object test scenes captioned by a bundled model: at least 3 in 4 name the object's colour."""
    wrapper = get_model(name)
    items = [it for it in world_scenes(0, "test", 60) if len(it.scene.objects) == 1][:16]
    pixels = torch.stack([transform_for(wrapper)(it.image) for it in items])
    caps = wrapper.generate_caption(pixels, num_beams=3, max_length=30)
    right = sum(it.scene.objects[0].colour in c for it, c in zip(items, caps, strict=True))
    assert right >= 0.75 * len(items), list(zip(caps, [it.captions[0] for it in items], strict=True))
    return wrapper, items, pixels


def test_bundled_blip_describes_world_scenes() -> None:
    _captions_name_the_colour("rcc-blip-world")
    assert _record("rcc-blip-world")["figures"]["captioning_CIDEr"] > 0.5


def test_bundled_llava_describes_and_answers_world_scenes() -> None:
    """The reference LLaVA names the colour of single objects in its captions and answers colour questions."""
    wrapper, items, pixels = _captions_name_the_colour("rcc-llava-world")
    answers = wrapper.answer(pixels, [f"what colour is the {it.scene.objects[0].shape}?" for it in items])
    right = sum(a == it.scene.objects[0].colour for it, a in zip(items, answers, strict=True))
    assert right >= 0.75 * len(items), answers
    # the vision tower is the bundled CLIP's, unchanged (LLaVA trains only the projector and the language model)
    clip = get_model("rcc-clip-world").model.vision_model.state_dict()
    tower = wrapper.model.model.vision_tower.state_dict()
    assert all(torch.equal(clip[k], tower[k]) for k in clip if k in tower)


@pytest.mark.slow
def test_bundled_llava_reproduces_its_recorded_figures() -> None:
    from rcc_compression.jobs.reference import measure_figures

    rec = _record("rcc-llava-world")
    sizes = rec["world"]["test_sizes"]
    spec = WorldSpec(seed=rec["world"]["seed"], test=sizes["test"], vqa_test=sizes["vqa_test"])
    res = measure_figures(get_model("rcc-llava-world"), "llava", spec, bootstrap_samples=0)
    cider = res["results"]["captioning"]["world:captions"]["metrics"]["CIDEr"]["value"]
    vqa = res["results"]["vqa"]["world:vqa"]["metrics"]["accuracy"]["value"]
    assert abs(cider - rec["figures"]["captioning_CIDEr"]) <= 0.01
    assert abs(vqa - rec["figures"]["vqa_accuracy"]) <= 0.01


@pytest.mark.slow
def test_bundled_blip_reproduces_its_recorded_cider() -> None:
    from rcc_compression.jobs.reference import measure_figures

    rec = _record("rcc-blip-world")
    wrapper = get_model("rcc-blip-world")
    spec = WorldSpec(seed=rec["world"]["seed"], test=rec["world"]["test_sizes"]["test"])
    res = measure_figures(wrapper, "blip", spec, bootstrap_samples=0)
    cider = res["results"]["captioning"]["world:captions"]["metrics"]["CIDEr"]["value"]
    assert abs(cider - rec["figures"]["captioning_CIDEr"]) <= 0.01


def test_training_recipe_runs_end_to_end(tmp_path: Path) -> None:
    from rcc_compression.jobs.reference import ReferenceRecipe, train_reference

    world = tmp_path / "world"
    generate_world(world, WorldSpec(seed=1, splits=("train",), parts=("captions",), train=40))
    recipe = ReferenceRecipe(
        kind="clip",
        seed=1,
        steps=3,
        batch_size=16,
        hidden=32,
        vision_layers=1,
        text_layers=1,
        heads=2,
        eval_every=2,
        groups=2,
    )
    rec = train_reference(
        "clip",
        tmp_path / "model",
        world_dir=world,
        recipe=recipe,
        bootstrap_samples=0,
        test_spec=WorldSpec(seed=1, test=8, cls_test_per_class=1),
    )
    assert rec["training"]["steps_done"] == 3 and rec["world"]["seed"] == 1
    assert set(rec["figures"]) >= {"zero_shot_colour_shape_top1", "retrieval_i2t_R@1"}
    wrapper = get_model(str(tmp_path / "model"))
    assert type(wrapper.model).__name__ == "CLIPModel" and wrapper.model.config.text_config.hidden_size == 32
    saved = json.loads((tmp_path / "model" / "reference.json").read_text())
    assert saved["figures"] == rec["figures"]
    assert json.loads((tmp_path / "model" / "training_run" / "run.json").read_text())["status"] == "ok"


def _tiny_recipe(kind: str, **kw):
    from rcc_compression.jobs.reference import ReferenceRecipe

    return ReferenceRecipe(kind=kind, seed=1, steps=3, batch_size=12, hidden=32, vision_layers=1, text_layers=1,
                           heads=2, eval_every=2, groups=2, warmup=1, **kw)


@pytest.mark.parametrize("kind", ["clip", "blip"])
def test_recipe_runs_on_the_trainer_and_repeats_exactly(tmp_path: Path, kind: str) -> None:
    """The recipe is CompressionTrainer steps over seeded batches: the same seed gives the same weights."""
    from rcc_compression.data.world import build_world_tokenizer
    from rcc_compression.jobs.reference import build_blip, build_clip, load_train_split, train_model

    world = tmp_path / "world"
    generate_world(world, WorldSpec(seed=1, splits=("train",), parts=("captions",), train=40))
    data = load_train_split(world, tmp_path / "cache")
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # the recipe must not depend on the global RNG state either
        wrapper, log = train_model(_tiny_recipe(kind), data)
        runs.append(({k: v.clone() for k, v in wrapper.model.state_dict().items()}, log))
        torch.manual_seed(7)
    (w1, log1), (w2, log2) = runs
    assert log1["steps_done"] == 3 and [h["step"] for h in log1["history"]] == [0, 2]
    assert [h["loss"] for h in log1["history"]] == [h["loss"] for h in log2["history"]]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    build = build_clip if kind == "clip" else build_blip
    init = build(_tiny_recipe(kind), build_world_tokenizer(kind)).model.state_dict()
    assert any(not torch.equal(init[k], w1[k]) for k in w1)  # it trained


def test_llava_recipe_repeats_exactly_and_its_feature_loss_is_the_models(tmp_path: Path) -> None:
    """Frozen-tower features computed once give the loss the model computes from pixels; same seed, same weights."""
    from rcc_compression.data.transforms import normalize
    from rcc_compression.data.world import build_world_tokenizer
    from rcc_compression.jobs.reference import load_train_split, train_model
    from rcc_compression.jobs.reference_llava import LlavaBatches, build_llava, image_features, llava_loss

    world = tmp_path / "world"
    generate_world(world, WorldSpec(seed=1, splits=("train",), parts=("captions",), train=40))
    data = load_train_split(world, tmp_path / "cache")
    recipe = _tiny_recipe("llava", vision_from=None, lm_hidden=32, lm_mlp_ratio=2)
    wrapper = build_llava(recipe, build_world_tokenizer("llava", 128), 64)
    batch = LlavaBatches(recipe, data, wrapper, image_features(wrapper, data.pixels))[0]
    assert batch["features"].shape[1:] == (wrapper.num_image_tokens, 32)
    pix = data.pixels[:4]
    feats = image_features(wrapper, pix)
    inputs = wrapper.training_inputs(["", "what colour is the circle?", "", "how many shapes are there?"],
                                     ["a red circle.", "red", "two stars.", "2"])
    with torch.no_grad():
        via_features = llava_loss(wrapper.model, {**inputs, "features": feats.float()})
        proc = wrapper.image_processor
        via_pixels = wrapper.model(pixel_values=normalize(pix, tuple(proc.image_mean), tuple(proc.image_std)),
                                   **inputs).loss
    torch.testing.assert_close(via_features, via_pixels, rtol=1e-5, atol=1e-5)
    runs = []
    for _ in range(2):
        trained, log = train_model(_tiny_recipe("llava", vision_from=None, lm_hidden=32, lm_mlp_ratio=2), data)
        runs.append({k: v.clone() for k, v in trained.model.state_dict().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0]) and log["steps_done"] == 3
    tower = {k for k in runs[0] if "vision_tower" in k}
    assert all(torch.equal(runs[0][k], wrapper.model.state_dict()[k]) for k in tower)  # the tower stays frozen


def test_recipe_stops_within_its_time_budget(tmp_path: Path) -> None:
    from rcc_compression.jobs.reference import load_train_split, train_model

    world = tmp_path / "world"
    generate_world(world, WorldSpec(seed=1, splits=("train",), parts=("captions",), train=40))
    data = load_train_split(world, tmp_path / "cache")
    recipe = _tiny_recipe("blip", time_budget_s=0.0)
    recipe.steps = 50
    _, log = train_model(recipe, data)
    assert log["steps_done"] == 1  # the budget is spent after the first step; the schedule says so
