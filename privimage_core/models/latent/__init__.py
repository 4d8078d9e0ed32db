"""The latent-diffusion family (method dp_ldm): an autoencoder and an EDM
diffusion model over its latents, each with its own DP-SGD stage.
``family.py`` is the family, ``autoencoder.py`` its networks, ``config.py``
its ``latent:`` config section."""
