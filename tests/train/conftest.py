"""Fixtures of the 3D training tests: four synthetic BraTS-like phantoms and their preprocessed cache."""

import pytest

from rwkvseg.data.preprocess3d import preprocess_dataset
from rwkvseg.data.specs import dataset_spec
from rwkvseg.data.synthetic3d import write_synthetic_volumes


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Four phantom cases (four modalities and a label map each) at 2 mm, 23 x 27 x 21 voxels."""
    root = tmp_path_factory.mktemp("phantoms")
    write_synthetic_volumes(root, n=4, shape=(23, 27, 21), spacing=2.0, seed=1)
    return root


@pytest.fixture(scope="module")
def cache(raw, tmp_path_factory):
    """`rwkvseg preprocess` of the phantoms (about 17 x 22 x 19 voxels each once cropped)."""
    out = tmp_path_factory.mktemp("cache")
    preprocess_dataset(raw, dataset_spec("brats"), out)
    return out
