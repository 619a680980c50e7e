"""The error the pipelines raise for a bad argument."""

from __future__ import annotations

from ..errors import InputError


class PipelineInputError(InputError):
    """A bad pipeline argument: `argument` names it (the request layer maps it to its command-line flag), `message`
    is a predicate ("must be an integer in [1, 100], got 0."); `str()` reads "`argument` message"."""

    template = "`{argument}` {message}"
