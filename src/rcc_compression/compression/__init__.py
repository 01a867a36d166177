"""Compression engine: the stages (dare, nullu, alphaedit), the cascade, calibration and storage."""
