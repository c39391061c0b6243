"""The module's logic (BrainLesionSAM/BrainLesionSAMSlicer/logic.py, dependencies.py) under slicer-core:
segmenting from volume nodes in the calling thread and in a worker-thread Job, cancelling, the
scene left alone until a result is complete, box refinement with the real LiteMedSAM weights and
its embedding cache, and the requirement checks that never prompt when not interactive.

The case is generated at 2 mm and cut to 16 axial slices around the tumour to keep this fast.
"""
import importlib.metadata
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "BrainLesionSAM"))
from BrainLesionSAMSlicer import dependencies, mrml  # noqa: E402
from BrainLesionSAMSlicer.logic import Job, MethodInfo, SegmentationLogic  # noqa: E402

from BrainLesionSAMLib.conventions import MODALITIES  # noqa: E402
from BrainLesionSAMLib.errors import (BrainLesionSAMError, CancelledError, GeometryError,  # noqa: E402
                                      MissingModalityError, WeightsError)
from BrainLesionSAMLib.pipeline import load_and_segment  # noqa: E402
from BrainLesionSAMLib.report import lesion_volumes  # noqa: E402
from BrainLesionSAMLib.sample import SampleParameters, generate_case  # noqa: E402


@pytest.fixture(scope="module")
def case():
    images = generate_case(SampleParameters.random(3, resolution=2))
    truth = sitk.GetArrayFromImage(images["seg"]) > 0
    centre = int(truth.sum(axis=(1, 2)).argmax())
    cut = slice(centre - 8, centre + 8)
    images = {key: image[:, :, cut] for key, image in images.items()}  # keeps the geometry of those slices
    scene = slicer.vtkMRMLScene()
    nodes = {key: mrml.addVolumeNodeFromImage(scene, images[key], f"case3_{key}") for key in MODALITIES}
    return {"images": {k: images[k] for k in MODALITIES}, "truth": sitk.GetArrayFromImage(images["seg"]) > 0,
            "scene": scene, "nodes": nodes, "logic": SegmentationLogic(scene)}


@pytest.fixture(scope="module")
def library_labels(case):
    return load_and_segment(case["images"], "unet2d", device="cpu").label_array


def node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def test_nothing_heavy_is_imported_with_the_module_side():
    code = ("import sys; sys.path.insert(0, 'BrainLesionSAM'); import BrainLesionSAMSlicer.logic, "
            "BrainLesionSAMSlicer.mrml, BrainLesionSAMSlicer.dependencies, BrainLesionSAMLib.catalogue; "
            "heavy = [m for m in ('torch', 'monai', 'segment_anything') if m in sys.modules]; "
            "assert not heavy, heavy; print('light')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "light" in result.stdout, result.stderr[-2000:]


def test_segment_from_nodes_equals_the_library_voxel_for_voxel(case, library_labels):
    logic, nodes = case["logic"], case["nodes"]
    messages = []
    outcome = logic.process(nodes, "unet2d", device="cpu", progressCallback=lambda f, m: messages.append((f, m)))
    labels, label_set = mrml.labelsFromSegmentation(outcome.segmentationNode, nodes["t1ce"])
    assert label_set == "brats" and np.array_equal(labels, library_labels)
    assert np.array_equal(sitk.GetArrayFromImage(outcome.result.labels), library_labels)
    assert (library_labels > 0).sum() > 0.5 * case["truth"].sum()  # a real segmentation, not an empty one
    assert outcome.segmentationNode.GetName() == "case3_t1ce unet2d"
    assert outcome.segmentationNode.GetNodeReference(
        outcome.segmentationNode.GetReferenceImageGeometryReferenceRole()) is nodes["t1ce"]
    spacing = tuple(reversed(case["images"]["t1ce"].GetSpacing()))
    expected = lesion_volumes(library_labels, spacing, "brats")
    assert all(outcome.volumesMl[k] == pytest.approx(v, rel=1e-9) for k, v in expected.items())
    assert [row[0] for row in mrml.tableRows(outcome.volumesTable)] == list(expected)
    assert outcome.caseWeights == {} and outcome.caseWeightsTable is None  # unet2d weighs no modalities
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and any("slices" in m for _, m in messages)
    assert outcome.timings["network_s"] > 0 and outcome.device == "cpu"


def test_worker_thread_job_touches_the_scene_only_in_finish(case, library_labels):
    logic, scene, nodes = case["logic"], case["scene"], case["nodes"]
    picked = mrml.newSegmentationNode(scene, "picked by the user", nodes["t1ce"])
    picked.GetSegmentation().AddEmptySegment("notes", "my notes")
    untouched = mrml.newSegmentationNode(scene, "someone else's", nodes["t1ce"])
    untouched.GetSegmentation().AddEmptySegment("keep", "keep me")
    before = node_ids(scene)
    job = logic.process(nodes, "unet2d", device="cpu", outputSegmentation=picked, waitForCompletion=False)
    assert isinstance(job, Job)
    with pytest.raises(BrainLesionSAMError, match="already running"):
        logic.process(nodes, "unet2d", device="cpu")
    seen = set()
    while not job.wait(0.05):
        seen.add(job.progress[1])
    assert node_ids(scene) == before and picked.GetSegmentation().GetNumberOfSegments() == 1
    assert any("slices" in message for message in seen)
    outcome = job.finish()
    assert outcome.segmentationNode is picked
    assert sorted(picked.GetSegmentation().GetSegmentIDs()) == ["BrainLesionSAM_ED", "BrainLesionSAM_ET",
                                                                "BrainLesionSAM_NCR", "notes"]
    assert np.array_equal(mrml.labelsFromSegmentation(picked, nodes["t1ce"])[0], library_labels)
    assert list(untouched.GetSegmentation().GetSegmentIDs()) == ["keep"]
    assert job.finish() is outcome  # applied once


def test_uncertainty_map_becomes_a_volume_node_on_the_reference_grid(case):
    logic, scene, nodes = case["logic"], case["scene"], case["nodes"]
    output = mrml.newSegmentationNode(scene, "tta", nodes["t1ce"])
    users = mrml.addVolumeNodeFromImage(scene, case["images"]["flair"], "tta uncertainty")  # the user's own node
    users_voxels = mrml.volumeArray(users)
    plain = logic.process(nodes, "unet2d", device="cpu", outputSegmentation=output)
    assert plain.uncertaintyNode is None and plain.result.uncertainty is None
    fractions = []
    outcome = logic.process(nodes, "unet2d", device="cpu", outputSegmentation=output, uncertainty=True,
                            progressCallback=lambda f, m: fractions.append(f))
    node = outcome.uncertaintyNode
    assert node is not users and node.GetName() != "tta uncertainty" and node.GetName().startswith("tta uncertainty")
    assert np.array_equal(mrml.volumeArray(users), users_voxels), "a user's node was changed"
    assert output.GetNodeReference("BrainLesionSAMUncertainty") is node
    assert np.allclose(mrml.ijkToRas(node), mrml.ijkToRas(nodes["t1ce"]), atol=1e-9)
    values = mrml.volumeArray(node)
    assert values.dtype == np.float32 and values.shape == mrml.volumeShape(nodes["t1ce"])
    expected = load_and_segment(case["images"], "unet2d", device="cpu", mirror_tta=True).result
    np.testing.assert_array_equal(values, sitk.GetArrayFromImage(expected.uncertainty))
    assert 0.0 <= values.min() and values.max() <= 1.0
    labels, _ = mrml.labelsFromSegmentation(output, nodes["t1ce"])
    assert np.array_equal(labels, sitk.GetArrayFromImage(expected.labels))  # the two passes' mean
    assert fractions == sorted(fractions)
    before = node_ids(scene)
    again = logic.process(nodes, "unet2d", device="cpu", outputSegmentation=output, uncertainty=True)
    assert again.uncertaintyNode is node and node_ids(scene) == before  # its own map is updated in place


def test_cancel_leaves_the_scene_unchanged(case):
    logic, scene, nodes = case["logic"], case["scene"], case["nodes"]
    before = node_ids(scene)
    job = logic.process(nodes, "unet2d", device="cpu", waitForCompletion=False)
    job.cancel()
    job.wait(120)
    with pytest.raises(CancelledError, match="nothing"):
        job.finish()
    assert node_ids(scene) == before
    with pytest.raises(CancelledError):
        logic.process(nodes, "unet2d", device="cpu", cancel=lambda: True)
    assert node_ids(scene) == before and not logic.busy


def test_input_problems_are_refused_before_any_work(case):
    logic, nodes = case["logic"], case["nodes"]
    scene = case["scene"]
    target = mrml.newSegmentationNode(scene, "target", nodes["t1ce"])
    target.GetSegmentation().AddEmptySegment("BrainLesionSAM_ED", "Edema")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    before = node_ids(scene)
    with pytest.raises(MissingModalityError, match="litemedsam needs FLAIR; missing: FLAIR"):
        logic.process({"t1ce": nodes["t1ce"]}, "litemedsam", device="cpu")
    with pytest.raises(GeometryError, match="only inside a box"):
        logic.process(nodes, "litemedsam", device="cpu")
    with pytest.raises(MissingModalityError, match="unknown modality"):
        logic.process({"dwi": nodes["t1"]}, "unet2d")
    with pytest.raises(BrainLesionSAMError, match="takes no box prompt"):
        logic.process(nodes, "unet2d", box=(1, 1, 1, 5, 5, 5))
    with pytest.raises(BrainLesionSAMError, match="takes no box prompt, so it cannot refine"):
        logic.refine(nodes, "unet2d", target, "BrainLesionSAM_ED", roi)
    with pytest.raises(GeometryError, match="select the segment"):
        logic.refine(nodes, "litemedsam", target, "no such segment", roi)
    with pytest.raises(WeightsError, match="is for method 'litemedsam'"):
        logic.process(nodes, "unet2d", weights="litemedsam-v1", device="cpu")
    assert node_ids(scene) == before and not logic.busy


def test_method_info_follows_the_registered_facts():
    from itertools import combinations

    from BrainLesionSAMLib.methods import get_method_class

    infos = SegmentationLogic(slicer.vtkMRMLScene()).methods()
    assert {"unet2d", "litemedsam"} <= {info.name for info in infos}
    subsets = [list(c) for r in range(5) for c in combinations(MODALITIES, r)]
    for info in infos:
        facts = get_method_class(info.name).facts
        assert info.promptable == facts.promptable and info.labelSet == facts.label_set
        for given in subsets:
            try:
                facts.check_modalities(given)
                refused = False
            except MissingModalityError:
                refused = True
            assert bool(info.modalityProblem(given)) == refused, (info.name, given)


def test_without_torch_the_panel_lists_the_catalogue(monkeypatch):
    monkeypatch.setattr(dependencies, "torchAvailable", lambda: False)
    infos = SegmentationLogic(slicer.vtkMRMLScene()).methods()
    assert [(i.name, i.fromCatalogue, i.promptable) for i in infos] == [("unet2d", True, None),
                                                                       ("litemedsam", True, None),
                                                                       ("cmaa", True, None),
                                                                       ("dbsam", True, None),
                                                                       ("brainsegdmif", True, None),
                                                                       ("mome", True, None)]
    assert infos[1].modalitiesText() == "FLAIR required; T1, T1CE, T2 optional"
    assert infos[0].modalitiesText() == "any of T1, T1CE, T2, FLAIR"


def test_weights_choices_and_devices(case, tmp_path):
    logic = case["logic"]
    assert [key for key, _ in logic.weightsChoices("unet2d")] == ["catalogue:unet2d-sample-v1", "catalogue:unet2d-synthesis-v2",
                                                             "file"]
    assert [key for key, _ in logic.weightsChoices("sofa")] == ["none", "file"]
    cmaa = logic.weightsChoices("cmaa")  # ships experimental weights, and says so
    assert [key for key, _ in cmaa] == ["catalogue:cmaa-lite128-v1", "file"] and cmaa[0][1].startswith("EXPERIMENTAL: ")
    assert logic.weightsProblem("sofa") and not logic.weightsProblem("unet2d")
    assert logic.methodInfo("sofa").weightsProblem == logic.weightsProblem("sofa")
    assert logic._weightsKey("unet2d", None) == ("catalogue", "unet2d-sample-v1")
    assert logic._weightsKey("unet2d", "litemedsam-v1") == ("catalogue", "litemedsam-v1")
    assert logic._weightsKey("unet2d", tmp_path / "w.safetensors") == ("file", str((tmp_path / "w.safetensors").resolve()))
    options, summary = logic.devices()
    assert [key for key, _ in options][:2] == ["auto", "cpu"] and "torch" in summary


def test_box_refinement_updates_one_segment_and_reuses_embeddings(case):
    logic, scene, nodes = case["logic"], case["scene"], case["nodes"]
    base = logic.process(nodes, "unet2d", device="cpu")
    segmentation = base.segmentationNode
    reference = nodes["t1ce"]
    truth = case["truth"]
    z = truth.shape[0] // 2
    _, y, x = np.nonzero(truth[z:z + 2])
    first, last = np.array([x.min() - 4, y.min() - 4, z]), np.array([x.max() + 4, y.max() + 4, z + 1])
    ras = mrml.ijkToRas(reference)
    low, high = ras @ np.array([*first, 1.0]), ras @ np.array([*last, 1.0])
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "lesion box")
    roi.SetCenter(*((low[:3] + high[:3]) / 2))
    roi.SetSize(*np.abs(high[:3] - low[:3]))
    box = mrml.roiToBox(roi, reference)
    assert box == (*first.tolist(), *last.tolist())
    before = {i: mrml.segmentMask(segmentation, i, reference) for i in base.segmentIds}

    timings = []
    for attempt in range(2):
        start = time.perf_counter()
        outcome = logic.refine(nodes, "litemedsam", segmentation, "BrainLesionSAM_ED", roi, device="cpu")
        timings.append(time.perf_counter() - start)
        if attempt == 0:
            cached = logic.embeddingCacheSize
            assert cached == 2  # the two slices in the box
            roi.SetCenter(*(np.array(roi.GetCenter()) + ras[:3, 0] * 2))  # move the box 2 voxels along x
    assert logic.embeddingCacheSize == cached  # the moved box reused the embeddings of both slices
    print(f"\nlitemedsam refinement, 2 slices, CPU: first {timings[0]:.2f} s, second (cached) {timings[1]:.2f} s")
    assert timings[1] < timings[0] / 2

    moved_box = outcome.box
    assert moved_box == (box[0] + 2, box[1], box[2], min(box[3] + 2, truth.shape[2] - 1), box[4], box[5])
    inside = mrml.boxMask(moved_box, truth.shape)
    lesion = sitk.GetArrayFromImage(outcome.result.labels) > 0  # litemedsam: one lesion class
    after = {i: mrml.segmentMask(segmentation, i, reference) for i in base.segmentIds}
    assert np.array_equal(after["BrainLesionSAM_ED"][inside], lesion[inside])
    first_inside = mrml.boxMask(box, truth.shape)
    untouched = ~(inside | first_inside)
    assert np.array_equal(after["BrainLesionSAM_ED"][untouched], before["BrainLesionSAM_ED"][untouched])
    for other in ("BrainLesionSAM_NCR", "BrainLesionSAM_ET"):
        assert np.array_equal(after[other], before[other])
    dice = 2 * (lesion & truth & inside).sum() / ((lesion & inside).sum() + (truth & inside).sum())
    assert dice > 0.6, dice  # the real LiteMedSAM weights find the lesion in the box
    assert outcome.volumesMl["Edema"] == pytest.approx(after["BrainLesionSAM_ED"].sum() * mrml.voxelVolumeMl(reference))

    # The segmentation disappears while a refinement runs: nothing is written, the error says so.
    job = logic.refine(nodes, "litemedsam", segmentation, "BrainLesionSAM_ED", roi, device="cpu",
                       waitForCompletion=False)
    job.wait(300)
    scene.RemoveNode(segmentation)
    with pytest.raises(BrainLesionSAMError, match="segmentation was removed"):
        job.finish()


# ----------------------------------------------------------------------------- requirements

def test_requirements_are_met_here_and_unmet_ones_are_named():
    assert dependencies.checkDependencies() == []
    unmet = dependencies.unmetRequirements(["surely-not-a-package-blsam>=1", "numpy<1"])
    assert [(u.requirement, u.installed) for u in unmet] == [("surely-not-a-package-blsam>=1", None),
                                                             ("numpy<1", importlib.metadata.version("numpy"))]
    assert not dependencies.isInteractive()


def refuse(message):
    raise AssertionError(f"asked the user in a non-interactive run: {message}")


def test_non_interactive_runs_never_prompt(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nsurely-not-a-package-blsam>=1,<2\n")
    with pytest.raises(dependencies.DependencyError, match='PythonSlicer -m pip install "surely-not-a-package-blsam>=1,<2"'):
        dependencies.ensureDependencies(refuse, interactive=False, requirementsFile=requirements)
    with pytest.raises(dependencies.DependencyError, match="cannot run yet"):
        dependencies.ensureDependencies(None, interactive=True, requirementsFile=requirements)


def test_interactive_install_asks_installs_and_asks_for_a_restart(tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy>=99\n")
    installed = []
    with pytest.raises(dependencies.DependencyError, match="declined"):
        dependencies.ensureDependencies(lambda message: False, interactive=True, requirementsFile=requirements,
                                        pipInstall=installed.append)
    assert installed == []
    with pytest.raises(dependencies.DependencyError, match="failed"):
        dependencies.ensureDependencies(lambda message: "numpy>=99" in message, interactive=True,
                                        requirementsFile=requirements, pipInstall=installed.append)
    assert installed == [["numpy>=99"]]

    real_version = importlib.metadata.version

    def pip_that_works(arguments):
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name: "99.0" if name == "numpy" else real_version(name))

    assert dependencies.ensureDependencies(lambda message: True, interactive=True, requirementsFile=requirements,
                                           pipInstall=pip_that_works) is True  # numpy was imported: restart


def test_torch_comes_from_the_pytorch_extension(tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("")
    missing = dependencies.UnmetRequirement("torch>=2.1", None)
    monkeypatch.setattr(dependencies, "torchProblem", lambda: missing)
    with pytest.raises(dependencies.DependencyError, match="PyTorch extension"):
        dependencies.ensureDependencies(refuse, interactive=False, requirementsFile=requirements)

    class TorchUtils:
        def __init__(self, result):
            self.result, self.calls = result, []

        def installTorch(self, **arguments):
            self.calls.append(arguments)
            return self.result

    declined = TorchUtils(None)
    with pytest.raises(dependencies.DependencyError, match="not installed"):
        dependencies.ensureDependencies(lambda m: True, interactive=True, requirementsFile=requirements,
                                        torchUtilsLogic=declined)
    assert declined.calls == [{"askConfirmation": True, "torchVersionRequirement": ">=2.1"}]
    with pytest.raises(dependencies.DependencyError, match="Extensions Manager"):
        dependencies.ensureDependencies(lambda m: True, interactive=True, requirementsFile=requirements)


def test_method_info_problem_texts():
    info = MethodInfo("x", "X", ("t1ce", "flair"), ("flair",), "lesion", True, True)
    assert info.modalityProblem(["t1ce"]) == "x needs FLAIR; missing: FLAIR"
    assert info.modalityProblem(["flair"]) == ""
    loose = MethodInfo("y", "Y", ("t1", "t2"), (), "brats", False, False)
    assert loose.modalityProblem(["flair"]) == "y needs at least one of T1, T2"
