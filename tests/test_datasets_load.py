"""The output loads with Hugging Face `datasets` and `image` decodes to PIL images, no cast: the
shards as the sink writes them (the session's `synthetic_output`: ShardWriter and finalize, the
job's own writer, without diffusion), error rows' missing images included."""

import datasets
from PIL import Image


def test_load_dataset_decodes_images(synthetic_output, tmp_path):
    ds = datasets.load_dataset("parquet", data_files=f"{synthetic_output.output}/data/*.parquet", split="train",
                               cache_dir=str(tmp_path / "hf-cache"))

    assert isinstance(ds.features["image"], datasets.Image)
    assert len(ds) == synthetic_output.rows
    images = [row["image"] for row in ds]
    assert sum(image is not None for image in images) == synthetic_output.ok
    assert all(isinstance(i, Image.Image) and i.size == (32, 32) for i in images if i is not None)
