import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from unet.evaluation import frame_masks
from unet.losses import BCEDiceLoss, dice_loss
from unet.metrics import bootstrap_interval, pixel_counts, summarize
from unet.model import UNet
from unet.processing import Postprocessing, Preprocessing, fill_mask_holes, keep_largest_volume_component
from unet.segmenter import Segmenter


def postprocess(prob, threshold, min_component_area=0, area_size=None, fill_holes=False):
    """The per-slice post-processing of these settings, as every mask is made."""
    post = Postprocessing(threshold=threshold, min_component_area=min_component_area, fill_holes=fill_holes)
    return post.slice_mask(prob, area_size)


def test_dice_loss_by_hand():
    # sigmoid(0) = 0.5 everywhere; target has 2 of 4 pixels: soft Dice = (2*1 + 1) / (2 + 2 + 1)
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert dice_loss(logits, target).item() == pytest.approx(1 - 3 / 5)
    # a confident perfect prediction has loss ~0; the exact opposite ~1
    assert dice_loss((target * 2 - 1) * 50, target).item() == pytest.approx(0, abs=1e-6)
    assert dice_loss((1 - target * 2) * 50, target).item() == pytest.approx(1 - 1 / 5, abs=1e-6)


def test_dice_loss_on_empty_target_rewards_empty_prediction():
    target = torch.zeros(1, 1, 4, 4)
    assert dice_loss(torch.full((1, 1, 4, 4), -50.0), target).item() == pytest.approx(0, abs=1e-6)
    assert dice_loss(torch.full((1, 1, 4, 4), 50.0), target).item() == pytest.approx(1 - 1 / 17, abs=1e-6)


def test_bce_dice_is_the_sum_on_logits():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.7).float()
    expected = F.binary_cross_entropy(torch.sigmoid(logits), target) + dice_loss(logits, target)
    assert BCEDiceLoss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    # bf16 logits are promoted: same loss within bf16 rounding
    low = BCEDiceLoss()(logits.bfloat16(), target)
    assert low.dtype == torch.float32 and low.item() == pytest.approx(expected.item(), rel=1e-2)


def masks(*rows):
    return np.array(rows, dtype=bool).reshape(len(rows), 1, -1)


def test_metrics_by_hand():
    # patient A: slice 1 pred 2 px, ref 2 px, overlap 1 -> Dice 0.5; slice 2 both empty -> 1
    # patient B: slice 3 healthy, pred 1 px -> Dice 0, a false positive; slice 4 ref 2 px, pred 2 same -> 1
    pred = masks([1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1])
    ref = masks([0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1])
    counts = pixel_counts(pred, ref)
    assert counts.tolist() == [[1, 2, 2], [0, 0, 0], [0, 1, 0], [2, 2, 2]]
    m = summarize(counts, ["A", "A", "B", "B"])
    assert m["slice_dice_mean"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert m["tumor_slice_dice_mean"] == pytest.approx((0.5 + 1) / 2)
    assert m["healthy_fp_rate"] == pytest.approx(1 / 2)
    # per patient, pooled: A = 2*1/(2+2) = 0.5; B = 2*2/(3+2) = 0.8
    assert m["per_patient_dice"] == {"A": 0.5, "B": 0.8}
    assert m["patient_dice_mean"] == pytest.approx(0.65)
    assert m["patient_dice_median"] == pytest.approx(0.65)
    assert m["patient_dice_min"] == pytest.approx(0.5) and m["worst_patient"] == "A"
    # IoU: 1/3, 1, 0, 1
    assert m["slice_iou_mean"] == pytest.approx((1 / 3 + 1 + 0 + 1) / 4)
    assert (m["patients"], m["slices"], m["tumor_slices"]) == (2, 4, 2)
    # resampling two patients with replacement gives means of 0.5, 0.65 and 0.8 only
    low, high = m["patient_dice_ci95"]
    assert low == pytest.approx(0.5) and high == pytest.approx(0.8)


def test_bootstrap_interval_narrows_with_more_patients_and_repeats():
    rng = np.random.default_rng(1)
    few, many = rng.uniform(0.6, 1.0, 9), rng.uniform(0.6, 1.0, 90)
    (a, b), (c, d) = bootstrap_interval(few), bootstrap_interval(many)
    assert a < few.mean() < b and c < many.mean() < d
    assert d - c < (b - a) / 2  # about 1/sqrt(10) as wide
    assert bootstrap_interval(few) == [a, b]
    assert all(np.isnan(bootstrap_interval([0.7])))


def test_metrics_without_healthy_or_tumor_slices():
    m = summarize(pixel_counts(masks([1, 0]), masks([1, 0])), ["A"])
    assert m["patient_dice_mean"] == 1.0 and math.isnan(m["healthy_fp_rate"])
    m = summarize(pixel_counts(masks([0, 0]), masks([0, 0])), ["A"])
    assert m["slice_dice_mean"] == 1.0 and math.isnan(m["tumor_slice_dice_mean"]) and m["healthy_fp_rate"] == 0.0


def test_metrics_reject_mismatched_ids():
    with pytest.raises(ValueError, match="patient ids"):
        summarize(np.zeros((3, 3)), ["A"])


def test_postprocess_threshold_and_small_components():
    prob = np.zeros((20, 20), np.float32)
    prob[2:10, 2:10] = 0.9  # 64 px
    prob[15:17, 15:17] = 0.9  # 4 px speck
    prob[12, 2] = 0.55
    assert postprocess(prob, 0.5).sum() == 64 + 4 + 1
    assert postprocess(prob, 0.6).sum() == 68
    assert postprocess(prob, 0.5, min_component_area=5).sum() == 64
    assert postprocess(prob, 0.95).sum() == 0


def test_postprocess_fills_holes_inside_kept_components_only():
    prob = np.zeros((24, 24), np.float32)
    prob[2:12, 2:12] = 0.9
    prob[5:8, 5:8] = 0.2  # 9 unsure pixels inside the tumor
    prob[15:20, 15:20] = 0.9
    prob[17, 17] = 0.2  # a one-pixel hole in a 25-px ring the area filter removes
    prob[14:22, 2:10] = 0.9
    prob[14:18, 5] = 0.2  # a notch open at the edge of the blob is not a hole
    plain = postprocess(prob, 0.5, min_component_area=30)
    filled = postprocess(prob, 0.5, min_component_area=30, fill_holes=True)
    assert filled.sum() == plain.sum() + 9
    assert filled[5:8, 5:8].all() and not filled[15:20, 15:20].any()
    assert not filled[14:18, 5].any() and filled[14:22, 2:10].sum() == 60
    assert not postprocess(np.zeros((8, 8), np.float32), 0.5, fill_holes=True).any()


def test_fill_mask_holes_matches_scipy():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = ndimage.binary_opening(rng.random((40, 56)) > 0.45)
        assert (fill_mask_holes(mask) == ndimage.binary_fill_holes(mask)).all()


def test_largest_volume_component_joins_slices_and_drops_strays():
    volume = np.zeros((4, 12, 12), bool)
    volume[0, 2:5, 2:5] = True  # 9 px
    volume[1, 5:7, 5:7] = True  # 4 px, touching slice 0's blob only diagonally: one 13-voxel tumor
    volume[3, 8:11, 8:12] = True  # 12 px: the biggest blob of any single slice, but alone
    kept = keep_largest_volume_component(volume)
    assert kept[:2].sum() == 13 and not kept[2:].any()
    assert not keep_largest_volume_component(np.zeros((3, 8, 8), bool)).any()
    assert (keep_largest_volume_component(volume[3:]) == volume[3:]).all()


def test_frame_masks_take_volumes_in_slice_order_per_patient():
    blob = np.zeros((12, 12), np.float32)
    blob[2:6, 2:6] = 1.0  # 16 px
    big = np.zeros((12, 12), np.float32)
    big[7:12, 7:12] = 1.0  # 25 px, touching no blob
    # patient A's rows come as slices 1, 4, 2: in slice order its blobs of slices 1 and 2 make one
    # 32-voxel tumor and the 25-pixel blob goes; stacked in row order, that blob would win
    probs = [blob, big, blob, blob, big]
    volumes = pd.DataFrame({"patient": ["A", "A", "A", "B", "B"], "slice": [1, 4, 2, 1, 2]})
    targets = np.zeros((5, 12, 12), bool)

    def predicted_pixels(post: Postprocessing) -> list[int]:
        segmenter = Segmenter(UNet(width=4, depth=1), Preprocessing(image_size=12), post)
        return list(pixel_counts(frame_masks(segmenter, probs, volumes), targets)[:, 1])

    assert predicted_pixels(Postprocessing()) == [16, 25, 16, 16, 25]
    assert predicted_pixels(Postprocessing(largest_3d_component=True)) == [16, 0, 16, 0, 25]
    # by summed probability, patient B's 25-pixel blob at 0.6 (15) loses to the 16-pixel one at 1.0
    probs[1] = probs[4] = big * 0.6
    by_probability = Postprocessing(threshold=0.5, largest_3d_component=True, largest_3d_component_by="probability")
    assert predicted_pixels(by_probability) == [16, 0, 16, 16, 0]
    assert predicted_pixels(dataclasses.replace(by_probability, largest_3d_component_by="voxels")) == [16, 0, 16, 0, 25]


def test_largest_volume_component_by_probability_keeps_the_surer_tumor_over_a_wider_faint_blob():
    # issue 28's DU_5852 in small: what the network kept of a tumor has fewer voxels than a faint false blob
    volume = np.zeros((3, 16, 16), bool)
    probs = np.zeros((3, 16, 16), np.float32)
    volume[0:2, 1:5, 1:5] = True  # 32 voxels at 0.95: 30.4
    probs[0:2, 1:5, 1:5] = 0.95
    volume[2, 8:14, 8:14] = True  # 36 voxels at 0.55: 19.8
    probs[2, 8:14, 8:14] = 0.55
    assert keep_largest_volume_component(volume).sum() == 36
    kept = keep_largest_volume_component(volume, list(probs))
    assert kept.sum() == 32 and kept[0:2, 1:5, 1:5].all()
    assert (
        Postprocessing(largest_3d_component=True, largest_3d_component_by="probability").volume_masks(volume, probs)
        == kept
    ).all()
    with pytest.raises(ValueError, match="needs each slice's probability map"):
        Postprocessing(largest_3d_component=True, largest_3d_component_by="probability").volume_masks(volume)
    with pytest.raises(ValueError, match="largest_3d_component_by must be voxels or probability, got 'mass'"):
        Postprocessing(largest_3d_component_by="mass")
    assert Postprocessing(largest_3d_component=True).volume_step == "largest 3D component by voxels"
    assert Postprocessing().volume_step == "off"


def test_a_probability_equal_to_the_threshold_is_tumor():
    # 0.375 and 0.5 are exact in float32: the values sit on the boundary, not next to it
    for threshold in (0.375, 0.5):
        prob = np.zeros((8, 8), np.float32)
        prob[2:4, 2:4] = threshold
        prob[5, 5] = np.nextafter(np.float32(threshold), np.float32(0))
        mask = Postprocessing(threshold=threshold).slice_mask(prob)
        assert mask[2:4, 2:4].all() and mask.sum() == 4


def test_a_component_of_exactly_the_minimum_area_is_kept():
    prob = np.zeros((32, 32), np.float32)
    prob[2:6, 2:6] = 0.9  # 16 px
    prob[10:13, 10:15] = 0.9  # 15 px
    mask = Postprocessing(min_component_area=16).slice_mask(prob)
    assert mask[2:6, 2:6].all() and not mask[10:13, 10:15].any()
    # counted at the input size: on a map twice as wide, 16 px of a 32 px input are 64 px
    wide = np.zeros((64, 64), np.float32)
    wide[2:10, 2:10] = 0.9  # 64 px
    wide[20:27, 20:29] = 0.9  # 63 px
    mask = Postprocessing(min_component_area=16).slice_mask(wide, area_size=32)
    assert mask[2:10, 2:10].all() and not mask[20:27, 20:29].any()
