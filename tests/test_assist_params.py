"""The MONAI Label interactive request rules (monailabel_app/lib/params.py): every bad parameter is named (HTTP 400
in the server, tests/test_monailabel.py), before any inference."""

import sys

import numpy as np
import pytest

from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "monailabel_app"))
from lib.params import BadParameter, check_label_map, parse_request  # noqa: E402

LABELS = {"rv": 1, "myo": 2, "lv": 3}
SHAPE = (232, 256, 10)


def test_good_request_and_defaults():
    req = parse_request({"label": "LV", "roi": [131, 87, 107, 150, 5, 5], "foreground": [[100.4, 120, 5]]},
                        LABELS, SHAPE)
    assert (req.target, req.target_name) == (3, "lv")
    assert req.box == ([87, 107, 5], [131, 150, 5])  # roi [i0, i1, j0, j1, k0, k1], any order per axis
    assert req.foreground == [[100, 120, 5]] and req.background == []
    assert (req.output_mode, req.mode, req.propagate, req.mask_prompt) == ("target", "auto", False, False)
    assert req.slices() == [5] and req.clicks_on(5) == ([[100, 120]], [])
    # MONAI Label config options arrive as lists of choices (the first is the value); strings for booleans.
    req = parse_request({"target": 2, "box": [[0, 0, 1], [9, 9, 3]], "output_mode": ["labelmap", "target"],
                         "propagate": "true", "click_radius": "2"}, LABELS, SHAPE)
    assert req.target == 2 and req.slices() == [1, 2, 3] and req.output_mode == "labelmap" and req.propagate
    assert req.click_radius == 2
    # A box reaching past the image is clipped to it.
    assert parse_request({"label": 1, "roi": [-5, 300, 0, 10, 9, 12]}, LABELS, SHAPE).box == ([0, 0, 9], [231, 10, 9])


@pytest.mark.parametrize(
    "params, param, expected",
    [
        ({"label": "heart", "roi": [1, 2, 3, 4, 5, 5]}, "label", "a label name ['rv', 'myo', 'lv']"),
        ({"roi": [1, 2, 3, 4, 5, 5]}, "label", "the structure to segment"),
        ({"label": 0, "roi": [1, 2, 3, 4, 5, 5]}, "label", "index [1, 2, 3]"),
        ({"label": "lv", "roi": [1, 2, 3]}, "roi", "[i0, i1, j0, j1, k0, k1]"),
        ({"label": "lv", "box": [1, 2, 3, 4, 5, 6]}, "box", "[[i0, j0, k0], [i1, j1, k1]]"),
        ({"label": "lv", "roi": [300, 310, 0, 1, 0, 0]}, "roi", "a box overlapping the image"),
        ({"label": "lv", "foreground": [[1, 2]]}, "foreground", "a list of [i, j, k] voxel indices"),
        ({"label": "lv", "background": "here"}, "background", "a list of [i, j, k] voxel indices"),
        ({"label": "lv", "foreground": [[1, 2, 10]]}, "foreground", "inside the image of shape (232, 256, 10)"),
        ({"label": "lv"}, "foreground/background/roi", "at least one click"),
        ({"label": "lv", "roi": [1, 2, 3, 4, 5, 5], "output_mode": "png"}, "output_mode", "['target', 'labelmap']"),
        ({"label": "lv", "roi": [1, 2, 3, 4, 5, 5], "mode": "magic"}, "mode", "['auto', 'prompt', 'correct']"),
        ({"label": "lv", "roi": [1, 2, 3, 4, 5, 5], "propagate": "maybe"}, "propagate", "true or false"),
        ({"label": "lv", "roi": [1, 2, 3, 4, 5, 5], "click_radius": -1}, "click_radius", "an integer >= 0"),
    ],
)
def test_bad_parameters_are_named(params, param, expected):
    with pytest.raises(BadParameter) as info:
        parse_request(params, LABELS, SHAPE)
    assert info.value.param == param
    assert f"bad parameter '{param}'" in str(info.value) and expected in str(info.value)


def test_label_map_checks():
    good = np.zeros(SHAPE, dtype=np.float32)
    good[1, 1, 1] = 3
    out = check_label_map(good[None], SHAPE, 4, "uploaded label file")
    assert out.dtype == np.uint8 and out.shape == SHAPE and out[1, 1, 1] == 3
    for bad, expected in [(np.zeros((10, 10, 10)), "of the image's shape (232, 256, 10)"),
                          (good + 0.5, "integer label values 0..3"),
                          (good * 2, "integer label values 0..3")]:
        with pytest.raises(BadParameter, match="bad parameter 'label'") as info:
            check_label_map(bad, SHAPE, 4, "uploaded label file")
        assert expected in str(info.value) and "uploaded label file" in str(info.value)
