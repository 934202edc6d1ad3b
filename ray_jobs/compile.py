"""Compile a DSPy program on a Ray cluster: a job YAML in, a compiled program and its run directory out.

Submit it from the repository root (the working dir carries the package and your program's module):

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python ray_jobs/compile.py --config ray_jobs/configs/demo_cpu.yaml

Against a local head (`ray start --head`) add `--address http://127.0.0.1:8265`. Override one key
with `--set epochs=3`. The last line printed is `BOOTFINETUNE_RESULT {...}` (run_dir, metric).
A bad config exits with code 2 before any teacher call, listing every problem. `bootfinetune compile`
takes the same arguments and runs this job in the calling process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package beside ray_jobs/

from bootfinetune.entrypoints.jobs import main_compile, run_main  # noqa: E402

if __name__ == "__main__":
    run_main(main_compile)
