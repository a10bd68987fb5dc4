"""Interoperability with Hugging Face diffusers.

convert.py            config and state-dict converters, ours <-> diffusers (torch only; bit-identical round trips)
pretrained.py         start our autoencoder / U-Net from a diffusers model on disk (stage.module.init_from_diffusers)
export.py             a trained diffusion stage -> a diffusers pipeline directory (python -m pipeline.export)
diffusers_pipeline.py GuidedLDMPipeline and ClassEmbedder (imports diffusers: only where it is installed)
"""
