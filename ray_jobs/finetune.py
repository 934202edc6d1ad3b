"""Finetune a run's models from the data its bootstrap saved (no teacher calls), on Ray Train + DeepSpeed.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python ray_jobs/finetune.py --run-dir s3://my-bucket/bootfinetune-runs/ShippingRouter-1a2b3c4d5e6f \
        --set num_workers=4 --set use_gpu=true

Train the same teacher traces with other options, without a teacher call:

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python ray_jobs/finetune.py --run-dir s3://my-bucket/bootfinetune-runs/ShippingRouter-1a2b3c4d5e6f \
        --set lr=1e-4 --set epochs=2

A changed training or inference option (`num_workers` and `use_gpu` among them: the global batch, the
precision path) writes a new run directory beside the old one (printed as `run_dir`); resource options
(`cpus_per_worker`, `gpus_per_worker`, `max_failures`, ...) train the run in place. It writes
models/{key}/ and program.json, so `bootfinetune.load(run_dir)` works. `bootfinetune retrain` takes the
same arguments and runs this job in the calling process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bootfinetune.entrypoints.jobs import main_finetune, run_main  # noqa: E402

if __name__ == "__main__":
    run_main(main_finetune)
