"""The read-back of shapes images (eval/shapes_readback.py) and the scores built on it (eval/spatial_scores.py):
real images of held-out scenes read back at mIoU >= 0.95 and pass their own layouts; a wrong image fails."""

import torch

from latentdiff.data.shapes import ShapesConfig, ShapesDataset
from latentdiff.eval.shapes_readback import ReadObject, read_back
from latentdiff.eval.spatial_scores import heldout_maps, layout_match, layout_scores, placed, segmentation_iou
from latentdiff.layouts import heldout_layouts, tile_layouts

CFG = ShapesConfig()


def _items(n, size):
    ds = ShapesDataset("test", n, size=size)
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), torch.stack([it["segmentation"] for it in items]), items


def test_read_back_of_real_maps_at_two_sizes():
    for size in (32, 64):
        images, maps, _ = _items(60, size)
        scores = segmentation_iou(read_back(images, CFG)[0], maps, CFG.num_classes)
        assert scores["miou"] >= 0.95, (size, scores["miou"])
        assert scores["miou_objects"] >= 0.95


def test_read_back_of_tiled_maps():
    images, maps = heldout_maps(3, (64, 128), 32, CFG)
    assert images.shape == (3, 3, 64, 128) and maps.shape == (3, 64, 128)
    assert segmentation_iou(read_back(images, CFG)[0], maps, CFG.num_classes)["miou"] >= 0.95


def test_real_images_pass_their_layouts_and_a_wrong_one_fails():
    layouts = heldout_layouts(40, min_objects=2, max_objects=3)
    ds = ShapesDataset("test", 500, size=32, min_objects=2, max_objects=3)
    images = torch.stack([ds[i]["image"] for i in range(40)])
    assert torch.allclose(torch.stack([ds[i]["layout"] for i in range(40)]), layouts)
    found = read_back(images, CFG)[1]
    scores = layout_scores(layouts, found)
    assert scores["overall"]["adherence"] >= 0.95 and scores["overall"]["box_iou"] > 0.6
    assert set(scores) == {"2 objects", "3 objects", "overall"}
    # The layouts of other images: objects elsewhere or of other classes fail.
    assert layout_scores(layouts.roll(1, 0), found)["overall"]["adherence"] < 0.2


def test_layout_match_rules():
    asked = torch.tensor([[3.0, 0.1, 0.1, 0.4, 0.4], [-1, 0, 0, 0, 0]])
    inside = ReadObject(3, (0.12, 0.12, 0.38, 0.38), 30)
    assert layout_match(asked, [inside]) == (True, [layout_match(asked, [inside])[1][0]])
    assert layout_match(asked, [ReadObject(4, inside.box, 30)])[0] is False  # another class
    assert layout_match(asked, [ReadObject(3, (0.5, 0.5, 0.8, 0.8), 30)])[0] is False  # centre outside the box
    assert layout_match(asked, [inside, ReadObject(5, (0.6, 0.6, 0.9, 0.9), 30)])[0] is False  # an extra object
    assert placed(asked, [ReadObject(4, inside.box, 30)]) == [True]  # position alone: any class counts
    assert placed(asked, [ReadObject(3, (0.5, 0.5, 0.8, 0.8), 30)]) == [False]


def test_segmentation_iou_by_hand():
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1]]])
    s = segmentation_iou(pred, target, 2)
    assert s["per_class"] == {0: 0.5, 1: 2 / 3}
    assert abs(s["miou"] - (0.5 + 2 / 3) / 2) < 1e-9 and abs(s["miou_objects"] - 2 / 3) < 1e-9


def test_tile_layouts_scales_boxes_into_tiles():
    lay = torch.tensor([[[2.0, 0.0, 0.0, 0.5, 0.5]], [[4.0, 0.5, 0.5, 1.0, 1.0]]])
    tiled = tile_layouts(lay, 1, 2)
    assert torch.allclose(tiled, torch.tensor([[2.0, 0.0, 0.0, 0.25, 0.5], [4.0, 0.75, 0.5, 1.0, 1.0]]))
