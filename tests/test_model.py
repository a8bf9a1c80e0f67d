import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from unet.model import UNet, count_parameters, load_model


def double_conv_params(i: int, o: int) -> int:
    return 9 * i * o + 9 * o * o + 4 * o  # two bias-free 3x3 convs + two BatchNorms (weight, bias)


def test_classic_configuration_parameter_count():
    classic = UNet(width=64, depth=3, upsampling="bilinear")
    expected = (
        double_conv_params(3, 64) + double_conv_params(64, 128) + double_conv_params(128, 256)
        + double_conv_params(256, 512)
        + double_conv_params(512 + 256, 256) + double_conv_params(256 + 128, 128) + double_conv_params(128 + 64, 64)
        + 64 + 1  # 1x1 head
    )
    assert count_parameters(classic) == expected == 7_785_729
    # the classic layer widths, in order
    convs = [m for m in classic.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs[::2][:4]] == [(3, 64), (64, 128), (128, 256), (256, 512)]
    assert [(d[0].in_channels, d[0].out_channels) for d in classic.decoders] == [(768, 256), (384, 128), (192, 64)]


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
        UNet(channel_order="GBR")


def test_save_load_round_trip_keeps_outputs_and_config(tmp_path):
    torch.manual_seed(0)
    model = UNet(width=8, depth=3, image_size=128, threshold=0.4, min_component_area=32, tta_flips=True).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["channel_order"] == "RGB" and config["image_size"] == 128
    assert config["threshold"] == 0.4 and config["min_component_area"] == 32 and config["tta_flips"] is True
    loaded = load_model(str(tmp_path))
    assert loaded.config == model.config
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_post_processing_changed_after_construction_is_saved(tmp_path):
    model = UNet(width=8, depth=2)
    model.threshold, model.min_component_area, model.largest_3d_component = 0.65, 64, True
    model.fill_holes = True
    model.save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).threshold == 0.65
    assert load_model(str(tmp_path)).largest_3d_component is True
    assert load_model(str(tmp_path)).fill_holes is True
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["min_component_area"] == 64
    # a model saved before the whole-volume step and hole filling existed loads without them
    del config["largest_3d_component"], config["fill_holes"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_model(str(tmp_path)).largest_3d_component is False
    assert load_model(str(tmp_path)).fill_holes is False


def test_loading_is_strict(tmp_path):
    UNet(width=8, depth=2).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    missing = dict(weights)
    missing.pop("head.weight")
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="head.weight"):
        load_model(str(tmp_path))
    save_file({**weights, "extra.weight": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="extra.weight"):
        load_model(str(tmp_path))


def test_a_broken_model_folder_is_a_one_line_error_naming_the_file(tmp_path):
    UNet(width=8, depth=2).save_pretrained(tmp_path)
    config_path, weights_path = tmp_path / "config.json", tmp_path / "model.safetensors"
    config, weights = config_path.read_text(), weights_path.read_bytes()

    def error_of(exception: type[Exception]) -> str:
        with pytest.raises(exception) as caught:
            load_model(str(tmp_path))
        assert "\n" not in str(caught.value)
        return str(caught.value)

    config_path.write_text(json.dumps({**json.loads(config), "width": 16}))  # weights of a width-8 net
    assert error_of(ValueError).startswith(f"{weights_path} does not fit {config_path}: size mismatch for ")
    config_path.write_text(config[:-5])
    assert error_of(ValueError).startswith(f"{config_path} is not valid JSON")
    config_path.write_text(config)
    weights_path.write_bytes(weights[:1000])
    assert error_of(ValueError).startswith(f"{weights_path} is not a readable safetensors file")
    weights_path.write_bytes(weights)
    settings = json.loads(config)
    config_path.write_text(json.dumps({**settings, "treshold": 0.6}))  # a typo would leave the default in use
    assert error_of(ValueError).startswith(f"{config_path}: unknown setting 'treshold'; a UNet takes in_channels, ")
    config_path.write_text("[1, 2]")
    assert error_of(ValueError) == f"{config_path} holds a JSON list, not the model's settings"
    config_path.write_bytes(b"\x99\xff" * 10)
    assert error_of(ValueError).startswith(f"{config_path} is not valid JSON")
    config_path.write_text(json.dumps({**settings, "image_size": 50}))
    assert error_of(ValueError).startswith(f"{config_path}: in_channels, width and depth must be at least 1 and "
                                           "image_size a positive multiple of 2**depth, got 3, 8, 2 and 50")
    for mean, std in (([0.1, 0.2], [0.1, 0.1, 0.1]), ([0.1, 0.1, 0.1], [0.1, 0.0, 0.1])):  # one short; a division by 0
        config_path.write_text(json.dumps({**settings, "mean": mean, "std": std}))
        assert error_of(ValueError) == (f"{config_path}: mean and std must hold three values (one per channel) and "
                                        f"std be above 0, got {mean} and {std}")
    config_path.unlink()  # the constructor's defaults are another model: refused, not guessed
    assert error_of(FileNotFoundError) == f"no config.json in model folder {tmp_path}"


def test_a_config_without_a_setting_loads_with_a_warning_naming_it(tmp_path, caplog):
    model = UNet(width=8, depth=2, threshold=0.7)
    model.save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "config.json").read_text())
    del settings["threshold"], settings["largest_3d_component"]  # saved before these existed
    (tmp_path / "config.json").write_text(json.dumps(settings))
    assert load_model(str(tmp_path)).threshold == 0.5
    assert f"{tmp_path / 'config.json'} lacks threshold, largest_3d_component: the UNet's defaults are used" in caplog.text


def test_folder_without_safetensors_is_refused(tmp_path):
    UNet(width=8, depth=2).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(str(tmp_path))


def test_normalization_mode_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="normalization"):
        UNet(normalization="volume")
    UNet(width=8, depth=2, normalization="slice").save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).normalization == "slice"


def test_context_slices_round_trip_and_old_configs_load_without_them_quietly(tmp_path, caplog):
    torch.manual_seed(0)
    model = UNet(in_channels=9, context_slices=1, width=8, depth=2).eval()
    model.save_pretrained(tmp_path / "context")
    assert json.loads((tmp_path / "context" / "config.json").read_text())["context_slices"] == 1
    loaded = load_model(str(tmp_path / "context"))
    assert loaded.context_slices == 1 and loaded.in_channels == 9 and loaded.config == model.config
    x = torch.randn(2, 9, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # every model saved before the setting existed sees one slice, and a one-slice model's config.json is still
    # written without it (older code loads it): it loads as 0, with nothing to warn about
    UNet(width=8, depth=2).save_pretrained(tmp_path / "old")
    settings = json.loads((tmp_path / "old" / "config.json").read_text())
    assert "context_slices" not in settings
    with caplog.at_level("WARNING"):
        assert load_model(str(tmp_path / "old")).context_slices == 0
    assert "lacks" not in caplog.text
    del settings["fill_holes"]  # a setting that does change behaviour is still named
    (tmp_path / "old" / "config.json").write_text(json.dumps(settings))
    load_model(str(tmp_path / "old"))
    assert "lacks fill_holes: the UNet's defaults are used" in caplog.text


def test_in_channels_must_hold_three_per_context_slice(tmp_path):
    with pytest.raises(ValueError, match=r"in_channels must be 3 x \(2 x context_slices \+ 1\).*got 3 with context_slices 1"):
        UNet(context_slices=1)
    with pytest.raises(ValueError, match="got 9 with context_slices 0"):
        UNet(in_channels=9)
    with pytest.raises(ValueError, match="context_slices -1"):
        UNet(in_channels=3, context_slices=-1)
    assert UNet(in_channels=15, context_slices=2, width=4, depth=1).encoders[0][0].in_channels == 15
    UNet(width=8, depth=2).save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**settings, "context_slices": 1}))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: in_channels must be 3 x"):
        load_model(str(tmp_path))
