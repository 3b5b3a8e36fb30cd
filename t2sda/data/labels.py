"""Label tables: every supported dataset's label ids -> the 19 Cityscapes train ids.

A table is a lookup array over the ids a label file can hold: ``TRAIN_ID`` (0..18) for
the 19 evaluated classes, ``IGNORE`` (255) for ids the dataset defines but the benchmark does
not score (void, parking, guard rail, ...), ``UNKNOWN`` (-1) for ids outside the dataset's
own table: those mean a wrong or damaged file, and ``data check`` reports them.
"""

from __future__ import annotations

import numpy as np

IGNORE = 255
UNKNOWN = -1

# Cityscapes train ids 0..18 in order (the official class names).
CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
NUM_CLASSES = len(CLASS_NAMES)

# The official Cityscapes label ids 0..33 (labels.py of cityscapesScripts) that have a train
# id; all other ids up to 33 are void/ignored classes (unlabeled, ego vehicle, parking,
# rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer, ...). GTA5, ACDC and
# Dark Zurich ship labels with the same ids.
CITYSCAPES_TRAIN_IDS: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CITYSCAPES_NUM_IDS = 34

# SYNTHIA-RAND-CITYSCAPES class ids 0..22 (its README: 0 void, 13 parking-slot, 14 road-work
# and 22 lanemarking have no Cityscapes train id).
SYNTHIA_TRAIN_IDS: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12,
    8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}
SYNTHIA_NUM_IDS = 23
# SYNTHIA has (almost) no terrain, truck, train: the 16-class mIoU drops them, the 13-class
# one also drops wall, fence, pole (the convention of the SYNTHIA -> Cityscapes literature).
SYNTHIA_16 = tuple(c for c in range(NUM_CLASSES) if c not in (9, 14, 16))
SYNTHIA_13 = tuple(c for c in SYNTHIA_16 if c not in (3, 4, 5))

# Mapillary Vistas v1.2 (66 classes, ids 0..65 in config.json order) -> train ids. Our
# mapping, by Cityscapes' own class definitions: lane markings, manholes, potholes and catch
# basins lie on the road; curbs and pedestrian areas are sidewalk; sign frames and utility
# poles are poles; both faces of a traffic sign are "traffic sign"; sand is terrain; all
# riders are rider. Parking, rail track, guard rail, bridge, tunnel, caravan, trailer have
# their own (ignored) Cityscapes ids and stay ignored here, as does every other class.
MAPILLARY_TRAIN_IDS: dict[int, int] = {
    7: 0, 8: 0, 13: 0, 14: 0, 23: 0, 24: 0, 36: 0, 41: 0, 43: 0,  # road
    2: 1, 9: 1, 11: 1, 15: 1,  # sidewalk
    17: 2, 6: 3, 3: 4,  # building, wall, fence
    45: 5, 46: 5, 47: 5,  # pole
    48: 6, 49: 7, 50: 7,  # traffic light, traffic sign
    30: 8, 26: 9, 29: 9, 27: 10,  # vegetation, terrain, sky
    19: 11, 20: 12, 21: 12, 22: 12,  # person, rider
    55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18,  # car .. bicycle
}
MAPILLARY_NUM_IDS = 66

# BDD100K semantic-segmentation masks already hold the 19 train ids (255 = unlabeled).
BDD100K_TRAIN_IDS: dict[int, int] = {c: c for c in range(NUM_CLASSES)}


def lookup_table(train_ids: dict[int, int], *, num_ids: int, ignore_ids: tuple[int, ...] = (),
                 num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(256,) int16 table: label id -> train id, IGNORE for defined-but-unscored ids, UNKNOWN
    for the rest. Train ids >= ``num_classes`` become IGNORE (a benchmark scoring fewer
    classes, e.g. the digits written in these layouts)."""
    table = np.full(256, UNKNOWN, np.int16)
    table[:num_ids] = IGNORE
    for i in ignore_ids:
        table[i] = IGNORE
    for label_id, train_id in train_ids.items():
        table[label_id] = train_id if train_id < num_classes else IGNORE
    return table
