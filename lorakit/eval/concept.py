"""The concept a LoRA was trained on, read from its training data: trigger, class prompt, core tags, scene tags.

- trigger: `--trigger`, else the first tag that most captions start with (what `keep_tokens 1` keeps in front), else
  the class tokens of the DreamBooth folder (`20_usu bear` -> "usu bear");
- class prompt: `--class_prompt`, else the trigger without its first word ("usu bear" -> "bear", DreamBooth's
  "instance class"), else the most frequent caption tag besides the trigger ("1girl");
- core tags: `--core_tags`, else the tags present in at least `core_share` of the training images, where an image has
  a tag when its caption has it or the tagger reads it on the image. The tagger's reading matters: DreamBooth-style
  captions leave the identity out ("usu bear, forest" for a black bear with a crescent), yet the images show it.
  Only tags the tagger can output are kept (a score cannot count what the tagger never says);
- scene tags: `--scene_tags a,b`, else N caption tags the tagger can read that are neither core nor the trigger,
  most frequent first, those among the tagger's declared contexts (`scene_labels`: settings and props, e.g. "forest",
  "outdoors") before the rest ("small", "waving"); when no caption tag is readable, the tagger's first N contexts
  (none when the readable ones are all core: the trigger alone then).
  Prompts "trigger, scene tag" test that the LoRA still follows the rest of the prompt. Which contexts are tested
  changes which checkpoint draws the concept best (a LoRA may hold the identity in one context and lose it in
  another): a setting is what users compose a character with, a layout tag ("small", "right") rarely is. Name the
  contexts you care about when you know them. `Concept.scene_reason` says which rule chose them.

The training images' perceptual hashes are kept for the memorisation score.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lorakit.errors import UserError
from lorakit.tools.tag_edit import normalize_tag


@dataclass
class TrainingImage:
    path: Path
    caption: str | None
    class_tokens: str | None


@dataclass
class Concept:
    trigger: str
    class_prompt: str
    core_tags: list[str]
    scene_tags: list[str]
    unrelated_prompts: list[str]
    images: list[TrainingImage]
    hashes: np.ndarray  # uint64 perceptual hash per training image
    tag_share: dict[str, float] = field(default_factory=dict)  # tag -> share of training images that have it
    notes: list[str] = field(default_factory=list)
    scene_reason: str = ""  # why these scene tags (one line for the log and the JSON)

    def as_dict(self) -> dict:
        return {"trigger": self.trigger, "class_prompt": self.class_prompt, "core_tags": self.core_tags,
                "scene_tags": self.scene_tags, "scene_reason": self.scene_reason,
                "unrelated_prompts": self.unrelated_prompts, "train_images": len(self.images), "notes": self.notes,
                "tag_share": {k: round(v, 4) for k, v in sorted(self.tag_share.items(), key=lambda kv: -kv[1])[:40]}}


def split_list(text: str | Sequence[str] | None, sep: str = ",") -> list[str]:
    if text is None:
        return []
    items = text.split(sep) if isinstance(text, str) else list(text)
    return [t.strip() for t in items if t and t.strip()]


def training_images(train_data_dir: str | Path | None = None, dataset_config: str | Path | dict | None = None,
                    caption_extension: str = ".txt") -> list[TrainingImage]:
    """The non-regularization images of a training dataset (DreamBooth folders or a dataset TOML), with captions."""
    from lorakit.data.captions import CaptionError, find_caption
    from lorakit.data.config import build_dataset_configs
    from lorakit.data.scan import list_images

    args = {"train_data_dir": str(train_data_dir) if train_data_dir else None, "caption_extension": caption_extension,
            "resolution": (512, 512)}  # any resolution: only the folders and captions are read
    configs = build_dataset_configs(args, dataset_config, notes=[])
    out = []
    for ds in configs:
        for sub in ds.subsets:
            if sub.is_reg or not sub.image_dir:
                continue
            for img in list_images(sub.image_dir):
                try:
                    cap, _ = find_caption(img, sub.caption_extension or caption_extension)
                except CaptionError:
                    cap = None  # a broken caption: the image still counts, read by the tagger alone
                out.append(TrainingImage(img, cap, sub.class_tokens))
    if not out:
        where = f"--train_data_dir {train_data_dir}" if train_data_dir else f"--dataset_config {dataset_config}"
        raise UserError(f"{where} holds no training images (regularization folders do not count); eval reads the "
                        "concept from the images the LoRA was trained on: point it at that folder.")
    return out


def _first_tag_trigger(captions: list[list[str]]) -> str | None:
    firsts = Counter(tags[0] for tags in captions if tags)
    if not firsts:
        return None
    tag, n = firsts.most_common(1)[0]
    return tag if n > len(captions) / 2 else None


def find_concept(images: list[TrainingImage], tagger, *, trigger: str | None = None,
                 class_prompt: str | None = None, core_tags: Sequence[str] | None = None, core_share: float = 0.75,
                 scene_tags: int | Sequence[str] = 3, unrelated_prompts: Sequence[str] | None = None,
                 n_unrelated: int = 2, image_tags: list[set[str]] | None = None,
                 flags: dict[str, str] | None = None) -> Concept:
    """Read the concept from the training images (`image_tags`: the tagger's reading of them, when already known).
    `flags`: what errors tell the caller's user: "core_tags" the flag's name (training: --eval_core_tags), "trigger"
    how to give the trigger."""
    from lorakit.tools.image_prep import phash_image
    from lorakit.utils.images import load_rgb

    flag = {"trigger": 'Pass --trigger "your trigger".', "core_tags": "--core_tags", **(flags or {})}
    notes: list[str] = []
    captions = [split_list(im.caption.split("\n")[0]) if im.caption else [] for im in images]
    trigger = trigger or _find_trigger(images, captions, flag["trigger"], notes)
    norm_trigger = normalize_tag(trigger)
    if image_tags is None:
        from lorakit.eval.taggers import tag_paths

        image_tags = tag_paths(tagger, [im.path for im in images])
    per_image = [({normalize_tag(t) for t in caps} | read) - {norm_trigger} for caps, read in zip(captions, image_tags)]
    counts = Counter(t for tags in per_image for t in tags)
    share = {t: n / len(images) for t, n in counts.items()}
    core = _core_tags(share, tagger, core_tags, core_share, len(images), flag["core_tags"], notes)
    caption_counts = Counter(normalize_tag(t) for caps in captions for t in set(caps))
    if isinstance(scene_tags, int):
        scene, scene_reason = choose_scene_tags(caption_counts, tagger, scene_tags, core, norm_trigger)
    else:
        scene = _known_tags(scene_tags, tagger, "--scene_tags", "adherence to them cannot be read")
        scene_reason = "given with --scene_tags"
    if class_prompt is None:
        words = trigger.split()
        rest = [t for t, _ in caption_counts.most_common() if t != norm_trigger] + core + [""]
        class_prompt = " ".join(words[1:]) if len(words) > 1 else prompt_tag(rest[0])
    unrelated = list(unrelated_prompts) if unrelated_prompts else list(tagger.default_unrelated_prompts[:n_unrelated])
    hashes = np.array([phash_image(load_rgb(im.path)) for im in images], dtype=np.uint64)
    return Concept(trigger=trigger, class_prompt=class_prompt, core_tags=core, scene_tags=scene,
                   unrelated_prompts=unrelated, images=images, hashes=hashes, tag_share=share, notes=notes,
                   scene_reason=scene_reason)


def choose_scene_tags(caption_counts: Counter, tagger, n: int, core: Sequence[str],
                      trigger: str) -> tuple[list[str], str]:
    """The default scene tags and why: `n` readable caption tags besides the core tags, most frequent first, the
    tagger's declared contexts first; else, when no caption tag is readable at all, its first `n` contexts."""
    if n < 0:
        raise UserError(f"--scene_tags {n}: give a number of scene tags (0 or more) or the tags themselves "
                        '("outdoors, night").')
    if n == 0:
        return [], "none asked for (--scene_tags 0)"
    declared = getattr(tagger, "scene_labels", ())  # optional: an adapter may declare none
    contexts = [t for t in declared if t in tagger.vocabulary and t not in core]
    ranked = [t for t, _ in sorted(caption_counts.items(), key=lambda kv: (-kv[1], kv[0])) if t != trigger]
    readable = [t for t in ranked if t in tagger.vocabulary and t not in core]
    if readable:
        settings = [t for t in readable if t in contexts]
        scene = (settings + [t for t in readable if t not in contexts])[:n]
        which = ("among its scene labels" if len(settings) >= len(scene) else "its scene labels first" if settings
                 else "none of its scene labels is in the captions")
        return scene, f"the most frequent caption tags that {tagger.name} reads, {which}"
    if any(t in tagger.vocabulary for t in ranked):
        # readable captions whose every tag is a core tag: the data shows one context (one image repeated, say),
        # so the trigger alone is the test; prompts for contexts it never had would also dilute the copy rate
        return [], f"none: every caption tag that {tagger.name} reads is a core tag"
    # captions the tagger cannot read (DreamBooth-style, prose) say nothing about contexts: try the tagger's own
    why = "no caption tag besides the trigger is one it reads" if ranked else "the captions hold only the trigger"
    if contexts:
        return contexts[:n], f"{tagger.name}'s own scene labels: {why}"
    left = "declares no scene labels" if not declared else "has no scene label besides the core tags"
    return [], f"none: {why}, and {tagger.name} {left}"


def _find_trigger(images: list[TrainingImage], captions: list[list[str]], hint: str, notes: list[str]) -> str:
    trigger = _first_tag_trigger(captions)
    if trigger:
        notes.append(f"trigger {trigger!r}: the first tag of most captions")
        return trigger
    tokens = Counter(im.class_tokens for im in images if im.class_tokens)
    if not tokens:
        raise UserError("eval cannot tell the trigger: the captions do not share a first tag and the image folders "
                        f"have no class tokens (`N_trigger class`). {hint}")
    trigger = tokens.most_common(1)[0][0]
    notes.append(f"trigger {trigger!r}: the folder's class tokens")
    return trigger


def _core_tags(share: dict[str, float], tagger, given: Sequence[str] | None, core_share: float, n_images: int,
               flag: str, notes: list[str]) -> list[str]:
    """The given core tags (each one the tagger can output), else the tags in `core_share` of the images."""
    if given:
        return _known_tags(given, tagger, flag, "no sample could show them")
    core = sorted((t for t, s in share.items() if s >= core_share and t in tagger.vocabulary),
                  key=lambda t: (-share[t], t))
    if not core:
        raise UserError(f"no tag is present in {core_share:.0%} of the {n_images} training images (captions or the "
                        f"tagger's reading), so eval cannot tell what the LoRA should draw. Pass {flag} \"tag1, "
                        "tag2\" (tags the tagger outputs, e.g. hair and eye colours, outfit).")
    notes.append(f"core tags: in at least {core_share:.0%} of the training images")
    return core


def _known_tags(tags: Sequence[str], tagger, flag: str, why: str) -> list[str]:
    """Tags given by the user, normalised; one the tagger never outputs could never be counted."""
    out = [normalize_tag(t) for t in tags]
    unknown = [t for t in out if t not in tagger.vocabulary]
    if unknown:
        raise UserError(f"{flag} {', '.join(unknown)}: the tagger ({tagger.name}) never outputs these, so {why}; "
                        "use tags it outputs (a WD14 tagger's are in its selected_tags.csv).")
    return out


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    kind: str  # "trigger", "class" or "unrelated"
    requested: tuple[str, ...] = ()  # scene tags the prompt asks for (normalised)


def prompt_tag(tag: str) -> str:
    """A tag as prompt text: parentheses escaped, or "name (series)" would be read as emphasis."""
    return tag.replace("\\(", "(").replace("\\)", ")").replace("(", "\\(").replace(")", "\\)")


def eval_prompts(concept: Concept) -> list[EvalPrompt]:
    """Trigger alone and with each scene tag; the class prompt alone and with the first scene tag; unrelated ones."""
    out = [EvalPrompt(concept.trigger, "trigger")]
    out += [EvalPrompt(f"{concept.trigger}, {prompt_tag(t)}", "trigger", (t,)) for t in concept.scene_tags]
    if concept.class_prompt:
        out.append(EvalPrompt(concept.class_prompt, "class"))
        if concept.scene_tags:
            out.append(EvalPrompt(f"{concept.class_prompt}, {prompt_tag(concept.scene_tags[0])}", "class",
                                  (concept.scene_tags[0],)))
    out += [EvalPrompt(p, "unrelated") for p in concept.unrelated_prompts]
    return out
