"""The sample-case generator: BraTS grid, determinism, labels, MRI contrast, mass effect, files.

Tissue classes for the contrast checks come from an independent path: nilearn's MNI152 tissue maps
resampled here with SimpleITK onto the generated grid through the documented geometry (physical
point = MNI point with x and y negated), not from the generator's internals.
"""
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from BrainLesionSAMLib.conventions import MODALITIES
from BrainLesionSAMLib.errors import BrainLesionSAMError, OutputPathError
from BrainLesionSAMLib.io import discover_case
from BrainLesionSAMLib.sample import (SAMPLE_CASE_SEED, CaseExistsError, SampleParameterError, SampleParameters,
                                      case_seed, generate_case, generate_cases, write_case)

KEYS = (*MODALITIES, "seg")
SIX = ndimage.generate_binary_structure(3, 1)


def arrays(images):
    return {k: sitk.GetArrayFromImage(v) for k, v in images.items()}


def mni_maps_on(reference: sitk.Image) -> dict[str, np.ndarray]:
    """nilearn's MNI152 GM, WM and brain mask, resampled onto ``reference`` (RAS -> LPS by hand)."""
    from nilearn import datasets
    maps = {}
    for name, loader in (("gm", datasets.load_mni152_gm_template), ("wm", datasets.load_mni152_wm_template),
                         ("t1", datasets.load_mni152_template)):
        nifti = loader(resolution=1)
        image = sitk.GetImageFromArray(np.asarray(nifti.get_fdata(), np.float32).transpose(2, 1, 0).copy())
        affine = nifti.affine
        assert np.allclose(affine[:3, :3], np.eye(3))  # the template is 1 mm, axis-aligned RAS
        image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
        image.SetOrigin((-affine[0, 3], -affine[1, 3], affine[2, 3]))
        resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
        maps[name] = sitk.GetArrayFromImage(resampled)
    maps["brain"] = maps.pop("t1") > 0.2  # nilearn's own brain-mask threshold
    maps["csf"] = np.clip(maps["brain"] - maps["gm"] - maps["wm"], 0, 1)
    return maps


@pytest.fixture(scope="module")
def case2():
    """A realistic random case at 2 mm, without mass effect so that tissue stays where MNI has it."""
    params = SampleParameters.random(3, resolution=2, mass_effect=False)
    images = generate_case(params)
    return params, images, arrays(images)


@pytest.fixture(scope="module")
def reference_maps(case2):
    return mni_maps_on(case2[1]["t1"])


def test_brats_grid_at_1mm_with_mni_physical_space():
    images = generate_case(SampleParameters.random(SAMPLE_CASE_SEED, resolution=1))
    assert set(images) == set(KEYS)
    for key, image in images.items():
        assert image.GetSize() == (240, 240, 155)
        assert image.GetSpacing() == (1.0, 1.0, 1.0)
        assert np.allclose(image.GetDirection(), np.eye(3).ravel())
        assert image.GetOrigin() == images["t1"].GetOrigin()
        assert image.GetPixelID() == (sitk.sitkUInt8 if key == "seg" else sitk.sitkFloat32)
    t1 = sitk.GetArrayFromImage(images["t1"])
    brain = t1 > 0
    # brain centred in x and y; inferior brain stem cut at the first slice, empty slices above the vertex
    centre = np.argwhere(brain).mean(axis=0)
    assert abs(centre[2] - 119.5) < 6 and abs(centre[1] - 119.5) < 12
    assert brain[0].any() and not brain[-1].any()
    # the brain is where nilearn's MNI152 brain is, through physical space (catches flips and shifts)
    reference = mni_maps_on(images["t1"])["brain"]
    dice = 2 * np.sum(brain & reference) / (brain.sum() + reference.sum())
    assert dice > 0.97
    # a seed makes the same tumour at 2 mm: compare the tumour cores in physical space
    coarse = generate_case(SampleParameters.random(SAMPLE_CASE_SEED, resolution=2))["seg"]
    fine = sitk.Resample(images["seg"], coarse, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    core_fine = np.isin(sitk.GetArrayFromImage(fine), (1, 4))
    core_coarse = np.isin(sitk.GetArrayFromImage(coarse), (1, 4))
    assert 2 * np.sum(core_fine & core_coarse) / (core_fine.sum() + core_coarse.sum()) > 0.9


def test_grid_at_2mm(case2):
    _, images, _ = case2
    for image in images.values():
        assert image.GetSize() == (120, 120, 78)
        assert image.GetSpacing() == (2.0, 2.0, 2.0)
        assert np.allclose(image.GetDirection(), np.eye(3).ravel())


def test_same_seed_is_bit_identical_and_other_seeds_differ(case2):
    params, _, first = case2
    again = arrays(generate_case(params))
    for key in KEYS:
        assert first[key].dtype == again[key].dtype
        assert np.array_equal(first[key], again[key]), key
    assert SampleParameters.random(3, resolution=2) == SampleParameters.random(3, resolution=2)
    other = arrays(generate_case(SampleParameters.random(4, resolution=2, mass_effect=False)))
    assert not np.array_equal(first["seg"], other["seg"])
    assert not np.array_equal(first["flair"], other["flair"])


def test_random_parameters_vary_realistically():
    drawn = [SampleParameters.random(seed) for seed in range(12)]
    radii = [p.radius_mm for p in drawn]
    assert all(15 <= r <= 35 for r in radii) and max(radii) - min(radii) > 8
    assert len({p.irregularity for p in drawn}) == 12
    assert all(p.centre is None and p.resolution == 1 for p in drawn)
    assert SampleParameters.random(5, noise=0.0).noise == 0.0


def test_labels_are_brats_values_and_nested(case2, reference_maps):
    _, _, a = case2
    seg = a["seg"]
    assert seg.dtype == np.uint8
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
    brain = a["t1"] > 0
    assert not seg[~brain].any()
    # necrosis touches only necrosis or rim; the rim never touches normal brain (oedema wraps it)
    assert set(np.unique(seg[ndimage.binary_dilation(seg == 1, SIX)]).tolist()) <= {1, 4}
    assert set(np.unique(seg[ndimage.binary_dilation(seg == 4, SIX) & brain]).tolist()) <= {1, 2, 4}
    # one lesion
    assert ndimage.label(seg > 0, np.ones((3, 3, 3)))[1] == 1
    # mostly in cerebral white matter of the reference maps
    core = (seg == 1) | (seg == 4)
    assert np.mean(reference_maps["wm"][core]) > 0.4


def test_brats2023_numbering_only_renames_et(case2):
    params, _, a = case2
    images = generate_case(SampleParameters(**{**params.__dict__, "label_convention": "brats2023"}))
    seg = sitk.GetArrayFromImage(images["seg"])
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}
    assert np.array_equal(seg, np.where(a["seg"] == 4, 3, a["seg"]))
    assert np.array_equal(sitk.GetArrayFromImage(images["t1ce"]), a["t1ce"])


def test_skull_stripped_intensities(case2, reference_maps):
    _, _, a = case2
    outside = a["t1"] == 0
    for key in MODALITIES:
        volume = a[key]
        assert volume.dtype == np.float32 and np.isfinite(volume).all() and volume.min() >= 0
        assert np.array_equal(volume == 0, outside), key  # same brain outline, nothing outside it
    brain = ~outside
    reference = reference_maps["brain"]
    assert 2 * np.sum(brain & reference) / (brain.sum() + reference.sum()) > 0.95


def test_tissue_contrast_follows_mri_physics(case2, reference_maps):
    _, _, a = case2
    far = ~ndimage.binary_dilation(a["seg"] > 0, iterations=3)
    wm = (reference_maps["wm"] > 0.95) & far
    gm = (reference_maps["gm"] > 0.8) & far
    csf = (reference_maps["csf"] > 0.9) & far & (a["t1"] > 0)
    assert wm.sum() > 1000 and gm.sum() > 300 and csf.sum() > 100
    mean = {k: {"wm": a[k][wm].mean(), "gm": a[k][gm].mean(), "csf": a[k][csf].mean()} for k in MODALITIES}
    assert mean["t2"]["csf"] > 1.5 * mean["t2"]["wm"]          # free water bright on T2
    assert mean["flair"]["csf"] < 0.6 * mean["flair"]["wm"]    # ... and nulled on FLAIR
    assert mean["t1"]["csf"] < 0.6 * mean["t1"]["wm"]          # long T1: dark
    assert mean["t1"]["gm"] < mean["t1"]["wm"] and mean["t1ce"]["gm"] < mean["t1ce"]["wm"]
    assert mean["t2"]["gm"] > mean["t2"]["wm"] and mean["flair"]["gm"] > mean["flair"]["wm"]


def test_tumour_subregions_have_glioma_contrast(case2, reference_maps):
    _, _, a = case2
    seg = a["seg"]
    far = ~ndimage.binary_dilation(seg > 0, iterations=3)
    wm = (reference_maps["wm"] > 0.95) & far

    def relative(key, label):
        region = seg == label
        inner = ndimage.binary_erosion(region, SIX)
        region = inner if inner.sum() >= 20 else region
        return a[key][region].mean() / a[key][wm].mean()

    # enhancing rim: bright only after contrast
    assert relative("t1ce", 4) > 1.4 and relative("t1ce", 4) > relative("t1", 4) + 0.5
    for key in ("t1", "t2", "flair"):
        assert relative(key, 4) < relative("t1ce", 4) - 0.3
    # oedema: bright on T2 and FLAIR, slightly dark on T1, nearly iso on T1CE
    assert relative("flair", 2) > 1.4 and relative("t2", 2) > 1.4
    assert relative("t1", 2) < 0.95 and 0.75 < relative("t1ce", 2) < 1.05
    # necrosis: dark on T1 and T1CE, fluid-bright on T2, darker than oedema on FLAIR
    assert relative("t1ce", 1) < 0.6 and relative("t1", 1) < 0.6
    assert relative("t2", 1) > 1.5
    assert relative("flair", 1) < relative("flair", 2)


def test_centre_is_a_physical_point():
    centre = (30.0, 10.0, 30.0)  # LPS mm: left hemisphere (MNI x = -30)
    params = SampleParameters(seed=1, centre=centre, radius_mm=15, irregularity=0.1, resolution=2,
                              noise=0, bias=0, mass_effect=False)
    images = generate_case(params)
    core = np.argwhere(sitk.GetArrayFromImage(images["seg"]) == 1).mean(axis=0)[::-1]
    found = images["seg"].TransformContinuousIndexToPhysicalPoint(core.tolist())
    assert np.linalg.norm(np.subtract(found, centre)) < 6
    with pytest.raises(SampleParameterError, match="outside the brain"):
        generate_case(SampleParameters(seed=1, centre=(0.0, 0.0, 200.0), resolution=2))


def test_mass_effect_pushes_tissue_away_from_the_tumour():
    centre = (25.0, 20.0, 25.0)  # LPS mm, white matter of the left hemisphere
    base = dict(seed=2, centre=centre, radius_mm=20.0, irregularity=0.1, edema_extent_mm=0.0,
                noise=0.0, bias=0.0, resolution=2)
    pushed_images = generate_case(SampleParameters(mass_effect=True, **base))
    pushed = arrays(pushed_images)
    still = arrays(generate_case(SampleParameters(mass_effect=False, **base)))
    assert np.array_equal(pushed["t1"] == 0, still["t1"] == 0)  # the brain outline does not move
    centre_zyx = np.array(pushed_images["t1"].TransformPhysicalPointToContinuousIndex(centre))[::-1]
    grid = np.indices(still["t1"].shape).astype(float)
    distance_mm = 2.0 * np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre_zyx)))
    lesion = (pushed["seg"] > 0) | (still["seg"] > 0)
    near = ~lesion & (distance_mm < 40) & (still["t1"] > 0)
    change = np.abs(pushed["t2"] - still["t2"]) / np.median(still["t2"][still["t2"] > 0])
    assert np.mean(change[near] > 0.05) > 0.2  # the neighbourhood visibly changes
    assert np.array_equal(pushed["t2"][distance_mm > 90], still["t2"][distance_mm > 90])  # far away: not

    # Along rays from the centre, the pushed image beyond the lesion is the plain image moved outwards:
    # pushed(rho + s) matches still(rho) best for a positive shift s.
    directions = np.random.default_rng(0).normal(size=(300, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rho = np.arange(28.0, 44.0, 1.0)

    def along(volume, shift):
        points = centre_zyx[:, None, None] + directions.T[:, :, None] * (rho + shift)[None, None, :] / 2.0
        return ndimage.map_coordinates(volume, points.reshape(3, -1), order=1).reshape(len(directions), -1)

    reference = along(still["t2"], 0.0)
    brain = (still["t1"] > 0).astype(float)
    inside = (along(brain, 0.0) > 0.99) & (along(brain, 10.0) > 0.99)
    errors = {s: np.mean((along(pushed["t2"], s) - reference)[inside] ** 2) for s in np.arange(-8.0, 9.0, 1.0)}
    best = min(errors, key=errors.get)
    assert best >= 2.0, errors


def test_write_case_layout_and_overwrite(tmp_path, case2):
    _, images, a = case2
    folder = write_case(images, tmp_path, "BLSAM_test")
    assert folder == tmp_path / "BLSAM_test"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"BLSAM_test_{k}.nii.gz" for k in KEYS)
    assert [p.name for p in tmp_path.iterdir()] == ["BLSAM_test"]  # no temporary leftovers
    found = discover_case(folder)
    assert set(found) == set(KEYS)
    read = {k: sitk.ReadImage(str(found[k])) for k in KEYS}
    for key, image in read.items():
        assert image.GetSize() == read["t1"].GetSize()
        assert np.allclose(image.GetOrigin(), images[key].GetOrigin())
        assert np.allclose(image.GetSpacing(), images[key].GetSpacing())
        assert np.allclose(image.GetDirection(), images[key].GetDirection())
        assert np.array_equal(sitk.GetArrayFromImage(image), a[key])
    assert read["seg"].GetPixelID() == sitk.sitkUInt8

    before = (folder / "BLSAM_test_t1.nii.gz").stat().st_mtime_ns
    with pytest.raises(CaseExistsError, match="overwrite") as error:
        write_case(images, tmp_path, "BLSAM_test")
    assert isinstance(error.value, OutputPathError) and isinstance(error.value, BrainLesionSAMError)
    assert (folder / "BLSAM_test_t1.nii.gz").stat().st_mtime_ns == before
    other = generate_case(SampleParameters.random(9, resolution=2))
    write_case(other, tmp_path, "BLSAM_test", overwrite=True)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "BLSAM_test_seg.nii.gz"))),
                          sitk.GetArrayFromImage(other["seg"]))
    assert [p.name for p in tmp_path.iterdir()] == ["BLSAM_test"]


def test_generate_cases_writes_seeded_cases(tmp_path):
    calls = []
    paths = generate_cases(tmp_path / "out", 2, seed=3, resolution=2, label_convention="brats2023",
                           progress=lambda fraction, message: calls.append(fraction))
    assert [p.name for p in paths] == ["BLSAM_0003_000", "BLSAM_0003_001"]
    assert calls[0] == 0.0 and calls[-1] == 1.0 and calls == sorted(calls)
    expected = generate_case(SampleParameters.random(case_seed(3, 1), resolution=2, label_convention="brats2023"))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[1] / "BLSAM_0003_001_seg.nii.gz")))
    assert np.array_equal(seg, sitk.GetArrayFromImage(expected["seg"]))
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}
    assert case_seed(3, 0) != case_seed(3, 1) != case_seed(4, 1)
    with pytest.raises(CaseExistsError):
        generate_cases(tmp_path / "out", 3, seed=3, resolution=2)
    assert not (tmp_path / "out" / "BLSAM_0003_002").exists()  # refused before generating anything


@pytest.mark.parametrize("bad", [dict(resolution=3), dict(radius_mm=0.5), dict(irregularity=2.0),
                                 dict(label_convention="brats2019"), dict(seed=-1), dict(centre=(1.0, 2.0))])
def test_invalid_parameters_say_what_is_allowed(bad):
    with pytest.raises(SampleParameterError):
        SampleParameters(**bad)
    assert issubclass(SampleParameterError, BrainLesionSAMError)


def test_no_single_modality_separates_all_three_subregions():
    """A sub-region is shown by a modality when its mean lies outside the normal-brain range
    (10th-90th percentile) and differs from both other sub-regions; no modality shows all three."""
    from BrainLesionSAMLib.sample import SampleParameters, generate_case
    images = generate_case(SampleParameters.random(5, resolution=2))
    labels = sitk.GetArrayFromImage(images["seg"])
    for key in ("t1", "t1ce", "t2", "flair"):
        array = sitk.GetArrayFromImage(images[key])
        normal = array[(labels == 0) & (array > 0)]
        scale = np.median(normal)
        low, high = np.percentile(normal, [10, 90]) / scale
        means = {label: array[labels == label].mean() / scale for label in (1, 2, 4)}
        shown = [label for label, mean in means.items()
                 if not low <= mean <= high
                 and all(abs(mean - other) > 0.15 for o, other in means.items() if o != label)]
        assert len(shown) < 3, f"{key} shows all three sub-regions: {means}, normal range {low:.2f}-{high:.2f}"
