import numpy as np
import pytest
import SimpleITK as sitk
import torchvision.ops  # noqa: F401  - fails loudly if torch and torchvision are a mismatched pair


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
