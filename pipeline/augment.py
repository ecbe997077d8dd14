"""The training augmentation's settings: one dataclass, the reference's values as defaults.

Geometry (flips, rotation) is drawn once per sample and applied to bg, fg_bg, mask and depth
alike; photometric ops (colour shift, noise, dropout) touch bg and fg_bg only, drawn per image
unless `shared`. Every op is off when its probability is 0; `Augment.off()` turns all off.
Validation never augments: it only resizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


OPS = ("hflip", "vflip", "rotate", "color", "noise", "dropout")  # each switched by its `<op>_p`


@dataclass(frozen=True)
class Augment:
    hflip_p: float = 0.5
    vflip_p: float = 0.3
    rotate_p: float = 0.7
    rotate_deg: float = 15.0  # angle ~ U(-rotate_deg, rotate_deg), corners filled with 0
    rotate_interp: str = "linear"  # for bg and fg_bg; mask and depth are always nearest (labels)
    color_p: float = 0.5  # then RGB shift or HSV, one of the two with equal odds
    rgb_shift: float = 20 / 255  # per channel, ~ U(-rgb_shift, rgb_shift)
    hue_deg: float = 20.0
    saturation: float = 0.3  # factor ~ U(1 - saturation, 1 + saturation)
    value: float = 0.2  # factor ~ U(1 - value, 1 + value)
    noise_p: float = 0.5
    noise_min: float = 3 / 255  # sigma ~ U(noise_min, noise_max) (DALI: in steps of 1/255)
    noise_max: float = 7 / 255
    dropout_p: float = 0.5
    dropout_max_holes: int = 2  # 1 to this many holes
    dropout_max_h: float = 1 / 3  # each hole up to this fraction of the height ...
    dropout_max_w: float = 1 / 4  # ... and of the width, filled with 0
    shared: bool = False  # photometric draws once per sample, not per image (noise pixels still differ)

    @classmethod
    def off(cls) -> "Augment":
        return cls(hflip_p=0, vflip_p=0, rotate_p=0, color_p=0, noise_p=0, dropout_p=0)

    def only(self, *ops: str) -> "Augment":
        """These settings with every op but `ops` (e.g. "hflip", "rotate") switched off."""
        probs = {f.name for f in fields(self) if f.name.endswith("_p")}
        unknown = {f"{op}_p" for op in ops} - probs
        if unknown:
            raise ValueError(f"unknown augmentation {sorted(unknown)}; choose from {sorted(p[:-2] for p in probs)}")
        return replace(self, **{p: 0.0 for p in probs if p[:-2] not in ops})

    def __post_init__(self):
        if self.rotate_interp not in ("linear", "nearest"):
            raise ValueError(f"rotate_interp must be 'linear' or 'nearest', got {self.rotate_interp!r}")
        if not 0 <= self.noise_min <= self.noise_max or self.dropout_max_holes < 1:
            raise ValueError("need 0 <= noise_min <= noise_max and dropout_max_holes >= 1")

    def to_dict(self) -> dict:
        return asdict(self)
