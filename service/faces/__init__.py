"""Faces in pictures: decoding images, detecting and aligning faces, their quality, the embed pipeline."""
