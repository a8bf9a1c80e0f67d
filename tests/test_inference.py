import numpy as np
import pytest
import torch

from unet.hub import SHIPPED_MODEL_DIR
from unet.inference import (autocast_dtype, context_batch, cpu_supports_bf16, postprocess, predict_proba,
                            prepare_for_inference, segment, to_rgb_uint8)
from unet.metrics import dice
from unet.model import UNet, load_model
from unet.synthetic import phantom_slice


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return prepare_for_inference(load_model(str(tiny_model_dir)))


def test_to_rgb_uint8_conversions():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_rgb_uint8(gray).shape == (3, 4, 3) and (to_rgb_uint8(gray)[..., 2] == gray).all()
    rgba = np.dstack([np.full((2, 2), v, np.uint8) for v in (1, 2, 3, 255)])
    assert to_rgb_uint8(rgba)[0, 0].tolist() == [1, 2, 3]
    deep = np.array([[0, 1000], [2000, 4000]], np.uint16)
    assert to_rgb_uint8(deep)[..., 0].tolist() == [[0, 64], [128, 255]]
    assert to_rgb_uint8(np.full((2, 2), 7, np.uint16)).max() == 0
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((2, 2, 5), np.uint8))


def test_probabilities_come_back_at_each_input_size(model):
    rng = np.random.default_rng(0)
    images = [phantom_slice(rng, 256, tumor=True)[0], phantom_slice(rng, 200, tumor=True)[0][:150, :190]]
    probs = predict_proba(model, images)
    assert [p.shape for p in probs] == [(256, 256), (150, 190)]
    assert all(p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1 for p in probs)


def test_segment_uses_the_models_threshold(model):
    rng = np.random.default_rng(1)
    image = phantom_slice(rng, 256, tumor=True)[0]
    masks, probs = segment(model, [image])
    settings = (model.min_component_area, model.image_size, model.fill_holes)  # the model's own, as segment uses
    assert np.array_equal(masks[0], postprocess(probs[0], model.threshold, *settings))
    low, _ = segment(model, [image], threshold=0.05)
    assert np.array_equal(low[0], postprocess(probs[0], 0.05, *settings))
    high, _ = segment(model, [image], threshold=0.95)
    assert low[0].sum() >= masks[0].sum() >= high[0].sum() and low[0].sum() > high[0].sum()


def test_channel_order_of_the_config_is_applied(model):
    rng = np.random.default_rng(2)
    image = phantom_slice(rng, 256, tumor=True)[0]
    rgb = predict_proba(model, [image])[0]
    model.channel_order = "BGR"
    try:
        swapped = predict_proba(model, [image[..., ::-1]])[0]
    finally:
        model.channel_order = "RGB"
    assert np.allclose(rgb, swapped, atol=1e-6)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    inter, pa, pb = (a & b).sum(), a.sum(), b.sum()
    return float(dice(np.array([inter]), np.array([pa]), np.array([pb]))[0])


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no bf16 units; fp32 is the path")
def test_bf16_gives_the_fp32_mask_within_rounding(model):
    rng = np.random.default_rng(3)
    images = [phantom_slice(rng, 256, tumor=True)[0] for _ in range(4)]
    fp32, _ = segment(model, images, precision="fp32")
    bf16, _ = segment(model, images, precision="bf16")
    for a, b in zip(fp32, bf16):
        assert agreement(a, b) > 0.97


@pytest.mark.real_data
@pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "model.safetensors").is_file(), reason="no shipped model yet")
def test_shipped_model_bf16_matches_fp32_on_real_slices(real_data_dir):
    from unet.data import read_image, scan_dataset

    shipped = prepare_for_inference(load_model(str(SHIPPED_MODEL_DIR)))
    df = scan_dataset(real_data_dir, check_images=False)
    rows = df[df["has_tumor"]].sample(16, random_state=0)
    images = [read_image(p) for p in rows["image_path"]]
    fp32, _ = segment(shipped, images, precision="fp32")
    auto, _ = segment(shipped, images)
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
    from unet.data import normalize

    model = prepare_for_inference(load_model(str(tiny_model_dir)))
    image = phantom_slice(np.random.default_rng(4), model.image_size, tumor=True)[0]
    plain = predict_proba(model, [image], precision="fp32")[0]
    model.tta_flips = True
    tta = predict_proba(model, [image], precision="fp32")[0]
    x = normalize(image, model.mean, model.std, model.normalization)[None]
    with torch.no_grad():
        by_hand = torch.sigmoid((model(x) + model(x.flip(-1)).flip(-1)) / 2)[0, 0].numpy()
    np.testing.assert_allclose(tta, by_hand, atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-3  # the mirror's prediction did count
    mirrored = predict_proba(model, [np.ascontiguousarray(image[:, ::-1])], precision="fp32")[0]
    np.testing.assert_allclose(mirrored, tta[:, ::-1], atol=1e-5)  # flipped back before averaging


# --- context slices (2.5D input) ----------------------------------------------------------------

def context_model(k: int = 1) -> UNet:
    return prepare_for_inference(UNet(in_channels=3 * (2 * k + 1), context_slices=k, width=4, depth=2, image_size=32,
                                      mean=(0.0,) * 3, std=(1.0,) * 3))


def valued_slices(*values: int, size: int = 32) -> list[np.ndarray]:
    return [np.full((size, size, 3), v, np.uint8) for v in values]


def test_a_volume_goes_in_as_previous_centre_and_next_slice_clamped_at_the_ends():
    def stacked(model: UNet, start: int, stop: int, volume: bool) -> list[list[int]]:
        """The value of the first channel of each stacked slice of each input."""
        batch = context_batch(model, valued_slices(10, 100, 200), start, stop, volume)
        assert batch.shape == (stop - start, model.in_channels, 32, 32)
        return (batch[:, ::3, 0, 0] * 255).round().int().tolist()

    model = context_model(1)
    assert stacked(model, 0, 3, volume=True) == [[10, 10, 100], [10, 100, 200], [100, 200, 200]]
    # neighbours come from the whole list, not the batch: slice 1 alone still sees 0 and 2
    assert stacked(model, 1, 2, volume=True) == [[10, 100, 200]]
    assert stacked(model, 0, 3, volume=False) == [[10] * 3, [100] * 3, [200] * 3]
    assert stacked(context_model(2), 1, 2, volume=True) == [[10, 10, 100, 200, 200]]


def test_a_volume_is_predicted_the_same_in_any_batch_size_and_alone_means_its_own_neighbours():
    model = context_model(1)
    rng = np.random.default_rng(0)
    images = [phantom_slice(rng, 32, tumor=True)[0] for _ in range(5)]
    whole = predict_proba(model, images, batch_size=8, volume=True)
    for batch_size in (1, 2):
        chunked = predict_proba(model, images, batch_size, volume=True)
        assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(whole, chunked))
    # the middle of a volume sees its neighbours, so its map differs from the slice's alone
    alone = predict_proba(model, images, volume=False)
    assert not np.allclose(whole[2], alone[2], atol=1e-4)
    # alone, a slice is its own neighbour: the same as a volume of three copies of it
    for image, prob in zip(images, alone):
        assert np.allclose(prob, predict_proba(model, [image] * 3, volume=True)[1], atol=1e-5)
        assert np.allclose(prob, predict_proba(model, [image], volume=True)[0], atol=1e-5)


def test_without_context_slices_a_volume_changes_nothing(model):
    rng = np.random.default_rng(3)
    images = [phantom_slice(rng, 256, tumor=True)[0] for _ in range(3)]
    assert model.context_slices == 0
    volume, alone = predict_proba(model, images, volume=True), predict_proba(model, images)
    assert all(np.array_equal(a, b) for a, b in zip(volume, alone))
    masks, _ = segment(model, images, volume=True)
    assert all(np.array_equal(a, b) for a, b in zip(masks, segment(model, images)[0]))
