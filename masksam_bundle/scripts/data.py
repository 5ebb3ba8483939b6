"""Datalists: loading and checking decathlon-style JSON, folder listings, and writing 5-fold splits.

Every function here fails early with a message naming the file or key at fault, so that a bad datalist is
reported before any network is built or any training starts.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from monai.data import load_decathlon_datalist

from .files import atomic_write_text

NIFTI_SUFFIXES = (".nii.gz", ".nii")
FILE_KEYS = ("image", "label")


def strip_nifti_suffix(path: str) -> str:
    """``/a/b/case_01.nii.gz`` -> ``case_01``."""
    name = os.path.basename(str(path))
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _entry_files(entry: Dict) -> List[str]:
    files: List[str] = []
    for key in FILE_KEYS:
        value = entry.get(key)
        if value is None:
            continue
        files.extend(value if isinstance(value, (list, tuple)) else [value])
    return [str(f) for f in files]


def check_files_exist(entries: Sequence[Dict], source: str = "datalist") -> None:
    """Raise one ``FileNotFoundError`` listing every missing image/label file of ``entries``."""
    missing = [f for entry in entries for f in _entry_files(entry) if not os.path.isfile(f)]
    if missing:
        shown = "\n  ".join(missing[:50])
        more = f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else ""
        raise FileNotFoundError(f"{len(missing)} file(s) named in {source} do not exist:\n  {shown}{more}")


def load_datalist(
    datalist: str,
    key: str = "training",
    base_dir: Optional[str] = None,
    limit: Optional[int] = None,
    require_label: bool = True,
    check: bool = True,
) -> List[Dict]:
    """Read the ``key`` list of a decathlon-style JSON (``monai.data.load_decathlon_datalist``) and check it.

    Args:
        datalist: path of the JSON file.
        key: list to read (``training``, ``validation``, ``test``, ...).
        base_dir: folder the relative paths are relative to (default: the JSON file's folder).
        limit: keep only the first ``limit`` entries (for smoke runs); ``None``, ``"all"``, ``0`` or ``-1`` keep
            all (MONAI's command-line parser drops ``--num_val_cases None``; ``all`` survives it).
        require_label: every entry must have a ``label``.
        check: verify that every file exists (one error listing all missing files).
    """
    datalist = str(datalist)
    if not os.path.isfile(datalist):
        raise FileNotFoundError(f"datalist {datalist!r} does not exist (set `datalist` or `dataset_dir`)")
    try:
        with open(datalist) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {datalist!r} is not valid JSON: {e}") from e
    if key not in content:
        lists = [k for k, v in content.items() if isinstance(v, list)]
        raise KeyError(f"datalist {datalist!r} has no key {key!r}; its lists are {lists}")
    if not content[key]:
        raise ValueError(f"datalist {datalist!r}: list {key!r} is empty")
    base_dir = os.path.abspath(base_dir) if base_dir is not None else os.path.dirname(os.path.abspath(datalist))
    entries = load_decathlon_datalist(datalist, is_segmentation=True, data_list_key=key, base_dir=base_dir)
    for i, entry in enumerate(entries):
        if "image" not in entry:
            raise KeyError(f"datalist {datalist!r}: entry {i} of {key!r} has no 'image' ({entry})")
        if require_label and "label" not in entry:
            raise KeyError(f"datalist {datalist!r}: entry {i} of {key!r} has no 'label' ({entry['image']})")
    limit = parse_limit(limit, "num_val_cases / num_train_cases")
    if limit is not None:
        entries = entries[:limit]
    if check:
        check_files_exist(entries, source=f"{datalist} [{key}]")
    return entries


def parse_limit(limit, name: str = "limit") -> Optional[int]:
    """A case limit: a positive int keeps that many; ``None``, ``"all"``, ``"none"``, ``0`` and ``-1`` keep all."""
    if limit is None or (isinstance(limit, str) and limit.strip().lower() in ("all", "none", "null", "")):
        return None
    try:
        value = int(limit)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of cases or 'all', got {limit!r}") from None
    if value in (0, -1):
        return None
    if value < 0:
        raise ValueError(f"{name} must be a positive number of cases, or all / 0 / -1 for every case, got {value}")
    return value


def list_images(folder: str) -> List[Dict]:
    """``[{"image": path}, ...]`` for one NIfTI file, or for every NIfTI file in ``folder`` (sorted)."""
    folder = str(folder)
    if os.path.isfile(folder):
        if not folder.endswith(NIFTI_SUFFIXES):
            raise ValueError(f"dataset_dir {folder!r} is a file but not a .nii/.nii.gz image")
        return [{"image": folder}]
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image file or folder {folder!r} does not exist")
    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.endswith(NIFTI_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no .nii/.nii.gz files in {folder!r}")
    return [{"image": f} for f in files]


def inference_list(dataset_dir: Optional[str] = None, datalist: Optional[str] = None, key: str = "test") -> List[Dict]:
    """Images to predict: the ``key`` list of ``datalist`` when given, else ``dataset_dir`` (one NIfTI file, or
    every NIfTI file in that folder).

    With a datalist, entries may carry labels (they are ignored); only the images must exist.
    """
    if datalist:
        entries = load_datalist(datalist, key, base_dir=dataset_dir, require_label=False, check=False)
        entries = [{"image": e["image"]} for e in entries]
        check_files_exist(entries, source=f"{datalist} [{key}]")
        return entries
    if not dataset_dir:
        raise ValueError("set `dataset_dir` (a NIfTI image or a folder of them) or `datalist` for inference")
    return list_images(dataset_dir)


def _case_id(image_name: str) -> str:
    """nnU-Net names images ``CASE_0000.nii.gz`` (channel suffix); MSD names them ``CASE.nii.gz``."""
    stem = strip_nifti_suffix(image_name)
    return re.sub(r"_\d{4}$", "", stem)


def scan_nnunet_folder(folder: str) -> List[Dict]:
    """Pair ``imagesTr/CASE[_0000..].nii.gz`` with ``labelsTr/CASE.nii.gz``; multi-channel cases give image lists."""
    folder = Path(folder)
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} does not exist (expected an nnU-Net/decathlon imagesTr + labelsTr folder)")
    cases: Dict[str, List[str]] = {}
    for f in sorted(images_dir.iterdir()):
        if f.name.endswith(NIFTI_SUFFIXES) and not f.name.startswith("."):
            cases.setdefault(_case_id(f.name), []).append(f"imagesTr/{f.name}")
    if not cases:
        raise FileNotFoundError(f"no NIfTI images in {images_dir}")
    entries, unlabeled = [], []
    for case, images in sorted(cases.items()):
        label = next((f"labelsTr/{case}{s}" for s in NIFTI_SUFFIXES if (labels_dir / f"{case}{s}").is_file()), None)
        if label is None:
            unlabeled.append(case)
            continue
        entries.append({"image": images[0] if len(images) == 1 else images, "label": label})
    if unlabeled:
        raise FileNotFoundError(f"{len(unlabeled)} case(s) in {images_dir} have no label in {labels_dir}: {unlabeled[:20]}")
    return entries


def kfold_splits(entries: Sequence[Dict], num_folds: int = 5, seed: int = 0, group_pattern: Optional[str] = None):
    """Split ``entries`` into ``num_folds`` folds; entries whose image name gives the same ``group_pattern``
    match (first group, e.g. ``(patient\\d+)`` for ACDC frames) always fall in the same fold."""
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")

    def group_of(entry):
        image = entry["image"][0] if isinstance(entry["image"], list) else entry["image"]
        name = strip_nifti_suffix(image)
        if group_pattern:
            m = re.search(group_pattern, name)
            if m:
                return m.group(1) if m.groups() else m.group(0)
        return _case_id(name)

    groups: Dict[str, List[Dict]] = {}
    for entry in entries:
        groups.setdefault(group_of(entry), []).append(entry)
    if len(groups) < num_folds:
        raise ValueError(f"{len(groups)} case groups cannot make {num_folds} folds")
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    folds: List[List[Dict]] = [[] for _ in range(num_folds)]
    for i, key in enumerate(keys):
        folds[i % num_folds].extend(groups[key])
    return folds


def make_datalists(
    folder: str,
    output_dir: Optional[str] = None,
    num_folds: int = 5,
    seed: int = 0,
    group_pattern: Optional[str] = None,
    overwrite: bool = False,
) -> List[str]:
    """Write ``dataset.json`` (all cases under ``training``) and ``dataset_fold{k}.json`` (``training`` /
    ``validation`` = the other folds / fold k) for an nnU-Net-style ``imagesTr/labelsTr`` folder.

    Paths in the JSON files are relative to ``folder``; pass ``dataset_dir=folder`` when training.
    Existing files are not replaced unless ``overwrite``. Returns the written paths.

    Command line (from the bundle root): ``python -m scripts.data make_datalists --folder DIR``.
    """
    output_dir = str(output_dir or folder)
    entries = scan_nnunet_folder(folder)
    folds = kfold_splits(entries, num_folds=num_folds, seed=seed, group_pattern=group_pattern)
    outputs = {os.path.join(output_dir, "dataset.json"): {"training": entries}}
    for k in range(num_folds):
        train = [e for j, fold in enumerate(folds) if j != k for e in fold]
        outputs[os.path.join(output_dir, f"dataset_fold{k}.json")] = {"training": train, "validation": folds[k]}
    existing = [p for p in outputs if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"datalist file(s) already exist (pass overwrite=True to replace): {existing}")
    os.makedirs(output_dir, exist_ok=True)
    for path, content in outputs.items():
        content = {"name": os.path.basename(os.path.abspath(folder)), "num_folds": num_folds, "seed": seed, **content}
        atomic_write_text(path, json.dumps(content, indent=2) + "\n")
    return list(outputs)


__all__ = [
    "strip_nifti_suffix",
    "check_files_exist",
    "load_datalist",
    "parse_limit",
    "list_images",
    "inference_list",
    "scan_nnunet_folder",
    "kfold_splits",
    "make_datalists",
]


if __name__ == "__main__":
    import fire

    fire.Fire({"make_datalists": make_datalists, "load_datalist": load_datalist})
