"""The demo: upload a brain MRI slice, see the tumor the U-Net finds. Research use only.

    python app.py                                  # the shipped model, http://127.0.0.1:7860
    python app.py --model runs/unet/model          # a local model folder
    python app.py --model USER/brain-mri-unet      # a Hub repo (or MODEL_ID=... in the environment)
    python app.py --examples ../shared/data/lgg_subset   # examples picked from a kaggle_3m folder

The prediction is also an API endpoint, ``/segment`` (image file and threshold in; overlay PNG, mask PNG and a
JSON summary out), for ``gradio_client``.

This file is the page: its layout, then its events. Reading files is `unet.uploads` and `unet.reader`, the masks
are the `unet.segmenter.Segmenter`'s, and what is shown of them is `unet.render`.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no calls home, from any Blocks or launch of this process

import argparse  # noqa: E402  (after the analytics setting above, which gradio reads on import)
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from types import FrameType, SimpleNamespace  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from unet import render  # noqa: E402
from unet.examples import Example, load_examples  # noqa: E402
from unet.reader import ReadError, Slice, read_mask, read_slice  # noqa: E402
from unet.segmenter import Segmenter  # noqa: E402
from unet.serving import SHIPPED_MODEL_DIR, ServingModel, load_for_serving  # noqa: E402
from unet.uploads import MAX_FILE_MB, WorkFolder, read_upload, read_volume  # noqa: E402

log = logging.getLogger("app")

ROOT = Path(__file__).resolve().parent
SESSION_TTL_S = 600  # what a session keeps (slice, probabilities) is dropped this long after its last use
START_TEXT = "### Upload a slice or click an example to start\nThe result appears here in a second or two."
CSS = """
#title h1 { margin-bottom: 0.2em; }
#disclaimer { border-left: 4px solid #dc2626; padding: 0.4em 0.8em; background: rgba(220, 38, 38, 0.06); }
#summary h3 { margin-top: 0.2em; }
"""
# The model's events share one queue with /segment, sized by --concurrency; the threshold's redraws are light.
HEAVY = dict(concurrency_id="model", api_visibility="private")
LIGHT = dict(api_visibility="private", show_progress="hidden", trigger_mode="always_last", concurrency_limit=4)
PROGRESS = gr.Progress()  # Gradio fills in a handler's progress argument whose default is a gr.Progress


# ---------------------------------------------------------------------------------------------------------------
# The page


def build_demo(serving: ServingModel, examples_dir: str | Path | None = None) -> gr.Blocks:
    """The Gradio app around one loaded model (tests build it without launching it)."""
    # One slice a batch, in both tabs: a volume's slice then gets exactly the one-slice tab's map.
    segmenter = one_slice_at_a_time(serving.segmenter)
    size = segmenter.preprocessing.image_size
    segmenter.probabilities([np.zeros((size, size, 3), np.uint8)])  # warm-up: the first user waits less
    work = WorkFolder(keep_s=SESSION_TTL_S)
    examples, source = load_examples(serving, examples_dir, work.path / "examples")
    events = Events(segmenter, work, examples)
    threshold = round(float(segmenter.postprocessing.threshold), 2)
    with gr.Blocks(title="Brain MRI tumor segmentation", delete_cache=(SESSION_TTL_S, SESSION_TTL_S)) as demo:
        model_line = header(serving)
        with gr.Tab("One slice"):
            single = single_slice_tab(examples, source, threshold)
        with gr.Tab("Volume (several slices)"):
            volume = volume_tab(segmenter, threshold)
        with gr.Accordion("About the model and this demo", open=False):
            card = render.card_body(serving.model_dir)
            gr.Markdown(f"{model_line}\n\nExamples: {source}.\n\n{card}\n\n---\n{render.DISCLAIMER}")
        api = api_panel(threshold)
        wire_single_slice(single, events)
        wire_volume(volume, events)
        api.button.click(
            events.api_segment,
            [api.image, api.threshold],
            [api.overlay, api.mask, api.summary],
            api_name="segment",
            concurrency_id="model",
        )
    return demo


def header(serving: ServingModel) -> str:
    """Title, disclaimer and which model answers; returns the model line for the About panel."""
    gr.Markdown(
        "# Brain MRI tumor segmentation\n"
        "Upload one axial slice of a brain MRI and a U-Net marks the lower-grade glioma "
        "(the FLAIR abnormality) in red. Slices are expected as in the LGG dataset: "
        "pre-contrast, FLAIR and post-contrast in the red, green and blue channels.",
        elem_id="title",
    )
    gr.Markdown(render.DISCLAIMER, elem_id="disclaimer")
    model_line = f"**Model:** {serving.description}" + (f"  \n⚠️ {serving.notice}" if serving.notice else "")
    gr.Markdown(model_line, elem_id="model-info")
    return model_line


def single_slice_tab(examples: list[Example], source: str, threshold: float) -> SimpleNamespace:
    with gr.Row(equal_height=True):
        upload = gr.File(
            label="1. Upload an MRI slice (PNG, JPEG or TIFF)", elem_id="upload", height=190, scale=1, min_width=260
        )
        gallery = gr.Gallery(
            value=[(str(e.image), e.caption) for e in examples],
            label=f"…or click an example ({source})",
            columns=max(4, len(examples)),
            height=190,
            allow_preview=False,
            object_fit="contain",
            buttons=[],
            elem_id="examples",
            scale=2,
            visible=bool(examples),
        )
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            summary = gr.Markdown(START_TEXT, elem_id="summary", min_height=120)
            slider = gr.Slider(
                *render.THRESHOLD_RANGE,
                value=threshold,
                step=0.01,
                label="2. Threshold",
                info="A pixel is tumor when its probability reaches this. "
                f"Lower finds more; the model's tuned value is {threshold:.2f}.",
                elem_id="threshold",
            )
            mask_file = gr.DownloadButton("3. Download the mask (PNG)", interactive=False, elem_id="mask-file")
        with gr.Column(scale=3), gr.Row():
            image_options = dict(format="png", interactive=False, height=320)
            preview = gr.Image(label="Your slice", elem_id="preview", **image_options)
            overlay = gr.Image(label="Prediction: tumor in red", elem_id="overlay", **image_options)
            probability = gr.Image(label="Tumor probability", elem_id="probability", **image_options)
    state = gr.State(None, time_to_live=SESSION_TTL_S)
    return SimpleNamespace(
        upload=upload,
        gallery=gallery,
        summary=summary,
        threshold=slider,
        mask_file=mask_file,
        preview=preview,
        overlay=overlay,
        probability=probability,
        state=state,
    )


def volume_tab(segmenter: Segmenter, threshold: float) -> SimpleNamespace:
    help_text = (
        "Upload all slices of one patient, as several files or one zip, taken in the order of the numbers in "
        "their names. Files named `<slice>_mask.png` (or `.tif`) are taken as reference masks and scored "
        "with Dice."
    )
    if segmenter.postprocessing.largest_3d_component:
        help_text += (
            " As the model's config asks, only the largest 3D tumor component across the slices is kept, "
            "a step a single slice cannot take."
        )
    gr.Markdown(help_text, elem_id="volume-help")
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            upload = gr.File(
                label="Slices of one patient (images or a .zip)",
                file_count="multiple",
                elem_id="volume-upload",
                height=160,
            )
            slider = gr.Slider(
                *render.THRESHOLD_RANGE, value=threshold, step=0.01, label="Threshold", elem_id="volume-threshold"
            )
            download = gr.File(label="Download all masks (zip)", interactive=False, height=80)
            plot = gr.BarPlot(
                x="slice",
                y="tumor pixels",
                label="Tumor area by slice",
                height=240,
                sort=None,
                x_label_angle=-45,
                y_axis_format="d",
            )
        with gr.Column(scale=2):
            summary = gr.Markdown("", elem_id="volume-summary")
            gallery = gr.Gallery(
                label="Every slice (tumor in red); click to enlarge",
                columns=5,
                height=560,
                object_fit="contain",
                format="png",
                elem_id="volume-gallery",
            )
    state = gr.State(None, time_to_live=SESSION_TTL_S)
    return SimpleNamespace(
        upload=upload, threshold=slider, download=download, plot=plot, summary=summary, gallery=gallery, state=state
    )


def api_panel(threshold: float) -> SimpleNamespace:
    """The /segment endpoint's simple inputs and outputs, hidden from the page."""
    with gr.Column(visible=False):
        return SimpleNamespace(
            image=gr.File(label="image", type="filepath"),
            threshold=gr.Number(value=threshold, label="threshold"),
            overlay=gr.Image(label="overlay", format="png"),
            mask=gr.Image(label="mask", format="png", image_mode="L"),
            summary=gr.JSON(label="summary"),
            button=gr.Button("segment"),
        )


def wire_single_slice(tab: SimpleNamespace, events: Events) -> None:
    outputs = [tab.upload, tab.preview, tab.overlay, tab.probability, tab.summary, tab.mask_file, tab.state]
    tab.upload.upload(events.on_upload, [tab.upload, tab.threshold], outputs, **HEAVY)
    tab.gallery.select(events.on_example, [tab.threshold], outputs, **HEAVY)
    tab.threshold.change(
        events.on_threshold, [tab.state, tab.threshold], [tab.overlay, tab.summary, tab.mask_file], **LIGHT
    )


def wire_volume(tab: SimpleNamespace, events: Events) -> None:
    outputs = [tab.gallery, tab.summary, tab.plot, tab.download]
    tab.upload.upload(events.on_volume, [tab.upload, tab.threshold], outputs + [tab.state], **HEAVY)
    tab.upload.clear(lambda: (None, "", None, None, None), None, outputs + [tab.state], api_visibility="private")
    tab.threshold.change(events.on_volume_threshold, [tab.state, tab.threshold], outputs, **LIGHT)


# ---------------------------------------------------------------------------------------------------------------
# The events


@dataclass
class SliceSession:
    """What one visitor's slice keeps for the threshold slider."""

    image: np.ndarray
    prob: np.ndarray  # render.compact_probability: float16 above the model's input size
    name: str
    reference: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    synthetic: bool = False


@dataclass
class VolumeSession:
    names: list[str]
    images: list[np.ndarray]
    probs: list[np.ndarray]  # render.compact_probability each
    references: dict[str, np.ndarray]


class Events:
    """What the page's events do, around one segmenter, the app's work folder and its examples."""

    def __init__(self, segmenter: Segmenter, work: WorkFolder, examples: list[Example]) -> None:
        self.segmenter, self.work, self.examples = segmenter, work, examples

    def at(self, threshold: float) -> Segmenter:
        return self.segmenter.with_postprocessing(threshold=float(threshold))

    # --- one slice

    def on_upload(self, path: str | None, threshold: float) -> tuple:
        if not path:
            return (gr.skip(),) * 7
        try:
            loaded = read_slice(read_upload(path), Path(path).name)
        except ReadError as error:
            gr.Warning(str(error))
            no_file = gr.DownloadButton(value=None, interactive=False)
            return None, None, None, None, f"### Could not use this file\n{error}", no_file, None
        return self.run_single(loaded, Path(path).stem, threshold)

    def on_example(self, threshold: float, evt: gr.SelectData) -> tuple:
        example = self.examples[evt.index]
        reference = read_mask(example.mask) if example.mask else None
        return self.run_single(read_slice(example.image), example.image.stem, threshold, reference, example.synthetic)

    def run_single(
        self, loaded: Slice, name: str, threshold: float, reference: np.ndarray | None = None, synthetic: bool = False
    ) -> tuple:
        start = time.perf_counter()
        prob = self.segmenter.probabilities([loaded.image])[0]
        height, width = loaded.image.shape[:2]
        log.info("segmented a %dx%d slice in %.2f s", width, height, time.perf_counter() - start)
        size = self.segmenter.preprocessing.image_size
        session = SliceSession(
            loaded.image, render.compact_probability(prob, size), name, reference, loaded.notes, synthetic
        )
        overlay, text, mask_file = self.show_single(session, threshold, prob)
        preview = self.work.png(f"{name}.png", loaded.image)
        heat = self.work.png(f"{name}_probability.png", render.probability_image(prob))
        # The upload box is emptied again, ready for the next file; the preview shows what is loaded.
        return None, preview, overlay, heat, text, mask_file, session

    def show_single(self, session: SliceSession, threshold: float, prob: np.ndarray | None = None) -> tuple:
        """(overlay file, summary Markdown, mask download) at a threshold; ``prob`` is the exact float32 map
        where the caller still has it."""
        prob = session.prob.astype(np.float32, copy=False) if prob is None else prob
        mask = self.at(threshold).slice_mask(prob)
        summary = render.slice_summary(session.image, prob, mask, threshold, session.reference)
        mask_file = self.work.png(f"{session.name}_mask.png", mask.astype(np.uint8) * 255)
        overlay = render.draw_overlay(session.image, mask, session.reference)
        return (
            self.work.png(f"{session.name}_overlay.png", overlay),
            render.summary_markdown(summary, session.notes, session.synthetic, session.name),
            gr.DownloadButton(value=mask_file, interactive=True),
        )

    def on_threshold(self, session: SliceSession | None, threshold: float) -> tuple:
        if session is None:
            return gr.skip(), gr.skip(), gr.skip()
        return self.show_single(session, threshold)

    # --- a volume

    def on_volume(self, paths: list[str] | None, threshold: float, progress: gr.Progress = PROGRESS) -> tuple:
        if not paths:
            return None, "", None, None, None
        try:
            volume = read_volume(paths)
        except ReadError as error:
            gr.Warning(str(error))
            return None, f"### Could not use these files\n{error}", None, None, None
        images, size = volume.images, self.segmenter.preprocessing.image_size
        start, probs = time.perf_counter(), []
        for prob in self.segmenter.iter_probabilities(images):
            probs.append(render.compact_probability(prob, size))
            progress((len(probs), len(images)), desc="segmenting slices")
        log.info("segmented a volume of %d slices in %.2f s", len(images), time.perf_counter() - start)
        session = VolumeSession(volume.names, images, probs, volume.references)
        return self.show_volume(session, threshold) + (session,)

    def show_volume(self, session: VolumeSession, threshold: float) -> tuple:
        """(gallery, summary Markdown, area chart, masks zip) at a threshold."""
        result = render.volume_result(
            self.at(threshold), session.names, session.images, session.probs, session.references
        )
        labels = render.short_labels(session.names)
        plot = pd.DataFrame({"slice": labels, "tumor pixels": [int(m.sum()) for m in result.masks]})
        masks_zip = self.work.mask_zip(f"{render.volume_name(session.names)}_masks.zip", session.names, result.masks)
        return result.gallery, render.volume_markdown(result.summary), gr.BarPlot(plot, sort=labels), masks_zip

    def on_volume_threshold(self, session: VolumeSession | None, threshold: float) -> tuple:
        if session is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return self.show_volume(session, threshold)

    # --- the API

    def api_segment(self, image: str, threshold: float | None) -> tuple[str, str, dict]:
        """Segment one MRI slice. image: a PNG, JPEG or TIFF file; threshold: 0.01..0.99 (model default if empty).
        Returns the overlay PNG, the mask PNG (0/255) and a summary (tumor_pixels, tumor_share_of_brain, ...)."""
        try:
            if not image:
                raise ReadError("no image given")
            overlay, mask, summary = render.segment_image(self.segmenter, image, threshold)
        except ReadError as error:  # the client's mistake: one line in the log, not a server traceback
            log.info("/segment refused: %s", error)
            raise gr.Error(str(error), print_exception=False) from None
        # Files, not arrays: Gradio caches an array by rewriting a content-hashed path on every request, so
        # clients fetching identical outputs at once could read a half-written file; a file is copied atomically.
        return self.work.png("overlay.png", overlay), self.work.png("mask.png", mask), summary


def one_slice_at_a_time(segmenter: Segmenter) -> Segmenter:
    """The same segmenter with batches of one slice, as the app has always run."""
    if segmenter.batch_size == 1:
        return segmenter
    return Segmenter(segmenter.network, segmenter.preprocessing, segmenter.postprocessing, segmenter.precision, 1)


# ---------------------------------------------------------------------------------------------------------------
# Serving


def launch(
    demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, concurrency: int = 1, prevent_thread_lock: bool = False
) -> None:
    """Queue (so concurrent users wait their turn, not fail) and serve, with bounded uploads."""
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{MAX_FILE_MB}mb",
        theme=gr.themes.Soft(),
        css=CSS,
        prevent_thread_lock=prevent_thread_lock,
        show_error=True,
    )


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Spaces stop a container with SIGTERM: remove the app's files, then exit (atexit would not run)."""
    WorkFolder.remove_all()
    log.info("stopped by signal %d; the work folder is removed", signum)
    sys.exit(128 + signum)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    on_spaces = bool(os.environ.get("SPACE_ID"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default=os.environ.get("MODEL_ID"),
        help="model folder or Hub repo id (env MODEL_ID; default: the shipped models/brain-mri-unet)",
    )
    p.add_argument(
        "--revision", default=os.environ.get("MODEL_REVISION"), help="Hub branch, tag or commit (env MODEL_REVISION)"
    )
    p.add_argument(
        "--examples",
        default=None,
        help="folder of example slices (with <name>_mask.png references) or a kaggle_3m folder "
        "(default: the model's examples, else the project's synthetic ones)",
    )
    p.add_argument(
        "--host",
        default="0.0.0.0" if on_spaces else os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="interface to listen on (default: %(default)s; 0.0.0.0 on Spaces)",
    )
    port = os.environ.get("GRADIO_SERVER_PORT", "7860")
    if not port.strip().isdigit():
        p.error(f"GRADIO_SERVER_PORT={port!r} is not a port number")
    p.add_argument("--port", type=int, default=int(port), help="(default: %(default)s, or GRADIO_SERVER_PORT)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests the model serves at once; more wait in the queue (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        p.error(f"--port must be from 1 to 65535, not {args.port}")
    if args.concurrency < 1:
        p.error(f"--concurrency must be at least 1, not {args.concurrency}: with none, every request waits forever")
    return args


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.model and not (SHIPPED_MODEL_DIR / "model.safetensors").is_file():
        log.error(
            "no model to serve: %s is missing; pass --model FOLDER_OR_REPO_ID (or set MODEL_ID)", SHIPPED_MODEL_DIR
        )
        return 2
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        serving = load_for_serving(args.model, args.revision, batch_size=1)
        demo = build_demo(serving, args.examples)
    except Exception as error:  # noqa: BLE001 - one line for the operator, not a traceback
        log.error("cannot start the app with model %s: %s", args.model or SHIPPED_MODEL_DIR.name, first_line(error))
        return 2
    log.info(
        "serving %s%s; work folder %s",
        serving.description,
        f" ({serving.notice})" if serving.notice else "",
        WorkFolder.live[-1].path,
    )
    try:
        launch(demo, args.host, args.port, args.concurrency)
    except OSError as error:  # a port in use or an address this machine does not have
        log.error("cannot listen on %s:%d (%s): check --host and --port", args.host, args.port, first_line(error))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
