"""The network (unet.model) and a model folder on disk: config.json (architecture), the processing files, weights."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from unet.model import ARCHITECTURE_KEYS, UNet, count_parameters
from unet.processing import LGG_MEAN, LGG_STD, Postprocessing, Preprocessing
from unet.segmenter import Segmenter


def double_conv_params(i: int, o: int) -> int:
    return 9 * i * o + 9 * o * o + 4 * o  # two bias-free 3x3 convs + two BatchNorms (weight, bias)


def test_classic_configuration_parameter_count():
    classic = UNet(width=64, depth=3, upsampling="bilinear")
    expected = (
        double_conv_params(3, 64)
        + double_conv_params(64, 128)
        + double_conv_params(128, 256)
        + double_conv_params(256, 512)
        + double_conv_params(512 + 256, 256)
        + double_conv_params(256 + 128, 128)
        + double_conv_params(128 + 64, 64)
        + 64
        + 1  # 1x1 head
    )
    assert count_parameters(classic) == expected == 7_785_729
    # the classic layer widths, in order
    convs = [m for m in classic.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs[::2][:4]] == [(3, 64), (64, 128), (128, 256), (256, 512)]
    assert [(d[0].in_channels, d[0].out_channels) for d in classic.decoders] == [(768, 256), (384, 128), (192, 64)]


def test_the_default_network_is_the_shipped_architecture():
    assert UNet().architecture == {"in_channels": 3, "width": 16, "depth": 4, "upsampling": "transpose"}
    assert count_parameters(UNet()) == 1_942_577  # metrics.json of the shipped model records this count


@pytest.mark.parametrize("kwargs", [dict(), dict(width=8, depth=2, upsampling="bilinear"), dict(width=8, depth=3)])
def test_output_is_one_logit_map_per_image(kwargs):
    model = UNet(**kwargs).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1, 64, 96)
    # logits, not probabilities: no sigmoid inside, so a shifted head goes below 0
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in model.modules())
    model.head.bias.data.fill_(-10.0)
    with torch.no_grad():
        assert (model(x) < 0).all()


def test_rejects_unknown_options():
    with pytest.raises(ValueError, match="upsampling"):
        UNet(upsampling="nearest")
    with pytest.raises(ValueError, match="channel_order"):
        Preprocessing(channel_order="GBR")


def test_save_load_round_trip_keeps_outputs_and_settings(tmp_path):
    torch.manual_seed(0)
    segmenter = Segmenter(
        UNet(width=8, depth=3),
        Preprocessing(image_size=128),
        Postprocessing(threshold=0.4, min_component_area=32, tta_flips=True),
    )
    segmenter.save_pretrained(tmp_path)
    # config.json is the architecture alone; the processing has files of its own
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "in_channels": 3,
        "width": 8,
        "depth": 3,
        "upsampling": "transpose",
    }
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    post = json.loads((tmp_path / "postprocessor_config.json").read_text())
    assert pre["channel_order"] == "RGB" and pre["image_size"] == 128
    assert post["threshold"] == 0.4 and post["min_component_area"] == 32 and post["tta_flips"] is True
    loaded = Segmenter.from_pretrained(tmp_path)
    assert loaded.preprocessing == segmenter.preprocessing and loaded.postprocessing == segmenter.postprocessing
    assert loaded.network.architecture == segmenter.network.architecture
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(segmenter.network(x), loaded.network(x))


def test_unet_from_pretrained_still_gives_the_network(tmp_path):
    torch.manual_seed(1)
    segmenter = Segmenter(UNet(width=8, depth=2), Preprocessing(image_size=64), Postprocessing(threshold=0.7))
    segmenter.save_pretrained(tmp_path)
    network = UNet.from_pretrained(tmp_path).eval()  # the Hub mixin reads config.json: the architecture alone
    assert isinstance(network, UNet) and network.architecture == segmenter.network.architecture
    assert_same_network(network, segmenter.network)


def assert_same_network(a: UNet, b: UNet) -> None:
    """The same architecture and weights, so the same logits (a segmenter's network runs channels_last, which
    changes only the order of summation)."""
    assert a.architecture == b.architecture
    weights = b.state_dict()
    assert a.state_dict().keys() == weights.keys()
    assert all(torch.equal(value, weights[key]) for key, value in a.state_dict().items())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=1e-5)


def test_post_processing_changed_after_construction_is_saved(tmp_path):
    segmenter = Segmenter(UNet(width=8, depth=2))
    tuned = segmenter.with_postprocessing(
        threshold=0.65, min_component_area=64, largest_3d_component=True, fill_holes=True
    )
    assert segmenter.postprocessing == Postprocessing()  # a new segmenter; the first is untouched
    assert tuned.network is segmenter.network
    tuned.save_pretrained(tmp_path)
    loaded = Segmenter.from_pretrained(tmp_path)
    assert loaded.postprocessing.threshold == 0.65
    assert loaded.postprocessing.largest_3d_component is True
    assert loaded.postprocessing.fill_holes is True
    assert json.loads((tmp_path / "postprocessor_config.json").read_text())["min_component_area"] == 64


def flat_config(network: UNet, **processing: object) -> dict:
    """config.json as brain-mri-unet wrote it before the processing files: architecture and processing in one."""
    return {**network.architecture, **processing}


def test_a_flat_config_of_a_model_pushed_before_the_redesign_loads_with_its_processing(tmp_path, caplog):
    torch.manual_seed(2)
    network = UNet(width=8, depth=2).eval()
    network.save_pretrained(tmp_path)
    settings = {
        "image_size": 64,
        "channel_order": "BGR",
        "mean": [0.2, 0.3, 0.4],
        "std": [0.5, 0.6, 0.7],
        "normalization": "dataset",
        "threshold": 0.65,
        "min_component_area": 48,
        "fill_holes": True,
        "tta_flips": True,
        "largest_3d_component": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(flat_config(network, **settings), indent=2, sort_keys=True))
    assert not (tmp_path / "preprocessor_config.json").exists()
    with caplog.at_level("WARNING"):
        loaded = Segmenter.from_pretrained(tmp_path)
    assert "lacks" not in caplog.text  # every setting is there: nothing to warn about
    assert dataclasses.asdict(loaded.preprocessing) == {
        "channel_order": "BGR",
        "image_size": 64,
        "normalization": "dataset",
        "mean": (0.2, 0.3, 0.4),
        "std": (0.5, 0.6, 0.7),
    }
    assert loaded.postprocessing == Postprocessing(
        threshold=0.65, min_component_area=48, fill_holes=True, tta_flips=True, largest_3d_component=True
    )
    assert_same_network(loaded.network, network)
    # saved again, it is written in today's layout with the same settings
    loaded.save_pretrained(tmp_path / "migrated")
    again = Segmenter.from_pretrained(tmp_path / "migrated")
    assert (again.preprocessing, again.postprocessing) == (loaded.preprocessing, loaded.postprocessing)
    assert set(json.loads((tmp_path / "migrated" / "config.json").read_text())) == set(ARCHITECTURE_KEYS)


def test_a_flat_config_without_a_setting_loads_with_the_default_of_its_day_and_a_warning(tmp_path, caplog):
    network = UNet(width=8, depth=2)
    network.save_pretrained(tmp_path)
    # saved before the whole-volume step and hole filling existed; before per-slice normalisation was the default
    (tmp_path / "config.json").write_text(json.dumps(flat_config(network, image_size=64, threshold=0.7)))
    loaded = Segmenter.from_pretrained(tmp_path)
    assert loaded.postprocessing.threshold == 0.7
    assert loaded.postprocessing.largest_3d_component is False and loaded.postprocessing.fill_holes is False
    assert loaded.preprocessing.normalization == "dataset"  # the old constructor's default, not today's "slice"
    assert loaded.preprocessing.mean == LGG_MEAN and loaded.preprocessing.std == LGG_STD
    assert (
        f"{tmp_path / 'config.json'} lacks channel_order, mean, std, normalization, min_component_area" in caplog.text
    )


def test_a_2_5d_model_is_refused_in_one_line(tmp_path):
    network = UNet(in_channels=9, width=8, depth=2)
    network.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(flat_config(network, context_slices=1, image_size=64)))
    with pytest.raises(ValueError) as caught:
        Segmenter.from_pretrained(tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'config.json'}: a 2.5D model (context_slices 1); 2.5D input was removed")


def test_loading_is_strict(tmp_path):
    Segmenter(UNet(width=8, depth=2)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    missing = dict(weights)
    missing.pop("head.weight")
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="head.weight"):
        Segmenter.from_pretrained(tmp_path)
    save_file({**weights, "extra.weight": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="extra.weight"):
        Segmenter.from_pretrained(tmp_path)


def error_of(folder, exception: type[Exception] = ValueError) -> str:
    with pytest.raises(exception) as caught:
        Segmenter.from_pretrained(folder)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_broken_model_folder_is_a_one_line_error_naming_the_file(tmp_path):
    Segmenter(UNet(width=8, depth=2), Preprocessing(image_size=64)).save_pretrained(tmp_path)
    config_path, weights_path = tmp_path / "config.json", tmp_path / "model.safetensors"
    config, weights = config_path.read_text(), weights_path.read_bytes()

    config_path.write_text(json.dumps({**json.loads(config), "width": 16}))  # weights of a width-8 net
    assert error_of(tmp_path).startswith(f"{weights_path} does not fit {config_path}: size mismatch for ")
    config_path.write_text(config[:-5])
    assert error_of(tmp_path).startswith(f"{config_path} is not valid JSON")
    config_path.write_text(config)
    weights_path.write_bytes(weights[:1000])
    assert error_of(tmp_path).startswith(f"{weights_path} is not a readable safetensors file")
    weights_path.write_bytes(weights)
    settings = json.loads(config)
    config_path.write_text(json.dumps({**settings, "treshold": 0.6}))  # a typo would leave the default in use
    assert error_of(tmp_path).startswith(f"{config_path}: unknown setting 'treshold'; config.json takes in_channels, ")
    config_path.write_text("[1, 2]")
    assert error_of(tmp_path) == f"{config_path} holds a JSON list, not the model's settings"
    config_path.write_bytes(b"\x99\xff" * 10)
    assert error_of(tmp_path).startswith(f"{config_path} is not valid JSON")
    config_path.write_text(json.dumps({**settings, "width": None}))
    assert error_of(tmp_path).startswith(f"{config_path} does not describe a UNet")
    config_path.write_text(config)
    config_path.unlink()  # the constructor's defaults are another model: refused, not guessed
    assert error_of(tmp_path, FileNotFoundError) == f"no config.json in model folder {tmp_path}"


def test_a_broken_processing_file_is_a_one_line_error_naming_it(tmp_path):
    Segmenter(UNet(width=8, depth=2), Preprocessing(image_size=64)).save_pretrained(tmp_path)
    pre_path, post_path = tmp_path / "preprocessor_config.json", tmp_path / "postprocessor_config.json"
    pre, post = json.loads(pre_path.read_text()), json.loads(post_path.read_text())

    pre_path.write_text(json.dumps({**pre, "image_size": 50}))  # the network's depth 2 cannot halve it twice
    assert error_of(tmp_path) == "image_size 50 must be a multiple of 2**depth = 4"
    for mean, std in (([0.1, 0.2], [0.1, 0.1, 0.1]), ([0.1, 0.1, 0.1], [0.1, 0.0, 0.1])):  # one short; a division by 0
        pre_path.write_text(json.dumps({**pre, "mean": mean, "std": std}))
        assert error_of(tmp_path) == (
            f"{pre_path}: mean and std must hold three values (one per channel) and "
            f"std be above 0, got {mean} and {std}"
        )
    pre_path.write_text(json.dumps({**pre, "normalisation": "slice"}))  # a misspelt key: refused, not defaulted
    assert error_of(tmp_path) == (
        f"{pre_path}: unknown setting 'normalisation'; preprocessor_config.json takes "
        "channel_order, image_size, normalization, mean, std"
    )
    pre_path.write_text(json.dumps(pre))
    post_path.write_text(json.dumps({**post, "treshold": 0.6}))
    assert error_of(tmp_path).startswith(
        f"{post_path}: unknown setting 'treshold'; postprocessor_config.json takes threshold, "
    )
    post_path.write_text(json.dumps({**post, "threshold": 1.0}))
    assert error_of(tmp_path) == f"{post_path}: threshold must lie strictly between 0 and 1, got 1.0"
    post_path.write_text("{not json")
    assert error_of(tmp_path).startswith(f"{post_path} is not valid JSON")
    post_path.unlink()
    assert error_of(tmp_path, FileNotFoundError) == f"no postprocessor_config.json in model folder {tmp_path}"


def test_a_processing_file_without_a_setting_loads_with_a_warning_naming_it(tmp_path, caplog):
    Segmenter(UNet(width=8, depth=2), Preprocessing(image_size=64), Postprocessing(threshold=0.7)).save_pretrained(
        tmp_path
    )
    path = tmp_path / "postprocessor_config.json"
    settings = json.loads(path.read_text())
    del settings["threshold"], settings["largest_3d_component"]  # saved before these existed
    path.write_text(json.dumps(settings))
    assert Segmenter.from_pretrained(tmp_path).postprocessing.threshold == 0.5
    assert f"{path} lacks threshold, largest_3d_component: the defaults are used" in caplog.text


def test_folder_without_safetensors_is_refused(tmp_path):
    Segmenter(UNet(width=8, depth=2)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Segmenter.from_pretrained(tmp_path)


def test_normalization_mode_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="normalization"):
        Preprocessing(normalization="volume")
    Segmenter(UNet(width=8, depth=2), Preprocessing(normalization="dataset")).save_pretrained(tmp_path)
    assert Segmenter.from_pretrained(tmp_path).preprocessing.normalization == "dataset"
    assert Preprocessing().normalization == "slice"  # the shipped recipe's, one home for the default
