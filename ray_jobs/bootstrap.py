"""Bootstrap only: run the teacher over the trainset on Ray Data and write the finetuning data.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python ray_jobs/bootstrap.py --config ray_jobs/configs/demo_cpu.yaml

The run directory it prints (`BOOTFINETUNE_RESULT {"run_dir": ...}`) is what `finetune.py`
takes. Running it again reads the finished bootstrap back instead of calling the teacher.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bootfinetune.entrypoints.jobs import main_bootstrap, run_main  # noqa: E402

if __name__ == "__main__":
    run_main(main_bootstrap)
