"""What one page works on, without a web server: the case and its volume nodes, the modality
inputs, Segment / Refine as background jobs of the module's ``SegmentationLogic``, the result shown
in the views (with the uncertainty map of mirror test-time augmentation as a slice-view layer, when
asked for), the refinement box (an ROI markup) and Save.

Everything that touches MRML runs on the caller's thread (the trame event loop, or a test); only
the network runs in the logic's worker thread, and a job's result reaches the scene only through
``finish`` - so a failed or cancelled job leaves the scene as it was.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from BrainLesionSAMLib.conventions import LABEL_COLORS, MODALITIES, MODALITY_DISPLAY_NAMES
from BrainLesionSAMLib.errors import BrainLesionSAMError, GeometryError, InputImageError, OutputPathError
from BrainLesionSAMLib.io import (IMAGE_SUFFIXES, LABEL_PATTERN, check_writable, discover_case, read_image,
                                  write_image)
from BrainLesionSAMSlicer import mrml
from BrainLesionSAMSlicer.logic import (CASE_WEIGHTS_TABLE_ROLE, UNCERTAINTY_ROLE, VOLUMES_TABLE_ROLE, MethodInfo,
                                        SegmentationLogic)

# Display of the result: fixed opacities (and the BraTS colours of the label set, set again on
# every result) so that two screenshots of the same result are comparable.
FILL_OPACITY_2D = 0.5
OUTLINE_OPACITY_2D = 1.0
UNCERTAINTY_OPACITY = 0.6  # the uncertainty map over the background volume (foreground layer)
ROI_COLOR = (0.2, 0.6, 1.0)
BACKGROUND_PREFERENCE = ("flair", "t1ce", "t2", "t1")


class FilesExistError(OutputPathError):
    """Save would replace files: the page asks before calling ``save(..., overwrite=True)``."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        names = ", ".join(p.name for p in self.paths)
        super().__init__(f"{names} already exist{'s' if len(self.paths) == 1 else ''} in {self.paths[0].parent}; "
                         "confirm to overwrite, or choose another folder or name")


@dataclass(frozen=True)
class VolumeRow:
    name: str
    ml: float
    voxels: int
    color: str | None  # '#rrggbb' of a segment; None for the BraTS regions WT / TC / ET


def _hex(color: Iterable[float]) -> str:
    return "#" + "".join(f"{int(round(255 * max(0.0, min(1.0, c)))):02x}" for c in color)


def is_label_file(name: str) -> bool:
    stem = name.lower().split(".")[0]
    return any(re.fullmatch(LABEL_PATTERN, token) for token in re.split(r"[_\-. ]+", stem))


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def volume_name(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class WebSession:
    """The state behind one page. ``slicer_app`` is a ``trame_slicer.core.SlicerApp`` whose view
    manager creates the views (remote views in the page, off-screen views in tests)."""

    def __init__(self, slicer_app, data_dir: str | Path | None = None, logic: SegmentationLogic | None = None):
        self.app = slicer_app
        self.scene = slicer_app.scene
        mrml.ensureSegmentationConverterRules()
        self.logic = logic or SegmentationLogic(self.scene)
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else None
        self.case_name = ""
        self.volume_ids: list[str] = []
        self.inputs: dict[str, str | None] = {key: None for key in MODALITIES}
        self.background_id: str | None = None
        self.segmentation = None
        self.outcome = None
        self.roi = None
        self.last_method = ""
        self.uncertainty_visible = True

    # ------------------------------------------------------------------ cases and volumes
    def list_cases(self) -> list[str]:
        """Sub-folders of the data folder holding at least one volume named after a modality."""
        if self.data_dir is None or not self.data_dir.is_dir():
            return []
        cases = []
        for folder in sorted(p for p in self.data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                found = discover_case(folder)
            except (BrainLesionSAMError, OSError):
                continue
            if any(key in found for key in MODALITIES):
                cases.append(folder.name)
        return cases

    def case_folder(self, name: str) -> Path:
        if self.data_dir is None:
            raise InputImageError("no case folder was given: start with --data DIR, or open the four files")
        if name not in self.list_cases():
            raise InputImageError(f"'{name}' is not a case folder of {self.data_dir}")
        return self.data_dir / name

    def load_case(self, name: str) -> list[str]:
        folder = self.case_folder(name)
        files = [path for key, path in discover_case(folder).items() if key in MODALITIES]
        return self.load_files(files, case_name=name)

    def load_uploaded(self, files: Sequence[dict]) -> list[str]:
        """Files sent by the page (trame file dicts: name, content): written to a private temporary
        folder only for reading, which is removed right after. Label files (seg, label, mask) and
        non-image files are skipped."""
        from trame.app.file_upload import ClientFile

        with tempfile.TemporaryDirectory(prefix="brainlesionsam-upload-") as folder:
            paths = []
            for entry in files:
                client = ClientFile(entry)
                name = Path(str(client.name or "")).name  # never a path from the client
                if not is_image_file(name) or is_label_file(name):
                    continue
                path = Path(folder) / name
                if path.exists():
                    raise InputImageError(f"two uploaded files are named {name}; upload one of them")
                path.write_bytes(client.content or b"")
                paths.append(path)
            if not paths:
                names = ", ".join(Path(str(ClientFile(f).name)).name for f in files) or "nothing"
                raise InputImageError(f"no image volume among the uploaded files ({names}); upload NIfTI "
                                      "(.nii, .nii.gz), NRRD or MHA volumes")
            common = _common_case_name([volume_name(p) for p in paths])
            return self.load_files(paths, case_name=common)

    def load_files(self, paths: Sequence[str | Path], case_name: str | None = None) -> list[str]:
        """Read every volume first (a bad file changes nothing), then replace the current case.
        Returns the new volume node ids; modalities are assigned by the file names."""
        if self.logic.busy:
            raise BrainLesionSAMError("a segmentation is running; cancel it before loading another case")
        paths = [Path(p) for p in paths]
        if not paths:
            raise InputImageError("no volume to load")
        images = [(path, read_image(path, what=path.name)) for path in paths]
        self.clear()
        nodes = [mrml.addVolumeNodeFromImage(self.scene, image, volume_name(path)) for path, image in images]
        self.volume_ids = [node.GetID() for node in nodes]
        guessed = mrml.guessInputVolumes(self.scene, nodes)
        self.inputs = {key: (guessed[key].GetID() if key in guessed else None) for key in MODALITIES}
        self.case_name = case_name or volume_name(paths[0])
        background = next((self.inputs[k] for k in BACKGROUND_PREFERENCE if self.inputs[k]), self.volume_ids[0])
        self.show_background(background)
        self.reset_views()
        return list(self.volume_ids)

    def clear(self) -> None:
        """Remove the case: volumes, result and its tables, box."""
        self.remove_box()
        self._remove_segmentation(self.segmentation)
        self.show_background(None)
        for node_id in self.volume_ids:
            node = self.scene.GetNodeByID(node_id)
            if node is not None:
                self.scene.RemoveNode(node)
        self.volume_ids = []
        self.inputs = {key: None for key in MODALITIES}
        self.segmentation = self.outcome = None
        self.background_id = None
        self.case_name = ""
        if not self.logic.busy:
            self.logic.clearCaches()  # the old case's preprocessed volumes and embeddings

    def volumes(self) -> list[tuple[str, str]]:
        """(node id, name) of the case's volumes, in load order."""
        return [(node_id, self.scene.GetNodeByID(node_id).GetName()) for node_id in self.volume_ids
                if self.scene.GetNodeByID(node_id) is not None]

    def set_input(self, modality: str, node_id: str | None) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality '{modality}'")
        if node_id and node_id not in self.volume_ids:
            raise InputImageError(f"volume {node_id} is not part of the case")
        self.inputs[modality] = node_id or None

    def input_nodes(self) -> dict[str, Any]:
        return {key: self.scene.GetNodeByID(node_id) for key, node_id in self.inputs.items() if node_id}

    def reference_node(self):
        if self.segmentation is not None:
            node = self.segmentation.GetNodeReference(self.segmentation.GetReferenceImageGeometryReferenceRole())
            if node is not None:
                return node
        nodes = self.input_nodes()
        return next((nodes[k] for k in ("t1ce", "flair", "t2", "t1") if k in nodes), None)

    # ------------------------------------------------------------------ views
    def slice_views(self):
        return self.app.view_manager.get_slice_views()

    def views(self):
        return self.app.view_manager.get_views()

    def show_background(self, node_id: str | None) -> None:
        node = self.scene.GetNodeByID(node_id) if node_id else None
        self.background_id = node.GetID() if node is not None else None
        self.app.display_manager.show_volume_in_slice_background(node)
        self._show_uncertainty_layer()

    def uncertainty_node(self):
        """The result's uncertainty map (a scalar volume node), or None: segmented without it."""
        node = self.segmentation.GetNodeReference(UNCERTAINTY_ROLE) if self.segmentation is not None else None
        return node if node is not None and node.GetScene() is self.scene else None

    def show_uncertainty(self, visible: bool) -> None:
        """Show (or hide) the uncertainty map as the slice views' foreground layer."""
        self.uncertainty_visible = bool(visible)
        self._show_uncertainty_layer()

    def _show_uncertainty_layer(self) -> None:
        node = self.uncertainty_node() if self.uncertainty_visible else None
        self.app.display_manager.show_volume_in_slice_foreground(node)
        for view in self.slice_views():
            view.set_foreground_opacity(UNCERTAINTY_OPACITY if node is not None else 0.0)
            view.schedule_render()

    def reset_views(self) -> None:
        for view in self.slice_views():
            view.set_visible_in_3d(True)
        for view in self.views():
            view.reset_view()
        for view in self.app.view_manager.get_threed_views():
            self._oblique(view)

    @staticmethod
    def _oblique(view, elevation: float = 30.0, azimuth: float = 30.0) -> None:
        """From anterior (trame-slicer's reset) to anterior-superior-left, so that the slices and the
        lesion are not seen edge-on."""
        node = view.get_camera_node()
        if node is None:
            return
        camera = node.GetCamera()
        camera.Elevation(elevation)
        camera.OrthogonalizeViewUp()
        camera.Azimuth(azimuth)
        node.ResetClippingRange()
        view.schedule_render()

    def centre_views_on(self, ras: Sequence[float]) -> None:
        """Put the RAS point at the centre of every slice view (and their slices through it)."""
        for view in self.slice_views():
            node = view.get_view_node()
            node.JumpSliceByCentering(float(ras[0]), float(ras[1]), float(ras[2]))
            view.schedule_render()
        for view in self.app.view_manager.get_threed_views():
            view.reset_focal_point()
            view.schedule_render()

    def dump_views(self, folder: str | Path, prefix: str) -> dict[str, Path]:
        from .rendering import dump_view_png

        folder = Path(folder)
        return {view.get_singleton_tag(): dump_view_png(view, folder / f"{prefix}_{view.get_singleton_tag()}.png")
                for view in self.views()}

    # ------------------------------------------------------------------ methods and their checks
    def methods(self) -> list[MethodInfo]:
        return self.logic.methods()

    def method_info(self, name: str) -> MethodInfo:
        return self.logic.methodInfo(name)

    def has_box(self) -> bool:
        return self.roi is not None and self.roi.GetScene() is self.scene and self._roi_placed()

    def _roi_placed(self) -> bool:
        """Both corners clicked: the box has a size and the views are no longer placing it (while
        the second corner is pending, the box follows the mouse with a size already)."""
        return (self.roi.GetNumberOfDefinedControlPoints() > 0 and min(self.roi.GetSize()) > 0
                and not self.placing_box())

    def placing_box(self) -> bool:
        interaction = self.app.markups_logic.interaction_node
        return (self.roi is not None and interaction is not None
                and interaction.GetCurrentInteractionMode() == interaction.Place)  # only the box is placed here

    def box_hint(self) -> str:
        """What the user does next while placing the box ('' when there is no box being placed)."""
        if self.roi is None or self.has_box():
            return ""
        if self.roi.GetNumberOfDefinedControlPoints() == 0:
            return "click one corner of the box in a slice view"
        return "click the opposite corner"

    def segment_problem(self, method: str) -> str:
        """'' when Segment can run, else why not (shown beside the disabled button)."""
        if not self.volume_ids:
            return "load a case first"
        if not method:
            return "choose a method"
        info = self.method_info(method)
        if info.weightsProblem:
            return f"{method} ships no trained weights yet; choose another method (or run it from the command line with --weights FILE)"
        problem = info.modalityProblem([k for k, v in self.inputs.items() if v])
        if problem:
            return problem
        if info.requiresBox and not self.has_box():
            return f"{method} segments only inside a box: click Draw box and drag it around the lesion"
        return ""

    def refine_problem(self, method: str, segment_id: str | None) -> str:
        if self.segmentation is None:
            return "segment first: refinement changes an existing result"
        if not method:
            return "choose a method for the refinement"
        info = self.method_info(method)
        if info.weightsProblem:
            return f"{method} ships no trained weights yet; choose another method for the refinement"
        if not info.promptable:
            return f"{method} takes no box prompt; choose a promptable method"
        problem = info.modalityProblem([k for k, v in self.inputs.items() if v])
        if problem:
            return problem
        if not self.has_box():
            return "click Draw box and drag a box around the part to refine"
        if not segment_id or self.segmentation.GetSegmentation().GetSegment(segment_id) is None:
            return "choose the segment to refine"
        return ""

    # ------------------------------------------------------------------ jobs
    def start_segment(self, method: str, device: str = "auto", uncertainty: bool = False):
        """A started Job (worker thread); the caller polls it and calls :meth:`finish`. ``uncertainty``:
        mirror test-time augmentation (about twice the time), its map shown as a layer."""
        problem = self.segment_problem(method)
        if problem:
            raise BrainLesionSAMError(problem)
        info = self.method_info(method)
        box = self.roi if (info.promptable and self.has_box()) else None
        self.last_method = method
        return self.logic.process(self.input_nodes(), method, device=device, box=box, waitForCompletion=False,
                                  uncertainty=uncertainty)

    def start_refine(self, method: str, segment_id: str, device: str = "auto"):
        problem = self.refine_problem(method, segment_id)
        if problem:
            raise BrainLesionSAMError(problem)
        return self.logic.refine(self.input_nodes(), method, self.segmentation, segment_id, self.roi,
                                 device=device, waitForCompletion=False)

    def finish(self, job, kind: str):
        """Apply a done job to the scene (raises its error, CancelledError after a cancel; the scene is
        then unchanged) and show the result."""
        outcome = job.finish()
        if kind == "segment" and self.segmentation is not None and self.segmentation is not outcome.segmentationNode:
            self._remove_segmentation(self.segmentation)
        self.segmentation = outcome.segmentationNode
        self.outcome = outcome
        self._style_result()
        self._show_uncertainty_layer()
        if kind == "segment":
            self._centre_on_result(outcome)
        return outcome

    def _remove_segmentation(self, node) -> None:
        if node is None or node.GetScene() is not self.scene:
            return
        for role in (VOLUMES_TABLE_ROLE, CASE_WEIGHTS_TABLE_ROLE, UNCERTAINTY_ROLE):
            table = node.GetNodeReference(role)
            if table is not None:
                self.scene.RemoveNode(table)
        self.scene.RemoveNode(node)

    def _style_result(self) -> None:
        node = self.segmentation
        segmentation = node.GetSegmentation()
        for segment_id, label_set, value in mrml.resultSegments(node):
            segmentation.GetSegment(segment_id).SetColor(*LABEL_COLORS[label_set][value])
        display = node.GetDisplayNode()
        if display is None:
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
        display.SetVisibility(True)
        display.SetOpacity2DFill(FILL_OPACITY_2D)
        display.SetOpacity2DOutline(OUTLINE_OPACITY_2D)
        display.SetOpacity3D(1.0)
        node.CreateClosedSurfaceRepresentation()
        for view in self.views():
            view.schedule_render()

    def _centre_on_result(self, outcome) -> None:
        labels = sitk.GetArrayFromImage(outcome.result.labels)
        kji = np.argwhere(labels > 0)
        if not len(kji):
            return
        centre_ijk = kji.mean(axis=0)[::-1]
        reference = self.reference_node()
        ras = mrml.ijkToRas(reference) @ np.append(centre_ijk, 1.0)
        self.centre_views_on(ras[:3])

    def segments(self) -> list[tuple[str, str, str]]:
        """(segment id, name, '#rrggbb') of the result's segments, in label order."""
        if self.segmentation is None:
            return []
        segmentation = self.segmentation.GetSegmentation()
        return [(sid, segmentation.GetSegment(sid).GetName(), _hex(segmentation.GetSegment(sid).GetColor()))
                for sid, _, _ in mrml.resultSegments(self.segmentation)]

    def volume_rows(self) -> list[VolumeRow]:
        """The lesion-volume table (the result's table node): segments, then the BraTS regions."""
        if self.segmentation is None:
            return []
        table = self.segmentation.GetNodeReference(VOLUMES_TABLE_ROLE)
        colours = {name: colour for _, name, colour in self.segments()}
        return [VolumeRow(str(name), float(ml), int(voxels), colours.get(str(name)))
                for name, ml, voxels in (mrml.tableRows(table) if table is not None else [])]

    # ------------------------------------------------------------------ the box
    def start_box(self):
        """A new ROI in place mode: the user clicks two opposite corners in a slice view, then drags
        its handles; any previous box is removed."""
        if not self.volume_ids:
            raise BrainLesionSAMError("load a case first")
        self.remove_box()
        roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Refinement box")
        roi.CreateDefaultDisplayNodes()
        display = roi.GetDisplayNode()
        display.SetSelectedColor(*ROI_COLOR)
        display.SetColor(*ROI_COLOR)
        display.SetHandlesInteractive(True)
        display.SetPropertiesLabelVisibility(False)  # the panel names it; a label would hide the lesion
        self.roi = roi
        self.app.markups_logic.place_node(roi, persistent=False)
        return roi

    def remove_box(self) -> None:
        if self.roi is not None and self.roi.GetScene() is self.scene:
            self.scene.RemoveNode(self.roi)
        self.roi = None
        interaction = self.app.markups_logic.interaction_node
        if interaction is not None:
            self.app.markups_logic.disable_place_mode()

    def box_voxels(self) -> tuple[int, ...] | None:
        """The box as inclusive reference voxel indices (x0, y0, z0, x1, y1, z1), None while there is
        none; raises GeometryError when it lies outside the volume."""
        if not self.has_box():
            return None
        reference = self.reference_node()
        if reference is None:
            return None
        return mrml.roiToBox(self.roi, reference)

    # ------------------------------------------------------------------ saving
    def default_output_name(self) -> str:
        base = self.case_name or "segmentation"
        method = self.outcome.method if self.outcome is not None else ""
        return f"{base}_{method}" if method else base

    @staticmethod
    def output_paths(folder: str | Path, name: str) -> tuple[Path, Path]:
        name = (name or "").strip()
        for suffix in (".seg.nrrd", ".nii.gz", ".nii"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise OutputPathError(f"'{name}' is not a usable file name; use letters, digits, '_' or '-'")
        folder = Path(str(folder or "")).expanduser()
        if not str(folder):
            raise OutputPathError("choose the folder to save into")
        return folder / f"{name}.seg.nrrd", folder / f"{name}.nii.gz"

    def save(self, folder: str | Path, name: str, overwrite: bool = False) -> list[Path]:
        """Write the result as ``<name>.seg.nrrd`` (segments with names, colours, terminology) and
        ``<name>.nii.gz`` (BraTS 2021 labels on the reference grid), and its uncertainty map, if any, as
        ``<name>_uncertainty.nii.gz``. Existing files are replaced only with ``overwrite`` (the page's
        confirmation): otherwise FilesExistError, nothing written."""
        if self.segmentation is None:
            raise BrainLesionSAMError("nothing to save yet: segment first")
        segmentation_path, labels_path = self.output_paths(folder, name)
        uncertainty = self.uncertainty_node()
        uncertainty_path = labels_path.with_name(labels_path.name[:-len(".nii.gz")] + "_uncertainty.nii.gz")
        paths = [segmentation_path, labels_path] + ([uncertainty_path] if uncertainty is not None else [])
        existing = [p for p in paths if p.exists()]
        if existing and not overwrite:
            raise FilesExistError(existing)
        folder = segmentation_path.parent
        if not folder.exists():
            try:
                folder.mkdir(parents=True)
            except OSError as error:
                raise OutputPathError(f"cannot create {folder} ({error.strerror}); choose another folder") from None
        for path in paths:
            check_writable(path, overwrite=True)
        reference = self.reference_node()
        labels, _ = mrml.labelsFromSegmentation(self.segmentation, reference)
        image = sitk.GetImageFromArray(labels)
        image.CopyInformation(mrml.imageFromVolumeNode(reference))
        write_image(image, labels_path)
        if uncertainty is not None:
            write_image(mrml.imageFromVolumeNode(uncertainty), uncertainty_path)
        mrml.writeSegmentationFile(self.segmentation, segmentation_path, overwrite=True)
        return paths


def _common_case_name(names: Sequence[str]) -> str:
    """'BraTS_001' for BraTS_001_t1, BraTS_001_flair, ... (the shared prefix without its separator)."""
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix.rstrip("_-. ")
    return prefix or names[0]


def modality_label(key: str) -> str:
    return MODALITY_DISPLAY_NAMES[key]


__all__ = ["FilesExistError", "GeometryError", "VolumeRow", "WebSession", "modality_label"]
