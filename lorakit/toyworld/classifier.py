"""The toy-world attribute classifier: a small CNN that reads a picture's attributes back.

It is the measuring instrument of the toy-world benchmarks: "does this sample show a bear, black fur, a forest, the
crescent marking?". It was trained on the open world (held-out concepts included, attributes independent) plus the
character's images, so the marking head looks at the crescent and not at "black bear".
Shipped weights: lorakit/toyworld/data/classifier.safetensors (fp16; config and held-out accuracies in the metadata),
rebuilt by `python scripts/train_toy_classifier.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import UserError
from lorakit.toyworld.world import BACKGROUNDS, COLORS, POSES, POSITIONS, SCARVES, SIZES, SPECIES

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "data" / "classifier.safetensors"
FORMAT = "lorakit-toy-classifier/1"

BOOL = (False, True)
# head name -> its classes; a head reads the attribute of the same name
HEADS: dict[str, tuple] = {
    "species": SPECIES, "color": COLORS, "background": BACKGROUNDS, "scarf": SCARVES, "hat": BOOL, "glasses": BOOL,
    "marking": BOOL, "position": POSITIONS, "size": SIZES, "pose": POSES, "blush": BOOL, "surprised": BOOL,
}


def targets_from_attrs(attrs_list: Sequence[dict], heads: dict[str, tuple] = HEADS) -> dict[str, torch.Tensor]:
    """Class indices per head for a list of attribute dicts."""
    return {h: torch.tensor([classes.index(a[h]) for a in attrs_list], dtype=torch.long)
            for h, classes in heads.items()}


def _conv(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ToyClassifier(nn.Module):
    """CNN on image_size x image_size RGB; one softmax head per attribute.

    The trunk halves the resolution three times; the feature is a global average (what) concatenated with a coarse
    8x8 map of a few channels (where), so the position and size heads can see layout.
    """

    def __init__(self, widths: Sequence[int] = (24, 32, 48, 96), hidden: int = 128, map_channels: int = 4,
                 image_size: int = 64, heads: dict[str, Sequence] | None = None):
        super().__init__()
        heads = dict(HEADS if heads is None else heads)
        self.config = {"widths": list(widths), "hidden": hidden, "map_channels": map_channels,
                       "image_size": image_size, "heads": {k: list(v) for k, v in heads.items()}}
        self.heads_classes = {k: tuple(v) for k, v in heads.items()}
        self.image_size = image_size
        layers = [_conv(3, widths[0], 1)]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [_conv(cin, cout, 2), _conv(cout, cout, 1)]
        self.trunk = nn.Sequential(*layers)
        self.to_map = nn.Conv2d(widths[-1], map_channels, 1)
        side = image_size // 2 ** (len(widths) - 1)
        self.fc = nn.Sequential(nn.Linear(widths[-1] + map_channels * side * side, hidden), nn.ReLU(inplace=True))
        self.out = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, image_size, image_size) in [0, 1]. Returns logits per head."""
        f = self.trunk((x - 0.5) / 0.25)
        feat = torch.cat([f.mean(dim=(2, 3)), self.to_map(f).flatten(1)], dim=1)
        z = self.fc(feat)
        return {k: m(z) for k, m in self.out.items()}

    # ------------------------------------------------------------------------------------------------------ inference
    def to_batch(self, images, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """PIL images, a uint8 numpy array (B,H,W,3) or a tensor (B,3,H,W) -> float (B,3,S,S) in [0,1]."""
        dev = next(self.parameters()).device
        if isinstance(images, torch.Tensor):
            x = images
            if x.dim() == 3:
                x = x[None]
            if x.dtype == torch.uint8:
                x = x.float() / 255.0
            else:
                lo, hi = value_range
                x = (x.float() - lo) / (hi - lo)
        elif isinstance(images, np.ndarray):
            arr = images[None] if images.ndim == 3 else images
            x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0
        else:
            from PIL import Image

            arrs = []
            for im in images:
                im = im.convert("RGB")
                if im.size != (self.image_size, self.image_size):
                    im = im.resize((self.image_size, self.image_size), Image.BOX)
                arrs.append(np.asarray(im, dtype=np.uint8))
            if not arrs:
                raise ValueError("predict() got no images")
            x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0
        x = x.to(dev).clamp(0, 1)
        if x.shape[1] != 3:
            raise ValueError(f"expected RGB images with 3 channels, got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    @torch.no_grad()
    def predict(self, images, value_range: tuple[float, float] = (0.0, 1.0), batch_size: int = 256) -> dict:
        """Read attributes of images.

        images: a list of PIL images, a uint8 array (B,H,W,3), or a tensor (B,3,H,W) with values in `value_range`
        (pass (-1, 1) for VAE decoder output). Any size is resized to the classifier's input size.
        Returns {head: {"labels": [...], "probs": Tensor (B, C), "classes": (...)}} for every head in `HEADS`
        (binary heads have classes (False, True), so their labels are bools), plus
        "character": {"labels": [bool], "probs": Tensor (B,)} with P(bear) * P(black) * P(marking) — the new
        character "usu bear" is a black bear with the crescent.
        """
        was_training = self.training
        self.eval()
        try:
            x = self.to_batch(images, value_range)
            probs: dict[str, list] = {k: [] for k in self.heads_classes}
            for i in range(0, x.shape[0], batch_size):
                logits = self(x[i:i + batch_size])
                for k, v in logits.items():
                    probs[k].append(v.float().softmax(dim=1).cpu())
        finally:
            self.train(was_training)
        out: dict = {}
        for k, classes in self.heads_classes.items():
            p = torch.cat(probs[k])
            out[k] = {"labels": [classes[j] for j in p.argmax(dim=1).tolist()], "probs": p, "classes": classes}
        pc = character_probability(out)
        out["character"] = {"labels": (pc > 0.5).tolist(), "probs": pc, "classes": BOOL}
        return out


def character_probability(pred: dict) -> torch.Tensor:
    def p(head, label):
        return pred[head]["probs"][:, list(pred[head]["classes"]).index(label)]

    return p("species", "bear") * p("color", "black") * p("marking", True)


def accuracy(pred: dict, attrs_list: Sequence[dict], heads: Sequence[str] | None = None) -> dict[str, float]:
    """Share of correct labels per head (and "character" when the attrs say which samples are the character)."""
    heads = [h for h in pred if h != "character"] if heads is None else list(heads)
    acc = {h: float(np.mean([lab == a[h] for lab, a in zip(pred[h]["labels"], attrs_list)])) for h in heads}
    truth = [a["species"] == "bear" and a["color"] == "black" and bool(a["marking"]) for a in attrs_list]
    acc["character"] = float(np.mean([lab == t for lab, t in zip(pred["character"]["labels"], truth)]))
    return acc


# ------------------------------------------------------------------------------------------------------------ saving
def save_classifier(model: ToyClassifier, path: str | os.PathLike, extra_metadata: dict | None = None) -> None:
    from lorakit.utils.atomic import save_safetensors_atomic

    tensors = {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(model.config)}
    for k, v in (extra_metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    save_safetensors_atomic(tensors, path, metadata=meta)


def load_classifier(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> ToyClassifier:
    """Load the shipped classifier (or one at `path`) in eval mode, float32."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise UserError(
            f"toy-world classifier weights {path} do not exist. The package ships them at {DEFAULT_WEIGHTS}; "
            "rebuild them with `python scripts/train_toy_classifier.py` (about ten minutes on a CPU).")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a broken file
        raise UserError(f"toy-world classifier {path} cannot be read ({exc}); rebuild it with "
                        "`python scripts/train_toy_classifier.py`.") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise UserError(f"{path} is not a lorakit toy-world classifier (metadata format {meta.get('format')!r}, "
                        f"expected {FORMAT!r}).")
    cfg = json.loads(meta["config"])
    model = ToyClassifier(widths=cfg["widths"], hidden=cfg["hidden"], map_channels=cfg["map_channels"],
                          image_size=cfg["image_size"], heads=cfg["heads"])
    # JSON turns the (False, True) classes into lists of bools already; restore tuples
    model.heads_classes = {k: tuple(v) for k, v in cfg["heads"].items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.metadata = meta
    return model.to(device).eval()
