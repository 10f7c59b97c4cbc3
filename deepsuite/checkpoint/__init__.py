"""Checkpoints: what is on disk, how to read it whatever layout wrote it, how a run saves and resumes.

=============  ==================================================================================
layout.py      tags, manifest, ``latest``, per-rank RNG states, trainer_state.json (one process)
full_state.py  read a saved tag into one unsharded :class:`FullState` (any EP x world x ZeRO)
zero3.py       ZeRO-3 partitions <-> whole tensors (dense over the world, experts over their EDP)
load.py        pour a FullState into a live engine; :func:`load_any_layout` decides at load time
run.py         a training run's save and resume (every rank, collectives, atomic commit)
convert.py     the offline converter behind ``deepsuite reshard``
export.py      the consolidated safetensors export (every expert gathered)
=============  ==================================================================================

Import from the modules; nothing is re-exported here, so reading the on-disk layout does not
import DeepSpeed.
"""
