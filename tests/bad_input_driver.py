"""Run one command on several argument lists in one process, as `python -m MODULE ...` or `python SCRIPT ...` would,
and print one JSON line per run: {"code": exit status, "stderr": what it printed there}. Used by
tests/test_bad_input.py, which sends each command's whole table of bad inputs here at once (one torch import per
command instead of one per case).

    python tests/bad_input_driver.py minivit.tools.knn '[["--k", "0"], ["--weights", "notes.txt"]]'
"""
import contextlib
import io
import json
import os
import runpy
import sys
import traceback


def run_once(command, argv):
    """(exit status, stderr text) of one run; an uncaught exception is printed as Python would: a traceback."""
    err, code = io.StringIO(), 0
    sys.argv = [command, *argv]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if command.endswith(".py"):
                runpy.run_path(command, run_name="__main__")
            else:  # as a fresh `python -m`: an earlier case may have imported the module (runpy warns then)
                sys.modules.pop(command, None)
                runpy.run_module(command, run_name="__main__", alter_sys=True)
        except SystemExit as e:  # what the interpreter does with it: a message goes to stderr with status 1
            if isinstance(e.code, int) or e.code is None:
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    return code, err.getvalue()


if __name__ == "__main__":
    sys.path[0] = os.getcwd()  # the repository root, as `python -m` and `python train_x.py` from there put it
    command, cases = sys.argv[1], json.loads(sys.argv[2])
    for argv in cases:
        code, stderr = run_once(command, argv)
        print(json.dumps({"code": code, "stderr": stderr}), flush=True)
