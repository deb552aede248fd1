"""User-facing errors: the CLI prints one line and exits with status 2."""

from models.errors import UserError  # noqa: F401  (defined at the bottom layer: models/ raises it too)


EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 3  # stopped by SIGTERM/SIGUSR1 (checkpoint written if a step boundary came in time); requeue
EXIT_HANG = 4  # the watchdog saw no progress for parallel.timeout_s (a dead peer or a hung collective)
# a launcher that cannot see training's exit status (torchrun exits 1 whenever a worker did
# not exit 0) names a file here; rank 0 writes its status into it
STATUS_FILE_ENV = "PRETRAIN_EXIT_STATUS_FILE"
