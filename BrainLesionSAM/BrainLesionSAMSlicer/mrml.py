"""MRML glue: volume nodes <-> SimpleITK images with their geometry, label maps -> segmentations
(names, colours, terminology), segment masks on a reference grid, ROI -> voxel box, segmentation
files and result tables.

Only ``slicer`` MRML classes, ``slicer.util`` array helpers and ``vtk``: no Qt, no ``slicer.app`` or
``slicer.mrmlScene`` - every function gets its nodes (and so their scene), which is what lets it run
under the ``slicer-core`` wheel exactly as inside Slicer.

Geometry conventions. A volume node maps voxel (i, j, k) to RAS with its IJK-to-RAS matrix and,
when it sits under a transform, to world RAS with that transform too (linear transforms only;
a non-linear one must be hardened first). SimpleITK images are LPS: direction = F @ R,
origin = F @ o with F = diag(-1, -1, 1). Arrays are SimpleITK's / ``slicer.util``'s [k, j, i].
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import SimpleITK as sitk
import slicer
import slicer.util
import vtk
from vtk.util import numpy_support

from BrainLesionSAMLib.conventions import LABEL_COLORS, LABEL_NAMES, LABEL_SETS, MODALITIES, REGIONS
from BrainLesionSAMLib.errors import GeometryError, InputImageError, OutputPathError
from BrainLesionSAMLib.io import atomic_output, modality_from_name
from BrainLesionSAMLib.terminology import ANATOMIC_REGION, SEGMENT_CATEGORY, SEGMENT_TYPES, Code

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
BINARY_LABELMAP = "Binary labelmap"  # vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()

# Segments this module writes carry these tags (read back by refinement, volumes and label export).
LABEL_VALUE_TAG = "BrainLesionSAM.LabelValue"   # BraTS 2021 value of the segment (1, 2, 4; lesion 1)
LABEL_SET_TAG = "BrainLesionSAM.LabelSet"       # 'brats' or 'lesion'
METHOD_TAG = "BrainLesionSAM.Method"            # method that made (or last refined) it
SEGMENT_KEYS = {"brats": {1: "NCR", 2: "ED", 4: "ET"}, "lesion": {1: "Lesion"}}

# Standard terminology (Slicer's serialized terminology entry: context~category~type~type modifier~
# anatomic context~anatomic region~region modifier, each code 'scheme^value^meaning'). The codes
# (DICOM CID 7168) are the library's, shared with its DICOM SEG output: BrainLesionSAMLib.terminology.
_TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def _serialized(code: Code) -> str:
    return "^".join(code)


_CATEGORY = _serialized(SEGMENT_CATEGORY)
_BRAIN = _serialized(ANATOMIC_REGION)
TERMINOLOGY_TYPES = {labelSet: {value: _serialized(code) for value, code in types.items()}
                     for labelSet, types in SEGMENT_TYPES.items()}


def terminologyEntry(labelSet: str, value: int) -> str:
    return "~".join((_TERMINOLOGY_CONTEXT, _CATEGORY, TERMINOLOGY_TYPES[labelSet][value], "^^",
                     _ANATOMIC_CONTEXT, _BRAIN, "^^"))


def resultSegmentId(labelSet: str, value: int) -> str:
    return f"BrainLesionSAM_{SEGMENT_KEYS[labelSet][value]}"


# ----------------------------------------------------------------------------- geometry

def _matrix(vtkMatrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.asarray(slicer.util.arrayFromVTKMatrix(vtkMatrix), dtype=float)


def parentToWorld(node) -> np.ndarray:
    """4x4 matrix from the node's own coordinates to world RAS (identity without a transform)."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise GeometryError(f"'{node.GetName()}' is under the non-linear transform '{transform.GetName()}'; "
                            "harden the transform on it (Data module: right-click > Harden transform) and try again")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return _matrix(matrix)


def ijkToRas(volumeNode, world: bool = True) -> np.ndarray:
    """The volume's IJK-to-RAS matrix, including its parent transform when ``world``."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    local = _matrix(matrix)
    return parentToWorld(volumeNode) @ local if world else local


def _geometryFromIjkToRas(matrix: np.ndarray, what: str) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in SimpleITK's LPS convention for an IJK-to-RAS matrix."""
    axes = matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(axes)) < 1e-12:
        raise GeometryError(f"{what} has a degenerate IJK-to-RAS matrix (spacing {tuple(spacing)}); fix its geometry")
    direction = LPS_FROM_RAS @ (axes / spacing)
    origin = LPS_FROM_RAS @ matrix[:3, 3]
    return tuple(float(s) for s in spacing), tuple(float(o) for o in origin), tuple(direction.ravel().tolist())


def _ijkToRasFromImage(image: sitk.Image) -> np.ndarray:
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_FROM_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_FROM_RAS @ np.asarray(image.GetOrigin(), dtype=float)
    return matrix


def volumeArray(volumeNode) -> np.ndarray:
    """A copy of the voxels as a [k, j, i] array (scalar volumes only)."""
    if volumeNode is None:
        raise InputImageError("no volume selected")
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise InputImageError(f"volume '{volumeNode.GetName()}' holds no voxels; load the image again")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise InputImageError(f"volume '{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} "
                              "components per voxel (colour or vector image); select a scalar MRI volume")
    return np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)


def imageFromVolumeNode(volumeNode, world: bool = True) -> sitk.Image:
    """The node's voxels as a SimpleITK image with its geometry (world RAS through any linear parent
    transform when ``world``, so volumes registered by an unhardened transform line up)."""
    image = sitk.GetImageFromArray(volumeArray(volumeNode))
    spacing, origin, direction = _geometryFromIjkToRas(ijkToRas(volumeNode, world), f"volume '{volumeNode.GetName()}'")
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def updateVolumeNodeFromImage(volumeNode, image: sitk.Image) -> None:
    slicer.util.updateVolumeFromArray(volumeNode, sitk.GetArrayFromImage(image))
    volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(_ijkToRasFromImage(image)))


def addVolumeNodeFromImage(scene, image: sitk.Image, name: str, className: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node in ``scene`` with the image's voxels and geometry (and display nodes)."""
    node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))
    updateVolumeNodeFromImage(node, image)
    node.CreateDefaultDisplayNodes()
    return node


# How a map in [0, 1] (the uncertainty map) is shown: Slicer's built-in heat colour table, fixed window.
MAP_COLOR_NODE_ID = "vtkMRMLColorTableNodeIron"


def writeMapOnReference(volumeNode, array_kji: np.ndarray, referenceVolumeNode) -> None:
    """Make ``volumeNode`` a float volume holding ``array_kji`` (values in [0, 1], on the reference
    grid) with the reference's own geometry and under its parent transform - so it follows the
    reference as the segmentation does - shown with a heat colour table over the fixed range 0-1."""
    _checkOnReference(array_kji, referenceVolumeNode, "the map")
    slicer.util.updateVolumeFromArray(volumeNode, np.ascontiguousarray(array_kji, dtype=np.float32))
    volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas(referenceVolumeNode, world=False)))
    volumeNode.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    display = volumeNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(MAP_COLOR_NODE_ID)
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)


def volumeShape(volumeNode) -> tuple[int, int, int]:
    """[k, j, i] shape of the volume's voxel array."""
    return tuple(reversed(volumeNode.GetImageData().GetDimensions()))


def voxelVolumeMl(volumeNode) -> float:
    return abs(float(np.linalg.det(ijkToRas(volumeNode, world=False)[:3, :3]))) / 1000.0


def guessInputVolumes(scene, nodes: Iterable | None = None) -> dict[str, object]:
    """{modality key: first scalar volume whose name says that modality} (t1c/t1gd/t1ce -> T1CE,
    flair/t2f -> FLAIR, t2/t2w -> T2, t1/t1n -> T1; names split at '_', '-', '.' and spaces).
    Label maps and nodes hidden from editors are skipped."""
    if nodes is None:
        collection = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    found: dict[str, object] = {}
    for node in nodes:
        if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetHideFromEditors():
            continue
        key = modality_from_name(node.GetName() or "")
        if key in MODALITIES and key not in found:
            found[key] = node
    return found


# ----------------------------------------------------------------------------- segmentations

def ensureSegmentationConverterRules() -> None:
    """Register the segmentation representation converters, as Slicer's Segmentations module does
    at start-up. Without an application (slicer-core) the factory starts empty, and a segment could
    not even get an empty binary labelmap (e.g. ``AddEmptySegment``). A no-op inside Slicer."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) == 0:
        for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                     slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
                     slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
                     slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule):
            factory.RegisterConverterRule(rule())


def newSegmentationNode(scene, name: str, referenceVolumeNode):
    """A new segmentation node on the reference volume's geometry and under its parent transform."""
    ensureSegmentationConverterRules()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    node.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
    return node


def _segmentationFrameImageToWorld(segmentationNode, referenceVolumeNode) -> np.ndarray:
    """Reference voxel -> the segmentation node's own coordinates (its labelmaps live there)."""
    return np.linalg.inv(parentToWorld(segmentationNode)) @ ijkToRas(referenceVolumeNode, world=True)


def _orientedImage(array_kji: np.ndarray | None, shape_kji: tuple[int, int, int], imageToWorld: np.ndarray):
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, shape_kji[2] - 1, 0, shape_kji[1] - 1, 0, shape_kji[0] - 1)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(imageToWorld))
    if array_kji is not None:
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = \
            np.ascontiguousarray(array_kji, dtype=np.uint8).ravel()
    return image


def _checkOnReference(array: np.ndarray, referenceVolumeNode, what: str) -> None:
    if tuple(array.shape) != volumeShape(referenceVolumeNode):
        raise GeometryError(f"{what} has shape {array.shape} but the reference volume "
                            f"'{referenceVolumeNode.GetName()}' has {volumeShape(referenceVolumeNode)}")


def writeLabelsToSegmentation(segmentationNode, labels: np.ndarray, referenceVolumeNode, labelSet: str,
                              method: str = "") -> list[str]:
    """Put a label map (on the reference volume's grid, [k, j, i]) into the segmentation as one
    segment per label of ``labelSet`` - empty ones too - named and coloured by BraTS convention,
    with standard terminology. Segments written earlier by this module (same ids) are replaced;
    the segmentation's other segments are kept. Returns the segment ids in label order."""
    _checkOnReference(labels, referenceVolumeNode, "the label map")
    ensureSegmentationConverterRules()
    values = [v for v in LABEL_SETS[labelSet] if v != 0]
    unknown = set(np.unique(labels).tolist()) - set(values) - {0}
    if unknown:
        raise ValueError(f"label map holds {sorted(unknown)}, not in label set '{labelSet}' {values}")
    segmentation = segmentationNode.GetSegmentation()
    # Slicer 5.4 renamed 'master' representation to 'source'; accept both.
    getSource = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    setSource = getattr(segmentation, "SetSourceRepresentationName", None) or segmentation.SetMasterRepresentationName
    if segmentation.GetNumberOfSegments() == 0:
        setSource(BINARY_LABELMAP)
    elif getSource() != BINARY_LABELMAP:
        raise GeometryError(f"segmentation '{segmentationNode.GetName()}' stores {getSource()} segments; choose "
                            "another output segmentation or let the module create a new one")
    if segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole()) is None:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    # One shared labelmap layer holding the label values, as Slicer stores imported label maps.
    image = _orientedImage(labels, labels.shape, _segmentationFrameImageToWorld(segmentationNode, referenceVolumeNode))
    ids = []
    wasModified = segmentationNode.StartModify()
    try:
        for value in values:
            segmentId = resultSegmentId(labelSet, value)
            if segmentation.GetSegment(segmentId) is not None:
                segmentation.RemoveSegment(segmentId)
            segment = slicer.vtkSegment()
            segment.SetName(LABEL_NAMES[labelSet][value])
            segment.SetColor(*LABEL_COLORS[labelSet][value])
            segment.SetLabelValue(value)
            segment.SetTag(segment.GetTerminologyEntryTagName(), terminologyEntry(labelSet, value))
            segment.SetTag(LABEL_VALUE_TAG, str(value))
            segment.SetTag(LABEL_SET_TAG, labelSet)
            segment.SetTag(METHOD_TAG, method)
            segment.AddRepresentation(BINARY_LABELMAP, image)
            segmentation.AddSegment(segment, segmentId)
            ids.append(segmentId)
    finally:
        segmentationNode.EndModify(wasModified)
    return ids


def segmentTag(segment, tag: str) -> str | None:
    value = vtk.mutable("")
    return str(value) if segment.GetTag(tag, value) else None


def segmentMask(segmentationNode, segmentId: str, referenceVolumeNode) -> np.ndarray:
    """The segment as a bool [k, j, i] array on the reference volume's grid."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise GeometryError(f"segmentation '{segmentationNode.GetName()}' has no segment '{segmentId}'")
    shape = volumeShape(referenceVolumeNode)
    internal = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentationNode, segmentId, internal, False):
        raise GeometryError(f"segment '{segment.GetName()}' has no binary labelmap")
    extent = internal.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return np.zeros(shape, dtype=bool)  # an empty segment
    reference = _orientedImage(None, shape, _segmentationFrameImageToWorld(segmentationNode, referenceVolumeNode))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            internal, reference, resampled, False, False):
        raise GeometryError(f"segment '{segment.GetName()}' could not be resampled onto "
                            f"'{referenceVolumeNode.GetName()}'")
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(shape)
    # Segments may share one labelmap layer, each with its own label value.
    return values == segment.GetLabelValue()


def setSegmentMask(segmentationNode, segmentId: str, mask: np.ndarray, referenceVolumeNode) -> None:
    """Replace the segment's voxels by ``mask`` (bool [k, j, i] on the reference grid)."""
    _checkOnReference(mask, referenceVolumeNode, "the mask")
    ensureSegmentationConverterRules()
    image = _orientedImage(mask.astype(np.uint8), mask.shape,
                           _segmentationFrameImageToWorld(segmentationNode, referenceVolumeNode))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_REPLACE):
        raise GeometryError(f"could not write segment '{segmentId}' of '{segmentationNode.GetName()}'")


def boxMask(box: tuple[int, int, int, int, int, int], shape_kji: tuple[int, int, int]) -> np.ndarray:
    x0, y0, z0, x1, y1, z1 = box
    mask = np.zeros(shape_kji, dtype=bool)
    mask[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = True
    return mask


def updateSegmentInBox(segmentationNode, segmentId: str, mask: np.ndarray, box, referenceVolumeNode,
                       method: str = "") -> dict[str, int]:
    """Inside ``box`` (inclusive voxel indices of the reference) the segment becomes ``mask``; outside
    it nothing changes, nor does any other segment. Returns voxel counts added / removed."""
    current = segmentMask(segmentationNode, segmentId, referenceVolumeNode)
    inside = boxMask(box, current.shape)
    updated = np.where(inside, mask.astype(bool), current)
    setSegmentMask(segmentationNode, segmentId, updated, referenceVolumeNode)
    if method:
        segmentationNode.GetSegmentation().GetSegment(segmentId).SetTag(METHOD_TAG, method)
    return {"added": int((updated & ~current).sum()), "removed": int((current & ~updated).sum())}


def resultSegments(segmentationNode) -> list[tuple[str, str, int]]:
    """(segment id, label set, label value) of the segments this module wrote, in label order."""
    segmentation = segmentationNode.GetSegmentation()
    found = []
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        value, labelSet = segmentTag(segment, LABEL_VALUE_TAG), segmentTag(segment, LABEL_SET_TAG)
        if value is not None and labelSet in LABEL_SETS:
            found.append((segmentId, labelSet, int(value)))
    return sorted(found, key=lambda item: LABEL_SETS[item[1]].index(item[2]))


def labelsFromSegmentation(segmentationNode, referenceVolumeNode) -> tuple[np.ndarray, str | None]:
    """Label map ([k, j, i], uint8, BraTS 2021 values) of this module's segments on the reference grid,
    and their label set (None if there are none). Where refined segments overlap, the later label
    in the label set's order wins."""
    labels = np.zeros(volumeShape(referenceVolumeNode), dtype=np.uint8)
    labelSet = None
    for segmentId, segmentLabelSet, value in resultSegments(segmentationNode):
        labels[segmentMask(segmentationNode, segmentId, referenceVolumeNode)] = value
        labelSet = segmentLabelSet
    return labels, labelSet


def writeSegmentationFile(segmentationNode, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``.seg.nrrd`` through a temporary file renamed into place on success."""
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise OutputPathError(f"{path}: a segmentation file must end with .seg.nrrd")
    if path.exists() and not overwrite:
        raise OutputPathError(f"{path} already exists; choose another name or allow overwriting")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetUseCompression(True)
    with atomic_output(path) as temporary:
        storage.SetFileName(str(temporary))
        if not storage.WriteData(segmentationNode):
            raise OutputPathError(f"writing {path} failed; check the folder and free disk space")
    return path


def readSegmentationFile(scene, path: str | os.PathLike, name: str | None = None):
    """Load a ``.seg.nrrd`` into a new segmentation node of ``scene``."""
    path = Path(path)
    if not path.is_file():
        raise InputImageError(f"segmentation file {path} does not exist")
    ensureSegmentationConverterRules()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or path.name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise InputImageError(f"{path} is not a readable segmentation file")
    return node


# ----------------------------------------------------------------------------- box prompt

def roiToBox(roiNode, volumeNode) -> tuple[int, int, int, int, int, int]:
    """The ROI as an inclusive voxel box (x0, y0, z0, x1, y1, z1) = (i, j, k) of ``volumeNode``.

    The ROI's eight corners go to world RAS (its orientation and any parent transform), then to the
    volume's IJK (inverse of its parent transform and IJK-to-RAS), and the box is their per-axis
    min/max - so flipped or rotated axes never give a flipped box. Voxels whose centres lie inside
    that IJK box are kept (at least the nearest voxel on a thin axis); the box is clipped to the
    volume. An ROI entirely outside the volume is an error.
    """
    if roiNode is None:
        raise GeometryError("no ROI selected; place an ROI around the lesion first")
    transform = roiNode.GetParentTransformNode()
    if transform is not None and not transform.IsTransformToWorldLinear():
        raise GeometryError(f"ROI '{roiNode.GetName()}' is under the non-linear transform '{transform.GetName()}'; "
                            "harden the transform on it and try again")
    size = np.asarray(roiNode.GetSize(), dtype=float)
    if np.any(size < 0) or not np.all(np.isfinite(size)):
        raise GeometryError(f"ROI '{roiNode.GetName()}' has an invalid size {tuple(size)}")
    objectToWorld = _matrix(roiNode.GetObjectToWorldMatrix())
    corners = np.array([[sx * size[0] / 2, sy * size[1] / 2, sz * size[2] / 2, 1.0]
                        for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]).T
    worldToIjk = np.linalg.inv(ijkToRas(volumeNode, world=True))
    ijk = (worldToIjk @ objectToWorld @ corners)[:3]
    low, high = ijk.min(axis=1), ijk.max(axis=1)
    dims = np.array(volumeNode.GetImageData().GetDimensions())  # i, j, k
    if np.any(high < -0.5) or np.any(low > dims - 0.5):
        raise GeometryError(f"ROI '{roiNode.GetName()}' lies outside volume '{volumeNode.GetName()}'; "
                            "move it onto the lesion")
    tolerance = 1e-3
    first = np.array([math.ceil(v - tolerance) for v in low])
    last = np.array([math.floor(v + tolerance) for v in high])
    thin = first > last
    centre = np.rint((low + high) / 2).astype(int)
    first[thin], last[thin] = centre[thin], centre[thin]
    first = np.clip(first, 0, dims - 1)
    last = np.clip(last, 0, dims - 1)
    return tuple(int(v) for v in (*first, *last))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- tables

def _fillTable(tableNode, columns: list[tuple[str, str, str]], rows: list[tuple]) -> None:
    """columns: (name, 'string' | 'double' | 'int', unit)."""
    table = tableNode.GetTable()
    wasModified = tableNode.StartModify()
    try:
        tableNode.RemoveAllColumns()
        for name, kind, unit in columns:
            array = {"string": vtk.vtkStringArray, "double": vtk.vtkDoubleArray, "int": vtk.vtkIntArray}[kind]()
            array.SetName(name)
            tableNode.AddColumn(array)
            if unit:
                tableNode.SetColumnUnitLabel(name, unit)
        table.SetNumberOfRows(len(rows))
        for row, values in enumerate(rows):
            for column, value in enumerate(values):
                table.SetValue(row, column, vtk.vtkVariant(value))
        table.Modified()
    finally:
        tableNode.EndModify(wasModified)


def segmentVolumes(segmentationNode, referenceVolumeNode) -> dict[str, float]:
    """Volume in ml of each of this module's segments (by segment name) and, for BraTS labels, of the
    evaluation regions WT, TC, ET (unions of the segments, overlaps counted once)."""
    voxelMl = voxelVolumeMl(referenceVolumeNode)
    volumes: dict[str, float] = {}
    masks: dict[int, np.ndarray] = {}
    labelSet = None
    segmentation = segmentationNode.GetSegmentation()
    for segmentId, labelSet, value in resultSegments(segmentationNode):
        mask = segmentMask(segmentationNode, segmentId, referenceVolumeNode)
        masks[value] = mask
        volumes[segmentation.GetSegment(segmentId).GetName()] = float(mask.sum()) * voxelMl
    if labelSet == "brats":
        for region, values in REGIONS.items():
            union = np.zeros(volumeShape(referenceVolumeNode), dtype=bool)
            for value in values:
                if value in masks:
                    union |= masks[value]
            volumes[region] = float(union.sum()) * voxelMl
    return volumes


def fillVolumesTable(tableNode, volumes: Mapping[str, float], voxelMl: float) -> None:
    rows = [(name, round(ml, 3), int(round(ml / voxelMl))) for name, ml in volumes.items()]
    _fillTable(tableNode, [("Segment", "string", ""), ("Volume", "double", "ml"), ("Voxels", "int", "")], rows)


def fillCaseWeightsTable(tableNode, caseWeights: Mapping[str, Mapping[str, float]]) -> None:
    """SOFA's per-sub-region modality attention, MoME's expert gate...: one row per (group, name)."""
    rows = [(group, name, float(weight)) for group, weights in caseWeights.items() for name, weight in weights.items()]
    _fillTable(tableNode, [("Group", "string", ""), ("Modality or expert", "string", ""), ("Weight", "double", "")],
               rows)


def tableRows(tableNode) -> list[tuple]:
    """The table's rows as tuples of Python values (for tests and the batch summary)."""
    table = tableNode.GetTable()
    rows = []
    for row in range(table.GetNumberOfRows()):
        values = []
        for column in range(table.GetNumberOfColumns()):
            variant = table.GetValue(row, column)
            values.append(variant.ToString() if table.GetColumn(column).IsA("vtkStringArray") else variant.ToDouble())
        rows.append(tuple(values))
    return rows
