"""Inference: sliding window and a predictor that loads from a checkpoint alone."""
