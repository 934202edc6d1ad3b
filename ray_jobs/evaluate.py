"""Score a compiled run on a valset: the metric over Ray Data actors, written to evaluations/{name}.json.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python ray_jobs/evaluate.py --run-dir s3://my-bucket/bootfinetune-runs/ShippingRouter-1a2b3c4d5e6f \
        --config ray_jobs/configs/demo_cpu.yaml --name heldout

The config supplies `valset` and `metric` (other keys are ignored here). `bootfinetune evaluate` takes
the same arguments and runs this job in the calling process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bootfinetune.entrypoints.jobs import main_evaluate, run_main  # noqa: E402

if __name__ == "__main__":
    run_main(main_evaluate)
