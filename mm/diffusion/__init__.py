"""mm.diffusion"""
