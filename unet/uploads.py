"""Files in and out of the app: uploads read under hard byte limits, volumes from several files and zips, and
the app's own work folder for downloads.

Every limit holds before the bytes are held: a file's size is checked before it is read, a zip entry is read
through a stream in chunks and stopped past its cap (its declared size is never trusted), and one `ByteBudget`
counts every file and entry of one request. Decoding is `unet.reader`'s; every refusal is a `ReadError` whose one
line names the file and never a server path.
"""

from __future__ import annotations

import atexit
import io
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from unet.reader import MAX_SIDE, SUFFIXES, ReadError, Slice, read_mask, read_slice

log = logging.getLogger(__name__)

MAX_FILE_MB = 50  # one file or one zip entry
MAX_REQUEST_MB = 200  # all files and zip entries of one request together
MAX_VOLUME_SLICES = 200
# Decoded pixels of a volume's slices (and, apart, of its masks): two full-size slices, or 128 slices of 512 x 512.
# What a volume costs to segment and redraw grows with it; this keeps the server under its memory bound.
MAX_VOLUME_PIXELS = 2 * MAX_SIDE * MAX_SIDE
MAX_NAME_CHARS = 245  # a longer name cannot become a file name on most file systems (255 bytes with a suffix)
CHUNK = 2**20  # bytes read from a zip entry at a time: what an entry can inflate to before the cap is checked
MASK_SUFFIX = "_mask"
MAX_KEPT_MB = 128  # what all sessions together keep for their sliders (see SessionBudget): 4 volumes of 60 slices
MAX_DOWNLOADS_MB = 256  # the derived files (downloads, views) the work folder keeps on disk (see WorkFolder)


class ByteBudget:
    """The bytes one request may bring in, over all its files and zip entries."""

    def __init__(self, limit_mb: float | None = None) -> None:
        self.limit = int((MAX_REQUEST_MB if limit_mb is None else limit_mb) * 2**20)
        self.used = 0

    def take(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise ReadError(f"the upload holds more than {self.limit / 2**20:g} MB in all")


def read_upload(path: str | Path, budget: ByteBudget | None = None) -> bytes:
    """The bytes of an uploaded file, refusing a missing or oversized one (checked before it is read)."""
    path = Path(path)
    if not path.is_file():
        raise ReadError(f"{path.name}: file not found")
    size = path.stat().st_size
    if size > MAX_FILE_MB * 2**20:
        raise ReadError(f"{path.name}: the file is {size / 2**20:.1f} MB; at most {MAX_FILE_MB} MB is accepted")
    if budget is not None:
        budget.take(size)
    with path.open("rb") as stream:  # read no more than was checked, should the file grow meanwhile
        return _read_capped(stream, path.name, budget=None)


def _read_capped(stream: BinaryIO, name: str, budget: ByteBudget | None) -> bytes:
    """A stream's bytes in chunks, stopped as soon as they pass MAX_FILE_MB or the request's budget."""
    cap = MAX_FILE_MB * 2**20
    chunks, total = [], 0
    while chunk := stream.read(CHUNK):
        total += len(chunk)
        if total > cap:
            raise ReadError(f"{name}: unpacks to more than {MAX_FILE_MB} MB; at most {MAX_FILE_MB} MB is accepted")
        if budget is not None:
            budget.take(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


def natural_key(name: str) -> list:
    """'P_10.tif' after 'P_9.tif': digits compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def is_mask_name(name: str) -> bool:
    """``<name>_mask.<ext>`` is the reference mask of ``<name>.<ext>``."""
    return Path(name).stem.endswith(MASK_SUFFIX)


# ---------------------------------------------------------------------------------------------------------------
# Zips


def _is_image_entry(member: zipfile.ZipInfo) -> bool:
    name = member.filename.replace("\\", "/")
    base = name.rsplit("/", 1)[-1]
    return (
        not member.is_dir()
        and "__MACOSX" not in name
        and not base.startswith(".")
        and Path(base).suffix.lower() in SUFFIXES
    )


def read_zip(path: Path, budget: ByteBudget) -> list[tuple[str, bytes]]:
    """(base name, bytes) of the image entries of a zip, each read through a capped stream."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if _is_image_entry(m)]
            if len(members) > 2 * MAX_VOLUME_SLICES:
                raise ReadError(
                    f"{path.name}: {len(members)} images; at most {MAX_VOLUME_SLICES} slices "
                    "(and their masks) are accepted"
                )
            names = _entry_names(path.name, members)
            files = []
            for name, member in zip(names, members):
                with archive.open(member) as stream:
                    files.append((name, _read_capped(stream, f"{path.name}: {name}", budget)))
            return files
    except zipfile.BadZipFile as error:  # not a zip, or an entry whose bytes do not match its header (CRC, size)
        detail = str(error).split(" for file")[0]
        raise ReadError(f"{path.name}: not a valid zip file ({detail})") from None
    except (RuntimeError, NotImplementedError) as error:  # encrypted, or packed by a method zipfile lacks
        raise ReadError(
            f"{path.name}: cannot unpack ({str(error).splitlines()[0]}); "
            "zip the slices without a password, with the usual Deflate method"
        ) from None


def _entry_names(zip_name: str, members: Sequence[zipfile.ZipInfo]) -> list[str]:
    """The entries' base names; a name too long for a file, or one base name in two folders, is refused."""
    names, seen = [], {}
    for member in members:
        name = member.filename.replace("\\", "/").rsplit("/", 1)[-1]
        if len(name) > MAX_NAME_CHARS:
            raise ReadError(
                f"{zip_name}: an entry's name is {len(name)} characters long; at most {MAX_NAME_CHARS} are accepted"
            )
        if name in seen:  # two folders of one zip: which slice is meant cannot be told
            raise ReadError(
                f"{zip_name}: two entries are named {name} ({seen[name]} and {member.filename}); "
                "each slice needs its own name"
            )
        seen[name] = member.filename
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------------------------
# Volumes


@dataclass
class Volume:
    """One patient's uploaded slices in natural name order, and the reference masks that came with them."""

    names: list[str]
    slices: list[Slice]
    references: dict[str, np.ndarray]  # by slice name

    @property
    def images(self) -> list[np.ndarray]:
        return [s.image for s in self.slices]


def read_files(paths: Sequence[str | Path], budget: ByteBudget | None = None) -> list[tuple[str, bytes]]:
    """(name, bytes) of uploaded files, zips unpacked, within one byte budget; a name given twice is refused."""
    if len(paths) > 2 * MAX_VOLUME_SLICES:
        raise ReadError(f"{len(paths)} files; at most {MAX_VOLUME_SLICES} slices (and their masks) are accepted")
    budget = budget or ByteBudget()
    files: list[tuple[str, bytes]] = []
    for path in map(Path, paths):
        if path.suffix.lower() == ".zip":
            files += read_zip(path, budget)
        else:
            files.append((path.name, read_upload(path, budget)))
    seen = set()
    for name, _ in files:
        if name in seen:
            raise ReadError(f"{name}: uploaded twice; each slice needs its own name")
        seen.add(name)
    return files


def read_volume(paths: Sequence[str | Path], budget: ByteBudget | None = None) -> Volume:
    """Files and zips -> a `Volume`: ``<name>_mask.<ext>`` files are the reference masks of ``<name>``.

    Every limit holds before anything is decoded (a small compressed file can decode to 50 MB of pixels).
    """
    files = read_files(paths, budget)
    masks_given = sum(is_mask_name(name) for name, _ in files)
    if len(files) - masks_given > MAX_VOLUME_SLICES or masks_given > MAX_VOLUME_SLICES:
        raise ReadError(
            f"{len(files) - masks_given} slices and {masks_given} masks; at most {MAX_VOLUME_SLICES} "
            "of each are accepted"
        )
    masks, slices = {}, {}
    pixels = {True: 0, False: 0}  # masks, slices: each stops at the limit, one image past it at most decoded
    for name, data in files:
        stem, mask = Path(name).stem, is_mask_name(name)
        if mask:
            array = masks[stem.removesuffix(MASK_SUFFIX)] = read_mask(data, name)
        else:
            slices[stem] = read_slice(data, name)
            array = slices[stem].image
        pixels[mask] += array.shape[0] * array.shape[1]
        if pixels[mask] > MAX_VOLUME_PIXELS:
            raise ReadError(
                f"the {'masks' if mask else 'slices'} hold more than {MAX_VOLUME_PIXELS / 1e6:.0f} megapixels in all"
            )
    if not slices:
        raise ReadError("no image slices found among the uploaded files")
    names = sorted(slices, key=natural_key)
    for name in names:
        if name in masks and masks[name].shape != slices[name].image.shape[:2]:
            raise ReadError(f"{name}_mask: mask size differs from its slice")
    return Volume(names, [slices[n] for n in names], {n: masks[n] for n in names if n in masks})


def read_reference(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A reference mask upload for a slice of ``shape`` (H, W) -> HxW bool; one line if it does not fit."""
    reference = read_mask(read_upload(path), Path(path).name)
    if reference.shape != tuple(shape):
        raise ReadError(
            f"reference mask is {reference.shape[1]}x{reference.shape[0]} but the slice is {shape[1]}x{shape[0]}"
        )
    return reference


# ---------------------------------------------------------------------------------------------------------------
# What sessions keep


def held_bytes(value: object, depth: int = 4) -> int:
    """The bytes of the numpy arrays in ``value``: in containers, dataclasses and objects, ``depth`` levels down."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if depth == 0:
        return 0
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, list | tuple):
        items = list(value)
    elif hasattr(value, "__dict__"):
        items = list(vars(value).values())
    else:
        return 0
    return sum(held_bytes(item, depth - 1) for item in items)


class SessionBudget:
    """The bytes all sessions' `gr.State` values may hold together (slices and probability maps kept for the
    sliders). Past it, the least recently used sessions' values are dropped, as if their time to live had passed:
    their sliders do nothing until their next upload. A time to live alone bounds nothing, since one client can open
    any number of sessions.

    Checked as each event starts (Gradio's state holder is told of every session in use), so what is kept stays
    under the budget plus the one session whose event ran last.
    """

    def __init__(self, limit_mb: float | None = None) -> None:
        self.limit = int((MAX_KEPT_MB if limit_mb is None else limit_mb) * 2**20)
        self.lock = threading.Lock()

    def install(self, holder: object) -> None:
        """Check the budget whenever Gradio's StateHolder (``demo.state_holder``, once launched) marks a session
        as used; its ``update(session_id)`` keeps the sessions in least-recently-used order."""
        update = holder.update

        def update_and_check(session_id: str) -> None:
            update(session_id)
            self.enforce(holder, session_id)

        holder.update = update_and_check

    def enforce(self, holder: object, current: str) -> int:
        """Drop the least recently used sessions' values (never ``current``'s) until the rest fit; bytes dropped."""
        with self.lock:
            with holder.lock:
                sessions = list(holder.session_data.items())  # least recently used first
            sizes = [held_bytes(list(state.state_data.values())) for _, state in sessions]
            total, dropped = sum(sizes), 0
            for (session_id, state), size in zip(sessions, sizes):
                if total - dropped <= self.limit:
                    break
                if session_id != current and size:
                    state.state_data.clear()
                    dropped += size
            if dropped:
                log.info("dropped %.0f MB kept by idle sessions (over %d MB)", dropped / 2**20, self.limit // 2**20)
            return dropped


# ---------------------------------------------------------------------------------------------------------------
# The app's work folder: downloads and example copies


class WorkFolder:
    """A temporary folder for what the app writes: removed at exit and by `remove_all` (the SIGTERM handler).

    As each download is written, older ones are swept away: those older than ``keep_s``, then the oldest while all
    of them together pass ``max_mb`` (a time alone bounds nothing: one client can ask for downloads without pause).
    The newest is always kept, whatever its size."""

    live: list[WorkFolder] = []  # every folder of this process, for the SIGTERM handler

    def __init__(self, keep_s: float = 600, max_mb: float | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="brain-mri-app-"))
        self.keep_s = keep_s
        self.max_bytes = int((MAX_DOWNLOADS_MB if max_mb is None else max_mb) * 2**20)
        self.downloads: deque[tuple[Path, int, float]] = deque()  # (folder, bytes, written at), oldest first
        self.kept_bytes = 0
        self.lock = threading.Lock()
        WorkFolder.live.append(self)
        atexit.register(self.remove)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    @classmethod
    def remove_all(cls) -> None:
        for folder in cls.live:
            folder.remove()

    def write(self, name: str, write: Callable[[Path], None]) -> str:
        """A fresh file named ``name`` (shortened to fit a file system) written by ``write``; its path."""
        stem, suffix = Path(name).stem, Path(name).suffix
        path = self.path / f"download-{uuid.uuid4().hex}" / f"{stem[: MAX_NAME_CHARS - len(suffix)]}{suffix}"
        path.parent.mkdir()
        write(path)
        self._keep(path.parent, path.stat().st_size)
        return str(path)

    def _keep(self, folder: Path, size: int) -> None:
        """Count a new download, then remove the oldest ones past ``keep_s`` or while the rest pass ``max_bytes``."""
        now = time.time()
        with self.lock:
            self.downloads.append((folder, size, now))
            self.kept_bytes += size
            while len(self.downloads) > 1:
                oldest, oldest_size, written = self.downloads[0]
                if now - written <= self.keep_s and self.kept_bytes <= self.max_bytes:
                    break
                self.downloads.popleft()
                self.kept_bytes -= oldest_size
                shutil.rmtree(oldest, ignore_errors=True)

    def png(self, name: str, array: np.ndarray) -> str:
        # Level 1 writes a slice in ~8 ms instead of ~27 ms (Pillow's default 6); the file grows by ~14%.
        return self.write(name, lambda p: Image.fromarray(array).save(p, compress_level=1))

    def mask_zip(self, name: str, names: Sequence[str], masks: Sequence[np.ndarray]) -> str:
        """The masks as ``<slice>_mask.png`` (0/255) in one zip."""

        def write(path: Path) -> None:
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
                for slice_name, mask in zip(names, masks):
                    buffer = io.BytesIO()
                    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
                    archive.writestr(f"{slice_name}_mask.png", buffer.getvalue())

        return self.write(name, write)
