"""The U-Net: a configurable encoder-decoder that returns logits.

The classic configuration (Ronneberger et al., as in usuyama/pytorch-unet) is
``UNet(width=64, depth=3, upsampling="bilinear")``: encoder 3->64->128->256->512 with
MaxPool2d(2), bilinear x2 upsampling with skip concatenation, decoders 512+256->256,
256+128->128, 128+64->64 and a 1x1 conv to one channel (7.79 M parameters).

The default, ``width=16, depth=4`` with transposed-convolution upsampling, has 1.94 M parameters
and a fraction of the classic net's FLOPs per 256x256 slice (benchmarks/), which is what makes CPU
training and serving practical; wider nets did no better on validation (README, Results).

Everything that serving needs to reproduce training (channel order, normalisation, input
size, threshold, post-processing) is an ``__init__`` argument, so ``save_pretrained`` writes
it to ``config.json`` beside the weights and ``from_pretrained`` gives it back.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors import SafetensorError
from torch import nn

log = logging.getLogger(__name__)

# Per-channel statistics of the LGG training slices scaled to [0, 1] (channel order
# pre-contrast, FLAIR, post-contrast), measured on the 42 training patients of the default split by
# `python -m unet.data ../shared/data/lgg_subset --stats`: the constructor's default. train.py measures
# its own training slices instead, and per-slice normalisation (the shipped model's) uses neither.
LGG_MEAN = (0.1018, 0.0848, 0.0890)
LGG_STD = (0.1432, 0.1256, 0.1315)


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """(conv3x3 -> BatchNorm -> ReLU) twice, the U-Net's basic block."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# The constructor's settings, written to config.json (the optional ones below only when set): the model's
# preprocessing and post-processing contract with every consumer.
CONFIG_KEYS = ("in_channels", "context_slices", "width", "depth", "upsampling", "image_size", "channel_order", "mean",
               "std", "normalization", "threshold", "min_component_area", "fill_holes", "tta_flips",
               "largest_3d_component")
# Settings whose default is exactly what every model saved before them did: written to config.json only when set,
# so such a model's config.json is what it always was (older code loads it), and one without them is no surprise.
OPTIONAL_KEYS = ("context_slices",)


class UNet(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="brain-mri-unet",
    pipeline_tag="image-segmentation",
    license="mit",
    tags=["medical-imaging", "brain-mri", "segmentation", "unet", "lgg"],
):
    """U-Net returning one logit map per image: ``(N, C, H, W) -> (N, 1, H, W)``.

    H and W must be multiples of ``2**depth``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        context_slices: int = 0,
        width: int = 16,
        depth: int = 4,
        upsampling: str = "transpose",
        image_size: int = 256,
        channel_order: str = "RGB",
        mean: tuple[float, ...] = LGG_MEAN,
        std: tuple[float, ...] = LGG_STD,
        normalization: str = "dataset",
        threshold: float = 0.5,
        min_component_area: int = 0,
        fill_holes: bool = False,
        tta_flips: bool = False,
        largest_3d_component: bool = False,
    ) -> None:
        super().__init__()
        if upsampling not in ("bilinear", "transpose"):
            raise ValueError(f"upsampling must be 'bilinear' or 'transpose', got {upsampling!r}")
        if normalization not in ("dataset", "slice"):
            raise ValueError(f"normalization must be 'dataset' or 'slice', got {normalization!r}")
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
        if min(in_channels, width, depth) < 1 or image_size < 1 or image_size % 2**depth:
            raise ValueError(f"in_channels, width and depth must be at least 1 and image_size a positive multiple of "
                             f"2**depth, got {in_channels}, {width}, {depth} and {image_size}")
        if context_slices < 0 or in_channels != 3 * (2 * context_slices + 1):
            raise ValueError(f"in_channels must be 3 x (2 x context_slices + 1), three per slice, got {in_channels} "
                             f"with context_slices {context_slices}")
        if not 0 < threshold < 1 or min_component_area < 0:
            raise ValueError(f"threshold must lie between 0 and 1 and min_component_area be at least 0, got "
                             f"{threshold} and {min_component_area}")
        # Three values each: every slice of a stack is normalised on its own (unet.data.normalize_stack).
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must hold three values (one per channel) and std be above 0, got "
                             f"{list(mean)} and {list(std)}")
        self.in_channels, self.width, self.depth, self.upsampling = in_channels, width, depth, upsampling
        self.image_size = image_size
        # 2.5D input: each slice goes in with this many neighbouring slices of its volume on each side.
        self.context_slices = int(context_slices)
        # The preprocessing and post-processing contract, stored in config.json.
        self.channel_order = channel_order
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.normalization = normalization
        self.threshold = float(threshold)
        self.min_component_area = int(min_component_area)
        self.fill_holes = bool(fill_holes)
        self.tta_flips = bool(tta_flips)
        # Whole-volume post-processing: applied wherever a patient's slices are segmented together
        # (unet.evaluate, the app's volume tab); one slice on its own has no neighbours to compare.
        self.largest_3d_component = bool(largest_3d_component)

        channels = [width * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        previous = in_channels
        for c in channels:
            self.encoders.append(double_conv(previous, c))
            previous = c
        self.pool = nn.MaxPool2d(2)

        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for deep, skip in zip(channels[:0:-1], channels[-2::-1]):
            if upsampling == "bilinear":
                self.upsamplers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
                self.decoders.append(double_conv(deep + skip, skip))
            else:
                self.upsamplers.append(nn.ConvTranspose2d(deep, skip, kernel_size=2, stride=2))
                self.decoders.append(double_conv(2 * skip, skip))
        self.head = nn.Conv2d(channels[0], 1, kernel_size=1)

    @property
    def config(self) -> dict:
        """The constructor arguments as they stand now, including tuned post-processing."""
        return {k: list(getattr(self, k)) if isinstance(getattr(self, k), tuple) else getattr(self, k)
                for k in CONFIG_KEYS if k not in OPTIONAL_KEYS or getattr(self, k)}

    def _save_pretrained(self, save_directory: Path) -> None:
        # Write config.json ourselves (the mixin then keeps it) so that post-processing
        # tuned after construction is saved, not the values the model was built with.
        super()._save_pretrained(save_directory)
        (Path(save_directory) / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips)):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


def load_model(source: str, revision: str | None = None, device: str | torch.device = "cpu") -> UNet:
    """Load a UNet from a local folder or a Hub repo id, strictly and from safetensors only.

    A missing or unexpected weight is an error, never a silently random layer; a repo with
    only pickled weights is refused because unpickling runs code from the network.
    """
    from unet.hub import resolve_model_dir

    model_dir = resolve_model_dir(source, revision=revision)
    config, weights = model_dir / "config.json", model_dir / "model.safetensors"
    check_config(config)
    try:
        # The mixin print()s "Loading weights from local directory": dropped, stdout is for results (--json).
        with contextlib.redirect_stdout(io.StringIO()):
            model = UNet.from_pretrained(model_dir, strict=True, map_location=str(device))
    except TypeError as error:  # a setting of the wrong type, e.g. "threshold": null
        raise ValueError(f"{config} does not describe this UNet ({error})") from None
    except SafetensorError as error:
        raise ValueError(f"{weights} is not a readable safetensors file ({error})") from None
    except RuntimeError as error:  # strict loading: the weights are not those of the net config.json describes
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ValueError(f"{weights} does not fit {config}: {detail}") from None
    except ValueError as error:  # a setting the UNet refuses
        raise ValueError(f"{config}: {error}") from None
    return model.to(device).eval()


def check_config(path: Path) -> None:
    """Refuse a config.json that is not a JSON object of UNet settings; warn about settings it lacks.

    A misspelt key would otherwise be dropped and its default used: another model than the one scored.
    """
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} holds a JSON {type(settings).__name__}, not the model's settings")
    unknown = sorted(settings.keys() - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown setting {unknown[0]!r}; a UNet takes {', '.join(CONFIG_KEYS)}")
    missing = [k for k in CONFIG_KEYS if k not in settings and k not in OPTIONAL_KEYS]
    if missing:  # models saved before a setting existed
        log.warning("%s lacks %s: the UNet's defaults are used", path, ", ".join(missing))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
