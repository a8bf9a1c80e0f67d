"""Where a model comes from: a local folder, a Hub repo id, or the model shipped in the repo.

A repo id is pulled with `huggingface_hub.snapshot_download` into the normal Hugging Face cache
(``HF_HOME`` / ``HF_HUB_CACHE``), weights from ``model.safetensors`` only. When the Hub cannot be
reached (no network, ``HF_HUB_OFFLINE=1``, a dead ``HF_ENDPOINT``), the cached copy is used with
a notice; for the app, with no cached copy either, the shipped model is served instead, again
with a notice. Connections give up after ``HUB_CONNECT_TIMEOUT`` seconds, so a dead endpoint
costs seconds, not minutes.

The endpoint is ``HF_ENDPOINT`` as set when the call is made (``huggingface_hub`` itself reads it
once, at import), so tests and tools can point a running process at another Hub.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, get_session, get_token, set_client_factory, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

log = logging.getLogger(__name__)

# What a model repo may hold: weights (safetensors only: no pickle from the network), config,
# card, metrics, curves and example slices (examples/<stem>.png with examples/<stem>_mask.png).
MODEL_FILES = [
    "config.json",
    "preprocessor_config.json",
    "postprocessor_config.json",
    "model.safetensors",
    "README.md",
    "metrics.json",
    "curves.png",
    "examples/*",
]

# Seconds, unless set in the environment: to open a connection to the Hub, to wait for any one read or
# write on it, and for the first question of a pull (which decides between the Hub and the cache).
TIMEOUT_DEFAULTS = {"HUB_CONNECT_TIMEOUT": 5.0, "HUB_READ_TIMEOUT": 60.0, "HUB_PROBE_TIMEOUT": 10.0}

# Errors that mean "the Hub cannot be reached" rather than "the Hub said no".
NETWORK_ERRORS = (httpx2.TransportError, OfflineModeIsEnabled)


class HubUnavailable(ConnectionError):
    """The Hub cannot be reached and there is no cached copy of the model."""


# Hub tokens as the Hub issues them (hf_ and 34 letters and digits) or as tests and older tools name them (with
# digits or underscores), and any "Bearer <credential>" an endpoint echoes back.
TOKEN_PATTERNS = (
    re.compile(r"\bBearer\s+[^\s\"',;]+", re.IGNORECASE),
    re.compile(r"\bhf_(?=[\w-]*\d)[\w-]{8,}"),
    re.compile(r"\bhf_[A-Za-z]{30,}"),
)
REDACTED = "***"


def redact(text: str) -> str:
    """``text`` with Hub tokens and this machine's paths taken out: for every message that carries a server's
    words (an endpoint may echo the Authorization header) or a file's path (the cache or home folder of a
    public Space says nothing a visitor needs, and tells an attacker where to look)."""
    text = str(text)
    for token in {os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN"), _saved_token()}:
        if token and len(token) >= 8:  # a short value would cut words out of the message, not a secret
            text = text.replace(token, REDACTED)
    for pattern in TOKEN_PATTERNS:
        text = pattern.sub(lambda m: "Bearer " + REDACTED if m.group(0)[:1] in "Bb" else REDACTED, text)
    for folder, name in _private_folders():
        text = re.sub(r"(?<![\w./-])" + re.escape(folder) + r"(?=[/\\\s'\"),:;]|$)", name, text)
    return text


def _saved_token() -> str | None:
    try:
        return get_token()
    except Exception:  # noqa: BLE001 - an unreadable token file leaves nothing to redact
        return None


def _private_folders() -> list[tuple[str, str]]:
    """(this machine's folder, what a message says instead), the longest first so the cache wins over home."""
    repo = Path(__file__).resolve().parent.parent
    folders = {
        constants.HF_HUB_CACHE: "$HF_HUB_CACHE",
        os.environ.get("HF_HUB_CACHE") or "": "$HF_HUB_CACHE",
        os.environ.get("HF_HOME") or constants.HF_HOME: "$HF_HOME",
        str(repo): "<repo>",
        str(Path.home()): "~",
    }
    # "/" would match the start of every path in the message
    found = [(str(Path(f).expanduser()), name) for f, name in folders.items() if f and len(Path(f).parts) > 1]
    found += [(str(Path(f).expanduser().resolve()), name) for f, name in found]
    return sorted(set(found), key=lambda pair: -len(pair[0]))


def hub_endpoint() -> str:
    """The Hub to talk to: ``HF_ENDPOINT`` now, else the client's default.

    A value that is no http(s) address is a setting to fix, not a network that is down.
    """
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"HF_ENDPOINT={endpoint!r} is not an http(s) address such as https://huggingface.co")
    return endpoint


def hub_timeout(name: str) -> float:
    """The timeout ``name`` (a key of TIMEOUT_DEFAULTS) in seconds, from the environment when set there."""
    value = os.environ.get(name)
    if value is None:
        return TIMEOUT_DEFAULTS[name]
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:  # NaN fails too
        raise ValueError(f"{name}={value!r} is not a number of seconds above 0")
    return seconds


def _bound_timeouts(request: httpx2.Request) -> None:
    """A request hook: fill in the timeouts a call left unset (the client's default is none)."""
    given = request.extensions.get("timeout") or {}
    read = hub_timeout("HUB_READ_TIMEOUT")
    defaults = {"connect": hub_timeout("HUB_CONNECT_TIMEOUT"), "read": read, "write": read, "pool": read}
    request.extensions["timeout"] = {
        k: default if given.get(k) is None else given[k] for k, default in defaults.items()
    }


def use_short_timeouts() -> None:
    """Bound every request of the client's shared session, so a dead or hung endpoint fails in
    seconds, and keep its per-request INFO lines out of our logs. A timeout set to no number of
    seconds is a `ValueError` here, before any request."""
    for name in TIMEOUT_DEFAULTS:
        hub_timeout(name)
    session = get_session()
    if _bound_timeouts not in session.event_hooks["request"]:
        # Through the factory, not on this session alone: the client closes its session after a
        # connection error and builds the next one from the factory, which would have no timeouts.
        hooks = [*session.event_hooks["request"], _bound_timeouts]
        follow = session.follow_redirects
        set_client_factory(lambda: httpx2.Client(event_hooks={"request": hooks}, follow_redirects=follow, timeout=None))
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLogger("httpx2").level))


def is_repo_id(source: str) -> bool:
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return not source.startswith((".", "~", "/")) and not Path(source).exists()


def pull_model(repo_id: str, revision: str | None = None) -> tuple[Path, str | None]:
    """Download (or find in the cache) a model repo: ``(snapshot folder, notice or None)``.

    Raises `FileNotFoundError` for a missing repo, revision or weights file, `PermissionError`
    for a refused token, and `HubUnavailable` when offline with nothing cached.
    """
    endpoint = hub_endpoint()
    where = repo_id + (f" @ {revision}" if revision else "")
    use_short_timeouts()
    try:
        info = HfApi(endpoint=endpoint).model_info(
            repo_id,
            revision=revision,
            timeout=httpx2.Timeout(hub_timeout("HUB_PROBE_TIMEOUT"), connect=hub_timeout("HUB_CONNECT_TIMEOUT")),
        )
    except OfflineModeIsEnabled:
        return _cached_copy(repo_id, revision, "HF_HUB_OFFLINE is set")
    except NETWORK_ERRORS as error:
        return _cached_copy(repo_id, revision, f"{endpoint} unreachable ({type(error).__name__})")
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"model repo {repo_id} not found at {endpoint} (a private repo needs a token: HF_TOKEN or `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"revision {revision!r} not found in model repo {repo_id} at {endpoint}") from None
    except HfHubHTTPError as error:
        status = error.response.status_code
        if status == 401:
            raise PermissionError(
                f"{endpoint} refused the token for {repo_id}: 401 invalid credentials "
                "(check HF_TOKEN or `hf auth login`)"
            ) from None
        if status >= 500 or status == 429:  # down or rate-limited: a cached copy is as good as it was
            return _cached_copy(repo_id, revision, f"{endpoint} answered {status}")
        raise OSError(
            redact(f"pull of {where} from {endpoint} failed: {status} {error.server_message or ''}".strip())
        ) from None

    files = {sibling.rfilename for sibling in info.siblings or []}
    if "config.json" not in files:
        raise FileNotFoundError(f"model repo {where} has no config.json")
    if "model.safetensors" not in files:
        pickled = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        raise FileNotFoundError(
            f"model repo {where} has no model.safetensors"
            + (f" (only {', '.join(pickled)}: pickled weights are refused)" if pickled else "")
        )
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES, endpoint=endpoint))
    except (*NETWORK_ERRORS, LocalEntryNotFoundError) as error:  # the connection dropped after the first answer
        return _cached_copy(repo_id, revision, f"{endpoint} unreachable during download ({type(error).__name__})")
    except GatedRepoError:
        raise PermissionError(
            f"model repo {where} is gated: accept its terms on the Hub with an account whose token "
            "this machine uses (HF_TOKEN or `hf auth login`)"
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no answer"
        raise OSError(
            redact(f"download of {where} from {endpoint} failed: {status} {error.server_message or ''}".strip())
        ) from None
    log.info("pulled %s (%s) into %s", where, folder.name[:7], folder)
    return folder, None


def _cached_copy(repo_id: str, revision: str | None, reason: str) -> tuple[Path, str]:
    where = repo_id + (f" @ {revision}" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        raise HubUnavailable(f"{reason} and no cached copy of {where}") from None
    if not (folder / "model.safetensors").is_file():
        raise HubUnavailable(f"{reason} and the cached copy of {where} has no model.safetensors")
    notice = f"offline: {reason}; using the cached copy of {where} ({folder.name[:7]})"
    log.warning(notice)
    return folder, notice


def resolve_model_dir(source: str, revision: str | None = None) -> Path:
    """A local folder as it is, else a Hub snapshot (the files of ``MODEL_FILES``); either must hold
    ``config.json`` and ``model.safetensors``."""
    path = Path(source).expanduser()
    if not path.is_dir():
        if not is_repo_id(source):
            raise FileNotFoundError(f"{source!r} is neither a model folder nor a Hub repo id (USER/NAME)")
        try:
            path = pull_model(source, revision)[0]
        except FileNotFoundError as error:
            raise FileNotFoundError(f"no model folder {source!r} here, and {error}") from None
    # Without its config a model would load with the constructor's defaults: another normalisation
    # and post-processing than it was trained and tuned with.
    missing = [name for name in ("config.json", "model.safetensors") if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"no {' or '.join(missing)} in model folder {path}")
    return path
