"""One error convention: library code raises these; the CLI prints the message in one line and exits 1.

Every message says what to do, not only what went wrong.
"""


class MemtuneError(Exception):
    """A user-facing error. Its message is shown as-is, on one line, without a traceback."""

    exit_code = 1


class InputError(MemtuneError):
    """A bad argument, a missing or malformed file."""


class PlanError(InputError):
    """A plan that does not validate or contradicts itself."""


class ProfileError(InputError):
    """A profile that is missing, malformed or of an unsupported version."""


class ScriptError(MemtuneError):
    """The user's script failed or did something memtune cannot work with."""


class EnvironmentNotSupported(MemtuneError):
    """The machine lacks something a requested feature needs (a GPU, Triton, a process group)."""


class BudgetTooSmall(MemtuneError):
    """No plan in the space is predicted to fit the budget."""


class VerificationFailed(MemtuneError):
    """Every verified plan failed for real (out of memory, over budget, or crashed)."""


class Interrupted(MemtuneError):
    """The user pressed Ctrl-C; the message says what was kept. Exit code 130, as a shell gives SIGINT."""

    exit_code = 130
