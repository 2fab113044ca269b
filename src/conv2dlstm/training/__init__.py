"""Training libraries: the networks, the data loader, the training loop, devices, several processes and preemption."""
