"""A local Hub for tests: olah serving git repos, behind a stand-in for the Hub's write API.

See `fixtures` for the pytest fixtures (``hub_server``, ``hub``) and how the client is pointed
at the server, `write_standin` for the endpoints, `git_store` for the on-disk layout.
"""

from .fixtures import (
    ORG,
    OTHER_USER,
    TOKENS,
    USER,
    HubServer,
    hub,
    hub_server,
    missing_requirements,
    start_hub_server,
)

__all__ = [
    "ORG",
    "OTHER_USER",
    "TOKENS",
    "USER",
    "HubServer",
    "hub",
    "hub_server",
    "missing_requirements",
    "start_hub_server",
]
