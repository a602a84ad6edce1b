"""`hlip-ray train` as a Ray job: train (or resume) the run a config names on the cluster the job runs on.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/train.py --config jobs/configs/smoke.yaml data.manifest=s3://... train.storage_path=s3://...
"""

import sys

from hlip_ray.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
