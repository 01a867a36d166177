"""Planted personal data in the world's captions: how much ``rcc data anonymize``'s text scrubber removes.

Plants N names ("First Last"), e-mail addresses and phone numbers (US, UK, German formats), in
turn, into N seeded captions of the reference world's split (by phrasings at the start or the
end of a caption), runs :class:`~rcc_compression.data.anonymize.TextScrubber` on every caption and
prints: the share of planted values gone, by type; how many captions differ from the expected
text (each planted value replaced by ``<TYPE>``, every other character kept); how many captions
without a plant changed at all; and the scrubbing rate.

Usage: python benchmarks/anonymize_pii.py [--plants 200] [--split test] [--seed 0] [--nlp-model none|NAME]
"""

from __future__ import annotations

import argparse
import json
import time

from rcc_compression.data.anonymize import TextScrubber, plant_pii
from rcc_compression.data.world import ensure_world, load_world_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plants", type=int, default=200)
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nlp-model", default="none", help="spaCy pipeline with NER, or none (the heuristic)")
    args = ap.parse_args()
    root = ensure_world(splits=(args.split,))
    data = json.loads((root / load_world_info(root)["captions"]).read_text(encoding="utf-8"))
    captions = [s["raw"] for e in data["images"] if e.get("split") == args.split for s in e["sentences"]]
    plants = plant_pii(captions, args.plants, seed=args.seed)
    scrubber = TextScrubber(nlp_model=None if args.nlp_model == "none" else args.nlp_model)
    start = time.perf_counter()
    scrubbed = [scrubber.scrub(c) for c in plants.planted]
    seconds = time.perf_counter() - start
    score = plants.score(scrubbed)
    print(f"engine: {scrubber.engine}")
    print(f"world {args.split} captions: {score['captions']}; planted: {score['planted']} "
          f"{score['planted_by_type']}")
    print(f"removed: {score['removed']} ({score['removed_share']:.2%}); missed by type: {score['missed_by_type']}")
    print(f"captions not exactly as expected: {score['captions_not_as_expected']}; captions without a plant "
          f"changed: {score['unplanted_changed']}")
    print(f"replaced spans by type: {dict(scrubber.counts)}; {len(captions) / seconds:.0f} captions/s")


if __name__ == "__main__":
    main()
