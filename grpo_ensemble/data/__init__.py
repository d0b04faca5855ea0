"""Prompts: files and built-in tasks read, cleaned and deduplicated, and the sampler that
draws each step's prompts."""
