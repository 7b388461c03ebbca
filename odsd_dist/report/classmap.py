"""Near-neighbour class maps: which source classes of a pool a teacher class may rightly claim.

Reports only (never a sampling input): the provenance's `source_class` of a selected image is judged
against the map of the teacher class it was selected for (`precision.py`). One built-in map
(`cifar10-tinyimagenet`), or a JSON/YAML file `{teacher class: [source classes]}`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import yaml

from ..errors import UserError

# Tiny ImageNet classes (wnid: the provenance's `source_class` words) that are near neighbours of a CIFAR-10
# class: the images a CIFAR-10 teacher may rightly call that class. Judged by eye, fixed here so every run
# uses the same map. Tiny ImageNet has no airplane (left out of the overall figure) and no horse (hoofed
# stand-ins); a police van is a neighbour of both automobile and truck.
TINYIMAGENET_NEAR_CIFAR10 = {
    "n04285008": ("sports car", ("automobile",)),
    "n03100240": ("convertible", ("automobile",)),
    "n03670208": ("limousine", ("automobile",)),
    "n02814533": ("beach wagon", ("automobile",)),
    "n03444034": ("go-kart", ("automobile",)),
    "n03977966": ("police van", ("automobile", "truck")),
    "n02058221": ("albatross", ("bird",)),
    "n02002724": ("black stork", ("bird",)),
    "n01855672": ("goose", ("bird",)),
    "n02056570": ("king penguin", ("bird",)),
    "n02124075": ("Egyptian cat", ("cat",)),
    "n02123045": ("tabby", ("cat",)),
    "n02123394": ("Persian cat", ("cat",)),
    "n02423022": ("gazelle", ("deer",)),
    "n02415577": ("bighorn", ("deer",)),
    "n02085620": ("Chihuahua", ("dog",)),
    "n02106662": ("German shepherd", ("dog",)),
    "n02099712": ("Labrador retriever", ("dog",)),
    "n02094433": ("Yorkshire terrier", ("dog",)),
    "n02099601": ("golden retriever", ("dog",)),
    "n02113799": ("standard poodle", ("dog",)),
    "n01641577": ("bullfrog", ("frog",)),
    "n01644900": ("tailed frog", ("frog",)),
    "n01629819": ("European fire salamander", ("frog",)),
    "n02437312": ("Arabian camel", ("horse",)),
    "n02403003": ("ox", ("horse",)),
    "n02410509": ("bison", ("horse",)),
    "n03662601": ("lifeboat", ("ship",)),
    "n03447447": ("gondola", ("ship",)),
    "n03796401": ("moving van", ("truck",)),
    "n04146614": ("school bus", ("truck",)),
    "n04487081": ("trolleybus", ("truck",)),
    "n04465501": ("tractor", ("truck",)),
    "n03393912": ("freight car", ("truck",)),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _invert(near: dict, classes) -> dict:
    """{wnid: (words, teacher classes)} -> {teacher class: [words and wnids of its near neighbours]}."""
    out = {c: [] for c in classes}
    for wnid, (words, targets) in near.items():
        for c in targets:
            out[c] += [words, wnid]
    return out


CIFAR10_TINYIMAGENET = _invert(TINYIMAGENET_NEAR_CIFAR10, CIFAR10_CLASSES)
BUILTIN_MAPS = {"cifar10-tinyimagenet": CIFAR10_TINYIMAGENET}


def is_wnid(x: str) -> bool:
    """A WordNet id ('n02123045'), as opposed to the words naming it."""
    return len(x) == 9 and x[0] == "n" and x[1:].isdigit()


def load_class_map(spec: Optional[str], class_names: Sequence[str]) -> Optional[dict]:
    """A {teacher class name: [near-neighbour source classes]} map from a JSON/YAML file or a built-in name."""
    if spec is None:
        return CIFAR10_TINYIMAGENET if tuple(class_names) == CIFAR10_CLASSES else None
    if spec in BUILTIN_MAPS:
        unknown = [k for k in BUILTIN_MAPS[spec] if k not in class_names]
        if unknown:
            raise UserError(f"--class-map {spec}: the teacher has no classes {unknown[:5]}")
        return BUILTIN_MAPS[spec]
    p = Path(spec)
    if not p.is_file():
        raise UserError(f"--class-map: no such file or built-in map: {spec} (built-in: {', '.join(BUILTIN_MAPS)})")
    try:
        data = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise UserError(f"--class-map {p}: not valid JSON/YAML ({e.__class__.__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise UserError(f"--class-map {p}: expected a mapping of class name -> list of source class names")
    unknown = [k for k in data if k not in class_names]
    if unknown:
        raise UserError(f"--class-map {p}: unknown teacher classes {unknown[:5]}")
    return {str(k): [str(x) for x in v] for k, v in data.items()}
