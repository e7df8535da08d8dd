"""Built-in sandboxes, registered through the same hook a third party uses."""

from ..hookspecs import hookimpl
from .local import LocalSandboxProvider


@hookimpl
def register_sandboxes(register):
    register(LocalSandboxProvider)
