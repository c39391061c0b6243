"""The page: trame-slicer's four views and the Segment panel, wired to a :class:`WebSession`.

The trame server runs one asyncio loop on the main thread; every MRML change happens there. A
Segment or Refine job runs in the logic's worker thread; :meth:`WebApp._watch` polls it from the
loop (progress bar, Cancel) and applies the result with ``session.finish`` when it is done, so the
views keep streaming while the network runs. One job at a time: the logic refuses a second one and
the page disables the buttons.

``phase`` (also the page's ``data-phase`` attribute on ``#blsam-panel``) says what the page is doing:
'idle' (ready), 'loading', 'segmenting', 'refining', 'placing-box', 'saving', 'confirm-overwrite'.
"""
from __future__ import annotations

import asyncio
import logging
import traceback
from pathlib import Path

from BrainLesionSAMLib.conventions import MODALITIES, MODALITY_DISPLAY_NAMES
from BrainLesionSAMLib.errors import BrainLesionSAMError, CancelledError
from BrainLesionSAMLib.methods import DEFAULT_METHOD

from .rendering import disable_multisampling
from .session import FilesExistError, WebSession

logger = logging.getLogger(__name__)

LAYOUT_ID = "BrainLesionSAM four views"
POLL_S = 0.2


def four_view_layout():
    """Axial | 3D over sagittal | coronal (Slicer's Four-Up arrangement)."""
    from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

    return Layout(LayoutDirection.Vertical, [
        Layout(LayoutDirection.Horizontal, [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.threed_view()]),
        Layout(LayoutDirection.Horizontal, [ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.coronal_view()]),
    ])


class WebApp:
    def __init__(self, server=None, data_dir: str | Path | None = None, output_dir: str | Path | None = None):
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        self.server = server or get_server(client_type="vue3")
        self.server.enable_module(trame_slicer_module)  # its chunked file upload
        self.state, self.ctrl = self.server.state, self.server.controller
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout(LAYOUT_ID, four_view_layout())
        self.layout_manager.set_layout(LAYOUT_ID)
        disable_multisampling(self.slicer_app.view_manager.get_views())  # before the first render

        self.session = WebSession(self.slicer_app, data_dir)
        self.job = None
        self.job_kind = ""
        self._roi_observer = None
        self._initial_state(output_dir)
        self._build_ui()
        # Placing a box ends with the interaction node leaving Place mode, after the ROI's last change.
        interaction = self.slicer_app.markups_logic.interaction_node
        interaction.AddObserver("ModifiedEvent", self._on_roi_modified)

    # ------------------------------------------------------------------ state
    def _initial_state(self, output_dir) -> None:
        session = self.session
        methods = session.methods()
        devices, device_summary = session.logic.devices()
        default_method = DEFAULT_METHOD if any(m.name == DEFAULT_METHOD for m in methods) else (methods[0].name if methods else "")
        promptable = [m for m in methods if m.promptable and not m.weightsProblem]
        self.state.update({
            "trame__title": "BrainLesionSAM",
            "phase": "idle",
            "error": "",
            "message": "",
            "cases": session.list_cases(),
            "case_name": None,
            "data_dir": str(session.data_dir) if session.data_dir else "",
            "loaded_case": "",
            "volumes": [],
            "background_id": None,
            **{f"input_{key}": None for key in MODALITIES},
            "methods": [{"title": f"{m.name} - {m.title}" + (" (no weights ship)" if m.weightsProblem else ""),
                         "value": m.name} for m in methods],
            "method": default_method,
            "method_modalities": "",
            "segment_problem": "load a case first",
            "devices": [{"title": label, "value": key} for key, label in devices],
            "device": "auto",
            "device_summary": device_summary,
            "uncertainty": False,
            "has_uncertainty": False,
            "show_uncertainty": True,
            "running": False,
            "progress": 0,
            "progress_message": "",
            "volume_rows": [],
            "segments": [],
            "refine_segment": None,
            "refine_methods": [{"title": f"{m.name} - {m.title}", "value": m.name} for m in promptable],
            "refine_method": next((m.name for m in promptable if m.name == "litemedsam"),
                                  promptable[0].name if promptable else ""),
            "refine_problem": "segment first: refinement changes an existing result",
            "box_text": "",
            "box_dragging": False,
            "save_folder": str(Path(output_dir or Path.cwd() / "brainlesionsam-web-output").expanduser()),
            "save_name": "",
            "confirm_files": [],
            "saved_paths": [],
            "last_seconds": None,
        })
        for key in MODALITIES:
            self.state.change(f"input_{key}")(self._make_input_handler(key))
        self.state.change("method", "refine_method", "refine_segment")(lambda **_: self._update_checks())
        self.state.change("background_id")(self._on_background)
        self.state.change("show_uncertainty")(lambda show_uncertainty=True, **_: self.session.show_uncertainty(show_uncertainty))

    def _make_input_handler(self, key: str):
        def handler(**_):
            if self.state.phase in ("loading",):
                return
            node_id = self.state[f"input_{key}"]
            try:
                self.session.set_input(key, node_id)
            except BrainLesionSAMError as error:
                self._show_error(error)
            self._update_checks()
        return handler

    def _on_background(self, background_id=None, **_):
        if background_id and background_id != self.session.background_id and background_id in self.session.volume_ids:
            self.session.show_background(background_id)

    def _update_checks(self) -> None:
        session, state = self.session, self.state
        method = state.method or ""
        try:
            info = session.method_info(method) if method else None
            state.method_modalities = info.modalitiesText() if info else ""
            state.segment_problem = session.segment_problem(method)
            state.refine_problem = session.refine_problem(state.refine_method or "", state.refine_segment)
        except BrainLesionSAMError as error:
            state.segment_problem = state.refine_problem = str(error)
        try:
            box = session.box_voxels()
        except BrainLesionSAMError as error:
            box, state.refine_problem = None, str(error)
        if box is not None:
            x0, y0, z0, x1, y1, z1 = box
            state.box_text = (f"x {x0}-{x1}, y {y0}-{y1}, z {z0}-{z1} "
                              f"({x1 - x0 + 1} x {y1 - y0 + 1} voxels, {z1 - z0 + 1} slices)")
        elif session.roi is not None:
            state.box_text = session.box_hint()
        else:
            state.box_text = ""

    def _refresh_result(self) -> None:
        session, state = self.session, self.state
        state.volume_rows = [{"name": row.name, "ml": f"{row.ml:.2f}", "voxels": row.voxels,
                              "color": row.color or ""} for row in session.volume_rows()]
        segments = session.segments()
        state.segments = [{"title": name, "value": sid} for sid, name, _ in segments]
        ids = [sid for sid, _, _ in segments]
        if state.refine_segment not in ids:
            largest = max(session.volume_rows()[: len(ids)], key=lambda row: row.ml, default=None)
            state.refine_segment = next((sid for sid, name, _ in segments if largest and name == largest.name), None)
        state.save_name = state.save_name or session.default_output_name()
        state.has_uncertainty = session.uncertainty_node() is not None

    def _show_error(self, error: BaseException) -> None:
        self.state.error = str(error) if isinstance(error, BrainLesionSAMError) else \
            f"{type(error).__name__}: {error}"
        if not isinstance(error, BrainLesionSAMError):
            logger.error("unexpected error\n%s", "".join(traceback.format_exception(error)))

    # ------------------------------------------------------------------ loading
    def load_case(self) -> None:
        name = self.state.case_name
        if not name:
            self.state.error = "choose a case first"
            return
        self._load(lambda: self.session.load_case(name))

    def _load(self, load) -> None:
        state = self.state
        state.error = state.message = ""
        state.phase = "loading"
        state.flush()
        try:
            load()
        except BrainLesionSAMError as error:
            self._show_error(error)
        except Exception as error:  # noqa: BLE001 - shown in the page; the server keeps running
            self._show_error(error)
        finally:
            self._after_load()

    def _after_load(self) -> None:
        session, state = self.session, self.state
        self._observe_roi(None)
        state.volumes = [{"title": name, "value": node_id} for node_id, name in session.volumes()]
        state.phase = "idle"
        for key in MODALITIES:
            state[f"input_{key}"] = session.inputs[key]
        state.background_id = session.background_id
        state.loaded_case = session.case_name
        state.volume_rows, state.segments, state.refine_segment = [], [], None
        state.has_uncertainty = False
        state.saved_paths, state.save_name = [], ""
        if session.volume_ids:
            assigned = [MODALITY_DISPLAY_NAMES[k] for k in MODALITIES if session.inputs[k]]
            state.message = (f"loaded {session.case_name}: {len(session.volume_ids)} volume(s); "
                             f"assigned by name: {', '.join(assigned) or 'none - choose them below'}")
        self._update_checks()

    # ------------------------------------------------------------------ jobs
    def segment(self) -> None:
        self._start("segment", lambda: self.session.start_segment(self.state.method, self.state.device,
                                                                  bool(self.state.uncertainty)))

    def refine(self) -> None:
        self._start("refine", lambda: self.session.start_refine(self.state.refine_method, self.state.refine_segment,
                                                                self.state.device))

    def _start(self, kind: str, start) -> None:
        state = self.state
        if self.job is not None:
            state.error = "a segmentation is already running; wait for it or cancel it"
            return
        state.error = state.message = ""
        try:
            self.job = start()
        except BrainLesionSAMError as error:
            self._show_error(error)
            return
        self.job_kind = kind
        state.running = True
        state.phase = "segmenting" if kind == "segment" else "refining"
        state.progress, state.progress_message = 0, "starting"
        asyncio.ensure_future(self._watch(self.job, kind))

    async def _watch(self, job, kind: str) -> None:
        state = self.state
        try:
            while not job.done:
                fraction, message = job.progress
                with state:
                    state.progress = round(100 * fraction, 1)
                    state.progress_message = message
                await asyncio.sleep(POLL_S)
            with state:
                try:
                    outcome = self.session.finish(job, kind)
                except CancelledError:
                    state.message = f"{kind} cancelled; nothing was changed"
                except BrainLesionSAMError as error:
                    self._show_error(error)
                except Exception as error:  # noqa: BLE001 - shown in the page; the scene is untouched
                    self._show_error(error)
                else:
                    seconds = job.elapsed
                    state.last_seconds = round(seconds, 2)
                    if kind == "segment":
                        state.message = f"segmented with {outcome.method} on {outcome.device} in {seconds:.1f} s"
                    else:
                        changed = outcome.changedVoxels or {}
                        state.message = (f"refined with {outcome.method} in {seconds:.1f} s: "
                                         f"{changed.get('added', 0)} voxels added, {changed.get('removed', 0)} removed")
                    self._refresh_result()
        finally:
            self.job = None
            with state:
                state.running = False
                state.progress = 0
                state.progress_message = ""
                state.phase = "placing-box" if self._placing() else "idle"
                self._update_checks()

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.state.progress_message = "cancelling..."

    # ------------------------------------------------------------------ the box
    def draw_box(self) -> None:
        state = self.state
        state.error = ""
        try:
            roi = self.session.start_box()
        except BrainLesionSAMError as error:
            self._show_error(error)
            return
        self._observe_roi(roi)
        if not state.running:
            state.phase = "placing-box"
        self._update_checks()

    def clear_box(self) -> None:
        self._observe_roi(None)
        self.session.remove_box()
        if not self.state.running:
            self.state.phase = "idle"
        self._update_checks()

    def _placing(self) -> bool:
        return self.session.placing_box()

    def _observe_roi(self, roi) -> None:
        if self._roi_observer is not None:
            node, tags = self._roi_observer
            for tag in tags:
                node.RemoveObserver(tag)
            self._roi_observer = None
        self.state.box_dragging = False
        if roi is not None:
            self._roi_observer = (roi, [
                roi.AddObserver("ModifiedEvent", self._on_roi_modified),
                roi.AddObserver(roi.PointStartInteractionEvent, lambda *_: self._set_dragging(True)),
                roi.AddObserver(roi.PointEndInteractionEvent, lambda *_: self._set_dragging(False)),
            ])

    def _set_dragging(self, dragging: bool) -> None:
        """A handle of the box is being dragged (``data-box-dragging`` on the panel)."""
        with self.state:
            self.state.box_dragging = dragging
            self._update_checks()

    def _on_roi_modified(self, *_):
        with self.state:
            if not self.state.running and self.state.phase in ("idle", "placing-box"):
                self.state.phase = "placing-box" if self._placing() else "idle"
            self._update_checks()

    # ------------------------------------------------------------------ saving
    def save(self, overwrite: bool = False) -> None:
        state = self.state
        state.error = state.message = ""
        state.confirm_files = []
        state.phase = "saving"
        state.flush()
        try:
            paths = self.session.save(state.save_folder, state.save_name, overwrite=overwrite)
        except FilesExistError as error:
            state.confirm_files = [str(p) for p in error.paths]
            state.phase = "confirm-overwrite"
            return
        except BrainLesionSAMError as error:
            self._show_error(error)
        else:
            state.saved_paths = [str(p) for p in paths]
            state.message = "saved " + ", ".join(p.name for p in paths)
        state.phase = "idle"

    def confirm_overwrite(self) -> None:
        self.save(overwrite=True)

    def cancel_overwrite(self) -> None:
        self.state.confirm_files = []
        self.state.phase = "idle"
        self.state.message = "not saved: nothing was overwritten"

    # ------------------------------------------------------------------ the page
    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import SinglePageWithDrawerLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v3
        from trame_slicer.app.ui import LoadVolumeUI

        busy = "running || phase === 'loading' || phase === 'saving'"
        with SinglePageWithDrawerLayout(self.server, width=400, theme="dark", full_height=True) as layout:
            self.ui = layout
            layout.title.set_text("BrainLesionSAM")
            with layout.toolbar:
                v3.VSpacer()
                html.Div("{{ device_summary }}", classes="text-caption text-medium-emphasis mr-4")
            with layout.drawer:
                with html.Div(id="blsam-panel", raw_attrs=[':data-phase="phase"', ':data-box-dragging="box_dragging"'], classes="pa-3 d-flex flex-column",
                              style="gap: 10px;"):
                    v3.VAlert(v_if="error", text=("error",), type="error", density="compact", closable=True,
                              id="blsam-error", click_close="error = ''")
                    v3.VAlert(v_if="message && !error", text=("message",), type="info", density="compact",
                              variant="tonal", id="blsam-message")

                    # -- input
                    html.Div("Case", classes="text-subtitle-2")
                    with html.Div(classes="d-flex align-center", style="gap: 6px;"):
                        v3.VSelect(label=("data_dir ? 'case in ' + data_dir : 'no --data folder'",),
                                   items=("cases",), v_model=("case_name",), density="compact", hide_details=True,
                                   id="blsam-case", disabled=(busy,))
                        v3.VBtn("Load", click=self.load_case, id="blsam-load", disabled=(f"!case_name || {busy}",),
                                variant="tonal")
                    with html.Div(classes="d-flex align-center text-caption", style="gap: 6px;"):
                        html.Span("or open the volumes (files or a folder):")
                        upload = LoadVolumeUI()
                        upload.on_load_volume.connect(self._on_uploaded)
                    html.Div("{{ loaded_case ? 'case: ' + loaded_case : 'no case loaded' }}",
                             classes="text-caption", id="blsam-loaded-case")
                    with v3.VRow(dense=True):
                        for key in MODALITIES:
                            with v3.VCol(cols=6):
                                v3.VSelect(label=MODALITY_DISPLAY_NAMES[key], items=("volumes",),
                                           v_model=(f"input_{key}",), clearable=True, density="compact",
                                           hide_details=True, id=f"blsam-input-{key}", disabled=(busy,))
                    v3.VSelect(label="shown in the slice views", items=("volumes",), v_model=("background_id",),
                               density="compact", hide_details=True, id="blsam-background")

                    # -- method and Segment
                    v3.VDivider()
                    html.Div("Segment", classes="text-subtitle-2")
                    v3.VSelect(label="method", items=("methods",), v_model=("method",), density="compact",
                               hide_details=True, id="blsam-method", disabled=(busy,))
                    html.Div("{{ method_modalities }}", classes="text-caption", id="blsam-method-modalities")
                    v3.VSelect(label="device", items=("devices",), v_model=("device",), density="compact",
                               hide_details=True, id="blsam-device", disabled=(busy,))
                    v3.VCheckbox(label="uncertainty map (mirror TTA, about twice the time)", v_model=("uncertainty",),
                                 density="compact", hide_details=True, id="blsam-uncertainty", disabled=(busy,))
                    with html.Div(classes="d-flex", style="gap: 6px;"):
                        v3.VBtn("Segment", click=self.segment, color="primary", id="blsam-segment",
                                disabled=(f"!!segment_problem || {busy}",))
                        v3.VBtn("Cancel", click=self.cancel, id="blsam-cancel", disabled=("!running",),
                                variant="tonal")
                    html.Div("{{ segment_problem }}", v_if="segment_problem", classes="text-caption text-warning",
                             id="blsam-segment-problem")
                    with html.Div(v_if="running"):
                        v3.VProgressLinear(model_value=("progress",), height=8, color="primary", id="blsam-progress")
                        html.Div("{{ progress_message }} ({{ Math.round(progress) }} %)", classes="text-caption")

                    # -- result
                    with html.Div(v_if="volume_rows.length"):
                        html.Div("Lesion volumes", classes="text-subtitle-2")
                        with v3.VTable(density="compact", id="blsam-volumes"):
                            with html.Thead():
                                with html.Tr():
                                    html.Th("segment")
                                    html.Th("ml", classes="text-right")
                                    html.Th("voxels", classes="text-right")
                            with html.Tbody():
                                with html.Tr(v_for="row in volume_rows", key="row.name",
                                             raw_attrs=[':data-segment="row.name"']):
                                    with html.Td():
                                        html.Span(v_if="row.color", classes="mr-2",
                                                  style=("{display: 'inline-block', width: '12px', height: '12px', "
                                                         "background: row.color, borderRadius: '2px'}",))
                                        html.Span("{{ row.name }}")
                                    html.Td("{{ row.ml }}", classes="text-right blsam-ml")
                                    html.Td("{{ row.voxels }}", classes="text-right")

                    v3.VSwitch(v_if="has_uncertainty", label="show the uncertainty map (0-1, heat colours)",
                               v_model=("show_uncertainty",), density="compact", hide_details=True, color="primary",
                               id="blsam-show-uncertainty")

                    # -- box refinement
                    v3.VDivider()
                    html.Div("Box refinement", classes="text-subtitle-2")
                    with html.Div(classes="d-flex", style="gap: 6px;"):
                        v3.VBtn("Draw box", click=self.draw_box, id="blsam-draw-box", variant="tonal",
                                disabled=("!volumes.length || phase === 'loading'",))
                        v3.VBtn("Remove box", click=self.clear_box, id="blsam-clear-box", variant="text",
                                disabled=("!box_text",))
                    html.Div("{{ box_text }}", v_if="box_text", classes="text-caption", id="blsam-box")
                    v3.VSelect(label="segment to refine", items=("segments",), v_model=("refine_segment",),
                               density="compact", hide_details=True, id="blsam-refine-segment", disabled=(busy,))
                    v3.VSelect(label="promptable method", items=("refine_methods",), v_model=("refine_method",),
                               density="compact", hide_details=True, id="blsam-refine-method", disabled=(busy,))
                    v3.VBtn("Refine", click=self.refine, color="primary", id="blsam-refine",
                            disabled=(f"!!refine_problem || {busy}",))
                    html.Div("{{ refine_problem }}", v_if="refine_problem", classes="text-caption text-warning",
                             id="blsam-refine-problem")

                    # -- save
                    v3.VDivider()
                    html.Div("Save", classes="text-subtitle-2")
                    v3.VTextField(label="folder (on the server)", v_model=("save_folder",), density="compact",
                                  hide_details=True, id="blsam-save-folder")
                    v3.VTextField(label="name (.seg.nrrd and .nii.gz)", v_model=("save_name",), density="compact",
                                  hide_details=True, id="blsam-save-name")
                    v3.VBtn("Save", click=self.save, id="blsam-save", variant="tonal",
                            disabled=(f"!volume_rows.length || {busy}",))
                    with html.Div(v_if="saved_paths.length", classes="text-caption", id="blsam-saved"):
                        html.Div("{{ path }}", v_for="path in saved_paths", key="path")

                    with v3.VDialog(model_value=("confirm_files.length > 0",), persistent=True, max_width=520):
                        with v3.VCard(title="Overwrite?", id="blsam-confirm"):
                            with v3.VCardText():
                                html.Div("These files exist already:")
                                html.Div("{{ path }}", v_for="path in confirm_files", key="path",
                                         classes="text-caption")
                            with v3.VCardActions():
                                v3.VSpacer()
                                v3.VBtn("Keep them", click=self.cancel_overwrite, id="blsam-keep")
                                v3.VBtn("Overwrite", click=self.confirm_overwrite, color="error",
                                        id="blsam-overwrite")

            with layout.content:
                with html.Div(style="position: relative; width: 100%; height: 100%; display: flex;",
                              id="blsam-views"):
                    self.layout_manager.initialize_layout_grid(layout)

    def _on_uploaded(self, files: list[dict]) -> None:
        self._load(lambda: self.session.load_uploaded(files))

    # ------------------------------------------------------------------ run
    def start(self, host: str, port: int, idle_exit_s: float = 0, **kwargs):
        """Blocks until the server stops (``idle_exit_s`` > 0: once no page has been connected that long)."""
        return self.server.start(host=host, port=port, open_browser=False, timeout=int(idle_exit_s),
                                 show_connection_info=False, **kwargs)
