"""Exception groups from anyio task groups, unwrapped to the one error a person should see."""

from __future__ import annotations


def single_error(error: BaseException) -> BaseException:
    """The one real error inside (nested) exception groups, or ``error`` itself when there
    are several or none."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(error)
    return leaves[0] if len(leaves) == 1 else error
