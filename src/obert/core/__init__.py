"""The math: OBS saliencies and updates from block Fisher inverses, OBS rounding to int8
(torch only; every formula tested against a float64 reference)."""
