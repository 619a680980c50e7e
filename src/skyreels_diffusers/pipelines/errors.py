"""The error the pipelines raise for a bad argument."""

from __future__ import annotations


class PipelineInputError(ValueError):
    """A bad pipeline argument: `argument` names it (the request layer maps it to its command-line flag)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"`{argument}` {message}")
        self.argument = argument
