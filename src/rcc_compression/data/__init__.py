"""Data: datasets in the common on-disk formats, transforms, the generated reference world."""
