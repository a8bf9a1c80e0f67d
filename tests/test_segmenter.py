"""The one road from images to masks: unet.segmenter.Segmenter with its pre- and post-processing."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from unet.device import autocast_dtype, cpu_supports_bf16
from unet.metrics import dice
from unet.model import UNet
from unet.processing import Postprocessing, Preprocessing
from unet.segmenter import Segmenter
from unet.serving import SHIPPED_MODEL_DIR
from unet.synthetic import phantom_slice


@pytest.fixture(scope="module")
def segmenter(tiny_model_dir):
    return Segmenter.from_pretrained(tiny_model_dir)


# ---- a network whose probabilities are known: the post-processing's wiring, pixel by pixel ----------------

SIZE = 32
GAIN, BIAS = 20.0, -10.0  # logit = GAIN * (channel 0 / 255) + BIAS


def pass_through_network() -> UNet:
    """A U-Net (width 1, depth 1) set by hand so that each pixel's logit is GAIN * its channel-0 value + BIAS: the
    encoder and decoder pass the skip connection through unchanged, the bottom of the U adds nothing."""
    network = UNet(width=1, depth=1).eval()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):  # the identity: (x - 0) / sqrt(var + eps) with var + eps = 1
                module.weight.fill_(1.0)
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)
        encoder, decoder = network.encoders[0], network.decoders[0]
        encoder[0].weight[0, 0, 1, 1] = 1.0  # channel 0, centre tap
        encoder[3].weight[0, 0, 1, 1] = 1.0
        decoder[0].weight[0, 1, 1, 1] = 1.0  # the skip's channel, after the upsampled one
        decoder[3].weight[0, 0, 1, 1] = 1.0
        network.head.weight[0, 0, 0, 0] = GAIN
        network.head.bias[0] = BIAS
    return network


# Pixels read as [0, 1] as they are: no statistics of their own, so channel 0 sets the probability alone.
PLAIN_INPUT = Preprocessing(image_size=SIZE, normalization="dataset", mean=(0.0,) * 3, std=(1.0,) * 3)
CONFIGURED = Postprocessing(threshold=0.6, min_component_area=20, fill_holes=True)


def value_for(probability: float) -> int:
    """The channel-0 value whose probability is nearest ``probability``."""
    return round((np.log(probability / (1 - probability)) - BIAS) / GAIN * 255)


def drawn_slice() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A slice with a tumor that has a hole, a blob of exactly 20 pixels, one of 19, and a patch of probability
    0.55 (between the default threshold and the configured one); its regions as masks."""
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    regions = {name: np.zeros((SIZE, SIZE), bool) for name in ("tumor", "hole", "blob20", "blob19", "unsure")}
    regions["tumor"][2:14, 2:14] = True
    regions["hole"][6:9, 6:9] = True
    regions["blob20"][20:24, 2:7] = True
    regions["blob19"][20:24, 10:15] = True
    regions["blob19"][20, 10] = False
    regions["unsure"][27:31, 20:30] = True
    for name in ("tumor", "blob20", "blob19"):
        image[regions[name], 0] = 255
    image[regions["hole"], 0] = 0
    image[regions["unsure"], 0] = value_for(0.55)
    return image, regions


@pytest.fixture(scope="module")
def drawn_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drawn_model")
    return Segmenter(pass_through_network(), PLAIN_INPUT, CONFIGURED).save_pretrained(folder)


def test_the_drawn_network_gives_the_probabilities_it_was_drawn_for():
    image, regions = drawn_slice()
    prob = Segmenter(pass_through_network(), PLAIN_INPUT, precision="fp32").probabilities([image])[0]
    assert prob[regions["tumor"] & ~regions["hole"]].min() > 0.999 and prob[regions["hole"]].max() < 0.001
    assert np.allclose(prob[regions["unsure"]], 0.55, atol=0.01)
    assert prob[~(regions["tumor"] | regions["blob20"] | regions["blob19"] | regions["unsure"])].max() < 0.001


def test_segment_slice_applies_the_configs_threshold_area_and_hole_filling(drawn_model_dir):
    image, regions = drawn_slice()
    segmenter = Segmenter.from_pretrained(drawn_model_dir, precision="fp32")
    assert segmenter.postprocessing == CONFIGURED  # read from postprocessor_config.json
    mask, _ = segmenter.segment_slice(image)
    # threshold 0.6 drops the unsure patch, area 20 keeps the 20-pixel blob (>=) and drops the 19-pixel one,
    # hole filling closes the tumor
    np.testing.assert_array_equal(mask, regions["tumor"] | regions["blob20"])
    plain, _ = segmenter.with_postprocessing(Postprocessing()).segment_slice(image)
    np.testing.assert_array_equal(
        plain, (regions["tumor"] & ~regions["hole"]) | regions["blob20"] | regions["blob19"] | regions["unsure"]
    )
    # each setting on its own
    one = segmenter.with_postprocessing
    assert one(threshold=0.5).segment_slice(image)[0][regions["unsure"]].all()
    assert one(min_component_area=21).segment_slice(image)[0][regions["blob20"]].sum() == 0
    assert not one(fill_holes=False).segment_slice(image)[0][regions["hole"]].any()


def test_thresholds_and_areas_are_inclusive_on_their_boundaries():
    post = Postprocessing(threshold=0.6, min_component_area=4)
    prob = np.zeros((8, 8), np.float32)
    prob[0, 0:2] = 0.6  # exactly the threshold: tumor
    prob[0, 2] = np.nextafter(np.float32(0.6), np.float32(0))  # just under it: not
    prob[1, 0:2] = 0.6  # with row 0's two pixels, a component of exactly 4 pixels: kept
    prob[5:7, 5] = 0.9  # 2 pixels: dropped
    mask = post.slice_mask(prob)
    assert mask[0:2, 0:2].all() and mask.sum() == 4
    # an area at a larger upload counts pixels of the input size: 4 at 8x8 is 16 at 16x16
    big = np.kron(prob, np.ones((2, 2), np.float32))
    assert post.slice_mask(big, area_size=8).sum() == 16
    assert Postprocessing(threshold=0.6, min_component_area=5).slice_mask(big, area_size=8).sum() == 0


def test_segment_volume_keeps_the_largest_3d_component_where_the_config_asks(tmp_path):
    image, regions = drawn_slice()
    stray = np.zeros_like(image)
    stray[26:30, 2:8, 0] = 255  # a blob on the third slice alone, touching nothing of the tumor's
    volume = [image, image, stray]
    folder = Segmenter(pass_through_network(), PLAIN_INPUT, dataclasses.replace(CONFIGURED, largest_3d_component=True))
    segmenter = Segmenter.from_pretrained(folder.save_pretrained(tmp_path), precision="fp32")
    masks, probs = segmenter.segment_volume(volume)
    tumor = regions["tumor"] | regions["blob20"]
    np.testing.assert_array_equal(masks[0], regions["tumor"])  # the 20-pixel blob is a 3D component of its own
    np.testing.assert_array_equal(masks[1], regions["tumor"])
    assert not masks[2].any()
    # one slice on its own never gets the whole-volume step
    np.testing.assert_array_equal(segmenter.segment_slice(stray)[0], stray[..., 0] > 0)
    np.testing.assert_array_equal(segmenter.segment_slice(image)[0], tumor)
    without, _ = segmenter.with_postprocessing(largest_3d_component=False).segment_volume(volume)
    np.testing.assert_array_equal(without, np.stack([tumor, tumor, stray[..., 0] > 0]))
    assert len(probs) == 3 and all(p.shape == (SIZE, SIZE) for p in probs)


def test_without_the_3d_step_a_volume_is_its_slices_one_by_one(segmenter):
    rng = np.random.default_rng(3)
    images = [phantom_slice(rng, 256, tumor=True)[0] for _ in range(3)]
    plain = segmenter.with_postprocessing(largest_3d_component=False)
    masks, probs = plain.segment_volume(images)
    for image, mask, prob in zip(images, masks, probs):
        alone_mask, alone_prob = plain.segment_slice(image)
        assert np.array_equal(mask, alone_mask) and np.allclose(prob, alone_prob, atol=1e-6)


def test_a_volume_of_slices_of_two_sizes_is_refused(segmenter):
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="one size"):
        segmenter.segment_volume([phantom_slice(rng, 64)[0], phantom_slice(rng, 96)[0]])


# ---- the trained fixture model ---------------------------------------------------------------------------


def test_probabilities_come_back_at_each_input_size(segmenter):
    rng = np.random.default_rng(0)
    images = [phantom_slice(rng, 256, tumor=True)[0], phantom_slice(rng, 200, tumor=True)[0][:150, :190]]
    probs = segmenter.probabilities(images)
    assert [p.shape for p in probs] == [(256, 256), (150, 190)]
    assert all(p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1 for p in probs)


def test_the_batch_size_does_not_change_the_probabilities(tiny_model_dir):
    rng = np.random.default_rng(6)
    images = [phantom_slice(rng, 64, tumor=True)[0] for _ in range(5)]
    whole = Segmenter.from_pretrained(tiny_model_dir, precision="fp32", batch_size=16).probabilities(images)
    for batch_size in (1, 2):
        chunked = Segmenter.from_pretrained(tiny_model_dir, precision="fp32", batch_size=batch_size)
        assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(whole, chunked.probabilities(images)))


def test_segment_uses_the_models_threshold(segmenter):
    rng = np.random.default_rng(1)
    image = phantom_slice(rng, 256, tumor=True)[0]
    mask, prob = segmenter.segment_slice(image)
    post = segmenter.postprocessing  # the model's own, as segment_slice uses
    assert np.array_equal(mask, post.slice_mask(prob, segmenter.preprocessing.image_size))
    low, low_prob = segmenter.with_postprocessing(threshold=0.05).segment_slice(image)
    size = segmenter.preprocessing.image_size
    assert np.array_equal(low, dataclasses.replace(post, threshold=0.05).slice_mask(low_prob, size))
    high, _ = segmenter.with_postprocessing(threshold=0.95).segment_slice(image)
    assert low.sum() >= mask.sum() >= high.sum() and low.sum() > high.sum()


def test_channel_order_of_the_config_is_applied(segmenter):
    rng = np.random.default_rng(2)
    image = phantom_slice(rng, 256, tumor=True)[0]
    rgb = segmenter.probabilities([image])[0]
    bgr = Segmenter(
        segmenter.network,
        dataclasses.replace(segmenter.preprocessing, channel_order="BGR"),
        segmenter.postprocessing,
        segmenter.precision,
    )
    swapped = bgr.probabilities([np.ascontiguousarray(image[..., ::-1])])[0]
    assert np.allclose(rgb, swapped, atol=1e-6)
    assert not np.allclose(rgb, bgr.probabilities([image])[0], atol=1e-3)  # the order does matter to this model


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    inter, pa, pb = (a & b).sum(), a.sum(), b.sum()
    return float(dice(np.array([inter]), np.array([pa]), np.array([pb]))[0])


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no bf16 units; fp32 is the path")
def test_bf16_gives_the_fp32_mask_within_rounding(tiny_model_dir):
    rng = np.random.default_rng(3)
    images = [phantom_slice(rng, 256, tumor=True)[0] for _ in range(4)]
    fp32 = Segmenter.from_pretrained(tiny_model_dir, precision="fp32")
    bf16 = Segmenter.from_pretrained(tiny_model_dir, precision="bf16")
    for image in images:
        assert agreement(fp32.segment_slice(image)[0], bf16.segment_slice(image)[0]) > 0.97


@pytest.mark.real_data
@pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "model.safetensors").is_file(), reason="no shipped model yet")
def test_shipped_model_bf16_matches_fp32_on_real_slices(real_data_dir):
    from unet.data import scan_dataset
    from unet.reader import read_image

    df = scan_dataset(real_data_dir, check_images=False)
    rows = df[df["has_tumor"]].sample(16, random_state=0)
    images = [read_image(p) for p in rows["image_path"]]
    fp32 = [Segmenter.from_pretrained(SHIPPED_MODEL_DIR, precision="fp32").segment_slice(i)[0] for i in images]
    auto = [Segmenter.from_pretrained(SHIPPED_MODEL_DIR).segment_slice(i)[0] for i in images]
    assert np.mean([agreement(a, b) for a, b in zip(fp32, auto)]) > 0.98
    assert sum(int((a != b).sum()) for a, b in zip(fp32, auto)) < 0.002 * 16 * 256 * 256


def test_autocast_picks_fp16_on_gpus_that_only_emulate_bf16(monkeypatch):
    cuda = torch.device("cuda")
    # an Ampere-or-newer card has bf16 units; an older one (T4, V100) only emulates them
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype(cuda) == torch.float16
    assert autocast_dtype(cuda, "bf16") == torch.bfloat16 and autocast_dtype(cuda, "fp32") is None
    assert autocast_dtype(torch.device("cpu"), "fp32") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert autocast_dtype(torch.device("cpu")) == (torch.bfloat16 if cpu_supports_bf16() else None)


def test_flip_tta_averages_the_logits_of_the_slice_and_its_mirror(tiny_model_dir):
    plain = Segmenter.from_pretrained(tiny_model_dir, precision="fp32").with_postprocessing(tta_flips=False)
    tta = plain.with_postprocessing(tta_flips=True)
    image = phantom_slice(np.random.default_rng(4), plain.preprocessing.image_size, tumor=True)[0]
    prob_plain, prob_tta = plain.probabilities([image])[0], tta.probabilities([image])[0]
    x = plain.preprocessing(image)[None]
    with torch.no_grad():
        by_hand = torch.sigmoid((plain.network(x) + plain.network(x.flip(-1)).flip(-1)) / 2)[0, 0].numpy()
    np.testing.assert_allclose(prob_tta, by_hand, atol=1e-5)
    assert np.abs(prob_tta - prob_plain).max() > 1e-3  # the mirror's prediction did count
    mirrored = tta.probabilities([np.ascontiguousarray(image[:, ::-1])])[0]
    np.testing.assert_allclose(mirrored, prob_tta[:, ::-1], atol=1e-5)  # flipped back before averaging


def test_a_segmenter_refuses_what_its_network_cannot_take():
    with pytest.raises(ValueError, match="image_size 50 must be a multiple of 2\\*\\*depth = 4"):
        Segmenter(UNet(width=4, depth=2), Preprocessing(image_size=50))
    with pytest.raises(ValueError, match="batch size must be at least 1, not 0"):
        Segmenter(UNet(width=4, depth=2), batch_size=0)
    with pytest.raises(ValueError, match="expected an HxWx3 uint8 RGB slice"):
        Segmenter(UNet(width=4, depth=2), Preprocessing(image_size=32)).probabilities([np.zeros((32, 32), np.uint8)])
