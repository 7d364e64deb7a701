from .embedded.gallery import Gallery, GalleryLoading, GalleryModelMismatch, GalleryOptions, Match
from .embedded.lock import DataDirLocked

__all__ = ["DataDirLocked", "Gallery", "GalleryLoading", "GalleryModelMismatch", "GalleryOptions", "Match"]
