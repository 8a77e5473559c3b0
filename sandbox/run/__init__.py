"""Run machinery: the training loop in phases (trainer), the optimizer and schedules (optim), the data stream
(data), run directories and checkpoints (rundir, checkpoints, files), resuming (resume), signals, the
non-finite guard and the best checkpoint (guards), distributed runs, the loss curve and TensorBoard (monitor),
and loading a trained run (loading)."""
