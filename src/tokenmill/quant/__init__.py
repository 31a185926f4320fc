"""Weight quantisation (int8 per channel, int4 group-wise, AWQ calibration, mixed-precision policies)."""
