"""Compression engine: the stages (dare, nullu, alphaedit, quant), the cascade, calibration and storage."""
