"""`hlip-ray preprocess` as a Ray job: decode a manifest into the Parquet shard cache on the cluster.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/preprocess.py --manifest s3://.../manifest.parquet --out s3://.../shards --config C
"""

import sys

from hlip_ray.cli import main

sys.exit(main(["preprocess", *sys.argv[1:]]))
