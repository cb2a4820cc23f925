"""Pruning: the gradient stream and block-Fisher collection, the methods (oBERT, magnitude) and
the driver that scores, selects and updates."""
