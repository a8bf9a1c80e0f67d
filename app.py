"""The demo: upload a brain MRI slice, see the tumor the U-Net finds. Research use only.

    python app.py                                  # the shipped model, http://127.0.0.1:7860
    python app.py --model runs/unet/model          # a local model folder
    python app.py --model USER/brain-mri-unet      # a Hub repo (or MODEL_ID=... in the environment)
    python app.py --examples ../shared/data/lgg_subset   # examples picked from a kaggle_3m folder
    python app.py --synthetic                      # the project's synthetic phantoms as examples

The prediction is also an API endpoint, ``/segment`` (image file and threshold in; overlay PNG, mask PNG and a
JSON summary out), for ``gradio_client``; its overlay stays the dataset's composite with the tumor in red, as
before. ``/segment_volume`` takes one patient's slices, zips or NIfTI volumes and returns the masks (a .nii.gz on
the input's grid for NIfTI, else a zip of PNGs) and a JSON summary.

This file is the page: its layout, then its events. Reading files is `unet.uploads` and `unet.reader`, the masks
are the `unet.segmenter.Segmenter`'s, and what is shown of them is `unet.render`.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no calls home, from any Blocks or launch of this process

# The imports come after the analytics setting above, which gradio reads when it is imported.
import argparse
import ctypes
import dataclasses
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, SimpleNamespace

import gradio as gr
import numpy as np
from gradio_client import handle_file

from unet import nifti, render, viewer
from unet.examples import Example, example_volume, load_examples
from unet.nifti import NiftiVolume
from unet.reader import ReadError, Slice, read_mask, read_slice
from unet.segmenter import Segmenter
from unet.serving import SHIPPED_MODEL_DIR, ServingModel, load_for_serving
from unet.uploads import MAX_FILE_MB, SessionBudget, WorkFolder, read_reference, read_upload

log = logging.getLogger("app")
LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None  # malloc_trim: glibc only

ROOT = Path(__file__).resolve().parent
SESSION_TTL_S = 600  # what a session keeps (slice, probabilities) is dropped this long after its last use
START_TEXT = "### Upload a slice or click an example to start\nThe result appears here in a second or two."
CSS = """
#title h1 { margin-bottom: 0.2em; }
#disclaimer { border-left: 4px solid #dc2626; padding: 0.4em 0.8em; background: rgba(220, 38, 38, 0.06); }
#summary h3 { margin-top: 0.2em; }
#examples-label p { margin: 0 0 0.2em 0; }
#volume-caption p { margin: 0.2em 0; }
@media (max-width: 480px) {  /* a phone: every column full width, the examples in a scrollable strip */
  #examples .grid-container { grid-template-columns: repeat(3, minmax(0, 1fr)) !important; }
}
"""
# The model's events share one queue with /segment, sized by --concurrency. The redraws (threshold, view, scrubber,
# reference) are light but each holds a session's full-size masks and pictures while it runs: one shared group of
# REDRAWS_AT_ONCE keeps simultaneous redraws of large sessions from adding up (issue 26's memory bound).
REDRAWS_AT_ONCE = 2
HEAVY = dict(concurrency_id="model", api_visibility="private")
LIGHT = dict(
    api_visibility="private",
    show_progress="hidden",
    trigger_mode="always_last",
    concurrency_id="redraw",
    concurrency_limit=REDRAWS_AT_ONCE,
)
API_SAMPLE_IMAGE = "https://raw.githubusercontent.com/gradio-app/gradio/main/test/test_files/bus.png"
PROGRESS = gr.Progress()  # Gradio fills in a handler's progress argument whose default is a gr.Progress


# ---------------------------------------------------------------------------------------------------------------
# The page


def build_demo(
    serving: ServingModel, examples_dir: str | Path | None = None, synthetic_examples: bool = False
) -> gr.Blocks:
    """The Gradio app around one loaded model (tests build it without launching it)."""
    # One slice a batch, in both tabs: a volume's slice then gets exactly the one-slice tab's map.
    segmenter = one_slice_at_a_time(serving.segmenter)
    size = segmenter.preprocessing.image_size
    segmenter.probabilities([np.zeros((size, size, 3), np.uint8)])  # warm-up: the first user waits less
    work = WorkFolder(keep_s=SESSION_TTL_S)
    examples, source = load_examples(serving, examples_dir, work.path / "examples", synthetic_examples)
    volume_example = [] if synthetic_examples else example_volume(serving.model_dir)
    events = Events(segmenter, work, examples, volume_example)
    threshold = round(float(segmenter.postprocessing.threshold), 2)
    with gr.Blocks(title="Brain MRI tumor segmentation", delete_cache=(SESSION_TTL_S, SESSION_TTL_S)) as demo:
        model_line = header(serving)
        with gr.Tab("One slice"):
            single = single_slice_tab(examples, source, threshold)
        with gr.Tab("Volume (slices or NIfTI)"):
            volume = volume_tab(segmenter, threshold, bool(volume_example))
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
        api.volume_button.click(
            events.api_segment_volume,
            [api.volume_files, api.threshold],
            [api.volume_mask, api.summary],
            api_name="segment_volume",
            concurrency_id="model",
        )
    return demo


def header(serving: ServingModel) -> str:
    """Title, disclaimer and which model answers; returns the model line for the About panel."""
    gr.Markdown(
        "# Brain MRI tumor segmentation\n"
        "Upload one axial slice of a brain MRI (or a whole volume, as slices or NIfTI) and a U-Net marks the "
        "lower-grade glioma (the FLAIR abnormality). Slices are expected as in the LGG dataset: pre-contrast, "
        "FLAIR and post-contrast in the red, green and blue channels; a grayscale FLAIR image works too.",
        elem_id="title",
    )
    gr.Markdown(render.DISCLAIMER, elem_id="disclaimer")
    model_line = f"**Model:** {serving.description}" + (f"  \n⚠️ {serving.notice}" if serving.notice else "")
    gr.Markdown(model_line, elem_id="model-info")
    return model_line


def view_controls(prefix: str) -> SimpleNamespace:
    """How a slice is drawn: which channel, the prediction filled or outlined, and the fill's opacity."""
    with gr.Row():
        channel = gr.Radio(
            list(viewer.CHANNELS), value="FLAIR", label="Show", elem_id=f"{prefix}channel", min_width=200, scale=2
        )
        style = gr.Radio(list(viewer.STYLES), value="Filled", label="Prediction", elem_id=f"{prefix}style", scale=1)
        opacity = gr.Slider(
            0.1, 1.0, value=viewer.DEFAULT_OPACITY, step=0.05, label="Fill opacity", elem_id=f"{prefix}opacity"
        )
    return SimpleNamespace(channel=channel, style=style, opacity=opacity, inputs=[channel, style, opacity])


def single_slice_tab(examples: list[Example], source: str, threshold: float) -> SimpleNamespace:
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=260):
            upload = gr.File(
                label="1. Upload an MRI slice (PNG, JPEG or TIFF); drop X.tif with X_mask.tif to score it",
                file_count="multiple",
                elem_id="upload",
                height=150,
            )
            reference = gr.File(
                label="Reference mask (optional): Dice against it", elem_id="reference", height=90, min_width=200
            )
        with gr.Column(scale=2, min_width=260, visible=bool(examples)):
            gr.Markdown(f"**…or click an example** ({source})", elem_id="examples-label")
            gallery = gr.Gallery(
                value=[(str(e.image), e.caption) for e in examples],
                show_label=False,
                columns=5,
                height=200,
                allow_preview=False,
                object_fit="contain",
                buttons=[],
                elem_id="examples",
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
        with gr.Column(scale=3, min_width=260):
            view = view_controls("")
            legend = gr.Markdown("", elem_id="legend")
            with gr.Row():
                image_options = dict(format="png", interactive=False, height=340, min_width=200)
                overlay = gr.Image(label="Prediction over the slice", elem_id="overlay", **image_options)
                probability = gr.Image(
                    label="Tumor probability (colour bar: 0 to 1)", elem_id="probability", **image_options
                )
                preview = gr.Image(label="Your slice (composite)", elem_id="preview", **image_options)
            # Closed by default: the three views above stay the page; the comparison is one click away.
            with gr.Accordion("Before / after: drag to compare the slice with the prediction", open=False):
                comparison = gr.ImageSlider(
                    label="The slice as shown, and the same with the prediction",
                    format="png",
                    interactive=False,
                    max_height=420,
                    elem_id="comparison",
                )
    state = gr.State(None, time_to_live=SESSION_TTL_S)
    return SimpleNamespace(
        upload=upload,
        reference=reference,
        gallery=gallery,
        summary=summary,
        threshold=slider,
        mask_file=mask_file,
        view=view,
        legend=legend,
        preview=preview,
        overlay=overlay,
        probability=probability,
        comparison=comparison,
        state=state,
    )


def volume_tab(segmenter: Segmenter, threshold: float, has_example: bool) -> SimpleNamespace:
    help_text = (
        "Upload all slices of one patient, as several files or one zip, taken in the order of the numbers in "
        "their names (`<slice>_mask.png` files are reference masks, scored with Dice); or a NIfTI volume "
        "(`.nii`/`.nii.gz`): FLAIR alone, or with `*_pre`, `*_post` and `*_mask` volumes named so."
    )
    if segmenter.postprocessing.largest_3d_component:
        help_text += (
            f" As the model's config asks, only the largest 3D tumor component across the slices (by "
            f"{segmenter.postprocessing.largest_3d_component_by}) is kept, a step a single slice cannot take."
        )
    gr.Markdown(help_text, elem_id="volume-help")
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            upload = gr.File(
                label="Slices of one patient (images, a .zip, or NIfTI)",
                file_count="multiple",
                elem_id="volume-upload",
                height=140,
            )
            example = gr.Button("…or open the example patient", elem_id="volume-example", visible=has_example)
            slider = gr.Slider(
                *render.THRESHOLD_RANGE, value=threshold, step=0.01, label="Threshold", elem_id="volume-threshold"
            )
            channel = gr.Radio(list(viewer.CHANNELS), value="FLAIR", label="Show", elem_id="volume-channel")
            download = gr.File(label="Download the masks", interactive=False, height=80, elem_id="volume-download")
            summary = gr.Markdown("", elem_id="volume-summary")
        with gr.Column(scale=2, min_width=280):
            scrubber = gr.Slider(1, 2, value=1, step=1, label="Axial slice", elem_id="volume-scrubber")
            axial = gr.Image(label="Axial slice", format="png", interactive=False, height=420, elem_id="volume-axial")
            caption = gr.Markdown("", elem_id="volume-caption")
            with gr.Row():
                coronal = gr.Image(label="Coronal", format="png", interactive=False, height=220, min_width=140)
                sagittal = gr.Image(label="Sagittal", format="png", interactive=False, height=220, min_width=140)
            # No fixed height: at one, Gradio 6.31 clips the legend's row of names below the title. No legend title
            # either (it would read "series"): the legend is just the two names, in the viewer's colours.
            plot = gr.LinePlot(
                x="slice",
                y="tumor pixels",
                color="series",
                color_title="",
                color_map=viewer.AREA_COLORS,
                label="Tumor area by slice (predicted and reference)",
                y_axis_format="d",
                elem_id="volume-plot",
            )
    state = gr.State(None, time_to_live=SESSION_TTL_S)
    return SimpleNamespace(
        upload=upload,
        example=example,
        threshold=slider,
        channel=channel,
        download=download,
        summary=summary,
        scrubber=scrubber,
        axial=axial,
        caption=caption,
        coronal=coronal,
        sagittal=sagittal,
        plot=plot,
        state=state,
    )


def api_panel(threshold: float) -> SimpleNamespace:
    """The /segment and /segment_volume endpoints' simple inputs and outputs, hidden from the page."""
    with gr.Column(visible=False):
        # A gr.File, not a gr.Image: the file reaches `unet.reader` undecoded, under its limits. The API page's
        # sample for a gr.File is a PDF; an image (the one Gradio's own gr.Image samples) says what to send.
        image = gr.File(label="image", type="filepath")
        image.example_payload = lambda: handle_file(API_SAMPLE_IMAGE)
        return SimpleNamespace(
            image=image,
            threshold=gr.Number(value=threshold, label="threshold"),
            overlay=gr.Image(label="overlay", format="png"),
            mask=gr.Image(label="mask", format="png", image_mode="L"),
            summary=gr.JSON(label="summary"),
            button=gr.Button("segment"),
            volume_files=gr.File(label="files", type="filepath", file_count="multiple"),
            volume_mask=gr.File(label="masks"),
            volume_button=gr.Button("segment_volume"),
        )


def wire_single_slice(tab: SimpleNamespace, events: Events) -> None:
    outputs = [tab.upload, tab.reference, tab.gallery, tab.preview, tab.overlay, tab.probability, tab.summary]
    outputs += [tab.legend, tab.mask_file, tab.comparison, tab.state]
    view = tab.view.inputs
    upload_inputs = [tab.upload, tab.reference, tab.state, tab.threshold, *view]
    tab.upload.upload(events.on_upload, upload_inputs, outputs, **HEAVY)
    tab.gallery.select(events.on_example, [tab.threshold, *view], outputs, **HEAVY)
    redraw = [tab.overlay, tab.probability, tab.summary, tab.legend, tab.mask_file, tab.comparison, tab.state]
    tab.reference.upload(events.on_reference, [tab.state, tab.reference, tab.threshold, *view], redraw, **LIGHT)
    tab.reference.clear(events.on_reference, [tab.state, tab.reference, tab.threshold, *view], redraw, **LIGHT)
    for control in (tab.threshold, *view):
        control.change(events.on_threshold, [tab.state, tab.threshold, *view], redraw[:-1], **LIGHT)


def wire_volume(tab: SimpleNamespace, events: Events) -> None:
    outputs = [tab.summary, tab.plot, tab.download, tab.scrubber, tab.axial, tab.caption, tab.coronal, tab.sagittal]
    volume_inputs = [tab.upload, tab.threshold, tab.channel, tab.state]
    tab.upload.upload(events.on_volume, volume_inputs, [tab.upload, *outputs, tab.state], **HEAVY)
    tab.example.click(
        events.on_volume_example, [tab.threshold, tab.channel], [tab.upload, *outputs, tab.state], **HEAVY
    )
    tab.upload.clear(
        lambda: ("", None, None, gr.Slider(1, 2, value=1), None, "", None, None, None),
        None,
        outputs + [tab.state],
        api_visibility="private",
    )
    volume_view = [tab.state, tab.threshold, tab.channel, tab.scrubber]
    tab.threshold.change(events.on_volume_threshold, volume_view, outputs, **LIGHT)
    view = [tab.axial, tab.caption, tab.coronal, tab.sagittal]
    for control in (tab.scrubber, tab.channel):
        control.change(events.on_scrub, [tab.state, tab.scrubber, tab.channel], view, **LIGHT)


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
    files: list[str] = field(default_factory=list)  # the uploaded files it came from


@dataclass
class VolumeSession:
    names: list[str]
    images: list[np.ndarray]
    probs: list[np.ndarray]  # render.compact_probability each
    references: dict[str, np.ndarray]
    nifti: NiftiVolume | None = None
    notes: list[str] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)  # at the last threshold shown
    files: list[str] = field(default_factory=list)  # the uploaded files it came from


class Events:
    """What the page's events do, around one segmenter, the app's work folder and its examples."""

    def __init__(
        self, segmenter: Segmenter, work: WorkFolder, examples: list[Example], volume_example: list[Path] = ()
    ) -> None:
        self.segmenter, self.work, self.examples = segmenter, work, examples
        self.volume_example = list(volume_example)

    def at(self, threshold: float) -> Segmenter:
        return self.segmenter.with_postprocessing(threshold=float(threshold))

    # --- one slice

    def on_upload(
        self,
        paths: list[str] | str | None,
        reference_path: str | None,
        previous: SliceSession | None,
        threshold: float,
        *view: object,
    ) -> tuple:
        release_freed_memory()
        if not paths:
            return (gr.skip(),) * 11
        paths = [paths] if isinstance(paths, str) else list(paths)
        # The box keeps what it showed and adds a new drop to it: only the files not used last time are new.
        paths = [p for p in paths if previous is None or p not in previous.files] or paths
        try:
            image_path, mask_path = viewer.pair_slice_and_mask(paths, reference_path)
            loaded = read_slice(read_upload(image_path), Path(image_path).name)
            reference = read_reference(mask_path, loaded.image.shape[:2]) if mask_path else None
        except ReadError as error:
            gr.Warning(str(error))
            no_file = gr.DownloadButton(value=None, interactive=False)
            text = f"### Could not use this file\n{error}"
            return paths, gr.skip(), gr.Gallery(selected_index=None), None, None, None, text, "", no_file, None, None
        # The upload box keeps the file (and its name); a highlighted example is no longer what is shown.
        shown = self.run_single(loaded, Path(image_path).stem, threshold, view, reference)
        shown[-1].files = paths
        return (paths, gr.skip(), gr.Gallery(selected_index=None), *shown)

    def on_example(self, threshold: float, channel: str, style: str, opacity: float, evt: gr.SelectData) -> tuple:
        view = (channel, style, opacity)
        example = self.examples[evt.index]
        reference = read_mask(example.mask) if example.mask else None
        loaded = read_slice(example.image)
        shown = self.run_single(loaded, example.image.stem, threshold, view, reference, example.synthetic)
        return (None, None, gr.skip(), *shown)

    def run_single(
        self,
        loaded: Slice,
        name: str,
        threshold: float,
        view: tuple = (),
        reference: np.ndarray | None = None,
        synthetic: bool = False,
    ) -> tuple:
        """(preview, overlay, probability, summary, legend, mask download, before/after, session) of a newly loaded
        slice."""
        start = time.perf_counter()
        prob = self.segmenter.probabilities([loaded.image])[0]
        height, width = loaded.image.shape[:2]
        log.info("segmented a %dx%d slice in %.2f s", width, height, time.perf_counter() - start)
        size = self.segmenter.preprocessing.image_size
        session = SliceSession(
            loaded.image, render.compact_probability(prob, size), name, reference, loaded.notes, synthetic
        )
        # every answer, this first one included, thresholds the map the session keeps, so a slider moved away and
        # back gives this answer again (a large upload's map is kept as float16)
        shown = self.show_single(session, threshold, *view)
        preview = self.work.png(f"{name}.png", loaded.image)
        return preview, *shown, session

    def show_single(
        self,
        session: SliceSession,
        threshold: float,
        channel: str = "FLAIR",
        style: str = "Filled",
        opacity: float = viewer.DEFAULT_OPACITY,
    ) -> tuple:
        """(overlay file, probability file, summary Markdown, legend, mask download, (slice, overlay) files for the
        before/after slider) at a threshold and view."""
        prob = session.prob.astype(np.float32, copy=False)
        mask = self.at(threshold).slice_mask(prob)
        summary = render.slice_summary(session.image, prob, mask, threshold, session.reference)
        mask_file = self.work.png(f"{session.name}_mask.png", mask.astype(np.uint8) * 255)
        overlay = viewer.draw_view(session.image, mask, session.reference, channel, style, float(opacity))
        heat = viewer.probability_with_colorbar(prob, threshold)
        overlay_file = self.work.png(f"{session.name}_overlay.png", overlay)
        before = self.work.png(f"{session.name}_slice.png", viewer.base_image(session.image, channel))
        return (
            overlay_file,
            self.work.png(f"{session.name}_probability.png", heat),
            render.summary_markdown(summary, session.notes, session.synthetic, session.name),
            viewer.legend_html(session.reference is not None, style),
            gr.DownloadButton(value=mask_file, interactive=True),
            (before, overlay_file),
        )

    def on_threshold(self, session: SliceSession | None, threshold: float, *view: object) -> tuple:
        if session is None:
            return (gr.skip(),) * 6
        return self.show_single(session, threshold, *view)

    def on_reference(self, session: SliceSession | None, path: str | None, threshold: float, *view: object) -> tuple:
        """A reference mask added to (or removed from) the slice on show: redraw with its Dice."""
        if session is None:
            return (gr.skip(),) * 7
        try:
            reference = read_reference(path, session.image.shape[:2]) if path else None
        except ReadError as error:
            gr.Warning(str(error))
            return (gr.skip(),) * 2 + (f"### Could not use this reference mask\n{error}",) + (gr.skip(),) * 4
        session = dataclasses.replace(session, reference=reference)
        return (*self.show_single(session, threshold, *view), session)

    # --- a volume

    def on_volume(
        self,
        paths: list[str] | None,
        threshold: float,
        channel: str = "FLAIR",
        previous: VolumeSession | None = None,
        progress: gr.Progress = PROGRESS,
    ) -> tuple:
        """(upload box, summary, chart, download, scrubber, axial, caption, coronal, sagittal, session)."""
        release_freed_memory()
        if not paths:
            return (gr.skip(),) * 10
        # The box adds a new drop to what it shows: only the files not used last time are the new volume.
        paths = [p for p in paths if previous is None or p not in previous.files] or list(paths)
        try:
            volume = render.load_volume(paths)
        except ReadError as error:
            gr.Warning(str(error))
            return (paths, f"### Could not use these files\n{error}") + (gr.skip(),) * 7 + (None,)
        images, size = volume.images, self.segmenter.preprocessing.image_size
        start, probs = time.perf_counter(), []
        for prob in self.segmenter.iter_probabilities(images):
            probs.append(render.compact_probability(prob, size))
            progress((len(probs), len(images)), desc="segmenting slices")
        log.info("segmented a volume of %d slices in %.2f s", len(images), time.perf_counter() - start)
        session = VolumeSession(volume.names, images, probs, volume.references, volume.nifti, volume.notes)
        session.files = list(paths)
        return (paths, *self.show_volume(session, threshold, channel), session)

    def on_volume_example(self, threshold: float, channel: str, progress: gr.Progress = PROGRESS) -> tuple:
        shown = self.on_volume([str(p) for p in self.volume_example], threshold, channel, None, progress)
        return (None, *shown[1:])

    def show_volume(
        self, session: VolumeSession, threshold: float, channel: str = "FLAIR", position: int | None = None
    ) -> tuple:
        """(summary, area chart, masks download, scrubber, axial view, caption, coronal, sagittal)."""
        result = render.volume_result(
            self.at(threshold), session.names, session.images, session.probs, session.references, draw=False
        )
        session.masks = result.masks
        summary = render.add_volume_units(result.summary, session.nifti)
        text = render.volume_markdown(summary) + "".join(f"\n\n*Note: {note}.*" for note in session.notes)
        refs = [session.references.get(n) for n in session.names]
        ref_areas = [int(r.sum()) if r is not None else 0 for r in refs] if session.references else None
        labels = render.short_labels(session.names)
        chart = viewer.area_frame(labels, [int(m.sum()) for m in result.masks], ref_areas)
        n = len(session.names)
        # A new volume opens on the slice with the most tumor; a new threshold keeps the scrubber where it is.
        index = viewer.most_tumor_slice(result.masks) if position is None else int(position) - 1
        scrubber = gr.Slider(1, max(n, 2), value=index + 1, step=1) if position is None else gr.skip()
        shown = self.show_slice(session, index, channel)
        return (text, chart, self.volume_download(session, result.masks), scrubber, *shown)

    def volume_download(self, session: VolumeSession, masks: list[np.ndarray]) -> str:
        name = session.nifti.name if session.nifti else render.volume_name(session.names)
        if session.nifti is not None:
            return self.work.write(f"{name}_mask.nii.gz", lambda p: nifti.write_mask(np.stack(masks), session.nifti, p))
        return self.work.mask_zip(f"{name}_masks.zip", session.names, masks)

    def show_slice(self, session: VolumeSession, index: int, channel: str = "FLAIR") -> tuple:
        """(axial view, caption, coronal, sagittal) at a slice index."""
        masks = session.masks
        index = min(max(int(index), 0), len(masks) - 1)
        name = session.names[index]
        reference = session.references.get(name)
        mask = masks[index]
        dice = render.slice_summary(session.images[index], mask, mask, 0.5, reference).get("dice")
        axial = viewer.draw_view(session.images[index], mask, reference, channel)
        caption = viewer.slice_caption(
            index,
            render.short_labels(session.names)[index],
            len(masks),
            int(mask.sum()),
            None if reference is None else int(reference.sum()),
            dice,
        )
        caption += ". " + viewer.legend_html(reference is not None)
        coronal = sagittal = None
        if len({m.shape for m in masks}) == 1:
            stack = np.stack(masks)
            refs = None
            if len(session.references) == len(masks):
                refs = np.stack([session.references[n] for n in session.names])
            stretch = self.slice_stretch(session, stack.shape)
            coronal_image, sagittal_image, _ = viewer.reconstructions(
                session.images, stack, refs, channel, stretch, index
            )
            coronal = self.work.png("coronal.png", coronal_image)
            sagittal = self.work.png("sagittal.png", sagittal_image)
            caption += "  \n" + self.plane_note(session)
        return self.work.png(f"{name}_view.png", axial), caption, coronal, sagittal

    @staticmethod
    def slice_stretch(session: VolumeSession, shape: tuple[int, ...]) -> float:
        """Rows a slice takes in the reconstructions: slice spacing / pixel spacing for NIfTI; for image stacks,
        whose spacing is unknown, enough to make the stack 60 % as tall as it is wide."""
        readable = 0.4 * shape[2] / shape[0]  # a 24-slice stack at 1 mm spacing would be a 24-pixel sliver
        if session.nifti is not None:
            x, _, z = session.nifti.spacing
            return max(z / x, readable)
        return max(1.0, 0.6 * shape[2] / shape[0])

    @staticmethod
    def plane_note(session: VolumeSession) -> str:
        where = "through the tumor's centre" if any(m.any() for m in session.masks) else "through the middle"
        if session.nifti is not None:
            return (
                f"Coronal and sagittal planes {where}, at the volume's voxel spacing; the white ticks mark this slice."
            )
        return (
            f"Coronal and sagittal planes {where}; the slice spacing of an image stack is unknown, so the stack is "
            "stretched to be seen; the white ticks mark this slice."
        )

    def on_volume_threshold(
        self, session: VolumeSession | None, threshold: float, channel: str, position: float
    ) -> tuple:
        release_freed_memory()
        if session is None:
            return (gr.skip(),) * 8
        return self.show_volume(session, threshold, channel, int(position))

    def on_scrub(self, session: VolumeSession | None, position: float, channel: str) -> tuple:
        if session is None or not session.masks:
            return (gr.skip(),) * 4
        return self.show_slice(session, int(position) - 1, channel)

    # --- the API

    def api_segment_volume(self, files: list[str] | None, threshold: float | None) -> tuple[str, dict]:
        """Segment one patient's volume. files: image slices (``<slice>_mask`` files as references) or zips, or
        NIfTI (FLAIR alone, or ``*_flair``/``*_pre``/``*_post``/``*_mask``); threshold: 0.01..0.99 (model default if
        empty). Returns the masks (NIfTI in: a .nii.gz label volume on the input's grid; else a zip of PNGs) and a
        summary (per-slice pixels, Dice where references came, tumor_volume_ml for NIfTI)."""
        release_freed_memory()
        try:
            if not files:
                raise ReadError("no files given")
            segmenter = self.segmenter if threshold is None else self.at(render.check_threshold(threshold))
            volume = render.load_volume(files)
        except ReadError as error:
            log.info("/segment_volume refused: %s", error)
            raise gr.Error(str(error), print_exception=False) from None
        probs = self.segmenter.probabilities(volume.images)
        session = VolumeSession(volume.names, volume.images, probs, volume.references, volume.nifti, volume.notes)
        result = render.volume_result(segmenter, volume.names, volume.images, probs, volume.references, draw=False)
        summary = render.add_volume_units(result.summary, volume.nifti)
        summary["notes"] = volume.notes
        return self.volume_download(session, result.masks), summary

    def api_segment(self, image: str, threshold: float | None) -> tuple[str, str, dict]:
        """Segment one MRI slice. image: a PNG, JPEG or TIFF file; threshold: 0.01..0.99 (model default if empty).
        Returns the overlay PNG, the mask PNG (0/255) and a summary (tumor_pixels, tumor_share_of_brain, ...)."""
        release_freed_memory()
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
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    concurrency: int = 1,
    prevent_thread_lock: bool = False,
    max_queue: int = 64,
) -> None:
    """Queue (so concurrent users wait their turn, not fail; past ``max_queue`` waiting, a clean "queue full")
    and serve, with bounded uploads."""
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{MAX_FILE_MB}mb",
        theme=gr.themes.Soft(),
        css=CSS,
        prevent_thread_lock=True,  # the state holder exists once launched: bound what sessions keep, then block
        show_error=True,
    )
    SessionBudget().install(demo.state_holder)
    if not prevent_thread_lock:
        demo.block_thread()


def release_freed_memory() -> None:
    """Give back to the system what earlier requests freed. glibc keeps freed memory of a thread's arena mapped, so
    without this each large request would start from the last one's high-water mark (issue 26's memory bound)."""
    if LIBC is not None:
        LIBC.malloc_trim(0)


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
        "--synthetic",
        action="store_true",
        help="show the project's synthetic phantoms as examples (not real MRI) instead of the model's",
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
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests that may wait in the queue; more are refused as 'queue full' (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.max_queue < 1:
        p.error(f"--max-queue must be at least 1, not {args.max_queue}")
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
        demo = build_demo(serving, args.examples, args.synthetic)
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
        launch(demo, args.host, args.port, args.concurrency, max_queue=args.max_queue)
    except OSError as error:  # a port in use or an address this machine does not have
        log.error("cannot listen on %s:%d (%s): check --host and --port", args.host, args.port, first_line(error))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
