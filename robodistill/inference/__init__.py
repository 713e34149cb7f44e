"""Turning policy outputs into actions: chunk execution now; samplers come with the diffusion teacher."""
