"""Preprocessing and its exact inverse: geometry, intensities, resampling, bad input."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from BrainLesionSAMLib.errors import GeometryError, InputImageError, MissingModalityError
from BrainLesionSAMLib.preprocessing import SliceGeometry, normalize_intensity, prepare_case

from conftest import blob_case, make_image, oblique_direction

ODD_GEOMETRIES = [
    dict(shape_zyx=(17, 241, 199), spacing=(0.94, 0.94, 3.3)),
    dict(shape_zyx=(9, 127, 255), spacing=(1.2, 0.7, 5.0), direction=oblique_direction(25)),
    dict(shape_zyx=(13, 33, 57), spacing=(2.0, 3.0, 1.5), origin=(-91.5, 12.25, -40.0),
         direction=oblique_direction(-40)),
]


@pytest.mark.parametrize("geometry", ODD_GEOMETRIES)
def test_labels_forward_and_back_are_identical_with_reference_geometry(geometry):
    shape = geometry.pop("shape_zyx")
    images, labels = blob_case(shape, **geometry)
    case = prepare_case(images)
    label_array = sitk.GetArrayFromImage(labels)
    assert label_array.any()
    network = case.slice_geometry.to_network(label_array, nearest=True)
    assert network.shape == (shape[0], 256, 256)
    back = case.slice_geometry.labels_from_network(network, num_classes=5).numpy()
    output = case.to_reference_image(back.astype(np.uint8))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(output), label_array)
    assert output.GetSize() == labels.GetSize()
    np.testing.assert_allclose(output.GetSpacing(), labels.GetSpacing(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(output.GetOrigin(), labels.GetOrigin(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(output.GetDirection(), labels.GetDirection(), rtol=0, atol=1e-12)


def test_larger_slices_are_resized_keeping_aspect_and_come_back_close():
    geometry = SliceGeometry(300, 200)
    assert geometry.scaled_shape == (256, 171)
    assert geometry.padding == (0, 42)
    rng = np.random.default_rng(1)
    labels = np.zeros((3, 300, 200), np.int64)
    labels[:, 100:220, 40:150] = 1
    labels[:, 140:180, 70:120] = 2
    network = geometry.to_network(labels, nearest=True)
    back = geometry.labels_from_network(network, num_classes=3).numpy()
    agreement = (back == labels).mean()
    assert agreement > 0.99
    probabilities = torch.as_tensor(rng.random((2, 3, 256, 256)), dtype=torch.float32)
    assert geometry.from_network(probabilities).shape == (2, 3, 300, 200)


def test_padding_is_centred_and_zero():
    geometry = SliceGeometry(240, 240)
    slices = np.ones((1, 4, 240, 240), np.float32)
    network = geometry.to_network(slices).numpy()
    assert network[0, :, 8:248, 8:248].min() == 1 and network.sum() == 4 * 240 * 240


def test_box_maps_to_network_pixels():
    geometry = SliceGeometry(240, 240)
    assert geometry.box_to_network(10, 20, 29, 39) == (18, 28, 38, 48)


def test_normalisation_clips_percentiles_and_keeps_background():
    rng = np.random.default_rng(0)
    array = np.zeros((10, 20, 20), np.float32)
    array[2:8, 5:15, 5:15] = rng.normal(500, 50, (6, 10, 10))
    array[5, 10, 10] = 1e6  # outlier that the 99.5 percentile clip removes
    out = normalize_intensity(array)
    assert out[array == 0].max() == 0
    brain = out[array != 0]
    assert brain.min() == 0 and brain.max() == pytest.approx(255)
    values = array[array != 0]
    low, high = np.percentile(values, [0.5, 99.5])
    expected = (np.clip(values, low, high) - low) / (high - low) * 255
    np.testing.assert_allclose(brain, expected, rtol=1e-5, atol=1e-3)


def test_other_modalities_are_resampled_in_physical_space():
    """A FLAIR on a coarser, shifted grid lands where it physically belongs on the T1CE grid."""
    images, labels = blob_case((20, 40, 40), spacing=(1.0, 1.0, 1.0))
    t1ce = images["t1ce"]
    # FLAIR: same anatomy sampled on a 2 mm grid (SimpleITK resampling as the independent reference).
    coarse = sitk.Resample(images["flair"], [20, 20, 10], sitk.Transform(), sitk.sitkLinear,
                           (0.5, 0.5, 0.5), (2.0, 2.0, 2.0), t1ce.GetDirection(), 0.0, sitk.sitkFloat32)
    case = prepare_case({"t1ce": t1ce, "flair": coarse})
    assert case.reference_modality == "t1ce"
    flair = case.images[3]
    lesion = sitk.GetArrayFromImage(labels) > 0
    # the resampled lesion is bright where the reference's label says it is
    assert flair[lesion].mean() > flair[(~lesion) & (flair > 0)].mean() + 50
    assert case.available.tolist() == [False, True, False, True]


def test_reference_preference_and_missing_modality():
    images, _ = blob_case()
    assert prepare_case({"t1": images["t1"], "t2": images["t2"]}).reference_modality == "t2"
    assert prepare_case(images).reference_modality == "t1ce"
    with pytest.raises(MissingModalityError):
        prepare_case({})
    with pytest.raises(MissingModalityError, match="unknown modality"):
        prepare_case({"pd": images["t1"]})


def test_non_overlapping_volume_is_refused():
    images, _ = blob_case()
    far = sitk.Image(images["flair"])
    far.SetOrigin((5000.0, 0.0, 0.0))
    with pytest.raises(GeometryError, match="does not overlap"):
        prepare_case({"t1ce": images["t1ce"], "flair": far})


@pytest.mark.parametrize("array, message", [
    (np.zeros((5, 6, 7), np.float32), "constant"),
    (np.full((5, 6, 7), np.nan, np.float32), "constant"),  # every voxel NaN: set to 0 (warning), then constant
    (np.ones((1, 6, 7), np.float32), "size"),
])
def test_bad_volumes_are_refused(array, message):
    with pytest.raises(InputImageError, match=message):
        prepare_case({"t1": make_image(array)})


def test_2d_and_4d_images_are_refused(tmp_path):
    image_2d = sitk.GetImageFromArray(np.random.rand(20, 20).astype(np.float32))
    with pytest.raises(InputImageError, match="2D"):
        prepare_case({"t1": image_2d})
    image_4d = sitk.JoinSeries([sitk.GetImageFromArray(np.random.rand(4, 5, 6).astype(np.float32))] * 3)
    path = tmp_path / "four_d.nii.gz"
    sitk.WriteImage(image_4d, str(path))
    with pytest.raises(InputImageError, match="4D"):
        prepare_case({"t1": path})


def test_a_file_that_is_not_an_image(tmp_path):
    path = tmp_path / "notes_t1.nii.gz"
    path.write_text("not an image")
    with pytest.raises(InputImageError, match="not a readable image"):
        prepare_case({"t1": path})


def test_a_working_grid_halves_by_block_means_and_keeps_probabilities_summing_to_one():
    """A 3D method's working grid (``working_spacing_mm``): 2 mm over a 1 mm grid is every 2 x 2 x 2
    block's mean (numpy's reshape-mean as the reference), back up is trilinear, and class
    probabilities resized either way still sum to 1; labels resize by nearest neighbour."""
    from BrainLesionSAMLib.preprocessing import resize_volume, working_shape

    assert working_shape((155, 240, 240), (1.0, 1.0, 1.0), 2.0) == (78, 120, 120)
    assert working_shape((40, 100, 100), (3.0, 0.9, 0.9), 2.0) == (60, 45, 45)
    rng = np.random.default_rng(0)
    volume = rng.random((1, 2, 8, 12, 16)).astype(np.float32)
    halved = resize_volume(torch.from_numpy(volume), (4, 6, 8)).numpy()
    blocks = volume.reshape(1, 2, 4, 2, 6, 2, 8, 2).mean(axis=(3, 5, 7))
    np.testing.assert_allclose(halved, blocks, atol=1e-6)
    probabilities = torch.softmax(torch.from_numpy(rng.normal(size=(1, 3, 5, 7, 9)).astype(np.float32)), dim=1)
    for shape in ((10, 14, 18), (3, 4, 5)):
        np.testing.assert_allclose(resize_volume(probabilities, shape).sum(1).numpy(), 1.0, atol=1e-5)
    labels = torch.zeros(1, 1, 4, 4, 4)
    labels[..., 2:, :, :] = 3
    assert resize_volume(labels, (8, 8, 8), nearest=True)[0, 0, 4:].eq(3).all()
    assert resize_volume(labels, (8, 8, 8), nearest=True)[0, 0, :4].eq(0).all()
    assert resize_volume(labels, (4, 4, 4)) is labels


def test_slices_with_context_stacks_each_slices_neighbours_and_repeats_the_edge_slices():
    from BrainLesionSAMLib.preprocessing import slices_with_context

    channels, depth, height, width = 4, 5, 3, 2
    images = (np.arange(channels)[:, None, None, None] * 100 + np.arange(depth)[None, :, None, None]
              + np.zeros((1, 1, height, width))).astype(np.float32)  # value = 100 * channel + z
    stacked = slices_with_context(images, [0, 2, 4], context=2)
    assert stacked.shape == (3, 4 * 5, height, width) and stacked.dtype == np.float32
    for n, z in enumerate([0, 2, 4]):
        for block, offset in enumerate(range(-2, 3)):
            neighbour = min(max(z + offset, 0), depth - 1)
            for c in range(channels):
                assert (stacked[n, block * channels + c] == 100 * c + neighbour).all()
    np.testing.assert_array_equal(slices_with_context(images, [3], 0)[0], images[:, 3])


def test_network_slices_with_context_hold_the_plain_slices_in_their_centre_block():
    images, _ = blob_case((9, 40, 30))
    case = prepare_case(images)
    plain = case.network_slices([0, 4, 8])
    wide = case.network_slices([0, 4, 8], context=1)
    assert wide.shape == (3, 12, 256, 256)
    torch.testing.assert_close(wide[:, 4:8], plain, rtol=0, atol=0)
    torch.testing.assert_close(wide[1, :4], case.network_slices([3])[0], rtol=0, atol=0)
    torch.testing.assert_close(wide[0, :4], plain[0], rtol=0, atol=0)  # below slice 0: slice 0 again
