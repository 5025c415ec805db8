"""mm: Open-Sora Plan v1.5 (SUV + WFVAE + T5/CLIP, flow matching) on megatron-core."""
