"""Built-in scenarios, registered through the same hook a third party uses."""

from ..hookspecs import hookimpl


@hookimpl
def register_scenarios(register):
    from .base import BaseScenario

    register(BaseScenario())
