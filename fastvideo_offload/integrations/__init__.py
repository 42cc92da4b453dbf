"""Integrations with the libraries our users run: FastVideo (patched in place) and diffusers
(whose transformers need nothing beyond `enable`)."""
