"""A procedural toy world that proves learning: generator, dataset writers and an attribute classifier.

    from lorakit.toyworld import ToyWorld, character_samples, load_classifier
    img, caption, attrs = ToyWorld(seed=0).sample(3)        # pretraining sample, never the held-out character
    clf = load_classifier()
    clf.predict([img])["species"]["labels"]                  # ['cat']

The classifier (torch) is imported lazily so the generator needs only PIL and numpy.
"""

from lorakit.toyworld.world import (BACKGROUNDS, CHARACTER, CLASS_TOKEN, COLORS, INSTANCE_TOKEN, POSES, POSITIONS,
                                    SCARVES, SIZES, SPECIES, TAG_ORDER, TRIGGER, ToyWorld, caption, character_samples,
                                    class_samples, is_held_out, parse_caption, pretraining_sample, render,
                                    tags)
from lorakit.toyworld.datasets import write_dreambooth_folder, write_pretraining_set

__all__ = [
    "BACKGROUNDS", "CHARACTER", "CLASS_TOKEN", "COLORS", "INSTANCE_TOKEN", "POSES", "POSITIONS", "SCARVES", "SIZES",
    "SPECIES", "TAG_ORDER", "TRIGGER", "ToyWorld", "caption", "character_samples", "class_samples", "is_held_out",
    "parse_caption", "pretraining_sample", "render", "tags", "write_dreambooth_folder", "write_pretraining_set",
    "load_classifier", "ToyClassifier",
]


def __getattr__(name):
    if name in ("load_classifier", "ToyClassifier"):
        from lorakit.toyworld import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'lorakit.toyworld' has no attribute {name!r}")
