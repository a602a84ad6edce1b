"""`hlip-ray tune` as a Ray job: a sweep whose trials are whole training runs on the cluster.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/tune.py --space tune_spaces/hlip_layout_batch_scans.yaml \\
        --config jobs/configs/brain_mri_1node_8gpu.yaml tune.storage_path=s3://.../sweeps
"""

import sys

from hlip_ray.cli import main

sys.exit(main(["tune", *sys.argv[1:]]))
