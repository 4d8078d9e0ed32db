"""The class-conditional GAN family (``privimage_g`` and ``dpgan``); DP-SGD
trains its discriminator. ``family.py`` is the family, ``networks.py`` the
generator and discriminator."""
