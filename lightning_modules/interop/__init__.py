"""Interoperability with Hugging Face diffusers: config and state-dict converters (`convert.py`, torch only)
and, in `diffusers_pipeline.py` (imported only where diffusers is installed), the project's pipeline class."""
