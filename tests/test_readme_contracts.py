"""README contracts stated literally, not read back from the code's own tables: a change to the code
that breaks one fails here, and a change to the contract is a change to this file and the README.

- "Each row: `id`, `image`, `status`, `error`, ... then the pass-through columns" (Output);
- which diffusers pipeline runs each kind for each model family (the families table).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.families import family_of
from tests.helpers import read_output

# README, Output: "Each row: ..." in this order, then the pass-through columns.
README_COLUMNS = [
    "id", "image", "status", "error", "prompt", "negative_prompt", "seed", "width", "height", "steps",
    "guidance_scale", "strength", "model", "scheduler", "stages", "stage_params", "image_sha256", "elapsed_s",
    "created_at",
]


def test_output_columns_are_the_readmes_in_its_order(synthetic_output):
    table = read_output(synthetic_output.output)
    assert table.column_names[:len(README_COLUMNS)] == README_COLUMNS
    # `image` is the Hugging Face Image storage type, declared so in the schema metadata.
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    shard = min(Path(synthetic_output.output, "data").rglob("*.parquet"))
    assert json.loads(pq.read_schema(shard).metadata[b"huggingface"])["info"]["features"]["image"] == {"_type": "Image"}


def test_the_card_declares_image_an_image_feature_and_every_column(synthetic_output):
    """README: "README.md, a dataset card whose YAML declares `image` as an image feature"."""
    card = Path(synthetic_output.output, "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    features = {f["name"]: f.get("dtype", f.get("list")) for f in front["dataset_info"]["features"]}
    assert features["image"] == "image"
    assert list(features)[:len(README_COLUMNS)] == README_COLUMNS


CLIP = ["transformers", "CLIPTextModel"]
# README, the families table: a model_index.json as the family's checkpoints have it, and the
# pipeline class each stage kind runs on it; `scale` for the upscalers (x4, x2).
FAMILY_TABLE = [
    ({"_class_name": "StableDiffusionPipeline"},
     {"text_to_image": "StableDiffusionPipeline", "image_to_image": "StableDiffusionImg2ImgPipeline",
      "inpainting": "StableDiffusionInpaintPipeline"}, 1),
    ({"_class_name": "StableDiffusionInpaintPipeline"}, {"inpainting": "StableDiffusionInpaintPipeline"}, 1),
    ({"_class_name": "StableDiffusionXLPipeline", "text_encoder": CLIP},
     {"text_to_image": "StableDiffusionXLPipeline", "image_to_image": "StableDiffusionXLImg2ImgPipeline",
      "inpainting": "StableDiffusionXLInpaintPipeline"}, 1),
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]},
     {"image_to_image": "StableDiffusionXLImg2ImgPipeline"}, 1),
    ({"_class_name": "StableDiffusionXLInpaintPipeline"}, {"inpainting": "StableDiffusionXLInpaintPipeline"}, 1),
    ({"_class_name": "StableDiffusion3Pipeline"},
     {"text_to_image": "StableDiffusion3Pipeline", "image_to_image": "StableDiffusion3Img2ImgPipeline",
      "inpainting": "StableDiffusion3InpaintPipeline"}, 1),
    ({"_class_name": "FluxPipeline"},
     {"text_to_image": "FluxPipeline", "image_to_image": "FluxImg2ImgPipeline", "inpainting": "FluxInpaintPipeline"},
     1),
    ({"_class_name": "FluxFillPipeline"}, {"inpainting": "FluxFillPipeline"}, 1),
    ({"_class_name": "PixArtSigmaPipeline"}, {"text_to_image": "PixArtSigmaPipeline"}, 1),
    ({"_class_name": "StableDiffusionUpscalePipeline"}, {"super_resolution": "StableDiffusionUpscalePipeline"}, 4),
    ({"_class_name": "StableDiffusionLatentUpscalePipeline"},
     {"super_resolution": "StableDiffusionLatentUpscalePipeline"}, 2),
    ({"_class_name": "DDPMPipeline"}, {"unconditional": "DDPMPipeline"}, 1),
    ({"_class_name": "DDIMPipeline"}, {"unconditional": "DDPMPipeline"}, 1),
    ({"_class_name": "LDMPipeline"}, {"unconditional": "LDMPipeline"}, 1),
]


@pytest.mark.parametrize("index, pipelines, scale", FAMILY_TABLE, ids=[i["_class_name"] + ("-refiner" if
                         i.get("text_encoder") == [None, None] else "") for i, _, _ in FAMILY_TABLE])
def test_each_family_runs_the_readmes_pipeline_for_each_kind(index, pipelines, scale):
    family = family_of(index)
    assert family is not None, index
    assert family.pipelines == pipelines
    assert family.scale == scale
