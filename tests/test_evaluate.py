import math

import torch

from t2sda.scoring import confusion_matrix, iou_from_confusion, predict, slide_logits


def test_confusion_and_iou_values():
    label = torch.tensor([[0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    conf = confusion_matrix(pred, label, 4)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    iou, miou = iou_from_confusion(conf)
    assert iou[:3].tolist() == [1 / 3, 2 / 3, 0.0]
    assert math.isnan(iou[3])  # absent from truth and prediction: not counted
    assert miou.item() == (1 / 3 + 2 / 3 + 0) / 3


class _Pointwise(torch.nn.Module):
    """A per-pixel model: any window gives the same logits for the pixels it covers."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 1)

    def forward(self, image):
        return self.conv(image), None


def test_sliding_window_equals_whole_image():
    torch.manual_seed(0)
    model, image = _Pointwise(), torch.rand(2, 3, 40, 56)
    whole = model(image)[0]
    for crop, stride in ((64, 32), (24, 16), (16, 16)):
        slid = slide_logits(model, image, num_classes=5, crop=crop, stride=stride)
        assert torch.allclose(slid, whole, atol=1e-6), (crop, stride)
    assert torch.equal(predict(model, image, num_classes=5, crop=24, stride=8),
                       whole.argmax(1))
