"""The output loads with Hugging Face `datasets` and `image` decodes to PIL images, no cast."""

import datasets
from PIL import Image

from pipeline.job import run_job
from tests.helpers import prompts_manifest, small_spec, write_manifest


def test_load_dataset_decodes_images(tmp_path, ray_local):
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(3))
    run_job(small_spec(manifest, str(tmp_path / "out")))

    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))

    assert isinstance(ds.features["image"], datasets.Image)
    assert len(ds) == 3
    image = ds[0]["image"]
    assert isinstance(image, Image.Image) and image.size == (32, 32)
