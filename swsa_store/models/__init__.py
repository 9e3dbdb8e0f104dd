"""Weights resolution, timm backbones and CLIP models."""
