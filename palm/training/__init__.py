"""Training: the run's configuration (`config`), the loop on accelerate (`loop`) with its
checkpoints (`checkpoints`), metrics (`metrics`) and optimizers (`optim`), and the tasks it runs
(`pretrain`: `palm train`)."""
