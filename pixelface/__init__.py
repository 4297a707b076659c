"""pixelface: synthetic structured-light face captures -> 3D face dataset -> 3DMM."""

__version__ = "0.1.0"
