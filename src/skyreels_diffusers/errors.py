"""The error every layer of the library raises for a bad argument (this module imports nothing of ours, so any
module may raise it).

`InputError(argument, message)` names the argument it concerns (a pipeline argument such as
`num_inference_steps`, a function's parameter such as the `name` a loader was given) and says what is wrong in
`message`, without the name. An application maps `argument` to its own spelling of it (the command line: a flag)
from the attribute, never from the text; `str()` is for people reading the library's own message.
"""

from __future__ import annotations


class InputError(ValueError):
    """A bad argument: `argument` names it, `message` says what is wrong ("file not found: a.png").

    `str()` reads "`argument`: message"; subclasses whose messages are predicates ("must be ...") read
    "`argument` message" (`PipelineInputError`). A `ValueError`, so `except ValueError` keeps catching it; it
    pickles with its fields (errors cross processes under torchrun)."""

    template = "`{argument}`: {message}"

    def __init__(self, argument: str, message: str):
        super().__init__(self.template.format(argument=argument, message=message))
        self.argument = argument
        self.message = message

    def __reduce__(self):
        return type(self), (self.argument, self.message)
