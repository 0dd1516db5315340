"""Shared code of the four stage scripts: data, prompts, modeling, training and evaluation."""
