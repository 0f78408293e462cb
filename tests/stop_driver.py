"""A stage run as the shell runs it, with a stop signal sent to one process at a chosen step (for
test_preemption.py under torchrun): python stop_driver.py SCRIPT STOP_RANK STOP_STEP AGREE_EVERY_S [stage flags].
STOP_STEP -1: no signal."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import training  # noqa: E402
import utils  # noqa: E402
from training import preemption  # noqa: E402
from helpers import cut_at  # noqa: E402


def main():
    script, stop_rank, stop_step, agree_every_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    sys.argv = [script, *sys.argv[5:]]
    preemption.AGREE_EVERY_S = agree_every_s
    module = __import__(script.removesuffix(".py"))

    def on_step(step):
        if step == stop_step and int(os.environ.get("RANK", 0)) == stop_rank:
            os.kill(os.getpid(), signal.SIGUSR2)
    with training.supplied_draws(cut_at(on_step=on_step)):
        utils.run_cli(module.get_args_parser, module.main)


if __name__ == "__main__":
    main()
