from .gallery import Gallery, GalleryModelMismatch, Match

__all__ = ["Gallery", "GalleryModelMismatch", "Match"]
