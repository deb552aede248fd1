"""User-facing errors: the CLI prints one line and exits with status 2."""


class UserError(Exception):
    """Bad input (config, data, checkpoint). The message names the problem."""


EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 3  # stopped by SIGTERM/SIGUSR1 (checkpoint written if a step boundary came in time); requeue
EXIT_HANG = 4  # the watchdog saw no progress for parallel.timeout_s (a dead peer or a hung collective)
