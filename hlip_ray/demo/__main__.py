from hlip_ray.demo.job import main

main()
