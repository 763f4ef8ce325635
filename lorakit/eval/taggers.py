"""What the evaluation reads samples with: a tagger adapter maps images to sets of tags.

Two adapters share one small interface (`tag(images) -> [set of tags]`, `vocabulary`, `default_unrelated_prompts`,
and optionally `scene_labels`: the contexts it reads, which eval's default scene tags prefer):

- `WD14Adapter`: a WD14-family ONNX tagger folder (model.onnx + selected_tags.csv), the one users caption with
  (lorakit.tools.tagger does the preprocessing and thresholds);
- `ToyClassifierAdapter`: the toy world's attribute classifier, whose readings are written as the toy world's
  caption tags ("bear", "black fur", "crescent marking", "forest"), so the toy world can check the metric.

Tags are compared in `normalize_tag` form (lower case, "_" as space), so "long_hair" in a tagger's CSV matches
"long hair" in a caption.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from lorakit.errors import UserError
from lorakit.tools.tag_edit import normalize_tag


class TaggerAdapter(Protocol):
    name: str
    vocabulary: frozenset[str]  # every tag it can output, normalised
    default_unrelated_prompts: tuple[str, ...]
    # optional: contexts it reads (settings, props), normalised and in `vocabulary`, most general first. Eval tests
    # "trigger, <scene>" with the frequent caption tags among these before other caption tags, and with the first of
    # these when no caption tag is readable (`lorakit.eval.concept.choose_scene_tags`)
    scene_labels: tuple[str, ...]

    def tag(self, images) -> list[set[str]]:
        """uint8 RGB images (N, H, W, 3) or a list of PIL images -> one set of normalised tags per image."""


def _pil(im):
    from PIL import Image

    return Image.fromarray(im) if isinstance(im, np.ndarray) else im.convert("RGB")


class WD14Adapter:
    """A WD14 ONNX tagger: general and character tags at or above the thresholds (the rating is left out)."""

    name = "wd14"
    # booru scenes far from most characters: the model should draw these as it did before training
    default_unrelated_prompts = ("scenery, no humans, mountain, sky, cloud", "food, fruit, still life, no humans",
                                 "1boy, solo, short hair, suit", "cat, no humans, grass")

    # common Danbooru setting tags: prompts "trigger, <one of these>" test whether the LoRA still follows the setting
    # asked for. Only those in the tagger's selected_tags.csv are declared (a tagger that never outputs "room" cannot
    # tell whether a sample shows one); general enough that most characters can be drawn in them
    SCENE_CANDIDATES = ("outdoors", "indoors", "sky", "night", "day", "forest", "beach", "city", "street", "room",
                        "bedroom", "classroom", "water", "snow", "simple background", "white background")

    def __init__(self, model_dir: str | Path, threshold: float = 0.35, character_threshold: float | None = None,
                 batch_size: int = 16):
        from lorakit.tools.tagger import TaggerOptions, WD14Tagger

        self.tagger = WD14Tagger(model_dir)
        self.opts = TaggerOptions(general_threshold=threshold,
                                  character_threshold=threshold if character_threshold is None else character_threshold)
        self.labels = self.tagger.labels(self.opts)
        self.batch_size = batch_size
        self.vocabulary = frozenset(normalize_tag(n) for n, c in zip(self.labels.names, self.labels.categories)
                                    if c in (0, 4))
        self.scene_labels = tuple(t for t in self.SCENE_CANDIDATES if t in self.vocabulary)
        self.name = f"wd14 ({Path(model_dir).name})"

    def tag(self, images) -> list[set[str]]:
        from lorakit.tools.tagger import preprocess, select_tags

        out: list[set[str]] = []
        for i in range(0, len(images), self.batch_size):
            batch = np.stack([preprocess(_pil(a), self.tagger.size) for a in images[i:i + self.batch_size]])
            for p in self.tagger.predict(batch):
                out.append({normalize_tag(t) for t in select_tags(p, self.labels, self.opts)})
        return out


class ToyClassifierAdapter:
    """The toy world's attribute classifier, read out as toy-world caption tags (identity not collapsed into the
    trigger: a black bear with the crescent reads "bear, black fur, crescent marking")."""

    name = "toy classifier"
    default_unrelated_prompts = ("cat, sky", "rabbit, forest", "frog, beach", "bird, night")

    def __init__(self, classifier=None):
        from lorakit.toyworld.classifier import HEADS, load_classifier
        from lorakit.toyworld.world import tags as world_tags

        self.classifier = classifier or load_classifier()
        self._tags = world_tags
        vocab = set()
        for sp in HEADS["species"]:
            for col in HEADS["color"]:
                vocab.update(world_tags(_attrs(species=sp, color=col)))
        for head in ("background", "position", "size", "pose"):
            vocab.update(HEADS[head])
        vocab.update(f"{s} scarf" for s in HEADS["scarf"] if s != "none")
        vocab.update(("crescent marking", "hat", "glasses", "blush", "surprised"))
        self.vocabulary = frozenset(normalize_tag(t) for t in vocab)
        # its contexts: the backgrounds, then what a character can wear (the toy metric composes the trigger with
        # backgrounds and a hat). Position, size, pose and expression are read too, but they describe the figure,
        # not where it is or what it has on
        self.scene_labels = tuple(normalize_tag(t) for t in (*HEADS["background"], "hat", "glasses",
                                                             *(f"{s} scarf" for s in HEADS["scarf"] if s != "none")))

    def tag(self, images) -> list[set[str]]:
        pred = self.classifier.predict(images if isinstance(images, np.ndarray) else [_pil(im) for im in images])
        heads = [h for h in pred if h != "character"]
        return [{normalize_tag(t) for t in self._tags({h: pred[h]["labels"][i] for h in heads})}
                for i in range(len(images))]


def _attrs(**kw) -> dict:
    a = {"species": "bear", "color": "brown", "marking": False, "scarf": "none", "hat": False, "glasses": False,
         "background": "sky", "position": "center", "size": "small", "pose": "standing", "blush": False,
         "surprised": False}
    a.update(kw)
    return a


WHERE_TO_GET = ("WD14 taggers are published by SmilingWolf on Hugging Face (e.g. wd-v1-4-moat-tagger-v2, "
                "wd-swinv2-tagger-v3): put their model.onnx and selected_tags.csv in a folder (lorakit never "
                "downloads models)")


def load_tagger(kind: str = "wd14", model_dir: str | Path | None = None, threshold: float = 0.35,
                flag: str = "--tagger_dir") -> TaggerAdapter:
    """`kind` "wd14" (needs `model_dir`) or "toy" (the toy world's classifier). `flag`: the option that gave
    `model_dir`, named in errors (`lorakit train` calls it --eval_tagger)."""
    if kind == "toy":
        return ToyClassifierAdapter()
    if kind != "wd14":
        raise UserError(f"--tagger {kind!r} is not known; use wd14 (with --tagger_dir) or toy.")
    if not model_dir:
        raise UserError(f"eval reads every sample with a WD14 tagger: pass {flag} FOLDER (model.onnx + "
                        f"selected_tags.csv), or --tagger toy for the toy world's classifier. {WHERE_TO_GET}.")
    return WD14Adapter(check_tagger_dir(model_dir, flag), threshold=threshold)


def check_tagger_dir(model_dir: str | Path, flag: str) -> Path:
    """A WD14 folder's two files are there (checked here so the message names this command's flag: the tagger
    tool's own errors name its --model_dir)."""
    folder = Path(model_dir)
    missing = [n for n in ("model.onnx", "selected_tags.csv") if not (folder / n).is_file()]
    if not folder.is_dir() or missing:
        what = "is not a folder" if not folder.is_dir() else f"has no {' and no '.join(missing)}"
        raise UserError(f"{flag} {folder} {what}; eval needs a WD14 tagger folder (model.onnx + "
                        f"selected_tags.csv). {WHERE_TO_GET}.")
    return folder


def tag_paths(tagger: TaggerAdapter, paths: Sequence[Path], chunk: int = 64) -> list[set[str]]:
    """Tag image files (the training images), a chunk at a time so large folders stay out of memory."""
    from lorakit.utils.images import load_rgb

    out: list[set[str]] = []
    for i in range(0, len(paths), chunk):
        out += tagger.tag([load_rgb(p) for p in paths[i:i + chunk]])
    return out
