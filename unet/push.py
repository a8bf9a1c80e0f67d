"""Publish a trained model folder to the Hugging Face Hub, in one commit.

    python -m unet.push --model runs/lgg/model --repo-id USER/brain-mri-unet --data-dir PATH/TO/kaggle_3m
    python -m unet.push --model runs/lgg/model --repo-id USER/brain-mri-unet --private --revision experiment-1

The commit holds config.json (the architecture), preprocessor_config.json and postprocessor_config.json (the
processing), model.safetensors, the model card (README.md), metrics.json, curves.png and examples/: a few slices
of patients it never trained on (its test split, else its validation split; tumor and healthy, lossless PNG in the
file's channel order) with their reference masks, for the app to show. The examples are read from ``--data-dir``
(one or more folders), else from the data folder metrics.json names (a name, not a machine's path: found only from
the folder that holds it), else left out with a warning; they are written to a staging copy, never into the model
folder.

The token is HF_TOKEN or the one saved by ``hf auth login``; it is never printed (`unet.hub.redact` cleans every
reason a server gives). A failed push leaves the model folder as it was and logs one line with the reason and the
command to retry.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

from unet.card import folder_card_text
from unet.data import DatasetError, example_slices, scan_dataset
from unet.evaluation import held_out_split, recorded_metrics
from unet.hub import NETWORK_ERRORS, hub_endpoint, redact, use_short_timeouts
from unet.processing import POSTPROCESSOR_FILE, PREPROCESSOR_FILE
from unet.reader import read_image, read_mask
from unet.segmenter import Segmenter

log = logging.getLogger(__name__)

# Published from the model folder when present (the examples are made separately).
PROCESSING_FILES = [PREPROCESSOR_FILE, POSTPROCESSOR_FILE]
PUBLISHED_FILES = [
    "config.json",
    *PROCESSING_FILES,
    "model.safetensors",
    "README.md",
    "metrics.json",
    "curves.png",
]


def write_examples(frame: pd.DataFrame, folder: Path) -> list[str]:
    """``folder/<patient>_<n>_{tumor,healthy}.png`` and its ``_mask.png`` (0/255) per row; the stems."""
    folder.mkdir(parents=True, exist_ok=True)
    stems = []
    for row in frame.itertuples():
        stem = f"{row.patient}_{row.slice}_{'tumor' if row.has_tumor else 'healthy'}"
        Image.fromarray(read_image(row.image_path)).save(folder / f"{stem}.png")  # RGB = file order
        mask = read_mask(row.mask_path).astype(np.uint8) * 255
        Image.fromarray(mask).save(folder / f"{stem}_mask.png")
        stems.append(stem)
    return stems


def stage(model_dir: Path, staging: Path, repo_id: str, examples: pd.DataFrame | None) -> list[str]:
    """Copy what gets published into ``staging``; the paths, as they will be in the repo."""
    missing = [name for name in ("config.json", "model.safetensors") if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a model folder: no {', '.join(missing)}")
    for name in PUBLISHED_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, staging / name)
    # A card as train.py wrote it gets the repo id in its usage lines; an edited card is kept as it is.
    readme = model_dir / "README.md"
    metrics = recorded_metrics(model_dir)
    if not readme.is_file() or readme.read_text() == folder_card_text(model_dir, metrics):
        (staging / "README.md").write_text(folder_card_text(model_dir, metrics, repo_id))
    if examples is not None and len(examples):
        write_examples(example_slices(examples), staging / "examples")
    elif (model_dir / "examples").is_dir():
        shutil.copytree(model_dir / "examples", staging / "examples")
    return sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())


def retry_command(
    model_dir: Path, repo_id: str, private: bool, revision: str | None, examples: pd.DataFrame | None
) -> str:
    args = ["python", "-m", "unet.push", "--model", str(model_dir), "--repo-id", repo_id]
    args += ["--private"] if private else []
    args += ["--revision", revision] if revision else []
    if examples is not None and len(examples):
        data_dirs = dict.fromkeys(str(Path(path).parent.parent) for path in examples["image_path"])
        args += ["--data-dir", *data_dirs]
    return shlex.join(args)


def explain(error: BaseException, repo_id: str, endpoint: str) -> str:
    """One line on why the push failed, naming the setting to fix."""
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status == 401:
            return "401 invalid or expired token (HF_TOKEN or `hf auth login`)"
        if status == 403:
            return f"403 this token may not write to {repo_id} (a write token of {repo_id.split('/')[0]} is needed)"
        detail = error.server_message or str(error).strip().splitlines()[0]
        return f"{status} {detail}"
    if isinstance(error, NETWORK_ERRORS):
        return f"cannot reach {endpoint} ({type(error).__name__}: check the network or HF_ENDPOINT)"
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def push_model(
    model_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    examples_from: pd.DataFrame | None = None,
) -> int:
    """Create ``repo_id`` if needed and publish ``model_dir`` to it in one commit; 0 on success.

    ``examples_from`` is a `unet.data.scan_dataset` frame of held-out slices to pick the examples from.
    """
    model_dir = Path(model_dir)
    try:  # what the Hub would serve must load: a broken folder is refused before anything is uploaded
        if not model_dir.is_dir():
            raise FileNotFoundError(f"no model folder at {model_dir}")
        Segmenter.from_pretrained(model_dir)  # network, weights and both processing files
        endpoint = hub_endpoint()
    except (OSError, ValueError) as error:
        log.error("error: %s; nothing pushed", error)
        return 2
    retry = retry_command(model_dir, repo_id, private, revision, examples_from)
    token = get_token()
    try:
        if token is None:
            raise PermissionError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
        use_short_timeouts()
        api = HfApi(endpoint=endpoint, token=token)
        with tempfile.TemporaryDirectory(prefix="unet-push-") as tmp:
            files = stage(model_dir, Path(tmp), repo_id, examples_from)
            url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            dice = (recorded_metrics(model_dir).get("test") or {}).get("patient_dice_mean")
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                # Stale files of an earlier push (e.g. other examples) go; files added on the Hub stay. A processing
                # file left from a newer push would override an old flat config.json's settings.
                delete_patterns=["examples/*", "curves.png", "metrics.json", *PROCESSING_FILES],
                commit_message="brain-mri-unet" + (f": test patient Dice {dice:.4f}" if dice is not None else ""),
            )
    except Exception as error:  # noqa: BLE001 - any failure is reported the same way, in one line
        reason = redact(explain(error, repo_id, endpoint))  # a server may echo the token back
        log.error(
            "push to %s/%s failed: %s; model kept in %s; retry with: %s", endpoint, repo_id, reason, model_dir, retry
        )
        return 1
    examples = sum(1 for f in files if f.startswith("examples/") and not f.endswith("_mask.png"))
    log.info(
        "pushed %d files (%d example slices) to %s @ %s (commit %s)",
        len(files),
        examples,
        url,
        revision or "main",
        commit.oid[:7],
    )
    log.info(
        "use it with: python -m unet.evaluate --model %s%s --data-dir ...  or  MODEL_ID=%s python app.py",
        repo_id,
        f" --revision {revision}" if revision else "",
        repo_id,
    )
    return 0


def examples_frame(data_dirs: list[str | Path], model_dir: Path, split: str) -> pd.DataFrame:
    """The slices of the ``split`` patients recorded in the model's metrics.json."""
    metrics_path = model_dir / "metrics.json"
    splits = recorded_metrics(model_dir).get("splits")
    if not splits or split not in splits:
        raise DatasetError(
            f"no {split} split recorded in {metrics_path}: cannot tell which patients to take examples from"
        )
    df = scan_dataset(data_dirs, check_images=False)
    frame = df[df["patient"].isin(splits[split])]
    if frame.empty:
        folders = ", ".join(map(str, data_dirs))
        raise DatasetError(f"none of the {len(splits[split])} {split} patients of {metrics_path} are in {folders}")
    return frame.reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder written by train.py (OUT_DIR/model)")
    parser.add_argument("--repo-id", required=True, help="USER/NAME or ORG/NAME on the Hub")
    parser.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)"
    )
    parser.add_argument(
        "--revision", default=None, help="branch to push to, created from main if needed (default: main)"
    )
    parser.add_argument(
        "--data-dir",
        nargs="+",
        default=None,
        help="kaggle_3m folders to take the example slices from (default: the one in metrics.json, if any)",
    )
    parser.add_argument(
        "--examples-split",
        choices=["train", "val", "test"],
        default=None,
        help="whose slices the examples are (default: the test patients, else the validation patients)",
    )
    parser.add_argument("--no-examples", action="store_true", help="publish without example slices")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_dir = Path(args.model)
    try:
        recorded = recorded_metrics(model_dir).get("data", "")
    except DatasetError as error:
        log.error("error: %s", error)
        return 2
    data_dirs = args.data_dir or ([recorded] if recorded and Path(recorded).is_dir() else None)
    examples = None
    if data_dirs and not args.no_examples:
        try:
            split = args.examples_split or held_out_split(recorded_metrics(model_dir))
            examples = examples_frame(data_dirs, model_dir, split)
        except DatasetError as error:
            log.error("error: %s (or pass --no-examples)", error)
            return 2
    elif not args.no_examples and not (model_dir / "examples").is_dir():
        log.warning("no example slices: pass --data-dir KAGGLE_3M to publish some for the app")
    return push_model(model_dir, args.repo_id, private=args.private, revision=args.revision, examples_from=examples)


if __name__ == "__main__":
    sys.exit(main())
