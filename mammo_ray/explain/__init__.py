"""Explanations: CAMs from pytorch-grad-cam, mapped back to the source geometry, and scored."""
