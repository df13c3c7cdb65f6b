"""Folders of cases: which files are inputs, and which image goes with which mask (by case id)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from . import formats
from .formats import case_id, suffix_of

# nnU-Net names the channels of an image <case>_0000, <case>_0001, ...
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Case:
    """One case of a folder pairing: image file(s) (several = channels) and its mask."""

    case_id: str
    images: list[Path]
    mask: Path


@dataclass
class Pairing:
    cases: list[Case]
    unmatched_images: list[Path]
    unmatched_masks: list[Path]


def list_files(folder: str | os.PathLike) -> list[Path]:
    """Supported files in a folder (not recursive, hidden files skipped), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {'a file, not a folder' if folder.exists() else 'no such folder'}")
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and suffix_of(p) in formats.FORMATS
    )


def by_case_id(files: list[Path]) -> dict[str, Path]:
    """Files by case id; two files of one case id (``case.png`` and ``case.tif``) are an error, not
    one silently shadowing the other."""
    found: dict[str, Path] = {}
    for path in files:
        cid = case_id(path)
        if cid in found:
            raise InputError(f"{path}: case id {cid!r} is also {found[cid].name}; keep one file per case")
        found[cid] = path
    return found


def pair_folders(image_dir: str | os.PathLike, mask_dir: str | os.PathLike) -> Pairing:
    """Pair images with masks by case id.

    An image pairs with the mask of the same case id. Failing that, images named
    ``<case>_0000``, ``<case>_0001``, ... (nnU-Net's channel naming) pair with mask ``<case>``,
    their files stacked as channels in that order. Everything left over is reported.
    """
    images = list_files(image_dir)
    by_case_id(images)  # refuses two images of one case id
    masks = by_case_id(list_files(mask_dir))
    by_case: dict[str, list[Path]] = {}
    unmatched_images = []
    for image in images:
        cid = case_id(image)
        if cid in masks:
            by_case.setdefault(cid, []).append(image)
            continue
        match = _CHANNEL_SUFFIX.match(cid)
        if match and match["case"] in masks:
            by_case.setdefault(match["case"], []).append(image)
        else:
            unmatched_images.append(image)
    cases = [Case(cid, sorted(files), masks[cid]) for cid, files in sorted(by_case.items())]
    unmatched_masks = [m for cid, m in sorted(masks.items()) if cid not in by_case]
    return Pairing(cases, unmatched_images, unmatched_masks)
