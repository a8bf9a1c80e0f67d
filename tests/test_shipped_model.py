"""The model shipped in models/brain-mri-unet: loadable as from the Hub, and its numbers reproduce."""
import json
import re

import pytest
from huggingface_hub import ModelCard

from unet.card import model_card_text
from unet.data import scan_dataset
from unet.evaluate import main as evaluate_main
from unet.evaluate import mask_counts, predict_frame, patient_rows
from unet.hub import SHIPPED_MODEL_DIR
from unet.inference import prepare_for_inference
from unet.metrics import summarize
from unet.model import load_model

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "model.safetensors").is_file(),
                                reason="no shipped model in models/brain-mri-unet")


def test_shipped_folder_is_the_hub_layout_and_small():
    for name in ("config.json", "model.safetensors", "README.md", "metrics.json"):
        assert (SHIPPED_MODEL_DIR / name).is_file(), name
    assert (SHIPPED_MODEL_DIR / "model.safetensors").stat().st_size <= 32 * 1024 * 1024
    # no dataset slices are shipped with the model: examples of real scans live only on the Hub
    assert not (SHIPPED_MODEL_DIR / "examples").exists()
    card = ModelCard.load(SHIPPED_MODEL_DIR / "README.md")
    assert card.data.pipeline_tag == "image-segmentation"
    metrics = json.loads((SHIPPED_MODEL_DIR / "metrics.json").read_text())
    assert f"{metrics['test']['patient_dice_mean']:.4f}" in card.text
    # the card is what write_model_card makes of these files, so it names both test results
    assert card.content.strip() == model_card_text(metrics, json.loads((SHIPPED_MODEL_DIR / "config.json").read_text())).strip()
    assert "test, slice by slice" in card.text and f"{metrics['test_per_slice']['patient_dice_mean']:.4f}" in card.text
    for patient in metrics["splits"]["test"]:
        assert patient in card.text
    assert metrics["command"].startswith("python train.py")


def test_config_carries_the_tuned_post_processing():
    model = load_model(str(SHIPPED_MODEL_DIR))
    config = json.loads((SHIPPED_MODEL_DIR / "config.json").read_text())
    assert model.config == config
    assert config["channel_order"] == "RGB" and config["image_size"] == 256
    # the loaded model applies what the card and the README say validation chose
    card = (SHIPPED_MODEL_DIR / "README.md").read_text()
    readme = (SHIPPED_MODEL_DIR.parents[1] / "README.md").read_text()
    stated = (f"threshold {model.threshold}, minimum component area {model.min_component_area} px, hole filling "
              f"{'on' if model.fill_holes else 'off'}, flip test-time augmentation off, largest 3D component per "
              f"patient {'on' if model.largest_3d_component else 'off'}")
    assert not model.tta_flips and stated in card
    assert f"threshold {model.threshold}, tumor components under {model.min_component_area} px removed" in readme


@pytest.mark.real_data
def test_evaluate_reproduces_the_shipped_test_metrics(real_data_dir, capsys):
    metrics = json.loads((SHIPPED_MODEL_DIR / "metrics.json").read_text())
    code = evaluate_main(["--data-dir", str(real_data_dir), "--model", str(SHIPPED_MODEL_DIR),
                          "--patients", *metrics["splits"]["test"], "--json"])
    assert code == 0
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = metrics["test"]
    assert (measured["patients"], measured["slices"]) == (expected["patients"], expected["slices"])
    for key in ("patient_dice_mean", "patient_dice_median", "tumor_slice_dice_mean", "slice_dice_mean", "healthy_fp_rate"):
        assert measured[key] == pytest.approx(expected[key], abs=0.003), key
    assert measured["patient_dice_ci95"] == pytest.approx(expected["patient_dice_ci95"], abs=0.003)


@pytest.mark.real_data
def test_whole_volume_step_only_removes_pixels_and_both_results_are_recorded(real_data_dir):
    metrics = json.loads((SHIPPED_MODEL_DIR / "metrics.json").read_text())
    df = patient_rows(scan_dataset(real_data_dir), metrics["splits"]["test"])
    model = prepare_for_inference(load_model(str(SHIPPED_MODEL_DIR)))
    assert model.largest_3d_component
    probs, targets = predict_frame(model, df, progress=False)
    per_slice = mask_counts(probs, targets, model.threshold, model.min_component_area, fill_holes=model.fill_holes)
    per_volume = mask_counts(probs, targets, model.threshold, model.min_component_area, df, fill_holes=model.fill_holes)
    assert (per_volume <= per_slice).all() and per_volume[:, 1].sum() < per_slice[:, 1].sum()
    assert (per_volume[:, 2] == per_slice[:, 2]).all()
    for counts, recorded in ((per_slice, metrics["test_per_slice"]), (per_volume, metrics["test"])):
        measured = summarize(counts, list(df["patient"]))
        for key in ("patient_dice_mean", "patient_dice_min", "tumor_slice_dice_mean", "healthy_fp_rate"):
            assert measured[key] == pytest.approx(recorded[key], abs=0.003), key


@pytest.mark.real_data
def test_hole_filling_follows_the_config_unless_told(real_data_dir, capsys):
    # TCGA_FG_5964: a validation patient whose predicted tumor has holes the reference does not
    args = ["--data-dir", str(real_data_dir), "--model", str(SHIPPED_MODEL_DIR), "--patients", "TCGA_FG_5964_20010511",
            "--json", "--fill-holes"]
    dice = {}
    for choice in ("config", "on", "off"):
        assert evaluate_main([*args, choice]) == 0
        dice[choice] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["patient_dice_mean"]
    assert load_model(str(SHIPPED_MODEL_DIR)).fill_holes
    assert dice["config"] == dice["on"] > dice["off"] + 0.003


def test_readme_states_the_shipped_numbers():
    readme = (SHIPPED_MODEL_DIR.parents[1] / "README.md").read_text()
    metrics = json.loads((SHIPPED_MODEL_DIR / "metrics.json").read_text())
    start = readme.index("## Results")
    section = readme[start:readme.index("**Cross-validation", start)]
    for split in ("test", "test_per_slice", "val", "val_per_slice"):
        for key in ("patient_dice_mean", "patient_dice_min", "tumor_slice_dice_mean", "healthy_fp_rate"):
            assert re.search(rf"\b{metrics[split][key]:.3f}\b", section), (split, key)
        low, high = metrics[split]["patient_dice_ci95"]
        assert f"{low:.3f} to {high:.3f}" in section, split


@pytest.mark.real_data
def test_volume_tab_makes_the_masks_that_evaluate_scores(real_data_dir):
    import app
    from unet.evaluate import predict_counts
    from unet.metrics import dice

    patient = "TCGA_DU_7294_19890104"  # a test patient with false-positive blobs outside its tumor
    df = patient_rows(scan_dataset(real_data_dir), [patient])
    model = prepare_for_inference(load_model(str(SHIPPED_MODEL_DIR)))
    names, slices, references = app.read_volume(list(df["image_path"]) + list(df["mask_path"]))
    probs = [app.predict(model, s.image) for s in slices]
    _, masks, summary = app.volume_results(model, names, [s.image for s in slices], probs, references, model.threshold)
    counts = predict_counts(model, df, progress=False)  # the config's post-processing, 3D step included
    assert summary["largest_3d_component"] == "on" and summary["pixels_outside_largest_3d_component"] > 0
    # one image at a time (app) and batches of 16 (evaluate) may round differently in bf16
    assert summary["tumor_pixels"] == pytest.approx(int(counts[:, 1].sum()), rel=0.01)
    assert summary["dice"] == pytest.approx(float(dice(*counts.sum(axis=0))), abs=0.005)
