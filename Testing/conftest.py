import contextlib

import numpy as np
import pytest
import SimpleITK as sitk
import torchvision.ops  # noqa: F401  - fails loudly if torch and torchvision are a mismatched pair

from BrainLesionSAMLib import engine
from BrainLesionSAMLib.backbones import openvino_encoder

REAL_CPU_HAS_NATIVE_BF16 = engine.cpu_has_native_bf16

# The tests the fast lane (`pytest -m "not slow"`) skips, as "file" or "file::test function" (every
# parametrisation) -> seconds measured with `pytest --durations=0` (set-up + call, all
# parametrisations) on 2 CPU cores shared with a training run (issue 23; None: not measured here).
# CI and the README's test command run them all; Testing/test_readme.py checks that each entry exists.
SLOW_TESTS: dict[str, float | None] = {
    "test_backbones.py::test_block_by_block_equals_the_encoder_and_declares_its_shapes": 7.7,
    "test_backbones.py::test_hook_output_replaces_the_block_output": 6.0,
    "test_brainsegdmif.py::test_ablation_switches_change_the_module_graph_and_still_run": 14.6,
    "test_brainsegdmif.py::test_brainsegdmif_starts_as_backbone": 25.3,
    "test_brainsegdmif.py::test_flops_per_slice_on_the_meta_device": 7.2,
    "test_brainsegdmif.py::test_forward_missing_modalities_and_case_weights": 8.3,
    "test_brainsegdmif.py::test_gradient_reaches_every_trainable_parameter": 6.6,
    "test_brainsegdmif.py::test_one_adam_step_lowers_the_loss": 16.9,
    "test_catalogue_wheel.py::test_wheel_ships_the_catalogue_and_resolves_weights_outside_the_source_tree": 9.0,
    "test_checkpoints.py::test_checkpoint_loads_where_the_initial_sam_file_is_absent": 3.8,
    "test_cli.py::test_console_script_reports_a_user_error_on_stderr_with_status_1": 10.9,
    "test_cli.py::test_info_json_lists_methods_devices_and_versions": 11.2,
    "test_cmaa.py::test_backbone_weights_and_other_input_sizes": 3.2,
    "test_cmaa.py::test_cmaa_starts_as_backbone": 30.5,
    "test_cmaa.py::test_forward_shape_probabilities_and_missing_modality": 4.3,
    "test_cmaa.py::test_lite_backbone_counts_weights_and_one_step": 33.0,
    "test_cmaa.py::test_one_adamw_step_trains_only_the_trainable_part": 12.8,
    "test_dbsam.py::test_256_shapes_cache_and_errors": 10.8,
    "test_dbsam.py::test_dbsam_starts_as_backbone": 17.3,
    "test_dbsam.py::test_engine_box_refinement_reuses_the_embeddings": 4.6,
    "test_dbsam.py::test_lite_backbone": 15.3,
    "test_dbsam.py::test_one_step_vit_b_trains_only_the_adapters_and_decoder": 13.5,
    "test_demo.py::test_demo_writes_segmentation_report_and_scores_above_0_8": 28.5,
    "test_demo.py::test_packaged_weights_generalise_to_fresh_cases": 18.9,
    "test_evaluate.py::test_a_trained_run_is_evaluated_like_its_written_predictions": 29.0,
    "test_evaluate.py::test_score_writes_per_case_csv_and_paper_table": 8.1,
    "test_lesion_metrics.py::test_agrees_with_official_brats_evaluation_on_shared_cases": 17.2,
    "test_litemedsam.py::test_cached_decode_equals_predict_proba_and_forward": 9.6,
    "test_litemedsam.py::test_zero_shot_box_segmentation_beats_random_weights": 30.5,
    "test_mome.py::test_full_2mm_case_through_the_engine_on_cpu": 14.0,
    "test_mome.py::test_mome_stage2_starts_from_experts": 14.6,
    "test_mome.py::test_one_sgd_step_lowers_the_loss": 3.1,
    "test_mome.py::test_several_modalities_are_run_one_by_one_and_combined": 4.0,
    "test_precision.py::test_bf16_on_the_cpu_gives_float32_probabilities_that_agree_with_fp32": 12.3,
    "test_precision.py::test_fp32_is_the_plain_network_bit_for_bit_and_what_amp_gave_on_the_cpu": 9.3,
    "test_precision.py::test_litemedsam_bf16_with_a_box_agrees_with_fp32_and_its_cached_refinement_is_the_same": 18.7,
    "test_sam_heads.py::test_training_resumes_exactly_and_trains_only_the_head": 20.0,
    "test_sam_heads.py::test_pool_embeddings_are_what_sofa_and_litemedsam_encode": 8.0,
    "test_sam_heads.py::test_delta_checkpoint_holds_only_trained_tensors_and_checks_its_base": 6.0,
    "test_sam_vit.py::test_256_variant_loads_every_key_and_resizes_like_sam": 3.3,
    "test_sam_vit.py::test_files": 6.1,
    "test_sam_vit.py::test_parity_with_segment_anything_at_1024": 94.0,
    "test_sample.py::test_brats_grid_at_1mm_with_mni_physical_space": 10.7,
    "test_slicer_batch.py": 107.1,  # every test: the script in a subprocess (slicer-core + torch start-up)
    "test_slicer_logic.py::test_box_refinement_updates_one_segment_and_reuses_embeddings": 6.6,
    "test_sofa.py::test_engine_cached_and_uncached_agree_with_case_weights": 21.1,
    "test_sofa.py::test_forward_is_the_log_of_predict_proba": 3.4,
    "test_sofa.py::test_one_adam_step_lowers_the_loss": 3.7,
    "test_sofa.py::test_sofa_starts_as_backbone": 27.2,
    "test_sofa.py::test_two_passes_on_the_real_network_and_refinement_switch": 20.5,
    "test_training.py::test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run": 31.2,
    "test_training.py::test_smoke_config_trains": 48.3,
    "test_training.py::test_two_gloo_processes_end_with_identical_weights": 16.1,
    "test_web_e2e.py": None,  # not measured: skipped here (no Playwright / Chromium); a server and a browser
    "test_web_session.py": 40.4,  # every test: they share one session, which the first one loads
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        name = getattr(item, "originalname", item.name)
        if item.path.name in SLOW_TESTS or f"{item.path.name}::{name}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def fp32_auto_precision_on_every_cpu():
    """Precision 'auto' runs fp32 in the test process on any CPU: on one with native bf16 it would pick
    bf16 for the methods measured safe (MethodFacts.cpu_bf16), and results compared with fp32
    references would depend on the machine. test_precision.py tests bf16 and 'auto' themselves; a
    module whose results meet a subprocess's (which picks for real) uses ``native_auto_precision``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "cpu_has_native_bf16", lambda *args: False)
        yield


@pytest.fixture(autouse=True, scope="session")
def torch_encoders_under_auto():
    """Encoder runtime 'auto' is PyTorch in the test process even where OpenVINO is installed: it would
    convert every test's (often random) encoder weights for about 20 s each. test_openvino_encoder.py
    tests the OpenVINO path against PyTorch's (``real_openvino``); subprocesses pick for real."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(openvino_encoder, "openvino_installed", lambda: False)
        yield


REAL_OPENVINO_INSTALLED = openvino_encoder.openvino_installed


@contextlib.contextmanager
def native_auto_precision():
    """Within the block, 'auto' picks the precision as a user's process does (the CPU's real flags)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "cpu_has_native_bf16", REAL_CPU_HAS_NATIVE_BF16)
        yield


def oblique_direction(angle_degrees: float = 20.0) -> tuple[float, ...]:
    """Rotation about an oblique axis: a direction matrix no axis-aligned shortcut can fake."""
    axis = np.array([1.0, 2.0, 3.0]) / np.linalg.norm([1.0, 2.0, 3.0])
    angle = np.deg2rad(angle_degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    return tuple(rotation.ravel())


def make_image(array_zyx: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
               direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def blob_case(shape_zyx=(21, 37, 45), seed=0, **geometry):
    """Four synthetic modalities with a bright/dark ellipsoid lesion and its BraTS labels."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    brain = (z ** 2 + y ** 2 + x ** 2) < 0.9
    lesion_r = (z ** 2 + (y - 0.2) ** 2 + (x + 0.1) ** 2)
    labels = np.zeros(shape_zyx, np.uint8)
    labels[lesion_r < 0.25] = 2
    labels[lesion_r < 0.12] = 4
    labels[lesion_r < 0.05] = 1
    labels[~brain] = 0
    images = {}
    for i, key in enumerate(("t1", "t1ce", "t2", "flair")):
        volume = (100 + 20 * i + rng.normal(0, 5, shape_zyx)) * brain + 50 * (labels > 0) * (i + 1)
        images[key] = make_image(volume.astype(np.float32), **geometry)
    return images, make_image(labels, **geometry)


@pytest.fixture
def synthetic_case():
    return blob_case()


@pytest.fixture(scope="session")
def lesion_batch():
    """Two lesion slices of a 2 mm sample case (seed 3) as the engine gives them to a 2D method:
    images [2, 4, 256, 256] in [0, 255], available [2, 4], whole-tumour target [2, 1, 256, 256] bool.
    Read-only: shared by the method tests' training-step checks."""
    import torch
    from BrainLesionSAMLib.preprocessing import prepare_case
    from BrainLesionSAMLib.sample import SampleParameters, generate_case

    images = generate_case(SampleParameters.random(3, resolution=2))
    seg = sitk.GetArrayFromImage(images.pop("seg"))
    case = prepare_case(images)
    z = [int(i) for i in np.argsort((seg > 0).sum(axis=(1, 2)))[-2:]]
    target = case.slice_geometry.to_network(seg[z][:, None].astype(np.float32), nearest=True) > 0
    available = torch.as_tensor(case.available)[None].expand(len(z), -1)
    return case.network_slices(z), available, target


# ------------------------------------------------- command-line cases, shared by test_cli and test_bad_inputs

CLI_SEED = 3
SMALL_UNET = {"channels": (8, 16, 32), "strides": (2, 2)}


def write_cli_cases(root):
    """Two 2 mm sample cases (seed CLI_SEED) in the BraTS layout: <root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz."""
    from BrainLesionSAMLib.sample import generate_cases
    generate_cases(root, 2, seed=CLI_SEED, resolution=2)
    return root


def write_small_unet(path):
    """A small unet2d checkpoint. Seeded so that its (random) output holds every BraTS label."""
    import torch
    from BrainLesionSAMLib.checkpoints import save_checkpoint
    from BrainLesionSAMLib.methods import build_method

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_method("unet2d", SMALL_UNET)
    return save_checkpoint(model, path)


def write_relabelled_weights(weights, path, method: str):
    """The same tensors, but the header says they belong to ``method``."""
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from BrainLesionSAMLib.checkpoints import HEADER_KEY

    with safe_open(str(weights), framework="pt") as handle:
        header = json.loads(handle.metadata()[HEADER_KEY])
    header["method"] = method
    save_file(load_file(str(weights)), str(path), metadata={HEADER_KEY: json.dumps(header)})
    return path


# Session-scoped: generating the cases is most of these tests' set-up, so it is done once per run.
@pytest.fixture(scope="session")
def cases_root(tmp_path_factory):
    return write_cli_cases(tmp_path_factory.mktemp("cases"))


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    return write_small_unet(tmp_path_factory.mktemp("weights") / "unet2d_small.safetensors")


@pytest.fixture(scope="session")
def sofa_weights(weights, tmp_path_factory):
    return write_relabelled_weights(weights, tmp_path_factory.mktemp("sofa") / "sofa.safetensors", "sofa")
