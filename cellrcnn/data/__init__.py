"""Data layer: COCO datasets, paired transforms, synthetic nuclei, converters."""
