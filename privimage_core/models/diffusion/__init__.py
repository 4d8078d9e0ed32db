"""The EDM diffusion family (Privimage+D, PDP-Diffusion, DPDM): an
EDM-preconditioned class-conditional UNet. ``family.py`` is the family,
``edm.py`` the preconditioning, loss and samplers, ``unet.py`` the networks."""
