"""Training entry point. Launch it with any of:

torchrun --standalone --nproc_per_node 2 train/train.py configs/tiny.yaml [key.sub=value ...]
deepspeed --num_gpus 2 train/train.py configs/tiny.yaml
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train/train.py configs/tiny.yaml
srun python train/train.py configs/tiny.yaml     (one task per GPU; see slurm/)
"""

import sys

from deepsuite.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
