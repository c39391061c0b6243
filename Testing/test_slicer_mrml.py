"""MRML glue (BrainLesionSAM/BrainLesionSAMSlicer/mrml.py) under the slicer-core wheel: real Slicer
MRML classes in plain Python, no application.

Geometry is checked against SimpleITK's own index <-> physical point transforms (LPS), an independent
path from the MRML matrices (RAS) the glue uses.
"""
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "BrainLesionSAM"))
from BrainLesionSAMSlicer import mrml  # noqa: E402

from BrainLesionSAMLib.errors import GeometryError, InputImageError, OutputPathError  # noqa: E402
from BrainLesionSAMLib.report import lesion_volumes  # noqa: E402
from conftest import make_image, oblique_direction  # noqa: E402

SPACING = (0.9, 1.3, 2.7)          # x, y, z (anisotropic)
ORIGIN = (-12.5, 40.0, 7.25)
SHAPE = (13, 17, 11)               # z, y, x
F = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def oblique_image(seed=0, direction=None):
    rng = np.random.default_rng(seed)
    return make_image(rng.normal(100, 20, SHAPE).astype(np.float32), spacing=SPACING, origin=ORIGIN,
                      direction=direction or oblique_direction(25.0))


def sample_labels(shape=SHAPE):
    labels = np.zeros(shape, np.uint8)
    labels[3:9, 4:12, 2:8] = 2
    labels[4:8, 6:10, 3:7] = 4
    labels[5:7, 7:9, 4:6] = 1
    return labels


def linear_transform_node(scene, matrix):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


def rotation(axis, degrees, translation=(0, 0, 0)):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    matrix = np.eye(4)
    matrix[:3, :3] = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    matrix[:3, 3] = translation
    return matrix


def about(centre, matrix):
    """``matrix`` applied about ``centre`` instead of the origin (keeps a small ROI on the volume)."""
    shift = np.eye(4)
    shift[:3, 3] = centre
    return shift @ matrix @ np.linalg.inv(shift)


def non_linear_transform_node(scene):
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for point in [(0, 0, 0), (50, 0, 0), (0, 50, 0), (0, 0, 50), (30, 30, 30)]:
        source.InsertNextPoint(point)
        target.InsertNextPoint(point[0] + (3 if point == (30, 30, 30) else 0), point[1], point[2])
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    spline.SetBasisToR()
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    node.SetAndObserveTransformToParent(spline)
    return node


# ----------------------------------------------------------------------------- volumes

def test_volume_round_trip_keeps_voxels_and_oblique_anisotropic_geometry(scene):
    image = oblique_image()
    node = mrml.addVolumeNodeFromImage(scene, image, "case_t1ce")
    assert np.array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(image))
    ijk_to_ras = mrml.ijkToRas(node)
    for index in [(0, 0, 0), (10, 3, 7), (SHAPE[2] - 1, SHAPE[1] - 1, SHAPE[0] - 1)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        assert np.allclose(ijk_to_ras @ np.array([*index, 1.0]), np.array([*(F @ lps), 1.0]), atol=1e-9)
    back = mrml.imageFromVolumeNode(node)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert np.allclose(back.GetSpacing(), SPACING) and np.allclose(back.GetOrigin(), ORIGIN)
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)
    assert mrml.voxelVolumeMl(node) == pytest.approx(np.prod(SPACING) / 1000)


def test_parent_transform_moves_the_world_geometry_and_non_linear_is_refused(scene):
    image = oblique_image()
    node = mrml.addVolumeNodeFromImage(scene, image, "flair")
    moved = rotation((0, 0, 1), 30, translation=(5, -7, 11))
    node.SetAndObserveTransformNodeID(linear_transform_node(scene, moved).GetID())
    world = mrml.imageFromVolumeNode(node, world=True)
    local = mrml.imageFromVolumeNode(node, world=False)
    assert np.allclose(local.GetOrigin(), ORIGIN)
    index = (4, 9, 2)
    lps_local = np.array(local.TransformIndexToPhysicalPoint(index))
    ras_world = moved @ np.array([*(F @ lps_local), 1.0])
    assert np.allclose(F @ np.array(world.TransformIndexToPhysicalPoint(index)), ras_world[:3], atol=1e-9)
    node.SetAndObserveTransformNodeID(non_linear_transform_node(scene).GetID())
    with pytest.raises(GeometryError, match="non-linear transform 'warp'.*[Hh]arden"):
        mrml.imageFromVolumeNode(node)


def test_volume_errors_name_the_node(scene):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty one")
    with pytest.raises(InputImageError, match="'empty one' holds no voxels"):
        mrml.imageFromVolumeNode(empty)
    colour = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    slicer.util.updateVolumeFromArray(colour, np.zeros((3, 4, 5, 3), np.uint8))
    with pytest.raises(InputImageError, match="'photo' has 3 components"):
        mrml.imageFromVolumeNode(colour)


def test_inputs_are_guessed_from_node_names(scene):
    image = oblique_image()
    names = ["BraTS-GLI-00001-000-t1c", "BraTS-GLI-00001-000-t2f", "sub-01_T2w", "sub-01_t1n",
             "second t1ce", "notes"]
    nodes = {name: mrml.addVolumeNodeFromImage(scene, image, name) for name in names}
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "case_t1_seg")
    found = mrml.guessInputVolumes(scene)
    assert found == {"t1ce": nodes["BraTS-GLI-00001-000-t1c"], "flair": nodes["BraTS-GLI-00001-000-t2f"],
                     "t2": nodes["sub-01_T2w"], "t1": nodes["sub-01_t1n"]}
    assert label not in found.values()
    hidden = mrml.addVolumeNodeFromImage(slicer.vtkMRMLScene(), image, "brain_flair")
    hidden.SetHideFromEditors(True)
    assert mrml.guessInputVolumes(None, [hidden]) == {}


# ----------------------------------------------------------------------------- segmentations

def terminology_codes(entry):
    parts = entry.split("~")
    return {"category": parts[1], "type": parts[2], "region": parts[5]}


def test_a_map_lies_on_the_reference_grid_and_follows_its_transform(scene):
    reference = mrml.addVolumeNodeFromImage(scene, oblique_image(), "t1ce")
    reference.SetAndObserveTransformNodeID(linear_transform_node(scene, rotation((1, 1, 0), 15, (5, -3, 2))).GetID())
    values = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "map")
    mrml.writeMapOnReference(node, values, reference)
    assert np.array_equal(mrml.volumeArray(node), values)
    assert np.allclose(mrml.ijkToRas(node), mrml.ijkToRas(reference), atol=1e-9)  # world, through the transform
    assert node.GetTransformNodeID() == reference.GetTransformNodeID()
    display = node.GetDisplayNode()
    assert display.GetColorNodeID() == mrml.MAP_COLOR_NODE_ID and not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    with pytest.raises(GeometryError, match="shape"):
        mrml.writeMapOnReference(node, values[:-1], reference)


def test_labelmap_becomes_named_coloured_segments_with_terminology(scene):
    reference = mrml.addVolumeNodeFromImage(scene, oblique_image(), "t1ce")
    labels = sample_labels()
    labels[labels == 1] = 2  # no necrosis: its segment still exists, empty
    node = mrml.newSegmentationNode(scene, "result", reference)
    ids = mrml.writeLabelsToSegmentation(node, labels, reference, "brats", "unet2d")
    segmentation = node.GetSegmentation()
    assert ids == ["BrainLesionSAM_NCR", "BrainLesionSAM_ED", "BrainLesionSAM_ET"]
    segments = [segmentation.GetSegment(i) for i in ids]
    assert [s.GetName() for s in segments] == ["Necrotic core", "Edema", "Enhancing tumor"]
    assert [tuple(s.GetColor()) for s in segments] == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 1.0, 0.0)]
    codes = [terminology_codes(mrml.segmentTag(s, s.GetTerminologyEntryTagName())) for s in segments]
    assert [c["type"] for c in codes] == ["SCT^6574001^Necrosis", "SCT^79654002^Edema",
                                          "NCIt^C113842^Enhancing Lesion"]
    assert all(c["category"] == "SCT^49755003^Morphologically Altered Structure" and c["region"] == "SCT^12738006^Brain"
               for c in codes)
    assert [mrml.segmentTag(s, mrml.METHOD_TAG) for s in segments] == ["unet2d"] * 3
    assert not mrml.segmentMask(node, ids[0], reference).any()
    assert np.array_equal(mrml.segmentMask(node, ids[2], reference), labels == 4)
    restored, label_set = mrml.labelsFromSegmentation(node, reference)
    assert label_set == "brats" and np.array_equal(restored, labels)
    assert node.GetParentTransformNode() is None
    with pytest.raises(ValueError, match=r"holds \[3\]"):
        mrml.writeLabelsToSegmentation(node, np.full(SHAPE, 3, np.uint8), reference, "brats")
    with pytest.raises(GeometryError, match="shape"):
        mrml.writeLabelsToSegmentation(node, labels[:-1], reference, "brats")


def test_lesion_label_set_and_rewriting_keeps_user_segments(scene):
    reference = mrml.addVolumeNodeFromImage(scene, oblique_image(), "flair")
    node = mrml.newSegmentationNode(scene, "mine", reference)
    node.GetSegmentation().AddEmptySegment("user_segment", "my notes")
    mine = np.zeros(SHAPE, bool)
    mine[0:2, 0:5, 0:5] = True
    mrml.setSegmentMask(node, "user_segment", mine, reference)
    first = sample_labels() > 0
    ids = mrml.writeLabelsToSegmentation(node, first.astype(np.uint8), reference, "lesion", "litemedsam")
    segment = node.GetSegmentation().GetSegment(ids[0])
    assert ids == ["BrainLesionSAM_Lesion"] and segment.GetName() == "Lesion"
    assert "SCT^52988006^Lesion" in mrml.segmentTag(segment, segment.GetTerminologyEntryTagName())
    second = np.zeros(SHAPE, np.uint8)
    second[1:3, 1:3, 1:3] = 1
    mrml.writeLabelsToSegmentation(node, second, reference, "lesion", "litemedsam")
    segmentation = node.GetSegmentation()
    assert sorted(segmentation.GetSegmentIDs()) == ["BrainLesionSAM_Lesion", "user_segment"]
    assert np.array_equal(mrml.segmentMask(node, ids[0], reference), second > 0)
    assert np.array_equal(mrml.segmentMask(node, "user_segment", reference), mine)


def test_segmentation_under_the_reference_transform_lines_up(scene):
    reference = mrml.addVolumeNodeFromImage(scene, oblique_image(), "t1ce")
    reference.SetAndObserveTransformNodeID(linear_transform_node(scene, rotation((1, 1, 0), 40, (3, 2, 1))).GetID())
    node = mrml.newSegmentationNode(scene, "result", reference)
    assert node.GetTransformNodeID() == reference.GetTransformNodeID()
    labels = sample_labels()
    mrml.writeLabelsToSegmentation(node, labels, reference, "brats")
    assert np.array_equal(mrml.labelsFromSegmentation(node, reference)[0], labels)
    node.SetAndObserveTransformNodeID(None)  # the user moves the segmentation out: masks follow physically
    assert not np.array_equal(mrml.labelsFromSegmentation(node, reference)[0], labels)


def test_segmentation_file_round_trip(scene, tmp_path):
    reference = mrml.addVolumeNodeFromImage(scene, oblique_image(), "t1ce")
    node = mrml.newSegmentationNode(scene, "result", reference)
    labels = sample_labels()
    mrml.writeLabelsToSegmentation(node, labels, reference, "brats", "unet2d")
    path = mrml.writeSegmentationFile(node, tmp_path / "case.seg.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.seg.nrrd"]
    with pytest.raises(OutputPathError, match="already exists"):
        mrml.writeSegmentationFile(node, path)
    with pytest.raises(OutputPathError, match=".seg.nrrd"):
        mrml.writeSegmentationFile(node, tmp_path / "case.nii.gz")

    other = slicer.vtkMRMLScene()
    other_reference = mrml.addVolumeNodeFromImage(other, oblique_image(), "t1ce")
    loaded = mrml.readSegmentationFile(other, path)
    restored, label_set = mrml.labelsFromSegmentation(loaded, other_reference)
    assert label_set == "brats" and np.array_equal(restored, labels)
    segment = loaded.GetSegmentation().GetSegment("BrainLesionSAM_ET")
    assert segment.GetName() == "Enhancing tumor" and tuple(segment.GetColor()) == (1.0, 1.0, 0.0)
    assert "NCIt^C113842" in mrml.segmentTag(segment, segment.GetTerminologyEntryTagName())
    with pytest.raises(InputImageError, match="does not exist"):
        mrml.readSegmentationFile(other, tmp_path / "missing.seg.nrrd")


def test_box_update_changes_only_the_selected_segment_inside_the_box(scene):
    reference = mrml.addVolumeNodeFromImage(scene, oblique_image(), "t1ce")
    node = mrml.newSegmentationNode(scene, "result", reference)
    labels = sample_labels()
    ids = mrml.writeLabelsToSegmentation(node, labels, reference, "brats")
    before = {i: mrml.segmentMask(node, i, reference) for i in ids}
    box = (2, 5, 3, 6, 10, 7)  # x0, y0, z0, x1, y1, z1
    proposal = np.zeros(SHAPE, bool)
    proposal[:, :, :] = True   # proposes everything, also outside the box
    changed = mrml.updateSegmentInBox(node, "BrainLesionSAM_ED", proposal, box, reference, "litemedsam")
    inside = mrml.boxMask(box, SHAPE)
    after = {i: mrml.segmentMask(node, i, reference) for i in ids}
    assert np.array_equal(after["BrainLesionSAM_ED"][inside], np.ones(inside.sum(), bool))
    assert np.array_equal(after["BrainLesionSAM_ED"][~inside], before["BrainLesionSAM_ED"][~inside])
    assert np.array_equal(after["BrainLesionSAM_NCR"], before["BrainLesionSAM_NCR"])
    assert np.array_equal(after["BrainLesionSAM_ET"], before["BrainLesionSAM_ET"])
    assert changed == {"added": int((inside & ~before["BrainLesionSAM_ED"]).sum()), "removed": 0}
    segment = node.GetSegmentation().GetSegment("BrainLesionSAM_ED")
    assert mrml.segmentTag(segment, mrml.METHOD_TAG) == "litemedsam"


def test_volumes_and_case_weight_tables(scene):
    reference = mrml.addVolumeNodeFromImage(scene, oblique_image(), "t1ce")
    node = mrml.newSegmentationNode(scene, "result", reference)
    labels = sample_labels()
    mrml.writeLabelsToSegmentation(node, labels, reference, "brats")
    volumes = mrml.segmentVolumes(node, reference)
    expected = lesion_volumes(labels, tuple(reversed(SPACING)), "brats")
    assert volumes.keys() == expected.keys()
    assert all(volumes[k] == pytest.approx(expected[k], rel=1e-12) for k in expected)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    mrml.fillVolumesTable(table, volumes, mrml.voxelVolumeMl(reference))
    rows = mrml.tableRows(table)
    assert [r[0] for r in rows] == ["Necrotic core", "Edema", "Enhancing tumor", "WT", "TC", "ET"]
    assert rows[1][2] == (labels == 2).sum() and rows[3][1] == pytest.approx(round(expected["WT"], 3))
    assert table.GetColumnUnitLabel("Volume") == "ml"
    mrml.fillCaseWeightsTable(table, {"gate": {"t1ce": 0.6, "flair": 0.4}, "ET": {"t1ce": 1.0}})
    assert mrml.tableRows(table) == [("gate", "t1ce", 0.6), ("gate", "flair", 0.4), ("ET", "t1ce", 1.0)]


# ----------------------------------------------------------------------------- ROI -> voxel box

def roi_node(scene, centre, size, object_to_node=None, transform=None):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(*centre)
    roi.SetSize(*size)
    if object_to_node is not None:
        matrix = np.array(object_to_node, float)
        matrix[:3, 3] = centre
        roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(matrix))
    if transform is not None:
        roi.SetAndObserveTransformNodeID(linear_transform_node(scene, transform).GetID())
    return roi


def expected_box(image, world_corners_ras):
    """Independent reference: SimpleITK's continuous indices of the corners (LPS), voxel centres inside."""
    indices = np.array([image.TransformPhysicalPointToContinuousIndex((F @ c).tolist()) for c in world_corners_ras])
    low, high = indices.min(0), indices.max(0)
    first = np.maximum(np.ceil(low - 1e-3), 0).astype(int)
    last = np.minimum(np.floor(high + 1e-3), np.array(image.GetSize()) - 1).astype(int)
    return (*first.tolist(), *last.tolist())


def corners(centre, size, rotation_matrix=np.eye(3), transform=np.eye(4)):
    result = []
    for signs in itertools.product((-1, 1), repeat=3):
        local = np.asarray(centre) + rotation_matrix @ (np.array(signs) * np.asarray(size) / 2)
        result.append((transform @ np.array([*local, 1.0]))[:3])
    return result


def test_roi_box_on_an_axis_aligned_volume_is_exact(scene):
    image = make_image(np.zeros((20, 30, 40), np.float32), spacing=(1.0, 1.0, 1.0))
    volume = mrml.addVolumeNodeFromImage(scene, image, "t1ce")
    ras = mrml.ijkToRas(volume)
    low, high = ras @ [5, 6, 7, 1.0], ras @ [15, 20, 12, 1.0]
    roi = roi_node(scene, (low[:3] + high[:3]) / 2, np.abs(high[:3] - low[:3]))
    assert mrml.roiToBox(roi, volume) == (5, 6, 7, 15, 20, 12)


@pytest.mark.parametrize("direction", [oblique_direction(25.0), (-1, 0, 0, 0, 1, 0, 0, 0, -1)],
                         ids=["oblique", "flipped"])
def test_roi_box_on_rotated_and_flipped_volumes(scene, direction):
    image = oblique_image(direction=direction)
    volume = mrml.addVolumeNodeFromImage(scene, image, "t1ce")
    centre_ras = mrml.ijkToRas(volume) @ np.array([5.0, 8.0, 6.0, 1.0])
    size = (6.0, 9.0, 8.0)
    box = mrml.roiToBox(roi_node(scene, centre_ras[:3], size), volume)
    assert box == expected_box(image, corners(centre_ras[:3], size))
    assert box[0] <= box[3] and box[1] <= box[4] and box[2] <= box[5]


def test_roi_aligned_with_a_rotated_volume_gives_its_exact_voxel_box(scene):
    image = oblique_image()
    volume = mrml.addVolumeNodeFromImage(scene, image, "t1ce")
    ras = mrml.ijkToRas(volume)
    axes = ras[:3, :3] / np.linalg.norm(ras[:3, :3], axis=0)
    first, last = np.array([2, 3, 1]), np.array([8, 12, 6])
    centre = (ras @ np.array([*((first + last) / 2), 1.0]))[:3]
    size = (last - first) * np.array(SPACING)  # from the first to the last voxel centre
    orientation = np.eye(4)
    orientation[:3, :3] = axes
    assert mrml.roiToBox(roi_node(scene, centre, size, object_to_node=orientation), volume) == (2, 3, 1, 8, 12, 6)


def test_transformed_roi_and_transformed_volume(scene):
    image = oblique_image()
    volume = mrml.addVolumeNodeFromImage(scene, image, "t1ce")
    centre_local = (mrml.ijkToRas(volume) @ np.array([6.0, 7.0, 5.0, 1.0]))[:3]
    size = (5.0, 7.0, 9.0)
    roi_transform = about(centre_local, rotation((1, 2, 3), 35, translation=(1.5, -2.0, 0.5)))
    roi = roi_node(scene, centre_local, size, transform=roi_transform)
    world_corners = corners(centre_local, size, transform=roi_transform)
    assert mrml.roiToBox(roi, volume) == expected_box(image, world_corners)
    # The volume moves too: the box follows the volume's own voxel grid.
    volume_transform = about(centre_local, rotation((0, 1, 0), -20, translation=(2, 0, -3)))
    volume.SetAndObserveTransformNodeID(linear_transform_node(scene, volume_transform).GetID())
    local_corners = [(np.linalg.inv(volume_transform) @ np.array([*c, 1.0]))[:3] for c in world_corners]
    assert mrml.roiToBox(roi, volume) == expected_box(image, local_corners)


def test_roi_clipping_thin_outside_and_warped(scene):
    image = make_image(np.zeros((20, 30, 40), np.float32))
    volume = mrml.addVolumeNodeFromImage(scene, image, "t1ce")
    ras = mrml.ijkToRas(volume)
    centre = (ras @ [38, 5, 10, 1.0])[:3]
    assert mrml.roiToBox(roi_node(scene, centre, (10, 4, 0)), volume) == (33, 3, 10, 39, 7, 10)
    far = (ras @ [200, 5, 10, 1.0])[:3]
    with pytest.raises(GeometryError, match="outside volume 't1ce'"):
        mrml.roiToBox(roi_node(scene, far, (4, 4, 4)), volume)
    warped = roi_node(scene, centre, (4, 4, 4))
    warped.SetAndObserveTransformNodeID(non_linear_transform_node(scene).GetID())
    with pytest.raises(GeometryError, match="non-linear"):
        mrml.roiToBox(warped, volume)
    with pytest.raises(GeometryError, match="no ROI"):
        mrml.roiToBox(None, volume)
