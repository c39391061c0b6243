"""Pretrained backbones the methods build on, each in its own module (import the one you need):

- ``sam_vit``: SAM ViT-B (image encoder, prompt encoder, mask decoder) from segment-anything's own
  classes at any input size, and the loader of official SAM / MedSAM ViT-B ``.pth`` checkpoints.
- ``litemedsam``: LiteMedSAM (TinyViT encoder + SAM prompt encoder and mask decoder).

This file imports no submodule on purpose: importing one backbone never pulls in (or breaks on) another.
"""
