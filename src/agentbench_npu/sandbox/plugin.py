"""Built-in sandboxes, registered through the same hook a third party uses."""

from ..hookspecs import hookimpl
from .docker import DockerSandboxProvider
from .local import LocalSandboxProvider
from .modal import ModalSandboxProvider


@hookimpl
def register_sandboxes(register):
    register(LocalSandboxProvider)
    register(DockerSandboxProvider)
    register(ModalSandboxProvider)
