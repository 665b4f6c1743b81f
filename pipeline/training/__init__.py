"""Training the built-in "shapes" models (``python -m pipeline.training``): a procedural captioned
image set, a small VAE, and text-to-image, x4 super-resolution and inpainting latent diffusion
models trained with DDPM on Ray Train, saved as standard diffusers pipelines."""
