"""Training entry point. Launch it with any of:

torchrun --standalone --nproc_per_node 2 train/train.py configs/tiny.yaml [key.sub=value ...]
deepspeed --num_gpus 2 train/train.py configs/tiny.yaml
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train/train.py configs/tiny.yaml
srun python train/train.py configs/tiny.yaml     (one task per GPU; see slurm/)
"""

import sys

if __name__ == "__main__":
    from deepsuite.training.preemption import listen

    listen()  # before the slow imports: a preemption notice during start-up is kept, not lost
    from deepsuite.training.trainer import main

    sys.exit(main())
