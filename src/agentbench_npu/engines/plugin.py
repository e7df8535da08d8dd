"""Built-in engines, registered through the same hook a third party uses."""

from ..hookspecs import hookimpl
from .reference import ReferenceEngine
from .sglang import SGLangEngine


@hookimpl
def register_engines(register):
    register(ReferenceEngine)
    register(SGLangEngine)
