"""rwkvseg: medical image segmentation with linear-time RWKV models (U-RWKV, MMSegRWKV)."""

__version__ = "0.1.0"
