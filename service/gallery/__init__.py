from .gallery import Gallery, GalleryLoading, GalleryModelMismatch, GalleryOptions, Match
from .lock import DataDirLocked

__all__ = ["DataDirLocked", "Gallery", "GalleryLoading", "GalleryModelMismatch", "GalleryOptions", "Match"]
