"""`hlip-ray embed` as a Ray job: every study of a manifest embedded by a trained model into Parquet.

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/embed.py --checkpoint s3://.../runs/RUN/checkpoint_00001000 \\
            --manifest s3://.../manifest.parquet --out s3://.../embeddings
"""

import sys

from hlip_ray.cli import main

sys.exit(main(["embed", *sys.argv[1:]]))
