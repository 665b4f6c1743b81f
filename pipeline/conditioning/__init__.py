"""Conditioning of the diffusion stages: LoRA adapters (lora.py), ControlNets (controlnet.py), and
the control images the prepare step reads or computes on CPU (control_images.py). A stage holds
one Conditioning (stage.py) that loads adapters and ControlNets with its pipeline and turns each
call's rows into the pipeline's arguments.

This package's __init__ imports nothing: pipeline/families.py reads controlnet.py, which must not
pull in the model resolution that imports families.
"""
