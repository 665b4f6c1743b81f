"""Names of the columns the pipeline adds while it runs; the sink drops them all."""

INTERNAL_PREFIX = "_sg_"
PIXELS = "_sg_pixels"  # uint8 HxWx3 arrays passed between stages
STAGES = "_sg_stages"  # comma-joined kinds of the stages a row went through
IMAGE_BYTES = "_sg_image_bytes"
IMAGE_PATH = "_sg_image_path"
ELAPSED_PREFIX = "_sg_elapsed_"  # + stage kind: seconds of that stage's work per row
REFERENCES = "_sg_references"  # PNG bytes of the reference images an editing model takes beside the image
MASK = "_sg_mask"  # uint8 HxW masks (white = repaint), the size of the row's image
TEXT_EMBEDS = "_sg_text_embeds"  # safetensors bytes: a row's prompt-embedding arguments, by pipeline argument name
TEXT_ENCODER = "_sg_text_encoder"  # fingerprint of the text encoder that made TEXT_EMBEDS
STAGE_PARAMS = "_sg_stage_params"  # JSON list: each stage's kind, model and parameters
LORA = "_sg_lora"  # the named LoRA adapters a row picked (comma-joined; empty: none)
CONTROL_PREFIX = "_sg_control_"  # + k: the row's control image for the stage's k-th ControlNet, as PNG bytes
REFERENCE_IMAGE = "_sg_reference_image"  # PNG bytes of the row's reference image for an IP-Adapter
