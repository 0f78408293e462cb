"""python -m launch LAUNCHER ARGS...: what bash LAUNCHER ARGS... runs (run_all.sh, run_finetune.sh, run_pretrain.sh,
run_selftrain.sh). Bad input: one line (with the usage where the arguments' shape is wrong) and exit code 2."""
import sys

from errors import UserError
from launch.launchers import LAUNCHERS
from launch.pool import Stopped


def main(argv: list[str]) -> int:
    launcher, words = argv[0], argv[1:]
    try:
        return LAUNCHERS[launcher](launcher, words) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Stopped as e:
        return e.code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
