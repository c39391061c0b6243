"""The web front end's session (BrainLesionSAM/BrainLesionSAMWeb/session.py) on trame-slicer's views,
rendered off-screen through EGL, without a web server: PNG dumps of the four views after load,
Segment (unet2d) and Refine (litemedsam inside a box drawn by mouse events on the axial view), the
lesion-volume table, Save that never overwrites without confirmation, a failed and a cancelled job
that leave the scene alone, and the command line's host guard.

The case is a generated 2 mm case cut to 6 axial slices around the tumour (fast on 2 CPU cores).
"""
import ctypes.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("trame_slicer", reason="the web front end needs the 'web' extra (trame-slicer)")
pytest.importorskip("slicer_layer_dm", reason="the web front end needs slicer-layer-dm (trame-slicer[standalone])")
if ctypes.util.find_library("EGL") is None:
    pytest.skip("no EGL library (Debian: libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1): views cannot render",
                allow_module_level=True)

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "BrainLesionSAM"))
import BrainLesionSAMWeb  # noqa: E402,F401  - configures headless rendering before any window exists
from BrainLesionSAMSlicer import mrml  # noqa: E402
from BrainLesionSAMWeb.rendering import disable_multisampling, view_pixels  # noqa: E402
from BrainLesionSAMWeb.server import check_host  # noqa: E402
from BrainLesionSAMWeb.session import FilesExistError, WebSession  # noqa: E402

from BrainLesionSAMLib.conventions import LABEL_COLORS, MODALITIES  # noqa: E402
from BrainLesionSAMLib.errors import BrainLesionSAMError, CancelledError, WeightsError  # noqa: E402
from BrainLesionSAMLib.sample import SampleParameters, generate_case, write_case  # noqa: E402

VIEW_SIZE = 320
CASE_ID = "BLSAM_WEB_0"


def cut_case(seed: int, slices: int = 6) -> dict:
    images = generate_case(SampleParameters.random(seed, resolution=2))
    truth = sitk.GetArrayFromImage(images["seg"]) > 0
    centre = int(truth.sum(axis=(1, 2)).argmax())
    cut = slice(centre - slices // 2, centre - slices // 2 + slices)
    return {key: image[:, :, cut] for key, image in images.items()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web-cases")
    write_case(cut_case(7), folder, CASE_ID)
    return folder


@pytest.fixture(scope="module")
def session(data_dir):
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    for definition in (ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
                       ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.threed_view()):
        view = app.view_manager.create_view(definition)
        view.render_window().SetSize(VIEW_SIZE, VIEW_SIZE)
        view.interactor().UpdateSize(VIEW_SIZE, VIEW_SIZE)
    disable_multisampling(app.view_manager.get_views())
    session = WebSession(app, data_dir=data_dir)
    yield session
    session.clear()


def node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def view(session, tag):
    return next(v for v in session.views() if v.get_singleton_tag() == tag)


def coloured(pixels: np.ndarray, rgb) -> int:
    """Pixels whose hue is that of the (fully saturated) segment colour ``rgb`` drawn at 50 % over
    grey: the colour's channels at least 60 above the others."""
    p = pixels.astype(int)
    on = [c for c in range(3) if rgb[c] > 0.5]
    off = [c for c in range(3) if rgb[c] <= 0.5]
    mask = np.ones(p.shape[:2], bool)
    for a in on:
        for b in off:
            mask &= p[..., a] - p[..., b] > 60
    return int(mask.sum())


def run(job, timeout=900):
    assert job.wait(timeout), "the job did not finish in time"
    return job


def place_box(session, half: int = 28):
    """What a user does: Draw box, then click two opposite corners in the axial view (mouse events
    through the view's interactor, as the page forwards them)."""
    axial = view(session, "Red")
    interactor = axial.interactor()
    centre = VIEW_SIZE // 2

    def event(name, x, y):
        interactor.SetEventInformation(x, y, 0, 0, "\0", 0)
        interactor.InvokeEvent(name)
        axial.render()

    session.start_box()
    for x, y in ((centre - half, centre - half), (centre + half, centre + half)):
        event("MouseMoveEvent", x - 1, y - 1)
        event("MouseMoveEvent", x, y)
        event("LeftButtonPressEvent", x, y)
        event("LeftButtonReleaseEvent", x, y)
    return session.box_voxels()


def test_case_folder_loads_with_modalities_assigned_by_name(session, data_dir, tmp_path):
    assert session.list_cases() == [CASE_ID]
    with pytest.raises(BrainLesionSAMError, match="not a case folder"):
        session.case_folder("../elsewhere")
    assert session.segment_problem("unet2d") == "load a case first"
    session.load_case(CASE_ID)
    names = {key: session.scene.GetNodeByID(node_id).GetName() for key, node_id in session.inputs.items()}
    assert names == {key: f"{CASE_ID}_{key}" for key in MODALITIES}
    assert session.background_id == session.inputs["flair"]
    dumps = session.dump_views(tmp_path, "load")
    axial = view_pixels(view(session, "Red"))
    assert axial.mean() > 10, "the axial view shows no image"
    assert coloured(axial, (0, 1, 0)) == 0 and coloured(axial, (1, 0, 0)) == 0  # no overlay yet
    three_d = view_pixels(view(session, "ThreeD"))
    assert np.ptp(three_d.reshape(-1, 3), axis=0).max() > 60, "the 3D view rendered empty (multisampling?)"
    assert all(p.stat().st_size > 1000 for p in dumps.values())


def test_method_checks_explain_what_is_missing(session):
    assert session.segment_problem("unet2d") == ""
    assert "box" in session.segment_problem("litemedsam")
    flair = session.inputs["flair"]
    session.set_input("flair", None)
    try:
        assert "missing: FLAIR" in session.segment_problem("litemedsam")
    finally:
        session.set_input("flair", flair)
    assert "segment first" in session.refine_problem("litemedsam", None)
    assert "ships no trained weights" in session.segment_problem("sofa")  # listed, but Segment is refused


def test_segment_shows_overlays_and_the_volume_table(session, tmp_path):
    job = run(session.start_segment("unet2d", "cpu"))
    outcome = session.finish(job, "segment")
    rows = session.volume_rows()
    assert [r.name for r in rows] == ["Necrotic core", "Edema", "Enhancing tumor", "WT", "TC", "ET"]
    reference = session.reference_node()
    expected = mrml.segmentVolumes(outcome.segmentationNode, reference)
    assert {r.name: r.ml for r in rows} == pytest.approx({k: round(v, 3) for k, v in expected.items()}, abs=1e-6)
    assert rows[3].ml > 1.0, "unet2d found no tumour in the generated case"
    colours = {name: colour for _, name, colour in session.segments()}
    assert colours == {"Necrotic core": "#ff0000", "Edema": "#00ff00", "Enhancing tumor": "#ffff00"}
    session.dump_views(tmp_path, "segment")
    axial = view_pixels(view(session, "Red"))
    assert coloured(axial, LABEL_COLORS["brats"][2]) > 200, "no edema overlay in the axial view"
    assert coloured(axial, LABEL_COLORS["brats"][1]) > 20, "no necrotic-core overlay in the axial view"
    assert coloured(view_pixels(view(session, "ThreeD")), (0, 1, 0)) > 200, "no lesion surface in 3D"


def test_failed_and_cancelled_jobs_leave_the_scene_alone(session, monkeypatch):
    box = place_box(session)
    assert box is not None
    before = node_ids(session.scene)
    rows = session.volume_rows()
    with pytest.raises(BrainLesionSAMError, match="medsam ships no trained weights"):
        session.start_segment("medsam", "cpu")  # its ViT-B weights do not ship: refused before any job

    def damaged(*args):
        raise WeightsError("weights file unet2d.safetensors is damaged; download or copy it again")

    session.logic.clearCaches()
    with monkeypatch.context() as patch:  # a failure inside the worker
        patch.setattr(session.logic, "_loadModel", damaged)
        job = run(session.start_segment("unet2d", "cpu"))
        with pytest.raises(WeightsError, match="damaged"):
            session.finish(job, "segment")
    session.logic.clearCaches()  # the model must load again, so the cancel lands before the network
    job = session.start_segment("unet2d", "cpu")
    job.cancel()
    run(job)
    with pytest.raises(CancelledError, match="nothing"):
        session.finish(job, "segment")
    assert node_ids(session.scene) == before and session.volume_rows() == rows and not session.logic.busy


def test_box_drawn_in_the_view_and_refine_inside_it(session, tmp_path):
    box = place_box(session)
    x0, y0, z0, x1, y1, z1 = box
    assert x1 > x0 and y1 > y0 and 1 <= z1 - z0 + 1 <= 6
    target = next(sid for sid, name, _ in session.segments() if name == "Edema")
    assert "no box prompt" in session.refine_problem("unet2d", target)
    assert session.refine_problem("litemedsam", target) == ""
    reference = session.reference_node()
    before = mrml.segmentMask(session.segmentation, target, reference)
    others = {sid: mrml.segmentMask(session.segmentation, sid, reference) for sid, _, _ in session.segments()
              if sid != target}
    start = time.perf_counter()
    outcome = session.finish(run(session.start_refine("litemedsam", target, "cpu")), "refine")
    print(f"refine (litemedsam, {z1 - z0 + 1} slices): {time.perf_counter() - start:.1f} s")
    after = mrml.segmentMask(session.segmentation, target, reference)
    inside = mrml.boxMask(box, after.shape)
    assert np.array_equal(after[~inside], before[~inside]), "refinement changed voxels outside the box"
    assert outcome.changedVoxels["added"] + outcome.changedVoxels["removed"] == int((after != before).sum())
    assert after[inside].any(), "litemedsam found nothing in a box around the tumour"
    assert all(np.array_equal(mrml.segmentMask(session.segmentation, sid, reference), mask)
               for sid, mask in others.items())
    edema = next(r for r in session.volume_rows() if r.name == "Edema")
    assert edema.voxels == int(after.sum())
    session.dump_views(tmp_path, "refine")
    axial = view_pixels(view(session, "Red")).astype(int)
    box_blue = (axial[..., 2] - axial[..., 0] > 60) & (axial[..., 2] > 150)  # ROI colour (0.2, 0.6, 1.0)
    assert box_blue.sum() > 30, "the box is not drawn in the axial view"


def test_save_writes_both_files_and_never_overwrites_without_confirmation(session, tmp_path):
    import slicer

    folder = tmp_path / "out"
    paths = session.save(folder, "case")
    assert [p.name for p in paths] == ["case.seg.nrrd", "case.nii.gz"]
    labels = sitk.ReadImage(str(paths[1]))
    reference = sitk.ReadImage(str(Path(session.data_dir) / CASE_ID / f"{CASE_ID}_t1ce.nii.gz"))
    assert labels.GetSize() == reference.GetSize() and labels.GetSpacing() == reference.GetSpacing()
    assert np.allclose(labels.GetOrigin(), reference.GetOrigin()) and np.allclose(labels.GetDirection(),
                                                                                  reference.GetDirection())
    expected, _ = mrml.labelsFromSegmentation(session.segmentation, session.reference_node())
    assert np.array_equal(sitk.GetArrayFromImage(labels), expected)
    scene = slicer.vtkMRMLScene()
    reloaded = mrml.readSegmentationFile(scene, paths[0])
    segmentation = reloaded.GetSegmentation()
    names = [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
             for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["Necrotic core", "Edema", "Enhancing tumor"]

    stamps = [p.stat().st_mtime_ns for p in paths]
    contents = [p.read_bytes() for p in paths]
    with pytest.raises(FilesExistError, match="confirm") as refused:
        session.save(folder, "case")
    assert refused.value.paths == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps and [p.read_bytes() for p in paths] == contents
    (folder / "other.nii.gz").write_bytes(b"a user's file")
    with pytest.raises(FilesExistError):
        session.save(folder, "other")  # one existing file is enough to ask
    assert (folder / "other.nii.gz").read_bytes() == b"a user's file" and not (folder / "other.seg.nrrd").exists()
    assert session.save(folder, "case", overwrite=True) == paths
    with pytest.raises(BrainLesionSAMError, match="usable file name"):
        session.save(folder, "../case")


def test_uncertainty_layer_is_shown_hidden_and_saved(session, tmp_path):
    assert session.uncertainty_node() is None  # segmented without it so far
    outcome = session.finish(run(session.start_segment("unet2d", "cpu", uncertainty=True)), "segment")
    node = session.uncertainty_node()
    assert node is outcome.uncertaintyNode and node.GetName() == f"{outcome.segmentationNode.GetName()} uncertainty"
    reference = session.reference_node()
    assert np.allclose(mrml.ijkToRas(node), mrml.ijkToRas(reference)) and \
        mrml.volumeShape(node) == mrml.volumeShape(reference)
    slice_views = session.slice_views()
    assert all(v.get_foreground_volume_id() == node.GetID() for v in slice_views)
    assert all(v.get_foreground_opacity() > 0 for v in slice_views)
    session.show_background(session.inputs["t1ce"])  # another background keeps the layer
    assert all(v.get_foreground_volume_id() == node.GetID() for v in slice_views)
    session.show_uncertainty(False)
    assert all(v.get_foreground_volume_id() is None for v in slice_views)
    session.show_uncertainty(True)
    paths = session.save(tmp_path, "tta")
    assert [p.name for p in paths] == ["tta.seg.nrrd", "tta.nii.gz", "tta_uncertainty.nii.gz"]
    saved = sitk.ReadImage(str(paths[2]))
    labels = sitk.ReadImage(str(paths[1]))
    assert saved.GetSize() == labels.GetSize() and np.allclose(saved.GetOrigin(), labels.GetOrigin())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(saved), sitk.GetArrayFromImage(outcome.result.uncertainty))
    with pytest.raises(FilesExistError) as refused:
        session.save(tmp_path, "tta")
    assert refused.value.paths == paths
    session.finish(run(session.start_segment("unet2d", "cpu")), "segment")  # a new result without the map
    assert node.GetScene() is None and session.uncertainty_node() is None
    assert all(v.get_foreground_volume_id() is None for v in slice_views)


def test_remote_host_needs_the_explicit_flag():
    assert check_host("127.0.0.1", False) == "" and check_host("localhost", False) == ""
    assert "NO authentication" in check_host("0.0.0.0", True)
    with pytest.raises(BrainLesionSAMError, match="no authentication.*--allow-remote"):
        check_host("0.0.0.0", False)
    result = subprocess.run([sys.executable, "-m", "BrainLesionSAMWeb.server", "--host", "0.0.0.0", "--port", "0"],
                            cwd=REPOSITORY, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                                str(REPOSITORY), os.environ.get("PYTHONPATH", "")]))})
    assert result.returncode == 1 and "--allow-remote" in result.stderr and "serving" not in result.stdout
