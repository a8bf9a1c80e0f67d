"""Write the app's fallback example slices: synthetic phantoms, not real MRI.

    python examples/make_examples.py

Each example is ``synthetic_<n>_<kind>.png`` (an RGB slice, channels in the LGG file order
pre-contrast, FLAIR, post-contrast) with its reference mask ``synthetic_<n>_<kind>_mask.png``
(0 or 255). The app shows them when the model came without examples and no ``--examples``
folder is given. No real patient image is ever stored in this repository.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from unet.synthetic import phantom_slice  # the package installed with `pip install -e .`

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
# (name, brain scale, tumor): two slices with a tumor, two without, at fixed seeds.
EXAMPLES = [
    ("synthetic_1_tumor", 1.0, True),
    ("synthetic_2_tumor", 0.9, True),
    ("synthetic_3_healthy", 1.0, False),
    ("synthetic_4_healthy", 0.8, False),
]


def main(out_dir: Path = HERE, size: int = 256, seed: int = 7) -> None:
    """Write the four examples and their masks to ``out_dir``, the same bytes on every run."""
    rng = np.random.default_rng(seed)
    for name, scale, tumor in EXAMPLES:
        image, mask = phantom_slice(rng, size, scale, tumor)
        Image.fromarray(image, "RGB").save(out_dir / f"{name}.png", optimize=True)
        Image.fromarray(mask, "L").save(out_dir / f"{name}_mask.png", optimize=True)
        log.info("wrote %s (%d tumor pixels)", name, int((mask > 0).sum()))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
