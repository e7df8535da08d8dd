"""Weight sync from trainer to engines: colocate (in memory) now; distributed and disk transports share the interface."""

from .base import ColocateSync, SyncResult
from .checksum import weights_checksum

__all__ = ["ColocateSync", "SyncResult", "weights_checksum"]
