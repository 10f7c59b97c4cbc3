"""Training entry point. Launch it with any of:

torchrun --standalone --nproc_per_node 2 train/train.py configs/tiny.yaml [key.sub=value ...]
deepsuite torchrun --standalone --nproc_per_node 2 train/train.py configs/tiny.yaml   (same, a
    failure ends in one line)
deepspeed --num_gpus 2 train/train.py configs/tiny.yaml
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train/train.py configs/tiny.yaml
srun python train/train.py configs/tiny.yaml     (one task per GPU; see slurm/)
python train/train.py configs/tiny.yaml          (one process)

Bad input (a config key, a file, the data) ends in one line per rank naming it and exit status 2;
--debug or DEEPSUITE_DEBUG=1 adds the traceback.
"""

import sys

if __name__ == "__main__":
    from deepsuite.training.preemption import listen

    listen()  # before the slow imports: a preemption notice during start-up is kept, not lost
    from deepsuite.cli import run_command

    sys.exit(run_command("train", sys.argv[1:], prog="train/train.py"))
