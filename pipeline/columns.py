"""Names of the columns the pipeline adds while it runs; the sink drops them all."""

INTERNAL_PREFIX = "_sg_"
PIXELS = "_sg_pixels"  # uint8 HxWx3 arrays passed between stages
STAGES = "_sg_stages"  # comma-joined kinds of the stages a row went through
IMAGE_BYTES = "_sg_image_bytes"
IMAGE_PATH = "_sg_image_path"
ELAPSED_PREFIX = "_sg_elapsed_"  # + stage kind: seconds of that stage's work per row
