"""Other tasks with a trained model: pixel masks -> token masks for inpainting, outpainting, variations and
super-resolution (masks)."""
