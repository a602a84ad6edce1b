"""`hlip-ray eval` as a Ray job: zero-shot AUC of a checkpoint on a split.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/eval.py --checkpoint s3://.../runs/RUN/checkpoint_00001000 --split val
"""

import sys

from hlip_ray.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
