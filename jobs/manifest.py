"""`hlip-ray manifest` as a Ray job: list a study folder (local to the cluster or s3://) into a manifest.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/manifest.py --root s3://.../raw --out s3://.../manifest.parquet
"""

import sys

from hlip_ray.cli import main

sys.exit(main(["manifest", *sys.argv[1:]]))
