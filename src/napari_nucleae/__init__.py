"""napari-nucleae: nuclei → latent space → objective representative nuclei."""

__version__ = "0.1.0"
