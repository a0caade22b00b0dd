"""Worker teardown: a torchrun worker ends through exit_worker, which must not lose output."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_exit_worker_flushes_and_keeps_the_code():
    # stdout to a pipe is block-buffered: without the flush, os._exit would drop the text
    code = ("from neurovfm.distributed import exit_worker\n"
            "print('result written', end='')\n"
            "import sys; sys.stderr.write('progress'); exit_worker(3)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(env, PYTHONPATH=os.path.join(ROOT, "src")))
    assert r.returncode == 3
    assert r.stdout == "result written"
    assert r.stderr.endswith("progress")


def test_single_process_run_is_not_a_worker():
    from neurovfm.distributed import init_distributed, joined_process_group

    env = os.environ.pop("WORLD_SIZE", None)
    try:
        rank, world, device = init_distributed("cpu")
    finally:
        if env is not None:
            os.environ["WORLD_SIZE"] = env
    assert (rank, world, device.type) == (0, 1, "cpu")
    assert not joined_process_group()  # main() returns normally: no os._exit in tests or notebooks
